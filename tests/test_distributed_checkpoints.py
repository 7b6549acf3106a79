"""Checkpoints cross world sizes: written on 2 ranks, resumed in one process, and back to 2 ranks.

Each resume must restart from exactly the saved weights, optimizer state, step and epoch, and the
monitors' histories must continue (their state travels in the checkpoint's callback states). The runs
stop at epoch ends (16 images: 2 steps per epoch on 2 ranks, 4 in one process), the checkpoint a
``ModelCheckpoint`` writes by default.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from ddp_utils import QUIET, ShardedTinyData, TinyResNet, ddp_env, dump, load_ranks  # noqa: F401 (fixture)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning_convnets.callbacks import (
    ActivationVarianceMonitor,
    BatchNormDriftMonitor,
    GradientShatteringMonitor,
)

pytestmark = pytest.mark.usefixtures("ddp_env")


class ResumeProbe(Callback):
    """Per rank: does the run start from the checkpoint exactly? And where did it end?"""

    def __init__(self, folder: Path, name: str, checkpoint: Path | None) -> None:
        self.folder, self.name, self.checkpoint = folder, name, checkpoint
        self.record: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        if self.checkpoint is None:
            return
        saved = torch.load(self.checkpoint, weights_only=False)
        state = pl_module.state_dict()
        self.record["weights"] = state.keys() == saved["state_dict"].keys() and all(
            torch.equal(v, saved["state_dict"][k]) for k, v in state.items()
        )
        current = trainer.optimizers[0].state_dict()["state"]
        expected = saved["optimizer_states"][0]["state"]
        self.record["optimizer"] = current.keys() == expected.keys() and all(
            torch.equal(current[i]["momentum_buffer"], expected[i]["momentum_buffer"]) for i in expected
        )
        self.record["start"] = (trainer.current_epoch, trainer.global_step)
        self.record["saved"] = (saved["epoch"], saved["global_step"])

    def on_train_end(self, trainer, pl_module) -> None:
        self.record["end"] = (trainer.current_epoch, trainer.global_step)
        for callback in trainer.callbacks:
            if hasattr(callback, "history") and hasattr(callback, "monitor_name"):
                self.record[callback.monitor_name] = [int(h["step"]) for h in callback.history]
        dump(self.folder, self.name, self.record)


def _fit(root: Path, name: str, epochs: int, world: int, resume: Path | None) -> Path:
    folder = root / name
    saver = ModelCheckpoint(dirpath=folder / "ckpt", save_last=True)
    monitors = [
        ActivationVarianceMonitor(log_every_n_steps=1),
        BatchNormDriftMonitor(log_every_n_steps=1),
        GradientShatteringMonitor(every_n_steps=2, num_points=8),
    ]
    placement = {"accelerator": "cpu", "devices": world}
    if world > 1:
        placement["strategy"] = "ddp_fork"
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        default_root_dir=folder,
        logger=False,
        callbacks=[*monitors, ResumeProbe(root, name, resume), saver],
        max_epochs=epochs,
        limit_val_batches=0,
        **placement,
        **QUIET,
    )
    trainer.fit(TinyResNet(), ShardedTinyData(num=16, batch_size=4), ckpt_path=resume)
    return folder / "ckpt" / "last.ckpt"


def test_checkpoints_resume_from_two_ranks_to_one_process_and_back(tmp_path):
    first = _fit(tmp_path, "ddp", epochs=1, world=2, resume=None)
    second = _fit(tmp_path, "single", epochs=2, world=1, resume=first)
    _fit(tmp_path, "ddp_again", epochs=3, world=2, resume=second)

    ddp = load_ranks(tmp_path, "ddp")
    assert [r["end"] for r in ddp] == [(1, 2)] * 2  # one epoch of 2 steps per rank

    (single,) = load_ranks(tmp_path, "single", world=1)
    assert single["weights"] and single["optimizer"], (
        "the one-process run did not start from the 2-rank state"
    )
    assert single["saved"] == (0, 2) and single["start"] == (1, 2) and single["end"] == (2, 6)

    for record in load_ranks(tmp_path, "ddp_again"):
        assert record["weights"] and record["optimizer"], "a rank did not start from the 1-process state"
        assert record["saved"] == (1, 6) and record["start"] == (2, 6) and record["end"] == (3, 8)

    # the monitors' curves continue across the changes of world size (rank zero's; one logs once per step)
    (zero, one) = load_ranks(tmp_path, "ddp_again")
    assert zero["activation_variance"] == list(range(1, 9)) == zero["batchnorm"]
    assert single["activation_variance"] == list(range(1, 7))
    # rank one restored the history it was handed and probed nothing itself
    assert zero["shattering"] == [0, 2, 4, 6, 8] and one["shattering"] == [0, 2, 4, 6]
