"""Fault injection: each fault of docs/reliability.md's table, injected into a real fit, and what the
library does about it.

* a NaN batch on one of two DDP ranks under ``nonfinite="skip"``: both ranks skip the step (one
  all-reduce of the decision per step), and the fit ends bit-identical to a run without that batch;
* ``nonfinite="rollback"`` on the quickstart against a learning rate x100 for a few steps, a NaN batch and
  a corrupted BatchNorm running variance: each run rolls back, completes, and ends within 0.5 point of
  the clean run's validation accuracy (the default suite runs a short setting, ``slow`` the quickstart's);
* BatchNorm statistics bit-identical across two ranks with non-i.i.d. shards after PreciseBN
  (``recalibrate_batchnorm``; the sync before validation and checkpoints is
  ``test_distributed_monitors.py::test_batchnorm_sync_makes_ranks_agree_before_validation_and_checkpoints``).

Exact resume after SIGKILL is tested in ``test_fault_resume.py``.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from ddp_utils import CPU_DDP, QUIET, CollectiveCounter, ddp_env, dump, load_ranks  # noqa: F401
from lightning.pytorch import Callback
from lightning_convnets.callbacks.nonfinite import training_findings
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_convnets.cli import ConvNetsCLI
from lightning_convnets.tasks import ImageClassifier
from lightning_convnets.tasks.nonfinite import RollbackLimitError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ---------------------------------------------------------------------------------------------- faults
class NaNBatch(Callback):
    """Fill the images of the batches of optimizer steps ``step .. step + count - 1`` with NaN (on global
    rank ``rank`` only; ``None``: every rank)."""

    def __init__(self, step: int, rank: int | None = None, count: int = 1) -> None:
        self.step, self.rank, self.count = step, rank, count

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        due = self.step <= trainer.global_step < self.step + self.count
        if due and self.rank in (None, trainer.global_rank):
            batch[0].fill_(float("nan"))


class LearningRateTimes100(Callback):
    """The updates of optimizer steps ``start .. start + steps - 1`` use 100 x the learning rate (a
    misconfigured schedule): the rate is raised around ``optimizer.step`` only, so the schedule and a
    rollback's lowering stay as they are."""

    def __init__(self, start: int, steps: int = 3) -> None:
        self.start, self.steps = start, steps

    def on_train_start(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        original = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            if not self.start <= trainer.global_step < self.start + self.steps:
                return original(*args, **kwargs)
            saved = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] *= 100
            try:
                return original(*args, **kwargs)
            finally:
                for group, lr in zip(optimizer.param_groups, saved):
                    group["lr"] = lr

        optimizer.step = step


class CorruptBatchNorm(Callback):
    """Set the running variance of the middle BatchNorm layer to -1 before optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            layers = [m for m in pl_module.modules() if isinstance(m, _BatchNorm)]
            layers[len(layers) // 2].running_var.fill_(-1.0)


# ------------------------------------------------------------------- part 2: one decision for all ranks
BATCH, DROPPED = 4, 2  # per-rank batch size; the optimizer step whose batch is poisoned / removed


class Shards(pl.LightningDataModule):
    """32 random 16 px images dealt in order (rank r: images r, r + 2, ...), without shuffling;
    ``drop`` removes the images of optimizer step ``drop`` on both ranks (the run "without that batch")."""

    def __init__(self, drop: int | None = None) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        images, labels = torch.randn(32, 3, 16, 16, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        keep = torch.ones(32, dtype=torch.bool)
        if drop is not None:
            keep[drop * BATCH * 2 : (drop + 1) * BATCH * 2] = False
        self.dataset = TensorDataset(images[keep], labels[keep])

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(self.dataset, shuffle=False) if dist.is_initialized() else None
        return DataLoader(self.dataset, batch_size=BATCH, sampler=sampler)


class FinalState(Callback):
    """Dump each rank's parameters, buffers, optimizer state, scheduler state and skip count at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        dump(
            self.folder,
            "final",
            {
                "state": state,
                "optimizer": trainer.optimizers[0].state_dict(),
                "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
                "skipped": pl_module.nonfinite_guard.skipped_steps,
                "steps": trainer.global_step,
            },
        )


def _ddp_fit(folder: Path, callbacks: list[Callback], drop: int | None) -> ImageClassifier:
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(
        "resnet18",
        backbone_kwargs={"width": 4},
        num_classes=3,
        optimizer=partial(torch.optim.AdamW, lr=0.01),  # Adam: its step count enters the update
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5),
        lr_scheduler_interval="step",
        nonfinite="skip",
        num_sample_figures=0,
    )
    counter = CollectiveCounter(folder, owners=[model])
    trainer = pl.Trainer(
        **CPU_DDP,
        **QUIET,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=folder,
        callbacks=[*callbacks, FinalState(folder), counter],
    )
    trainer.fit(model, Shards(drop))
    return model


@pytest.mark.usefixtures("ddp_env")
def test_nan_on_one_rank_is_skipped_by_both_and_equals_the_run_without_that_batch(tmp_path):
    _ddp_fit(tmp_path / "faulted", [NaNBatch(DROPPED, rank=1)], drop=None)
    _ddp_fit(tmp_path / "reference", [], drop=DROPPED)
    faulted = load_ranks(tmp_path / "faulted", "final")
    reference = load_ranks(tmp_path / "reference", "final")
    assert [r["skipped"] for r in faulted] == [[DROPPED], [DROPPED]]  # both ranks skipped that step
    assert [r["steps"] for r in faulted] == [4, 4] and [r["steps"] for r in reference] == [3, 3]
    params = [
        n
        for n, _ in ImageClassifier(
            "resnet18", backbone_kwargs={"width": 4}, num_classes=3
        ).named_parameters()
    ]
    for name in params:  # the replicas agree, and with the run that never saw the batch, bit for bit
        assert torch.equal(faulted[0]["state"][name], faulted[1]["state"][name]), name
        assert torch.equal(faulted[0]["state"][name], reference[0]["state"][name]), name
    for rank in (0, 1):  # BatchNorm statistics (rank-local under DDP) as in the run without the batch
        for name, value in faulted[rank]["state"].items():
            assert torch.equal(value, reference[rank]["state"][name]), (rank, name)
        # the optimizer's step count and moments, and the schedule, did not move on the skipped step
        ours, theirs = faulted[rank]["optimizer"]["state"], reference[rank]["optimizer"]["state"]
        for index, state in ours.items():
            for key, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(theirs[index][key])), (index, key)
        assert faulted[rank]["scheduler"]["last_epoch"] == reference[rank]["scheduler"]["last_epoch"] == 3
        assert (
            faulted[rank]["optimizer"]["param_groups"][0]["lr"]
            == reference[rank]["optimizer"]["param_groups"][0]["lr"]
        )
    # what the agreement costs: one all-reduce per optimizer step, issued by the task, inside the batch
    for calls in load_ranks(tmp_path / "faulted", "collectives"):
        in_steps = [(c["op"], c["step"]) for c in calls if c["in_batch"] and c["owner"] == "ImageClassifier"]
        assert in_steps == [("all_reduce", step) for step in range(4)], calls


# ------------------------------------------------------------------------------- part 3: rollback
SHORT = {"num_train": 1024, "batch_size": 32, "max_epochs": 3, "width": 4}  # 96 steps, ~4 CPU-s a fit
# measured (quickstart sizes, one thread): clean 0.990; NaN batch 0.990; BN variance -1 0.990; learning rate
# x100 for 2 steps: one rollback; for 3 steps: two rollbacks (learning rate x0.25 for the second half), 0.950
QUICKSTART = {"num_train": 4000, "batch_size": 64, "max_epochs": 3, "width": 8}  # the config's sizes


def _quickstart(
    tmp_path: Path, size: dict[str, int], fault: Callback | list[Callback] | None, **model: Any
) -> tuple[float, Any]:
    """The quickstart config (optimizer, schedule, seed, data) through the CLI, at ``size``, with ``fault``
    (one callback or several); returns the final ``val/acc`` and the model."""
    args = [
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        "--trainer.accelerator=cpu",
        f"--trainer.max_epochs={size['max_epochs']}",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.init_args.backbone_kwargs={{stem: cifar, width: {size['width']}}}",
        "--model.init_args.num_sample_figures=0",
        f"--data.init_args.num_train={size['num_train']}",
        "--data.init_args.num_val=200",
        "--data.init_args.num_test=8",
        f"--data.init_args.batch_size={size['batch_size']}",
        f"--data.init_args.root={tmp_path.parent / 'shapes'}",
        *[f"--model.init_args.{k}={v}" for k, v in model.items()],
    ]
    cli = ConvNetsCLI(args=args, run=False)
    if fault is not None:
        cli.trainer.callbacks.extend(fault if isinstance(fault, list) else [fault])
    cli.trainer.fit(cli.model, cli.datamodule)
    return float(cli.trainer.callback_metrics["val/acc"]), cli.model


ROLLBACK = {"nonfinite": "rollback", "spike_threshold": 8, "snapshot_every_n_steps": 10}
FAULTS = {
    "lr_x100": lambda steps: LearningRateTimes100(steps // 2, steps=2),
    "nan_batch": lambda steps: NaNBatch(steps // 2),
    "bn_variance": lambda steps: CorruptBatchNorm(steps // 2),
}
CAUSES = {"lr_x100": "loss spike", "nan_batch": "non-finite loss", "bn_variance": "invalid BatchNorm"}


@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory) -> Any:
    """The clean run's val/acc per size, computed once (under rollback: a healthy run never rolls back)."""
    cache: dict[str, float] = {}

    def get(name: str, size: dict[str, int]) -> float:
        if name not in cache:
            acc, model = _quickstart(tmp_path_factory.mktemp(f"clean-{name}"), size, None, **ROLLBACK)
            assert model.nonfinite_guard.rollbacks == [], model.nonfinite_guard.rollback_summary()
            cache[name] = acc
        return cache[name]

    return get


def _check_rollback(tmp_path: Path, size: dict[str, int], fault: str, clean: float | None) -> None:
    steps = size["num_train"] // size["batch_size"] * size["max_epochs"]
    with pytest.warns(UserWarning, match="rollback 1 of at most 5"):
        acc, model = _quickstart(tmp_path, size, FAULTS[fault](steps), **ROLLBACK)
    rollbacks = model.nonfinite_guard.rollbacks
    assert rollbacks and all(CAUSES[fault] in r["cause"] for r in rollbacks), rollbacks
    assert all(r["step"] >= steps // 2 and "learning rate x0.5" in r["action"] for r in rollbacks)
    if fault == "nan_batch":  # the NaN enters at the first convolution; the diagnosis gets a row per rollback
        assert rollbacks[0]["module"] == "backbone.conv1"
        rows = training_findings(model)
        assert [(f.kind, f.step, f.layers) for f in rows] == [("rollback", steps // 2, ["backbone.conv1"])]
    if fault == "bn_variance":  # the corrupted layer is named
        assert rollbacks[0]["module"] and "bn" in rollbacks[0]["module"]
    assert all(torch.isfinite(p).all() for p in model.parameters()) and acc > 0
    if clean is not None:  # within 0.5 point of the clean run
        assert abs(acc - clean) <= 0.005, (fault, acc, clean)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_rollback_recovers_from_the_fault_short(tmp_path, fault):
    # 96 steps do not converge (val/acc about 0.4): the run must complete, roll back for the right cause
    # and end finite; the 0.5-point comparison needs the quickstart's length (the slow test below)
    _check_rollback(tmp_path, SHORT, fault, None)


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
def test_rollback_recovers_from_the_fault_on_the_quickstart(tmp_path, fault, clean_runs):
    _check_rollback(tmp_path, QUICKSTART, fault, clean_runs("quickstart", QUICKSTART))


def test_rollback_gives_up_with_a_named_error_listing_every_rollback(tmp_path):
    size = dict(SHORT, max_epochs=1)
    # two NaN batches in a row: the first rolls back, the second gives up
    with pytest.raises(
        RollbackLimitError, match=r"step 11 .*max_rollbacks=1 rollbacks.*step 10: non-finite loss"
    ):
        _quickstart(tmp_path, size, NaNBatch(10, count=2), **dict(ROLLBACK, max_rollbacks=1))


def test_the_diagnosis_lists_every_rollback_and_the_monitors_record_the_skips(tmp_path):
    from lightning_convnets.callbacks import BatchNormDriftMonitor

    size = dict(SHORT, max_epochs=1)
    steps = size["num_train"] // size["batch_size"]
    monitor = BatchNormDriftMonitor(log_every_n_steps=4)
    fault = NaNBatch(steps // 2)
    with pytest.warns(UserWarning, match="rollback 1 of at most 5"):
        _, cli_model = _quickstart(tmp_path, size, [fault, monitor], **ROLLBACK)
    rows = json.loads((tmp_path / "diagnosis.json").read_text())
    rollbacks = [r for r in rows if r["kind"] == "rollback"]
    assert [(r["step"], r["layers"]) for r in rollbacks] == [(steps // 2, ["backbone.conv1"])], rows
    assert cli_model.nonfinite_guard.skipped == 1
    skipped = [e["batchnorm/skipped_steps"] for e in monitor.history]
    assert skipped[0] == 0 and skipped[-1] == 1, skipped  # the monitor's record shows the step it did not see

