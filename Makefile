# Plain targets for newcomers: each creates .venv when missing and installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# make demo TASK=classification|segmentation|detection runs one quickstart; empty or all: the three.
TASK ?= all

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m lightning_convnets.demo --task "$(TASK)"

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_monitors.py

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache .ruff_cache
