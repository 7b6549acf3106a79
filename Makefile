# Plain targets for newcomers: each creates .venv when missing and installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# make demo TASK=classification|segmentation|detection runs one quickstart; empty or all: the three.
TASK ?= all

.PHONY: demo test docs bench zoo install clean

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

# The documentation site from docs/ (mkdocs.yml) into build/site; fails on a broken link or docstring.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

$(VENV)/.docs-installed: $(STAMP)
	$(BIN)/python -m pip install -e ".[docs]"
	touch $@

# Every table of benchmarks/results (CPU; a quiet machine gives the README's numbers; 20-40 min).
bench: $(STAMP)
	$(BIN)/python -m pip install -e ".[export]"
	$(BIN)/python benchmarks/bench_monitors.py
	$(BIN)/python benchmarks/bench_tasks.py
	$(BIN)/python benchmarks/bench_inference.py
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_scaling.py

# is the end-of-fit diagnosis right? known pathologies and healthy twins, 3 seeds (~5 min on 2 CPU cores)
zoo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/diagnosis_zoo.py

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache .ruff_cache
