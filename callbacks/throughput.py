"""Where a training step's time goes: waiting for the loader, computing, or the callbacks around it.

Owns :class:`ThroughputMonitor` (the clocks at the step's edges, read without a host sync; the host-sync
counter of a sampled step; images/s; FLOPs and model FLOP utilisation), :class:`HostSyncCounter` (the
dispatch mode that counts and places host reads), the table of known devices' peak FLOP/s
(:data:`PEAK_TFLOPS`) and the judging rules of its findings (:func:`input_bound`, :func:`host_syncs`,
:func:`callback_overhead`, the ``KIND_*`` constants). Details (what each number means, the cost) are in
``docs/monitors.md``.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .core import MonitorCallback, MonitorConfigError
from .diagnosis import Finding
from .hooks import is_compiled

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

    from .packing import PackedStats, StatsPacker

__all__ = [
    "INPUT_BOUND_SHARE",
    "KIND_CALLBACK_OVERHEAD",
    "KIND_COMPUTE_BOUND",
    "KIND_HOST_SYNC",
    "KIND_INPUT_BOUND",
    "KIND_THROUGHPUT",
    "PEAK_TFLOPS",
    "HostSyncCounter",
    "ThroughputMonitor",
    "callback_overhead",
    "host_syncs",
    "input_bound",
    "peak_flops_of",
]

KIND_INPUT_BOUND = "input_bound"
KIND_COMPUTE_BOUND = "compute_bound"
KIND_HOST_SYNC = "host_sync"
KIND_CALLBACK_OVERHEAD = "callback_overhead"
KIND_THROUGHPUT = "throughput"

INPUT_BOUND_SHARE = 0.25
"""Share of the step spent waiting for the next batch from which the run is input-bound (a warning)."""
CALLBACK_SHARE = 0.2
"""Share of the step spent in the callbacks' batch hooks that is reported (info)."""
WARMUP_STEPS = 2
"""First optimizer steps left out of the clocks (allocator, cuDNN autotuning, compilation)."""
MIN_TIMED_STEPS = 5
"""Fewest timed steps a verdict on the time split needs."""
DEFAULT_SYNC_STEPS = (10, 60)
"""Optimizer steps (moved to the next step that neither logs nor flushes) counted for host syncs."""

PEAK_TFLOPS: dict[str, tuple[float, float, float]] = {
    # device name substring -> dense (fp32, tf32, bf16/fp16) tensor TFLOP/s, no sparsity; first match wins
    "H200": (67.0, 494.7, 989.4),
    "H100 PCIe": (51.0, 378.0, 756.0),
    "H100 NVL": (60.0, 417.5, 835.0),
    "H100": (67.0, 494.7, 989.4),
    "A100": (19.5, 156.0, 312.0),
    "L40S": (91.6, 183.0, 362.0),
    "L4": (30.3, 60.0, 121.0),
    "A10G": (31.2, 35.0, 70.0),
    "A10": (31.2, 62.5, 125.0),
    "V100": (15.7, 15.7, 125.0),
    "T4": (8.1, 8.1, 65.0),
}
"""Peak TFLOP/s of known GPUs by :func:`torch.cuda.get_device_name` substring: (fp32, tf32, bf16/fp16)."""

_SYNC_OPS = {
    "aten._local_scalar_dense": "a tensor value read on the host (.item(), float(), int(), bool(), `if tensor`)",
    "aten.nonzero": "an output whose size depends on the values (nonzero, boolean-mask indexing)",
    "aten.masked_select": "an output whose size depends on the values (masked_select)",
    "aten._unique2": "an output whose size depends on the values (unique)",
    "aten.unique_consecutive": "an output whose size depends on the values (unique_consecutive)",
    "aten.unique_dim": "an output whose size depends on the values (unique)",
    "aten.repeat_interleave": "an output whose size depends on the values (repeat_interleave)",
}
_COPY_TO_HOST = "a copy to the host (.cpu(), .tolist(), .numpy(), .to('cpu'))"

# frames of these packages are the machinery between a sync and the code that asked for it
_MACHINERY = tuple(
    str(Path(m.__file__).resolve().parent) + os.sep
    for m in (torch, __import__("lightning"), __import__("lightning_fabric"))
)
_MONITORS = str(Path(__file__).resolve().parent) + os.sep
_SITE = ("site-packages", "dist-packages")


def peak_flops_of(device: torch.device, precision: str | None = None) -> float | None:
    """Peak FLOP/s of one device from :data:`PEAK_TFLOPS` (bf16/fp16 for a 16-bit ``precision``, tf32 when
    float32 matmuls may use it, else fp32), ``None`` for a CPU or an unknown GPU.

    Example:
        >>> peak_flops_of(torch.device("cpu")) is None
        True
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    peaks = next((p for key, p in PEAK_TFLOPS.items() if key in name), None)
    if peaks is None:
        return None
    if precision and "16" in str(precision):
        return peaks[2] * 1e12
    if torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32:
        return peaks[1] * 1e12
    return peaks[0] * 1e12


class HostSyncCounter(TorchDispatchMode):
    """Counts the operations that make the host wait for the device (a value read, a copy to the host, an
    output whose size depends on the values) and says where each came from: the innermost module running
    (``names``: ``id(module) -> qualified name``) and the first line of code outside torch and Lightning.

    The operations run on every device alike, so a CPU run counts what a GPU run would wait on.

    Args:
        names: qualified module names by ``id``, to name the module a sync happened in.

    Example:
        >>> import torch
        >>> with HostSyncCounter({}) as counter:
        ...     _ = torch.ones(2).sum().item()
        >>> counter.count
        1
    """

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names
        self.count = 0
        self.monitor_count = 0  # syncs made by this package's monitors (their logging steps' reads)
        self.where: Counter[tuple[str, str, bool]] = Counter()  # (where, what, in user code) -> count

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        what = _sync_kind(func, args, kwargs)
        if what is not None:
            where, user, monitor = _locate(self.names)
            if monitor:
                self.monitor_count += 1
            else:
                self.count += 1
                self.where[(where, what, user)] += 1
        return func(*args, **kwargs)


def _sync_kind(func: Any, args: Any, kwargs: dict[str, Any]) -> str | None:
    name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
    what = _SYNC_OPS.get(f"aten.{name}")
    if what is not None:
        return what
    if name == "index" and len(args) >= 2:
        masks = [i for i in args[1] if isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8)]
        return _SYNC_OPS["aten.nonzero"] if masks else None
    if name == "_to_copy":
        source, device = (args[0] if args else None), kwargs.get("device")
        to_host = device is not None and torch.device(device).type == "cpu"
        if to_host and isinstance(source, Tensor) and source.device.type != "cpu":
            return None if kwargs.get("non_blocking", False) else _COPY_TO_HOST
    elif name == "copy_" and len(args) >= 2 and all(isinstance(a, Tensor) for a in args[:2]):
        blocking = not (args[2:3] or [kwargs.get("non_blocking", False)])[0]
        if blocking and args[0].device.type == "cpu" and args[1].device.type != "cpu":
            return _COPY_TO_HOST
    return None


def _locate(names: dict[int, str]) -> tuple[str, bool, bool]:
    """``(where, in user code, in a monitor)`` of the current sync: the innermost named module and the first
    frame outside torch/Lightning, read off the Python stack (only when a sync happens)."""
    frame = inspect.currentframe()
    module_name: str | None = None
    code: str | None = None
    user = False
    try:
        while frame is not None and frame.f_code.co_filename == __file__:  # the counter itself
            frame = frame.f_back
        while frame is not None:
            filename = frame.f_code.co_filename
            if filename.startswith(_MONITORS):
                return "monitors", False, True
            owner = frame.f_locals.get("self")
            if module_name is None and isinstance(owner, nn.Module) and id(owner) in names:
                module_name = names[id(owner)] or type(owner).__name__
            if code is None and not filename.startswith(_MACHINERY) and not filename.startswith("<"):
                label = type(owner).__name__ + "." if owner is not None else ""
                code = f"{label}{frame.f_code.co_name} ({_short(filename)}:{frame.f_lineno})"
                user = not any(part in filename for part in _SITE)
            if module_name is not None and code is not None:
                break
            frame = frame.f_back
    finally:
        del frame
    parts = [f"module {module_name}" if module_name else None, code]
    return ", ".join(p for p in parts if p) or "unknown", user, False


def _short(filename: str) -> str:
    path = Path(filename)
    for marker in _SITE:
        if marker in path.parts:
            return "/".join(path.parts[path.parts.index(marker) + 1 :])
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return path.name


def _batch_size(batch: Any) -> int:
    """Examples in a batch, from shapes only (no host read): a tensor's first dimension, a list of images'
    length, the first such thing inside a tuple, list or dict; 0 if none."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 0
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, list | tuple) and batch:
        if all(isinstance(x, Tensor) and x.dim() >= 2 for x in batch) and len({x.shape for x in batch}) > 1:
            return len(batch)  # a list of images of different sizes
        for item in batch:
            size = _batch_size(item)
            if size:
                return size
    return 0


def _num_workers(trainer: pl.Trainer) -> int | None:
    """The training loader's ``num_workers`` (the first :class:`~torch.utils.data.DataLoader` found), or
    ``None`` when the loaders are not DataLoaders."""
    loaders: Any = getattr(trainer, "train_dataloader", None)
    stack = [loaders]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.utils.data.DataLoader):
            return int(item.num_workers)
        if isinstance(item, dict):
            stack += list(item.values())
        elif isinstance(item, list | tuple):
            stack += list(item)
        elif hasattr(item, "iterables"):  # a CombinedLoader
            stack.append(item.iterables)
    return None


def _cpus_per_process(trainer: pl.Trainer) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, int(getattr(trainer, "num_devices", 1) or 1)))


# ------------------------------------------------------------------------------------ judging rules
def input_bound(
    wait_share: float,
    step_ms: float,
    num_workers: int | None,
    cpus: int,
    step: int | None = None,
    threshold: float = INPUT_BOUND_SHARE,
    monitor: str = "throughput",
) -> Finding | None:
    """The verdict on the loader: a warning when the step waits ``threshold`` or more of its time for the
    next batch, with the fix that fits ``num_workers`` and the CPUs; an info line (compute-bound) below.

    Example:
        >>> input_bound(0.38, 100.0, 0, 8).message.split(";")[0]
        'input-bound: the loader takes 38% of the step (38.0 ms of 100.0 ms)'
    """
    if not (math.isfinite(wait_share) and math.isfinite(step_ms)):
        return None
    values = {
        "wait_share": wait_share,
        "step_ms": step_ms,
        "num_workers": float(num_workers or 0),
        "cpus": cpus,
    }
    workers = "unknown" if num_workers is None else str(num_workers)
    if wait_share < threshold:
        return Finding(
            monitor,
            "info",
            [],
            f"compute-bound: the loader takes {wait_share:.0%} of the step ({wait_share * step_ms:.1f} ms of "
            f"{step_ms:.1f} ms); num_workers is {workers} on {cpus} cores",
            "",
            step=step,
            values=values,
            kind=KIND_COMPUTE_BOUND,
        )
    message = (
        f"input-bound: the loader takes {wait_share:.0%} of the step ({wait_share * step_ms:.1f} ms of "
        f"{step_ms:.1f} ms); num_workers is {workers} on {cpus} cores"
    )
    best = max(1, min(8, cpus - 1))
    if num_workers is not None and num_workers < best:
        fix = f"raise the loader's num_workers to {best} (persistent_workers=True, pin_memory=True on a GPU)"
    else:
        fix = (
            "the workers cannot keep up: make __getitem__ cheaper (decode once and cache, lighter or GPU "
            "augmentations, smaller stored images), or raise prefetch_factor"
        )
    return Finding(monitor, "warning", [], message, fix, step=step, values=values, kind=KIND_INPUT_BOUND)


def host_syncs(
    counts: Sequence[int],
    where: Sequence[tuple[str, str, bool, int]],
    steps: Sequence[int],
    monitor: str = "throughput",
) -> Finding | None:
    """Host syncs found on every counted step (``counts``, one per sampled step ``steps``; ``where``:
    ``(place, what, in user code, count)`` of the latest, most first): a warning when one is in the run's own
    code, an info line when all come from a library it calls.

    Example:
        >>> f = host_syncs([2, 2], [("module net.1", ".item()", True, 2)], [10, 60])
        >>> f.severity, f.values["syncs_per_step"]
        ('warning', 2.0)
    """
    if not counts or min(counts) < 1:
        return None
    per_step = min(counts)
    top = sorted(where, key=lambda w: -w[3])
    places = "; ".join(f"{n} in {place}: {what}" for place, what, _, n in top[:3])
    more = f" (+{len(top) - 3} more places)" if len(top) > 3 else ""
    user = any(u for _, _, u, _ in top)
    message = (
        f"host syncs: {per_step} per step found (steps {', '.join(map(str, steps))}): {places}{more}; on a GPU "
        "each one stalls the host until the device has caught up"
    )
    suggestion = (
        "keep the value on the device: accumulate in a tensor and read it at logging steps (self.log does), "
        "replace `if tensor:` with torch.where, give repeat_interleave its output_size, avoid boolean-mask "
        "indexing in the step"
        if user
        else "they come from a library the step calls; nothing to change in this code"
    )
    layers = sorted(
        {place.split(",")[0].removeprefix("module ") for place, _, _, _ in top if place.startswith("module ")}
    )
    return Finding(
        monitor,
        "warning" if user else "info",
        layers,
        message,
        suggestion,
        step=steps[-1],
        values={"syncs_per_step": float(per_step)},
        kind=KIND_HOST_SYNC,
    )


def callback_overhead(
    share: float, step_ms: float, step: int | None = None, monitor: str = "throughput"
) -> Finding | None:
    """An info line when the callbacks' batch hooks take :data:`CALLBACK_SHARE` or more of the step.

    Example:
        >>> callback_overhead(0.05, 10.0) is None
        True
    """
    if not math.isfinite(share) or share < CALLBACK_SHARE:
        return None
    return Finding(
        monitor,
        "info",
        [],
        f"the callbacks' batch hooks take {share:.0%} of the step ({share * step_ms:.1f} ms of {step_ms:.1f} ms)",
        "profile the callbacks (Trainer(profiler='simple') lists each hook); log less often",
        step=step,
        values={"callback_share": share},
        kind=KIND_CALLBACK_OVERHEAD,
    )


# ------------------------------------------------------------------------------------ the monitor
class _Edge(Callback):
    """A clock at one end of the callback list (the monitor puts one first and one last), so that the
    step's time splits into the callbacks' batch hooks and what lies between them."""

    def __init__(self, monitor: ThroughputMonitor, first: bool) -> None:
        self.monitor = monitor
        self.first = first

    @property
    def state_key(self) -> str:
        return f"{type(self).__name__}[{'first' if self.first else 'last'}]"

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.monitor._edge(trainer, "first_start" if self.first else "last_start", batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.monitor._edge(trainer, "first_end" if self.first else "last_end", batch)


class ThroughputMonitor(MonitorCallback):
    """Where the time of a training step goes: waiting for the next batch, the forward, backward and
    optimizer step, and the callbacks' batch hooks; images/s, FLOPs per step and model FLOP utilisation;
    the host syncs of the step, counted on a few sampled steps and named by module and line of code.

    Clocks at the step's edges (two small callbacks the monitor puts first and last in the trainer's
    list): on a CPU ``time.perf_counter``; on a GPU CUDA events as well, read at the logging interval once
    complete, so the split is the device's time (a GPU idle while the loader works shows as waiting) and no
    step waits on the device. The first :data:`WARMUP_STEPS` steps, the steps that count FLOPs or host
    syncs, and the gaps that hold a validation run or a checkpoint save are left out.

    Args:
        log_every_n_steps: optimizer steps between reductions and logs (default: the trainer's).
        peak_flops: the device's peak FLOP/s for the model FLOP utilisation (``mfu``); ``None``: looked up
            in :data:`PEAK_TFLOPS` by the GPU's name and the trainer's precision (no MFU on a CPU).
        count_flops: count the FLOPs of one training step (forward and backward) with
            :class:`torch.utils.flop_counter.FlopCounterMode` at the first timed step.
        sync_steps: optimizer steps whose host syncs are counted (each moved to the next step that neither
            logs nor flushes a monitor); ``()`` counts none.
        input_bound_share: share of the step spent waiting for the loader from which the run is judged
            input-bound.
        max_history: history cap (entries of ~10 numbers).
        strict: re-raise unexpected exceptions instead of switching off (see
            :class:`~lightning_convnets.callbacks.core.MonitorCallback`).

    Raises:
        MonitorConfigError: for a non-positive ``peak_flops``, negative ``sync_steps`` or a share outside (0, 1).

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[ThroughputMonitor(log_every_n_steps=20)], logger=False)
        >>> # trainer.fit(model, datamodule) then logs throughput/wait_share, throughput/images_per_s ...
        >>> # and the diagnosis says "input-bound: the loader takes 38% of the step; num_workers is 0 ..."
    """

    monitor_name = "throughput"

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        peak_flops: float | None = None,
        count_flops: bool = True,
        sync_steps: Sequence[int] = DEFAULT_SYNC_STEPS,
        input_bound_share: float = INPUT_BOUND_SHARE,
        max_history: int = 1000,
        strict: bool | None = None,
    ) -> None:
        super().__init__(log_every_n_steps, max_history, 1, True, strict)
        if peak_flops is not None and not peak_flops > 0:
            raise MonitorConfigError(
                f"ThroughputMonitor: peak_flops must be > 0 FLOP/s or None, got {peak_flops}"
            )
        if any(not isinstance(s, int) or s < 0 for s in sync_steps):
            raise MonitorConfigError(
                f"ThroughputMonitor: sync_steps must be ints >= 0, got {list(sync_steps)}"
            )
        if not 0 < input_bound_share < 1:
            raise MonitorConfigError(
                f"ThroughputMonitor: input_bound_share must be in (0, 1), got {input_bound_share}"
            )
        self.peak_flops = peak_flops
        self.count_flops = count_flops
        self.sync_steps = tuple(sorted(set(sync_steps)))
        self.input_bound_share = input_bound_share
        self.flops_per_step: float | None = None
        self.sync_counts: list[int] = []
        self.sync_counted_steps: list[int] = []
        self.sync_where: list[tuple[str, str, bool, int]] = []
        self.totals = {
            "wait": 0.0,
            "compute": 0.0,
            "callbacks": 0.0,
            "steps": 0.0,
            "images": 0.0,
            "wall": 0.0,
        }
        self.num_workers: int | None = None
        self.cpus = 1
        self._edges: list[_Edge] = []
        self._cuda = False
        self._reset_clocks()

    def _reset_clocks(self) -> None:
        self._t: dict[str, float] = {}
        self._ev: dict[str, Any] = {}
        self._prev_end: float | None = None  # last_end of the previous step (host clock)
        self._prev_end_ev: Any = None
        self._excluded = 0.0  # host seconds of validation inside the current gap
        self._dirty = False  # a checkpoint save inside the current gap
        self._timed = False  # this step's clocks count
        self._images = 0
        self._pending: list[tuple[Any, ...]] = []  # GPU: (events..., host times) of finished steps
        self._acc = [0.0] * 6  # wait, compute, callbacks, steps, images, wall (this interval, host)
        self._mode: Any = None
        self._mode_kind = ""
        self._sync_targets: list[int] = []
        self._flops_step: int | None = None

    # ------------------------------------------------------------------ setup
    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset_clocks()
        if not any(isinstance(cb, _Edge) and cb.monitor is self for cb in trainer.callbacks):
            # a new list, not an insertion: Lightning is iterating the current one to call setup (the
            # clocks need no setup of their own)
            self._edges = [_Edge(self, first=True), _Edge(self, first=False)]
            trainer.callbacks = [self._edges[0], *trainer.callbacks, self._edges[1]]
        self._cuda = pl_module.device.type == "cuda"
        self._names = {id(m): n for n, m in pl_module.named_modules()}
        self._compiled = is_compiled(pl_module)

    def _quiet_step(self, trainer: pl.Trainer, step: int) -> bool:
        """Neither the trainer's logging step nor any monitor's flush or probe step."""
        after = step + 1
        if after % max(1, int(trainer.log_every_n_steps or 1)) == 0:
            return False
        for cb in trainer.callbacks:
            if isinstance(cb, MonitorCallback) and after % cb.interval(trainer) == 0:
                return False
            every = getattr(cb, "probe_interval", None)
            if isinstance(every, int) and every > 0 and after % every == 0:
                return False
        return True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.num_workers = _num_workers(trainer)
        self.cpus = _cpus_per_process(trainer)
        start = int(trainer.global_step)
        restored = self.__dict__.pop("_restored_targets", None)
        if restored is not None and not self._compiled:  # a resumed run: the steps the checkpoint planned
            targets, flops_step = restored
            self._sync_targets = [s for s in targets if s >= start]
            self._flops_step = None if flops_step is None else int(flops_step)
            return
        if self.count_flops and self.flops_per_step is None and not self._compiled:
            self._flops_step = self._next_quiet(trainer, max(start, WARMUP_STEPS - 1), set())
        taken = {self._flops_step} if self._flops_step is not None else set()
        if not self._compiled:
            for s in self.sync_steps:
                if s >= start and len(self.sync_counts) + len(self._sync_targets) < len(self.sync_steps):
                    quiet = self._next_quiet(trainer, s, taken)
                    if quiet is not None:
                        self._sync_targets.append(quiet)
                        taken.add(quiet)

    def _next_quiet(self, trainer: pl.Trainer, step: int, taken: set[int]) -> int | None:
        for candidate in range(step, step + 200):
            if candidate not in taken and self._quiet_step(trainer, candidate):
                return candidate
        return None

    # ------------------------------------------------------------------ the clocks
    def _edge(self, trainer: pl.Trainer, point: str, batch: Any) -> None:
        if not self.active:
            return
        try:
            now = time.perf_counter()
            if point == "first_start":
                self._step_begins(trainer, now, batch)
            self._t[point] = now
            if self._timed and self._cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                self._ev[point] = event
            if point == "last_start":
                self._enter_modes(trainer)
            elif point == "first_end":
                self._leave_modes(trainer)
            elif point == "last_end":
                self._step_ends(now)
        except Exception as err:  # the edges are plain callbacks: the monitor's guard, by hand
            if self.strict:
                raise
            self._leave_modes(trainer)
            self.fail(f"the step clock ({point})", err, trainer)

    def _step_begins(self, trainer: pl.Trainer, now: float, batch: Any) -> None:
        step = int(trainer.global_step)
        special = step == self._flops_step or step in self._sync_targets
        self._timed = step >= WARMUP_STEPS and not special and self._prev_end is not None and not self._dirty
        self._gap = now - self._prev_end - self._excluded if self._prev_end is not None else 0.0
        self._gap_ev = self._prev_end_ev
        self._images = _batch_size(batch)
        self._excluded, self._dirty = 0.0, False
        self._ev = {}

    def _step_ends(self, now: float) -> None:
        t = self._t
        self._prev_end = now
        self._prev_end_ev = self._ev.get("last_end")
        if not self._timed:
            return
        compute = t["first_end"] - t["last_start"]
        callbacks = (t["last_start"] - t["first_start"]) + (now - t["first_end"])
        wall = self._gap + compute + callbacks
        if self._cuda and self._gap_ev is not None and len(self._ev) == 4:
            self._pending.append((self._gap_ev, self._ev, self._images, wall))
            if len(self._pending) > 4096:  # a device far behind: drop the oldest, never wait
                self._pending.pop(0)
            return
        self._add(self._gap, compute, callbacks, self._images, wall)

    def _add(self, wait: float, compute: float, callbacks: float, images: int, wall: float) -> None:
        for i, v in enumerate((wait, compute, callbacks, 1.0, float(images), wall)):
            self._acc[i] += v

    def _read_events(self) -> None:
        """Fold the finished steps whose events the device has passed (query: no wait) into the interval."""
        keep = []
        for gap_ev, ev, images, wall in self._pending:
            if not ev["last_end"].query():
                keep.append((gap_ev, ev, images, wall))
                continue
            ms = 1e-3
            wait = gap_ev.elapsed_time(ev["first_start"]) * ms
            compute = ev["last_start"].elapsed_time(ev["first_end"]) * ms
            callbacks = (
                ev["first_start"].elapsed_time(ev["last_start"])
                + ev["first_end"].elapsed_time(ev["last_end"])
            ) * ms
            self._add(wait, compute, callbacks, images, wall)
        self._pending = keep

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_began = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        began = getattr(self, "_val_began", None)
        if began is not None and trainer.state.fn == "fit":  # a validation inside the fit's step gap
            self._excluded += time.perf_counter() - began
            self._dirty = self._dirty or self._cuda  # the device's clocks cannot subtract it
        self._val_began = None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._dirty = True

    # ------------------------------------------------------------------ FLOPs and host syncs
    def _enter_modes(self, trainer: pl.Trainer) -> None:
        self._leave_modes(trainer)  # a step that never reached its end (on_train_batch_start returned -1)
        step = int(trainer.global_step)
        if step == self._flops_step:
            from torch.utils.flop_counter import FlopCounterMode

            self._mode, self._mode_kind = FlopCounterMode(display=False), "flops"
        elif step in self._sync_targets:
            self._mode, self._mode_kind = HostSyncCounter(self._names), "syncs"
        else:
            return
        self._mode.__enter__()
        self._mode_step = step

    def _leave_modes(self, trainer: pl.Trainer | None) -> None:
        mode, self._mode = self._mode, None
        if mode is None:
            return
        mode.__exit__(None, None, None)
        if self._mode_kind == "flops":
            self.flops_per_step = float(mode.get_total_flops()) or None
        else:
            self._sync_targets.remove(self._mode_step)
            self.sync_counts.append(mode.count)
            self.sync_counted_steps.append(self._mode_step)
            self.sync_where = [(w, what, user, n) for (w, what, user), n in mode.where.most_common()]

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._leave_modes(trainer)

    # ------------------------------------------------------------------ reduction
    def pack(self, trainer: pl.Trainer, pl_module: pl.LightningModule, packer: StatsPacker) -> None:
        if self._cuda:
            self._read_events()
        device = pl_module.device
        packer.sum("acc", torch.tensor([*self._acc, 1.0], dtype=torch.float64, device=device))

    def reset_interval(self) -> None:
        self._acc = [0.0] * 6

    def compute_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: PackedStats
    ) -> dict[str, float]:
        acc = stats.get("acc")
        if acc is None or float(acc[3]) == 0:
            return {}
        wait, compute, callbacks, steps, images, wall, ranks = (float(v) for v in acc)
        for key, value in zip(
            ("wait", "compute", "callbacks", "steps", "images", "wall"),
            (wait, compute, callbacks, steps, images, wall),
        ):
            self.totals[key] += value
        total = wait + compute + callbacks
        metrics = {
            "wait_ms": 1e3 * wait / steps,
            "compute_ms": 1e3 * compute / steps,
            "callbacks_ms": 1e3 * callbacks / steps,
            "wait_share": wait / total if total > 0 else math.nan,
            "callback_share": callbacks / total if total > 0 else math.nan,
            "images_per_s": images / (wall / ranks) if wall > 0 else math.nan,
        }
        mfu = self._mfu(trainer, steps, wall)
        if self.flops_per_step:
            metrics["tflops_per_step"] = self.flops_per_step / 1e12
        if mfu is not None:
            metrics["mfu"] = mfu
        return metrics

    def _peak(self, trainer: pl.Trainer | None) -> float | None:
        if self.peak_flops is not None:
            return self.peak_flops
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        return peak_flops_of(device, str(getattr(trainer, "precision", "")))

    def _mfu(self, trainer: pl.Trainer | None, steps: float, wall: float) -> float | None:
        peak = self._peak(trainer)
        if not self.flops_per_step or peak is None or wall <= 0:
            return None
        return self.flops_per_step * steps / wall / peak

    # ------------------------------------------------------------------ reporting
    def diagnose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Finding]:
        """The loader verdict (input- or compute-bound), the host syncs, the callbacks' share and one info
        line with images/s, FLOPs and MFU, from the whole run's clocks."""
        findings: list[Finding | None] = []
        t = self.totals
        step = int(trainer.global_step) if trainer is not None else None
        if t["steps"] >= MIN_TIMED_STEPS:
            total = t["wait"] + t["compute"] + t["callbacks"]
            step_ms = 1e3 * total / t["steps"]
            findings.append(
                input_bound(
                    t["wait"] / total, step_ms, self.num_workers, self.cpus, step, self.input_bound_share
                )
            )
            findings.append(callback_overhead(t["callbacks"] / total, step_ms, step))
            findings.append(self._summary(trainer, step))
        findings.append(host_syncs(self.sync_counts, self.sync_where, self.sync_counted_steps))
        return [f for f in findings if f is not None]

    def _summary(self, trainer: pl.Trainer | None, step: int | None) -> Finding:
        t = self.totals
        ranks = max(1, int(getattr(trainer, "world_size", 1) or 1))
        rate = t["images"] / (t["wall"] / ranks) if t["wall"] > 0 else math.nan
        values = {"images_per_s": rate}
        parts = [f"{rate:.1f} images/s over {int(t['steps'] / ranks)} timed steps"]
        if self.flops_per_step:
            values["tflops_per_step"] = self.flops_per_step / 1e12
            parts.append(f"{self.flops_per_step / 1e9:.3g} GFLOP per step (forward and backward, per device)")
            mfu = self._mfu(trainer, t["steps"], t["wall"])
            if mfu is not None:
                values["mfu"] = mfu
                parts.append(f"model FLOP utilisation {mfu:.1%} of {self._peak(trainer) / 1e12:.0f} TFLOP/s")
        return Finding(
            self.monitor_name,
            "info",
            [],
            "throughput: " + "; ".join(parts),
            "",
            step=step,
            values=values,
            kind=KIND_THROUGHPUT,
        )

    def tables(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, list[dict[str, Any]]]:
        """The report's tables: where the step's time goes, and where the counted host syncs are."""
        try:
            t = self.totals
            rows: dict[str, list[dict[str, Any]]] = {}
            if t["steps"]:
                total = t["wait"] + t["compute"] + t["callbacks"]
                rows["Where the step's time goes"] = [
                    {
                        "part": part,
                        "ms per step": round(1e3 * t[key] / t["steps"], 3),
                        "share": round(t[key] / total, 4),
                    }
                    for part, key in (
                        ("waiting for the batch", "wait"),
                        ("forward, backward, optimizer", "compute"),
                        ("callbacks' batch hooks", "callbacks"),
                    )
                ]
            if self.sync_where:
                rows["Host syncs of one step"] = [
                    {"where": w, "what": what, "count": n, "own code": user}
                    for w, what, user, n in self.sync_where
                ]
            return rows
        except Exception:
            return {}

    # ------------------------------------------------------------------ checkpointing
    def extra_state(self) -> dict[str, Any]:
        return {
            "totals": dict(self.totals),
            "flops_per_step": self.flops_per_step,
            "sync_counts": list(self.sync_counts),
            "sync_counted_steps": list(self.sync_counted_steps),
            "sync_where": [list(w) for w in self.sync_where],
            # the logging interval so far (timed steps and images are counts; the rest wall-clock seconds,
            # which a resumed run cannot repeat) and the steps still to be counted: a resumed run counts
            # FLOPs and host syncs on the steps the uninterrupted one would
            "interval": self._interval_at_save(),
            "sync_targets": [int(s) for s in self._sync_targets],
            "flops_step": self._flops_step,
        }

    def _interval_at_save(self) -> list[float]:
        """The open interval as a checkpoint keeps it: with the steps whose device clocks are still pending
        (a save waits for the device anyway) and the step in flight, whose end Lightning runs after the
        save (a resumed run never sees it end, the uninterrupted one counts it): host clocks up to now."""
        if self._cuda and self._pending:
            torch.cuda.synchronize()
            self._read_events()
        acc = [float(v) for v in self._acc]
        t = self._t
        in_flight = t.get("first_end", -math.inf) > t.get("first_start", math.inf) > t.get("last_end", -math.inf)
        if self._timed and in_flight and "last_start" in t:
            now = time.perf_counter()
            compute = t["first_end"] - t["last_start"]
            callbacks = (t["last_start"] - t["first_start"]) + (now - t["first_end"])
            step = (self._gap, compute, callbacks, 1.0, float(self._images), self._gap + compute + callbacks)
            acc = [a + v for a, v in zip(acc, step)]
        return acc

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.totals.update(state.get("totals") or {})
        self.flops_per_step = state.get("flops_per_step")
        self.sync_counts = list(state.get("sync_counts") or [])
        self.sync_counted_steps = list(state.get("sync_counted_steps") or [])
        self.sync_where = [tuple(w) for w in state.get("sync_where") or []]
        interval = state.get("interval")
        if isinstance(interval, list | tuple) and len(interval) == len(self._acc):
            self._acc = [float(v) for v in interval]
        if "sync_targets" in state:  # else (an older checkpoint) on_train_start picks them afresh
            self._restored_targets = ([int(s) for s in state["sync_targets"]], state.get("flops_step"))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._leave_modes(trainer)
        super().teardown(trainer, pl_module, stage)
