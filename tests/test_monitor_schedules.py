"""The monitors' default schedules: derived from cost, deterministic, resumable, free on quiet steps.

* activation and BatchNorm monitors: every step for the first ``DEFAULT_DENSE_STEPS``, then one step in
  ``min(DEFAULT_SAMPLE_PERIOD, log interval)``; an explicit ``sample_every_n_steps`` wins (no dense phase);
* their forward hooks are in the modules on recorded steps only;
* the shattering probe's interval comes from the batch size (a probe ~1% of its interval), is fixed at the
  first batch and checkpointed; an explicit ``every_n_steps`` wins;
* training is bit-identical with and without the monitors, and a run killed and resumed from a
  checkpoint logs the same history as one that was not.
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_convnets.callbacks import (
    ActivationVarianceMonitor,
    BatchNormDriftMonitor,
    GradientShatteringMonitor,
)
from lightning_convnets.callbacks.core import MonitorCallback
from lightning_convnets.callbacks.schedule import DEFAULT_DENSE_STEPS, DEFAULT_SAMPLE_PERIOD
from lightning_convnets.callbacks.shattering import PROBE_BUDGET, PROBE_POINT_COST, default_probe_interval
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_convnets.backbones import create_backbone


class _Trainerless:
    log_every_n_steps = 50


def test_default_schedule_is_dense_then_sparse_and_explicit_wins():
    monitor = ActivationVarianceMonitor()
    trainer = _Trainerless()
    recorded = [s for s in range(200) if monitor.records(s, trainer)]
    assert recorded == list(range(DEFAULT_DENSE_STEPS)) + list(range(DEFAULT_DENSE_STEPS, 200, DEFAULT_SAMPLE_PERIOD))
    assert BatchNormDriftMonitor().records(100, trainer) and not BatchNormDriftMonitor().records(75, trainer)
    # every logging interval gets a recorded step, even when it is shorter than the sampling period
    short = ActivationVarianceMonitor(log_every_n_steps=10)  # one recorded step per interval
    assert [s for s in range(60, 100) if short.records(s)] == [60, 70, 80, 90]
    # an explicit period wins, with no dense phase unless asked for
    assert [s for s in range(9) if ActivationVarianceMonitor(sample_every_n_steps=3).records(s)] == [0, 3, 6]
    every = BatchNormDriftMonitor(sample_every_n_steps=1)
    assert all(every.records(s, trainer) for s in range(300))
    dense = ActivationVarianceMonitor(sample_every_n_steps=4, dense_steps=6)
    assert [s for s in range(13) if dense.records(s)] == [0, 1, 2, 3, 4, 5, 8, 12]
    with pytest.raises(ValueError, match="dense_steps"):
        ActivationVarianceMonitor(dense_steps=-1)
    with pytest.raises(ValueError, match="sample_every_n_steps"):
        BatchNormDriftMonitor(sample_every_n_steps=0)


def test_probe_interval_keeps_a_probe_under_its_budget_at_every_batch_size():
    for batch in (1, 8, 16, 64, 128, 1000):
        for points in (16, 256, 1024):
            every = default_probe_interval(points, batch)
            assert every % 100 == 0 and every >= 100
            assert PROBE_POINT_COST * points / batch <= PROBE_BUDGET * every  # at most ~1% of the interval
    assert default_probe_interval(256, 16) == 2200
    assert default_probe_interval(256, 8, accumulate_grad_batches=2) == 2200  # the optimizer step's images
    with pytest.raises(ValueError, match="batch_size"):
        default_probe_interval(256, 0)


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = create_backbone("preact_resnet18", stem="cifar", width=4)
        self.head = nn.Linear(self.net.out_channels[-1], 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x)[-1].mean((2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)


def _loader() -> DataLoader:
    # one batch an epoch: every step sees the same batch, so a resumed run's data cannot differ from an
    # uninterrupted one's, however Lightning counts a checkpoint's epoch on resume
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 3, (4,), generator=gen))
    return DataLoader(data, batch_size=4)


def _fit(root, monitors, max_steps, ckpt_path=None, checkpoint=None) -> Net:
    torch.manual_seed(1)
    model = Net()
    callbacks = [*monitors, *([checkpoint] if checkpoint else [])]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        log_every_n_steps=10,
        logger=False,
        enable_checkpointing=checkpoint is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
    )
    trainer.fit(model, _loader(), ckpt_path=ckpt_path)
    return model


class HookWatch(pl.Callback):
    """Forward hooks present in the network during each step (seen from the first forward's pre-hook)."""

    def __init__(self) -> None:
        self.per_step: dict[int, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pass

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pl_module.net.modules())
        self.per_step[trainer.global_step] = hooks


def _three() -> list[MonitorCallback]:
    return [ActivationVarianceMonitor(), BatchNormDriftMonitor(), GradientShatteringMonitor(num_points=16)]


def test_defaults_train_bit_identically_hook_only_recorded_steps_and_resume_to_the_same_history(tmp_path):
    steps = 80  # the dense phase (0-49) and the sparse one (recorded: 50, 60, 70 at a log interval of 10)
    watch = HookWatch()
    monitors = _three()
    watched = _fit(tmp_path / "full", [watch, *monitors], steps)
    bare = _fit(tmp_path / "bare", [], steps)
    for got, want in zip(watched.state_dict().values(), bare.state_dict().values(), strict=True):
        assert torch.equal(got, want)  # observing changes nothing, dense and sparse alike

    hooked = {step for step, count in watch.per_step.items() if count}
    assert hooked == set(range(50)) | {50, 60, 70}
    activation, batchnorm, shattering = monitors
    assert [h["step"] for h in activation.history] == [float(s) for s in range(10, steps + 1, 10)]
    assert [h["step"] for h in batchnorm.history] == [float(s) for s in range(10, steps + 1, 10)]
    # the probe interval from the batch (4 images, 16 points): 1.35 * 16 / 4 / 1% = 540 -> 600 steps;
    # probes at step 0 and, with the derived schedule, at the end of fit
    assert shattering.probe_interval == 600
    assert [h["step"] for h in shattering.history] == [0.0, float(steps)]

    # a checkpoint at step 60 and the run stopped there, resumed: the same history, the same schedule
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=60, save_top_k=-1, filename="{epoch}")
    _fit(tmp_path / "killed", _three(), 60, checkpoint=checkpoint)
    resumed = _three()
    model = _fit(tmp_path / "resumed", resumed, steps, ckpt_path=str(tmp_path / "ckpt" / "epoch=59.ckpt"))
    for got, want in zip(model.state_dict().values(), bare.state_dict().values(), strict=True):
        assert torch.equal(got, want)
    for mine, theirs in zip(resumed[:2], monitors[:2], strict=True):
        assert mine.history == theirs.history
    # the probes too (the checkpoint was written before the stopped run's end probe), timings aside
    assert resumed[2].probe_interval == 600

    def untimed(history):
        return [{k: v for k, v in h.items() if not k.endswith("probe_seconds")} for h in history]

    assert untimed(resumed[2].history) == untimed(shattering.history)


def test_stored_probe_interval_survives_a_resume_with_another_batch_size():
    monitor = GradientShatteringMonitor()
    monitor.load_extra_state({"probe_interval": 2200, "last_probe_step": 0})
    assert monitor.probe_interval == 2200  # not re-derived from the resumed run's first batch
    explicit = GradientShatteringMonitor(every_n_steps=300)
    explicit.load_extra_state({"probe_interval": 2200, "last_probe_step": 0})
    assert explicit.probe_interval == 300  # an explicit interval wins


class _Block(nn.Module):
    """A residual block (protocol 2: ``residual_branch``) whose output is scaled by :attr:`scale`."""

    residual_branch = "branch"

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.branch(x)) * self.scale


class LateBlowUp(pl.LightningModule):
    """Healthy until optimizer step ``blow_up_at``; from then on a side block (an auxiliary probe whose
    output the loss does not use, so the weights stay finite and the pathology stays where it started)
    produces NaN/Inf at every forward."""

    def __init__(self, blow_up_at: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blow_up_at = blow_up_at
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(_Block(4), _Block(4))
        self.probe = _Block(4)
        self.head = nn.Linear(4, 3)
        self.blown_up_at: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(self.stem(x))
        self.probe(features)
        return self.head(features.mean((2, 3)))

    def training_step(self, batch, batch_idx):
        if self.global_step >= self.blow_up_at and self.blown_up_at is None:
            self.probe.scale, self.blown_up_at = float("inf"), self.global_step
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)


def test_sparse_phase_still_catches_a_late_nonfinite_and_the_diagnosis_names_it(tmp_path):
    late = DEFAULT_DENSE_STEPS + 13  # inside the sparse phase, between two recorded steps
    model = LateBlowUp(blow_up_at=late)
    monitors = [ActivationVarianceMonitor(), BatchNormDriftMonitor()]  # the defaults
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=late + 30,
        log_every_n_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=monitors,
    )
    trainer.fit(model, _loader())
    assert model.blown_up_at == late
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the blow-up stayed in the probe
    # the sparse phase records one step per logging interval (10 here): the first recorded step after the
    # blow-up at step 63 is step 70
    seen = next(s for s in range(late, late + 30) if monitors[0].records(s, trainer))
    assert seen == late + 7
    assert monitors[0].nonfinite == {"step": seen, "layer": "probe"}
    (path,) = list(tmp_path.rglob("diagnosis.json"))
    report = json.loads(path.read_text())
    findings = report["findings"] if isinstance(report, dict) else report
    nonfinite = [f for f in findings if f["kind"] == "nonfinite"]
    assert len(nonfinite) == 1 and nonfinite[0]["layers"] == ["probe"] and nonfinite[0]["step"] == seen
    assert "probe at step 70" in nonfinite[0]["message"]
