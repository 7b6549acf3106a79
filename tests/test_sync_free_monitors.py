"""The three monitors at their defaults add no host synchronisation on steps that do not log.

A ``TorchDispatchMode`` counts ``aten._local_scalar_dense`` (what ``.item()``, ``float(tensor)``,
``bool(tensor)`` and a Python branch on a tensor value dispatch to; ``.cpu()`` / ``.tolist()`` of a CUDA
tensor copy to the host, and ``.tolist()`` reads scalars) from the start of each training batch to its end,
the optimizer step and every callback included, over a fit of a bare LightningModule (a preact ResNet-18
and ``self.log("train/loss", loss)``). The steps that log (the monitors' flushes, the shattering probe at
the first and last step) may read the host; every other step must read nothing more than the bare module
does, which is nothing. The same path runs on every device (no CPU-only host read), so this CPU test
stands for the GPU; ``benchmarks/gpu_check.sh`` runs it again on CUDA with
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning_convnets.callbacks import (
    ActivationVarianceMonitor,
    BatchNormDriftMonitor,
    GradientShatteringMonitor,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from lightning_convnets.backbones import create_backbone

# benchmarks/gpu_check.sh runs this file with SYNC_FREE_DEVICE=cuda: the same fit on the GPU in bf16-mixed and
# channels_last, and torch.cuda.set_sync_debug_mode("error") on every quiet step (any synchronising call
# raises), besides the count
DEVICE = os.environ.get("SYNC_FREE_DEVICE", "cpu")
LOG_EVERY = 10
STEPS = 80  # the dense phase (steps 0-49, every step recorded) and the sparse one (one step in 10 here)


class ScalarReads(TorchDispatchMode):
    """Counts host reads of tensor values (``aten._local_scalar_dense``) and copies to the CPU of
    tensors on another device."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        elif func is torch.ops.aten._to_copy.default:
            source = args[0] if args else None
            device = kwargs.get("device")
            to_host = device is not None and torch.device(device).type == "cpu"
            if to_host and isinstance(source, torch.Tensor) and source.device.type != "cpu":
                self.count += 1
        return func(*args, **kwargs)


class Counter:
    """Enters the mode at the start of each training batch (first callback) and leaves it at its end
    (last callback): everything of the step, every callback's batch hooks included, is counted."""

    def __init__(self) -> None:
        self.per_step: dict[int, int] = {}
        self.mode: ScalarReads | None = None
        self.step = -1


class Enter(pl.Callback):
    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.counter.step = trainer.global_step
        self.counter.mode = ScalarReads()
        self.counter.mode.__enter__()
        if DEVICE == "cuda" and _quiet(trainer.global_step):
            torch.cuda.set_sync_debug_mode("error")


class Leave(pl.Callback):
    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode(0)
        mode = self.counter.mode
        mode.__exit__(None, None, None)
        self.counter.per_step[self.counter.step] = self.counter.per_step.get(self.counter.step, 0) + mode.count


class Bare(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = create_backbone("preact_resnet18", stem="cifar", width=4)
        self.head = nn.Linear(self.net.out_channels[-1], 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x)[-1].mean((2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def _reads(tmp_path, monitors: list[pl.Callback]) -> dict[int, int]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4 * STEPS, 3, 16, 16, generator=gen), torch.randint(0, 3, (4 * STEPS,), generator=gen))
    counter = Counter()
    cuda = DEVICE == "cuda"
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        max_steps=STEPS,
        log_every_n_steps=LOG_EVERY,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[Enter(counter), *monitors, Leave(counter)],
    )
    model = Bare().to(memory_format=torch.channels_last) if cuda else Bare()
    try:
        trainer.fit(model, DataLoader(data, batch_size=4))
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
    assert len(counter.per_step) == STEPS
    return counter.per_step


def _quiet(step: int) -> bool:
    """Neither a logging step (the flush at the end of step ``k * LOG_EVERY - 1``) nor a probe step."""
    return (step + 1) % LOG_EVERY != 0 and step not in (0, STEPS - 1)


@pytest.mark.slow
def test_bare_module_reads_nothing_on_quiet_steps(tmp_path):
    bare = _reads(tmp_path, [])
    assert sum(n for step, n in bare.items() if _quiet(step)) == 0


def test_three_monitors_at_their_defaults_add_no_host_read_on_quiet_steps(tmp_path):
    monitors = [ActivationVarianceMonitor(), BatchNormDriftMonitor(), GradientShatteringMonitor(num_points=16)]
    reads = _reads(tmp_path, monitors)
    quiet = {step: n for step, n in reads.items() if _quiet(step)}
    assert len(quiet) > 50  # dense (recorded) and sparse (mostly unrecorded) steps alike
    assert sum(quiet.values()) == 0, {step: n for step, n in quiet.items() if n}
    # the counter does see the monitors' reads where they are allowed: the logging steps
    assert sum(n for step, n in reads.items() if not _quiet(step)) > 0
    for monitor in monitors[:2]:
        assert len(monitor.history) == STEPS // LOG_EVERY
