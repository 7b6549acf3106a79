"""Shared test setup: CPU only, no network, quiet matplotlib, one intra-op thread."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm / smp must never reach the hub in tests
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# every monitor in this suite is strict (re-raises instead of switching itself off) unless a test says
# otherwise: nothing hides behind the guard here
os.environ.setdefault("LIGHTNING_CONVNETS_STRICT_MONITORS", "1")
# num_workers="auto" (the data modules' default) starts no worker processes in the suite on any machine:
# tiny generated datasets, where workers would only add start-up time (the rule has its own tests)
os.environ.setdefault("LIGHTNING_CONVNETS_NUM_WORKERS", "0")

import pytest
import torch

# The tests use tiny models: on a 2-core CI machine two OpenMP threads spend more time waiting on each
# other than computing (measured up to 7x slower), so the whole suite runs single-threaded.
torch.set_num_threads(1)



@pytest.fixture
def class_count_error(tmp_path):
    """The error a fit raises when a task's class count disagrees with its datamodule: the one check
    (``ConvNetTask.check_datamodule``, run in ``setup``, before the first step)."""

    def run(model, datamodule) -> str:
        import lightning.pytorch as pl

        trainer = pl.Trainer(
            max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path,
        )  # fmt: skip
        with pytest.raises(ValueError) as caught:
            trainer.fit(model, datamodule)
        return str(caught.value)

    return run


@pytest.fixture(autouse=True, scope="session")
def _nothing_written_into_the_repository_root():
    """A test writes into its ``tmp_path``, never into the working tree: a Trainer without
    ``default_root_dir`` puts ``lightning_logs/`` and the monitors' ``diagnosis.*`` into the working
    directory. Fails the session naming what appeared (hidden files and caches aside)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def entries() -> set[str]:
        return {p.name for p in root.iterdir() if not p.name.startswith((".", "__"))}

    before = entries()
    yield
    new = sorted(entries() - before)
    assert not new, f"tests wrote into the repository root: {new} (give the Trainer default_root_dir=tmp_path)"
