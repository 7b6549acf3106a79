"""Helpers for the multi-process tests (tests/test_distributed*.py).

The 2-rank tests run Lightning's ``ddp_fork`` strategy on CPU (gloo) inside the pytest process: each fit
forks two workers that inherit everything already imported, so a run costs seconds, not a re-import.
What happens inside a worker is invisible to the parent except through files, so tests record per-rank
facts with :func:`dump` (``<name>-rank<r>.pt`` under a folder) and read them back with :func:`load_ranks`.

Pieces:

* :func:`ddp_env` (fixture): restores ``os.environ`` (Lightning sets ``MASTER_PORT`` in the parent;
  workers set ``MASTER_ADDR``/``RANK``/``WORLD_SIZE``/``LOCAL_RANK``...), and fails the test if a child
  process outlives it, if the parent was left with an initialised process group, or if the port the run
  used is still bound.
* :class:`CollectiveCounter`: a callback that wraps the ``torch.distributed`` collectives inside each
  worker and records every call with the step, whether it ran inside a training batch, and which monitor
  (if any) issued it.
* :class:`TinyResNet`: a LightningModule with a stem, two residual blocks (summed through
  :class:`~lightning_convnets.nn.ResidualAdd`) and BatchNorm, plus :class:`ShardedTinyData`.
"""

from __future__ import annotations

import contextlib
import csv
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_convnets.nn import ResidualAdd

WORLD = 2
CPU_DDP: dict[str, Any] = {"accelerator": "cpu", "devices": WORLD, "strategy": "ddp_fork"}
"""Trainer arguments of the in-process 2-rank runs."""

QUIET: dict[str, Any] = {
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}

_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "gather_object",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "barrier",
)


# --------------------------------------------------------------------------------------------------
# Hygiene
# --------------------------------------------------------------------------------------------------


def child_pids() -> set[int]:
    """Live (or unreaped) child processes of this process, from /proc."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            pids.update(int(p) for p in (task / "children").read_text().split())
        except OSError:  # a thread that ended while we looked
            continue
    return pids


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def ddp_hygiene() -> Iterator[None]:
    """Around code that launches ranks: restore the environment, then fail on leaked processes or ports.

    Lightning's launcher writes ``MASTER_PORT`` into the parent's environment (a later run would reuse the
    port) and ``seed_everything`` writes ``PL_GLOBAL_SEED``; the workers set ``MASTER_ADDR``, ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``... in their own copies. Everything is put back as it was, then: no child
    process may outlive the block, the parent must hold no process group, and the run's port must be free.
    """
    saved = dict(os.environ)
    children_before = child_pids()
    assert not (dist.is_available() and dist.is_initialized()), "a process group was already initialised"
    try:
        yield
    finally:
        port = os.environ.get("MASTER_PORT")
        os.environ.clear()
        os.environ.update(saved)
    deadline = time.monotonic() + 10
    leaked = child_pids() - children_before
    while leaked and time.monotonic() < deadline:  # a worker may still be exiting
        time.sleep(0.1)
        leaked = child_pids() - children_before
    assert not leaked, f"child processes outlived the test: {sorted(leaked)}"
    assert not dist.is_initialized(), "the test process was left with an initialised process group"
    if port and port != saved.get("MASTER_PORT"):
        assert port_is_free(int(port)), f"port {port} (MASTER_PORT of the run) is still bound"


@pytest.fixture
def ddp_env() -> Iterator[None]:
    """:func:`ddp_hygiene` around one test."""
    with ddp_hygiene():
        yield


# --------------------------------------------------------------------------------------------------
# Per-rank records
# --------------------------------------------------------------------------------------------------


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def dump(folder: str | Path, name: str, obj: Any) -> None:
    """Save ``obj`` as ``<folder>/<name>-rank<r>.pt`` from the calling rank."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(obj, folder / f"{name}-rank{rank()}.pt")


def logged(folder: str | Path, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every row of the run's ``metrics.csv`` (a CSVLogger under ``folder``) that has
    ``key``, in file order: what rank zero logged."""
    (path,) = Path(folder).rglob("metrics.csv")
    with open(path) as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


def load_ranks(folder: str | Path, name: str, world: int = WORLD) -> list[Any]:
    """What each rank :func:`dump`-ed under ``name``, in rank order (fails clearly if one is missing)."""
    paths = [Path(folder) / f"{name}-rank{r}.pt" for r in range(world)]
    missing = [str(p) for p in paths if not p.is_file()]
    assert not missing, f"ranks wrote no record: {missing}"
    return [torch.load(p, weights_only=False) for p in paths]


class CollectiveCounter(Callback):
    """Record every ``torch.distributed`` collective a worker issues while fitting.

    Each call is recorded as ``{"op", "step", "in_batch", "owner"}``: ``step`` is ``trainer.global_step`` at
    the call, ``in_batch`` whether it ran between this callback's ``on_train_batch_start`` and
    ``on_train_batch_end`` (put this callback after the monitors so their batch-end work is inside), and
    ``owner`` the class name of the first of ``owners`` found as ``self`` on the call stack (else ``None``).
    DDP's gradient and buffer communication runs in C++ and is not seen: only Python-level collectives
    (Lightning's, torchmetrics', ours) are. The list is dumped as ``collectives-rank<r>.pt`` at teardown.
    """

    def __init__(self, folder: str | Path, owners: list[Callback]) -> None:
        self.folder = Path(folder)
        self.owners = owners
        self.calls: list[dict[str, Any]] = []
        self._saved: dict[str, Any] = {}
        self._trainer: pl.Trainer | None = None
        self._in_batch = False

    def _owner(self) -> str | None:
        frame = sys._getframe(2)
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if candidate is not None and any(candidate is o for o in self.owners):
                return type(candidate).__name__
            frame = frame.f_back
        return None

    def _wrap(self, name: str, original: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            trainer = self._trainer
            self.calls.append(
                {
                    "op": name,
                    "step": None if trainer is None else int(trainer.global_step),
                    "in_batch": self._in_batch,
                    "owner": self._owner(),
                }
            )
            return original(*args, **kwargs)

        return counted

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        for name in _COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None and name not in self._saved:
                self._saved[name] = original
                setattr(dist, name, self._wrap(name, original))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved.clear()
        dump(self.folder, "collectives", self.calls)

    def on_train_batch_start(self, *args: Any) -> None:
        self._in_batch = True

    def on_train_batch_end(self, *args: Any) -> None:
        self._in_batch = False


# --------------------------------------------------------------------------------------------------
# A tiny model and data
# --------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN branch summed with the identity through ResidualAdd, then ReLU."""

    def __init__(self, channels: int, momentum: float | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, momentum=momentum)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, momentum=momentum)
        self.add = ResidualAdd()

    def forward(self, x: Tensor) -> Tensor:
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(self.add(x, branch))


class TinyResNet(pl.LightningModule):
    """Stem (conv-BN-ReLU), two residual blocks, global pooling, linear head; SGD.

    Args:
        channels: width of every layer.
        num_classes: outputs of the head.
        lr: SGD learning rate.
        momentum: BatchNorm momentum of every BN layer (1.0: the running statistics are the last batch's).
    """

    def __init__(
        self, channels: int = 4, num_classes: int = 3, lr: float = 0.1, momentum: float = 0.1
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels, momentum=momentum),
            nn.ReLU(),
        )
        self.layer1 = nn.Sequential(Block(channels, momentum), Block(channels, momentum))
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer1(self.stem(x)).mean((2, 3)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        self.log("val/loss", F.cross_entropy(self(images), labels), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def tiny_dataset(num: int = 32, size: int = 8, num_classes: int = 3, odd_shift: float = 0.0, seed: int = 0):
    """Random images ``[num, 3, size, size]`` with labels; ``odd_shift`` is added to odd-indexed images, so an
    unshuffled DistributedSampler hands rank 1 of 2 a shifted distribution (non-i.i.d. shards)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(num, 3, size, size, generator=gen)
    images[1::2] += odd_shift
    labels = torch.randint(0, num_classes, (num,), generator=gen)
    return TensorDataset(images, labels)


class ShardedTinyData(pl.LightningDataModule):
    """:func:`tiny_dataset` dealt to the ranks in order: rank ``r`` of ``W`` gets images ``r, r + W, ...``.

    Lightning replaces a training loader's sampler by a *shuffling* DistributedSampler whatever the loader
    said; a loader that already holds a DistributedSampler is kept, so this module builds one with
    ``shuffle=False`` (in the worker, once the process group exists). With ``odd_shift`` rank 1 of 2 then
    sees only shifted images: shards with different distributions.

    Args:
        batch_size: images per batch and rank.
        **kwargs: :func:`tiny_dataset` arguments.
    """

    def __init__(self, batch_size: int = 4, **kwargs: Any) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.dataset = tiny_dataset(**kwargs)

    def _loader(self) -> DataLoader:
        sampler = None
        if dist.is_available() and dist.is_initialized():
            sampler = DistributedSampler(self.dataset, shuffle=False)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()


class EvalSampleRecorder(Callback):
    """Record, per rank, which sampler fed training and testing, and every test image seen with the
    predictions the task handed to its test metrics for it.

    Images are keyed by a SHA-1 of their bytes, so the ranks' records can be matched with a single-process
    run's. Predictions are caught by wrapping ``pl_module.metrics["test_"].update`` (our tasks' metric
    collections), split per image (tensor rows or list entries). Dumps ``fit-rank<r>.pt`` at the end of
    training and ``test-rank<r>.pt`` at the end of testing.

    Args:
        folder: where the per-rank records go.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.fingerprints: list[str] = []
        self.predictions: dict[str, Any] = {}
        self.samplers: dict[str, str] = {}
        self._batch: list[str] = []

    @staticmethod
    def _sampler_name(loader: Any) -> str:
        if isinstance(loader, list | tuple):
            loader = loader[0]
        sampler = getattr(loader, "sampler", None)
        inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
        for candidate in (sampler, inner):
            if candidate is not None and "Distributed" in type(candidate).__name__:
                return type(candidate).__name__
        return type(sampler).__name__

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.samplers["train"] = self._sampler_name(trainer.train_dataloader)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dump(self.folder, "fit", {"samplers": dict(self.samplers), "world_size": trainer.world_size})

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.samplers["test"] = self._sampler_name(trainer.test_dataloaders)
        metric = pl_module.metrics["test_"]
        update = metric.update

        def recording_update(preds: Any, *args: Any, **kwargs: Any) -> Any:
            rows = list(preds) if isinstance(preds, Tensor | list | tuple) else [preds]
            assert len(rows) == len(self._batch), "predictions do not line up with the batch's images"
            for key, row in zip(self._batch, rows):
                self.predictions[key] = _to_cpu(row)
            return update(preds, *args, **kwargs)

        metric.update = recording_update

    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        images = batch
        if isinstance(batch, dict):
            images = next(batch[k] for k in ("image", "images") if k in batch)
        elif isinstance(batch, list | tuple):
            images = batch[0]
        self._batch = [fingerprint(image) for image in images]
        self.fingerprints.extend(self._batch)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = {
            "fingerprints": self.fingerprints,
            "predictions": self.predictions,
            "samplers": self.samplers,
        }
        dump(self.folder, "test", record)


def fingerprint(image: Tensor) -> str:
    """SHA-1 of an image tensor's bytes (the identity of a sample across processes)."""
    import hashlib

    return hashlib.sha1(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


# --------------------------------------------------------------------------------------------------
# Comparing checkpoints
# --------------------------------------------------------------------------------------------------


def state_differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Paths where two nested states (checkpoint entries, state dicts) differ: tensors bit for bit (shape,
    dtype and values; NaN equal to NaN), floats exactly, containers entry by entry. ``[]`` when equal."""
    import math

    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return [f"{where}: {a.dtype}{list(a.shape)} != {b.dtype}{list(b.shape)}"]
        if a.is_floating_point() or a.is_complex():
            same = torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        else:
            same = torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where} keys {sorted(set(a) ^ set(b), key=str)}"]
        return [d for k in a for d in state_differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{where} length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in state_differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if type(a) is type(b) and a == b else [f"{where}: {a!r} != {b!r}"]
