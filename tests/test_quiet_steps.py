"""What the monitors do on a quiet step (neither recorded nor flushed): no forward hook in any module, and
no per-parameter tensor work. The optimization monitor's gradient norms: every step on a GPU, on recorded
steps only on a CPU (``grad_norms_every_step=None``); the loss is recorded every step either way, so a
spike on a quiet step is still found; with the norms off its cause is said to be unknown, not "the batch".
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning_convnets.callbacks import (
    ActivationVarianceMonitor,
    BatchNormDriftMonitor,
    OptimizationMonitor,
    ThroughputMonitor,
)
from lightning_convnets.callbacks.loss_spikes import StepRing, find_spikes, loss_spike_finding
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_convnets.backbones import create_backbone

SPIKE_AT = 75  # a quiet step: past the dense phase (50), not a multiple of the log interval (10)


class Net(pl.LightningModule):
    def __init__(self, spike_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = create_backbone("preact_resnet18", stem="cifar", width=4)
        self.head = nn.Linear(self.net.out_channels[-1], 3)
        self.spike_at = spike_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x)[-1].mean((2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        return loss * 60.0 if self.global_step == self.spike_at else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class StepWatch(pl.Callback):
    """Per optimizer step: forward hooks in the network's modules, and ``torch._foreach_norm`` calls."""

    def __init__(self) -> None:
        self.hooks: dict[int, int] = {}
        self.norms: dict[int, int] = {}
        self.batch_step = -1  # the optimizer step of the batch running (global_step moves on inside it)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_step = trainer.global_step

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.hooks[trainer.global_step] = sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pl_module.modules()
        )


def _fit(tmp_path, monitors, steps: int, spike_at: int | None = None, monkeypatch=None) -> StepWatch:
    watch = StepWatch()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        log_every_n_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[watch, *monitors],
    )
    real = torch._foreach_norm

    def counted(*args, **kwargs):
        step = watch.batch_step
        watch.norms[step] = watch.norms.get(step, 0) + 1
        return real(*args, **kwargs)

    if monkeypatch is not None:
        monkeypatch.setattr(torch, "_foreach_norm", counted)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 3, (4,), generator=gen))
    trainer.fit(Net(spike_at), DataLoader(data, batch_size=4))
    return watch


def test_quiet_steps_hold_no_hook_and_measure_no_gradient_norm_on_a_cpu(tmp_path, monkeypatch):
    steps = 90
    monitors = [
        ActivationVarianceMonitor(),
        BatchNormDriftMonitor(),
        OptimizationMonitor(),
        ThroughputMonitor(count_flops=False, sync_steps=()),
    ]
    watch = _fit(tmp_path, monitors, steps, monkeypatch=monkeypatch)
    recorded = set(range(50)) | {50, 60, 70, 80}
    assert {s for s, n in watch.hooks.items() if n} == recorded
    # one _foreach_norm per recorded step (the gradient norms) plus the update meter's two; none between
    assert set(watch.norms) == recorded
    optimization = monitors[2]
    assert optimization.failure is None and optimization._norms_every_step is False
    # the loss of every step is still searched: the medians of the sparse phase's intervals are logged
    assert all("optimization/loss_median" in h for h in optimization.history)
    # a sparse interval's gradient norm is its recorded step's (the mean over the steps with norms)
    assert all(
        math.isfinite(v) for h in optimization.history for k, v in h.items() if k.endswith("/grad_norm")
    )


@pytest.mark.parametrize("every", [None, True])
def test_a_spike_on_a_quiet_step_is_found_with_its_cause_only_when_norms_are_per_step(tmp_path, every):
    monitor = OptimizationMonitor(grad_norms_every_step=every)
    _fit(tmp_path, [monitor], SPIKE_AT + 10, spike_at=SPIKE_AT)
    spikes = [s for s in monitor.spikes if s.step == SPIKE_AT]
    assert len(spikes) == 1
    (finding,) = [f for f in monitor.diagnose(None, None) if f.kind == "loss_spike" and f.step == SPIKE_AT]
    if every:
        assert spikes[0].jump is not None and spikes[0].jump.step == SPIKE_AT and spikes[0].norms_recorded
        assert "jumped first" in finding.message
    else:  # the CPU default: the spike is found, its cause is said to be unmeasured (not "look at the batch")
        assert spikes[0].jump is None and not spikes[0].norms_recorded
        assert "not measured" in finding.message and "grad_norms_every_step=True" in finding.message
        assert "look at the batch" not in finding.message


def test_a_step_without_norms_is_unknown_not_quiet_and_old_ring_rows_still_load():
    steps = list(range(40))
    losses = [1.0 + 0.01 * (i % 3) for i in range(40)]
    losses[35] = 9.0
    grads = torch.ones(40, 2)
    grads[30:] = math.nan  # the steps before the spike have no norms
    (spike,) = find_spikes(steps, losses, grads, ["a", "b"], first_new=0)
    assert spike.step == 35 and spike.jump is None and not spike.norms_recorded
    assert "not measured" in loss_spike_finding(spike, "optimization").message
    grads[30:] = 1.0  # measured and flat: the batch is blamed
    (spike,) = find_spikes(steps, losses, grads, ["a", "b"], first_new=0)
    assert spike.norms_recorded and "look at the batch" in loss_spike_finding(spike, "optimization").message

    ring = StepRing(capacity=4, params=2, device=torch.device("cpu"))
    ring.begin(3)
    ring.stepped_unmeasured(0)
    state = ring.state()
    assert state["rows"] == [[0, 3, 0, [], [0]]]
    again = StepRing(capacity=4, params=2, device=torch.device("cpu"))
    assert again.load(state) and again.unmeasured() == [frozenset({0})]
    state["rows"] = [row[:4] for row in state["rows"]]  # a checkpoint written before this field
    assert (
        again.load(state) and again.rows() == [(3, 0, 0, frozenset())] and again.unmeasured() == [frozenset()]
    )


def test_grad_norms_every_step_is_an_option_of_the_cli_and_the_python_api(tmp_path):
    from lightning_convnets.cli import ConvNetsCLI

    assert OptimizationMonitor().grad_norms_every_step is None
    with pytest.raises(ValueError, match="spike_window"):  # a neighbour's check still names its argument
        OptimizationMonitor(spike_window=2)
    args = [
        "fit",
        "--model=ImageClassifier",
        "--model.backbone=resnet18",
        "--data=ShapesDataModule",
        "--data.num_train=16",
        "--data.num_val=8",
        "--data.image_size=32",
        "--data.batch_size=8",
        "--trainer.max_steps=2",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--trainer.callbacks+=lightning_convnets.callbacks.OptimizationMonitor",
        "--trainer.callbacks.grad_norms_every_step=true",
    ]
    cli = ConvNetsCLI(args=args, run=True)
    (monitor,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, OptimizationMonitor)]
    assert monitor.grad_norms_every_step is True and monitor._norms_every_step is True  # on a CPU too
    assert monitor.failure is None
