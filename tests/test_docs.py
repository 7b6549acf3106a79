"""The docs are executed: every shell, Python and YAML block of README.md and docs/ runs (fast mode) or is
marked not runnable here with a reason from one list (``tests/docs_runner.py``)."""

from __future__ import annotations

from pathlib import Path

import docs_runner as runner
import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("page", runner.pages(), ids=lambda p: str(p.relative_to(runner.ROOT)))
def test_every_block_of_the_page_runs(page: Path, tmp_path: Path):
    state = runner.run_page(page, tmp_path / "work")  # raises on the first block that fails
    for line in state.not_run:  # shown with -rP; every reason comes from the runner's two tables
        print("not run:", line)
    blocks = runner.read_blocks(page)
    handled = {line.split(": ", 1)[0] for line in state.ran + state.not_run}
    assert {b.where for b in blocks} == handled  # no block passed over in silence


def test_the_parser_reads_fences_markers_continuations_and_chains(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(
        "# T\n\n"
        "```bash\n"
        "lightning-convnets fit --config a.yaml \\\n    --trainer.max_epochs 2   # comment\n"
        "python -m venv .venv && . .venv/bin/activate\n"
        "```\n"
        "<!-- docs: not-run gpu -->\n"
        "```bash\nCUDA_VISIBLE_DEVICES=0,1 lightning-convnets fit\n```\n"
        "```python\nx = 1\n```\n"
    )
    blocks = runner.read_blocks(page)
    assert [(b.lang, b.line, b.not_run) for b in blocks] == [("bash", 3, None), ("bash", 9, "gpu"), ("python", 12, None)]
    assert runner.shell_commands(blocks[0].text) == [
        ["lightning-convnets", "fit", "--config", "a.yaml", "--trainer.max_epochs", "2"],
        ["python", "-m", "venv", ".venv"],
        [".", ".venv/bin/activate"],
    ]


def _page(tmp_path: Path, body: str) -> Path:
    page = tmp_path / "page.md"
    page.write_text(body)
    return page


def test_an_unknown_program_fails_instead_of_being_skipped(tmp_path: Path):
    page = _page(tmp_path, "```bash\nrm -rf lightning_logs\n```\n")
    with pytest.raises(AssertionError, match="`rm` is not known to the docs runner"):
        runner.run_page(page, tmp_path / "w")


def test_a_marker_needs_a_reason_from_the_list(tmp_path: Path):
    page = _page(tmp_path, "<!-- docs: not-run because -->\n```bash\nsbatch x\n```\n")
    with pytest.raises(AssertionError, match="unknown not-run reason 'because'"):
        runner.run_page(page, tmp_path / "w")


def test_a_failing_python_block_fails_the_page(tmp_path: Path):
    page = _page(tmp_path, "```python\nx = 1\n```\n\n```python\nassert x == 2, 'x is wrong'\n```\n")
    with pytest.raises(AssertionError, match="x is wrong"):
        runner.run_page(page, tmp_path / "w")


def test_pip_install_of_an_unpublished_name_or_a_missing_extra_fails(tmp_path: Path):
    state = runner.PageState(workspace=tmp_path)
    with pytest.raises(AssertionError, match="installed from a clone"):
        runner._pip(["install", "lightning-convnets[export]"], state)
    with pytest.raises(AssertionError, match="no extra 'gpu'"):
        runner._pip(["install", "-e", ".[gpu]"], state)
    assert "checked" in runner._pip(["install", "-e", ".[dev,export]"], state)


def test_a_yaml_block_with_a_wrong_argument_fails(tmp_path: Path):
    page = _page(
        tmp_path,
        "```yaml\ntrainer:\n  callbacks:\n    - class_path: lightning_convnets.callbacks.BatchNormDriftMonitor\n"
        "      init_args:\n        synch: pooled\n```\n",
    )
    with pytest.raises(AssertionError, match="takes no 'synch'"):
        runner.run_page(page, tmp_path / "w")


def test_a_placeholder_before_any_fit_is_an_error(tmp_path: Path):
    page = _page(tmp_path, "```bash\nlightning-convnets test --ckpt_path '<best checkpoint printed by fit>'\n```\n")
    with pytest.raises(AssertionError, match="used before any fit"):
        runner.run_page(page, tmp_path / "w")
