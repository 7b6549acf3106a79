"""The shared core of the diagnostic monitors: the guard, streaming statistics, one collective per logging
interval, any-logger output, bounded checkpointed history and one end-of-fit diagnosis.

Start with :class:`MonitorCallback` (the subclass API: ``attach``, ``pack``, ``compute_metrics``,
``reset_interval``, ``diagnose``, ``figures``), then :class:`StatsPacker` (what travels in the one
collective) and :class:`ShiftedMoments` / :class:`MomentBank` (per-channel moments on the device).
The full API, the cost model and the streaming-moment algebra are in ``docs/monitors.md``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl
    from matplotlib.figure import Figure

__all__ = [
    "DEFAULT_DENSE_STEPS",
    "DEFAULT_MAX_HISTORY",
    "DEFAULT_SAMPLE_PERIOD",
    "Diagnosis",
    "Finding",
    "HookSpec",
    "MomentBank",
    "Moments",
    "MonitorCallback",
    "MonitorConfigError",
    "PackedStats",
    "RunningMoments",
    "ShiftedMoments",
    "StatsPacker",
    "batch_moments",
    "diagnosis_for",
    "is_compiled",
    "observers_paused",
]

DEFAULT_MAX_HISTORY = 1000
"""History cap (entries) of every monitor unless ``max_history`` says otherwise."""

DEFAULT_DENSE_STEPS = 50
"""Default schedule: every optimizer step below this one is recorded (early training, where most
pathologies show and statistics move fastest)."""

DEFAULT_SAMPLE_PERIOD = 50
"""Default schedule after the dense phase: one optimizer step in this many is recorded (or one per logging
interval, if that is shorter: at the trainer's default interval of 50, one recorded step per interval). A
recorded step costs the activation and BatchNorm monitors together ~13% of a CPU training step (measured
on width-8 preact ResNet-18 and -152, batch 16), so one in 50 costs ~0.3% of every step, and the flush at
the end of the interval ~0.15-0.3% more; quiet steps cost nothing measurable (no hooks installed, no
tensor op, no host read)."""

_PAUSED = 0  # module-level so a hook's gate is one global read (dynamo guards on it under compile)


@contextlib.contextmanager
def observers_paused() -> Iterator[None]:
    """Silence every monitor's hooks inside the block (probes, extra forwards that are not training).

    Example:
        >>> import torch
        >>> with observers_paused():  # no monitor records this forward
        ...     out = torch.nn.Linear(2, 2)(torch.zeros(1, 2))
    """
    global _PAUSED
    _PAUSED += 1
    try:
        yield
    finally:
        _PAUSED -= 1


# --------------------------------------------------------------------------------------------------
# Streaming statistics
# --------------------------------------------------------------------------------------------------


def channel_dims(x: Tensor) -> tuple[int, ...]:
    """Dimensions reduced for per-channel statistics: all but dim 1 (``N, C, *spatial``); ``[N]`` and
    0-d tensors count as one channel."""
    if x.dim() <= 1:
        return tuple(range(x.dim()))
    return (0, *range(2, x.dim()))


def batch_moments(x: Tensor) -> tuple[float, Tensor, Tensor]:
    """Per-channel ``(n, mean, M2)`` of one batch ``x`` (``N, C, ...``; mean and M2 as float64 ``[C]``).

    The corrected two-pass algorithm (Chan, Golub & LeVeque 1983): ``c`` = the float32 mean, ``d = x - c``,
    ``mean = c + sum(d) / n`` and ``M2 = sum(d^2) - sum(d)^2 / n``. Both passes are plain vectorised sums
    (``torch.var_mean``'s Welford loop is ~40x slower on CPU) and the result is exact to float32 rounding
    of the deviations, whatever the mean: a large mean never cancels the spread. bf16/fp16 inputs are
    promoted to float32 by the subtraction (no separate cast). ``n`` is a Python number fixed by the shape
    (no sync, no recompilation under ``torch.compile``). One activation-sized float32 temporary lives
    for the duration of the call.
    """
    x = x.detach()
    if not x.is_floating_point():
        x = x.float()
    dims = channel_dims(x)
    channels = x.shape[1] if x.dim() >= 2 else 1
    n = float(x.numel() // max(channels, 1))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    centre = x.sum(dim=dims, dtype=acc) / n
    shape = [1] * x.dim()
    if x.dim() >= 2:
        shape[1] = channels
    d = x - centre.reshape(shape)
    shift = d.sum(dim=dims)
    m2 = d.square_().sum(dim=dims)
    shift = shift.reshape(-1).double()
    mean = centre.reshape(-1).double() + shift / n
    return n, mean, m2.reshape(-1).double() - shift * shift / n


class RunningMoments:
    """Per-channel count, mean and M2 (sum of squared deviations) of a stream of tensors.

    The state is one float64 tensor ``[3, C]`` (rows: count, mean, M2) on the input's device, created at
    the first update. Each update reduces the batch with :func:`batch_moments` (the corrected two-pass
    algorithm) and merges it with Chan et al.'s formula in float64:
    ``delta = m_b - m_a; n = n_a + n_b; m = m_a + delta n_b / n; M2 = M2_a + M2_b + delta^2 n_a n_b / n``.
    Everything is a tensor op: no host sync, and under ``torch.compile`` no Python number that changes
    per step (which would recompile).

    Example:
        >>> import torch
        >>> rm = RunningMoments()
        >>> _ = rm.update(torch.tensor([[1.0], [3.0]]))
        >>> _ = rm.update(torch.tensor([[5.0]]))
        >>> rm.mean, rm.var
        (tensor([3.], dtype=torch.float64), tensor([2.6667], dtype=torch.float64))
    """

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state: Tensor | None = None

    def update(self, x: Tensor) -> Tensor:
        """Merge ``x`` (``N, C, ...`` or ``N, C``) in; returns the batch's per-channel sum (float64; finite
        iff every element was finite, as long as nothing overflows)."""
        n_b, mean_b, m2_b = batch_moments(x)
        if self.state is None:  # created inside the traced hook under compile (dynamo replays it)
            self.state = torch.zeros(3, mean_b.numel(), dtype=torch.float64, device=x.device)
        count, mean, m2 = self.state[0], self.state[1], self.state[2]
        total = count + n_b
        delta = mean_b - mean
        frac = n_b / total
        mean.add_(delta * frac)
        m2.add_(m2_b + delta * delta * count * frac)
        count.copy_(total)
        return mean_b * n_b

    def reset(self) -> None:
        """Zero the state in place (keeps the tensor: no reallocation under compile)."""
        if self.state is not None:
            self.state.zero_()

    @property
    def count(self) -> Tensor | None:
        return None if self.state is None else self.state[0]

    @property
    def mean(self) -> Tensor | None:
        return None if self.state is None else self.state[1]

    @property
    def m2(self) -> Tensor | None:
        return None if self.state is None else self.state[2]

    @property
    def var(self) -> Tensor | None:
        """Population variance per channel (M2 / count)."""
        if self.state is None:
            return None
        return self.state[2] / self.state[0].clamp_min(1)


class ShiftedMoments:
    """Per-channel moments for hot paths: float64 sums of shifted data, ``n``, ``sum(x - K)`` and
    ``sum((x - K)^2)``, around a per-channel shift ``K`` (the first batch's mean, re-centred on the
    interval's mean at every :meth:`reset`).

    The shifted-data algorithm is exact as long as ``K`` is within a few standard deviations of the mean
    (the cancellation in ``M2 = S2 - S1^2 / n`` then loses nothing), which re-centring keeps true unless
    the mean moves by thousands of standard deviations within one logging interval. Each update is four
    activation-sized passes (``d = x - K``, two sums, an in-place square) and three in-place adds, about
    a third of :class:`RunningMoments`' small ops: what keeps a monitor with dozens of hooks under a few
    percent of the step time. Same read API (``count``, ``mean``, ``m2``, ``var``, ``state``, ``reset``);
    ``state`` rows are ``(n, S1, S2)``.

    Example:
        >>> import torch
        >>> sm = ShiftedMoments()
        >>> sm.update(torch.tensor([[1.0], [3.0]]))
        >>> sm.update(torch.tensor([[5.0]]))
        >>> sm.mean, sm.var
        (tensor([3.], dtype=torch.float64), tensor([2.6667], dtype=torch.float64))
    """

    __slots__ = ("_rows", "shift", "state")

    def __init__(self) -> None:
        self.state: Tensor | None = None
        self.shift: Tensor | None = None
        self._rows: tuple[Tensor, Tensor, Tensor] | None = None  # views of state's rows, made once

    def update(self, x: Tensor) -> None:
        """Add the batch ``x`` (``N, C, ...`` or ``N, C``)."""
        x = x.detach()
        if not x.is_floating_point():
            x = x.float()
        dims = channel_dims(x)
        if self._rows is None:  # created inside the traced hook under compile (dynamo replays it)
            channels = x.shape[1] if x.dim() >= 2 else 1
            shape = [1] * x.dim()
            if x.dim() >= 2:
                shape[1] = channels
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            self.shift = (x.sum(dim=dims, dtype=acc) / (x.numel() // channels)).reshape(shape)
            self.state = torch.zeros(3, channels, dtype=torch.float64, device=x.device)
            self._rows = (self.state[0], self.state[1], self.state[2])
        count, s1, s2 = self._rows
        d = x - self.shift
        count.add_(float(x.numel() // s1.shape[0]))  # static per shape: no sync, no recompile
        if x.dim() >= 2:
            s1.add_(d.sum(dim=dims))
            s2.add_(d.square_().sum(dim=dims))
        else:
            s1.add_(d.sum().reshape(1))
            s2.add_(d.square_().sum().reshape(1))

    def reset(self) -> None:
        """Zero the sums and re-centre the shift on the current mean (where it is finite)."""
        if self.state is None or self.shift is None:
            return
        mean = self.mean
        usable = torch.isfinite(mean) & (self.state[0] > 0)
        new_shift = torch.where(usable, mean, self.shift.reshape(-1).double())
        self.shift.copy_(new_shift.reshape(self.shift.shape).to(self.shift.dtype))
        self.state.zero_()

    @property
    def count(self) -> Tensor | None:
        return None if self.state is None else self.state[0]

    @property
    def mean(self) -> Tensor | None:
        if self.state is None or self.shift is None:
            return None
        return self.shift.reshape(-1).double() + self.state[1] / self.state[0].clamp_min(1)

    @property
    def m2(self) -> Tensor | None:
        if self.state is None:
            return None
        return (self.state[2] - self.state[1] ** 2 / self.state[0].clamp_min(1)).clamp_min(0)

    @property
    def var(self) -> Tensor | None:
        if self.state is None:
            return None
        return self.m2 / self.state[0].clamp_min(1)


class MomentBank:
    """Many :class:`ShiftedMoments` in three flat buffers, for monitors with dozens or hundreds of hooks.

    A :class:`ShiftedMoments` update costs eight small ops (three of them float64 adds with a cast); on a
    deep network with small activations those per-tensor ops cost more than the statistics' arithmetic.
    Once every moment has seen one batch (its width is then known), :meth:`build` moves all states into
    one float64 ``[3, total]`` buffer (each moment's ``state`` becomes a view of it) and the shifts into one
    float32 vector. From then on :meth:`take` reduces a tensor with four ops into a float32 scratch row
    (``sum(x - K)`` and ``sum((x - K)^2)``, written in place with ``out=``) and :meth:`fold` adds the whole
    scratch to the float64 state once per batch; the counts (integers, exact in float64 in any order)
    are added when :meth:`settle` is called, before the moments are read. The float32 sums and the
    float64 additions are the same values in the same order as :meth:`ShiftedMoments.update`'s, so the
    results are bit-identical. A tensor the bank cannot take (float64 data, a second call of the same module before
    the fold, a non-batched tensor, tracing under ``torch.compile``) goes through the moment's own
    ``update`` instead, after its pending scratch is folded.

    Example:
        >>> import torch
        >>> bank = MomentBank()
        >>> a, b = bank.add("a"), bank.add("b")
        >>> a.update(torch.tensor([[1.0], [3.0]])); b.update(torch.ones(2, 2, 4))  # first batch: own path
        >>> bank.build()
        True
        >>> bank.take(0, torch.tensor([[5.0]])), bank.take(1, torch.zeros(1, 2, 4))
        (True, True)
        >>> bank.fold(); bank.settle()  # settle: the counts of the folded batches, before reading
        >>> a.mean, a.var
        (tensor([3.], dtype=torch.float64), tensor([2.6667], dtype=torch.float64))
    """

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.moments: list[ShiftedMoments] = []
        self.ready = False
        self.state: Tensor | None = None  # [3, total] float64: count, S1, S2
        self.shift: Tensor | None = None  # [total] float32
        self.scratch: Tensor | None = None  # [2, total] float32: this batch's S1, S2
        self.offsets: list[int] = []
        self.widths: list[int] = []
        self._s1: list[Tensor] = []
        self._s2: list[Tensor] = []
        self._shifts: list[Tensor] = []
        self._pending: list[float] = []  # elements per channel taken into the scratch this batch (0: none)
        self._widths: Tensor | None = None  # channels per slot (int64, on the state's device)
        self._ends: Tensor | None = None  # cumulative widths: the first column after each slot
        self._stale = False  # the scratch still holds the last fold's sums (not zeroed: all were taken)
        self._buffer: Tensor | None = None  # flat x - K of contiguous CPU tensors, reused within a forward
        # folded batches not yet in the count row, per pattern of elements per channel (one per slot): the
        # counts are integers (exact in float64 up to 2^53), so adding them later, at :meth:`settle`, gives
        # the same numbers as adding them at every fold, without two ops per batch
        self._unsettled: dict[tuple[float, ...], int] = {}

    def add(self, key: str) -> ShiftedMoments:
        """A new moment (before :meth:`build`); its index is its slot."""
        if self.ready:
            raise RuntimeError("MomentBank.add: the bank is already built")
        moments = ShiftedMoments()
        self.keys.append(key)
        self.moments.append(moments)
        return moments

    def build(self) -> bool:
        """Move every moment into the flat buffers; ``False`` (nothing done) while some moment has not seen
        data yet, or when their devices or dtypes differ."""
        if self.ready:
            return True
        states = [m.state for m in self.moments]
        if not states or any(s is None for s in states):
            return False
        shifts = [m.shift for m in self.moments]
        if len({s.device for s in states}) != 1 or any(s.dtype != torch.float32 for s in shifts):
            return False
        self.widths = [s.shape[1] for s in states]
        self.offsets = [0]
        for width in self.widths[:-1]:
            self.offsets.append(self.offsets[-1] + width)
        self.state = torch.cat(states, dim=1)
        self.shift = torch.cat([s.reshape(-1) for s in shifts])
        self.scratch = torch.zeros(2, self.state.shape[1], dtype=torch.float32, device=self.state.device)
        for i, m in enumerate(self.moments):
            part = slice(self.offsets[i], self.offsets[i] + self.widths[i])
            m.state = self.state[:, part]
            m._rows = (m.state[0], m.state[1], m.state[2])
            m.shift = self.shift[part].view(m.shift.shape)
            self._shifts.append(m.shift)
            self._s1.append(self.scratch[0, part])
            self._s2.append(self.scratch[1, part])
        self._pending = [0.0] * len(self.moments)
        self._widths = torch.tensor(self.widths, device=self.state.device)
        self._ends = torch.cumsum(self._widths, 0)
        self.ready = True
        return True

    def take(self, slot: int, x: Tensor) -> bool:
        """Reduce ``x`` into ``slot``'s scratch (four ops); ``False`` when the moment must update itself."""
        if not self.ready or x.dim() < 2 or x.dtype == torch.float64 or torch.compiler.is_compiling():
            self.flush_slot(slot)
            return False
        if self._pending[slot]:  # a second call of the module before the fold: keep the order of adds
            self.flush_slot(slot)
            return False
        x = x.detach()
        dims = (0, *range(2, x.dim()))
        shift = self._shifts[slot]
        if x.device.type == "cpu" and x.is_contiguous():
            # A difference tensor allocated afresh lands on memory that is cold or mapped afresh (page
            # faults: 2.5x the arithmetic on 8 MiB after a training step, 10-20% on a few hundred KiB).
            # One flat buffer is reused while the sizes stay within a factor of two (a stage's blocks); it
            # shrinks with the stages, so the forward's tail holds only the last stage's size.
            numel, buffer = x.numel(), self._buffer
            dtype = torch.promote_types(x.dtype, shift.dtype)
            if buffer is None or not numel <= buffer.numel() < 2 * numel or buffer.dtype != dtype:
                self._buffer = None  # the old one is freed before the new one is made
                buffer = self._buffer = torch.empty(numel, dtype=dtype)
            # the values and layout of x - shift (x is contiguous, and so is the buffer's prefix)
            d = torch.sub(x, shift, out=buffer[:numel].view(x.shape))
        else:
            self._buffer = None
            d = x - shift
        torch.sum(d, dim=dims, out=self._s1[slot])
        torch.sum(d.square_(), dim=dims, out=self._s2[slot])
        self._pending[slot] = float(x.numel() // x.shape[1])
        return True

    def release(self) -> None:
        """Free the reused difference buffer (at the end of the forward, before the backward's peak)."""
        self._buffer = None

    def flush_slot(self, slot: int) -> None:
        """Fold one slot's pending scratch into its state now."""
        if not self.ready or not self._pending[slot]:
            return
        m = self.moments[slot]
        m._rows[0].add_(self._pending[slot])
        m._rows[1].add_(self._s1[slot])
        m._rows[2].add_(self._s2[slot])
        self._s1[slot].zero_()
        self._s2[slot].zero_()
        self._pending[slot] = 0.0

    def fold(self) -> None:
        """Add this batch's scratch to the float64 state (once per batch: one op when every slot was taken);
        its counts wait for :meth:`settle`."""
        self._buffer = None
        if not self.ready or not any(self._pending):
            return
        pending = tuple(self._pending)
        self._unsettled[pending] = self._unsettled.get(pending, 0) + 1
        if len(self._unsettled) > 16:  # shapes that keep changing: keep the bookkeeping bounded
            self.settle()
        if all(pending):  # every slot's scratch holds this batch's sums, and the next take overwrites it
            self.state[1:].add_(self.scratch)
            self._stale = True
        else:  # a slot not taken must add zeros: clear what an earlier batch left in it, then everything
            if self._stale:
                for slot in (i for i, p in enumerate(pending) if not p):
                    self._s1[slot].zero_()
                    self._s2[slot].zero_()
            self.state[1:].add_(self.scratch)
            self.scratch.zero_()
            self._stale = False
        self._pending = [0.0] * len(self.moments)

    def settle(self) -> None:
        """Add the folded batches' counts to the count row (:meth:`fold` defers them): call it before
        reading the moments (``count``, ``mean``, ``m2``, ``var``, ``state``)."""
        if not self._unsettled:
            return
        counts = torch.tensor(
            [[n * c for c in pending] for pending, n in self._unsettled.items()],
            dtype=torch.float64,
            device=self.state.device,
        ).sum(0)  # integers: exact in any order
        self._unsettled = {}
        # a transient per-channel vector (after the step's peak): nothing per channel is kept for it
        self.state[0].add_(torch.repeat_interleave(counts, self._widths, output_size=self.state.shape[1]))

    def reset(self) -> None:
        """:meth:`ShiftedMoments.reset` of every moment at once (the same arithmetic, vectorised)."""
        if not self.ready:
            for m in self.moments:
                m.reset()
            return
        self.settle()
        count = self.state[0]
        mean = self.shift.double() + self.state[1] / count.clamp_min(1)
        usable = torch.isfinite(mean) & (count > 0)
        self.shift.copy_(torch.where(usable, mean, self.shift.double()).to(self.shift.dtype))
        self.state.zero_()

    def first_nonfinite_slot(self) -> Tensor | None:
        """On the device, without a sync: the first slot (in order) with a non-finite S1 or S2, as a
        ``(found, slot)`` pair of 0-d tensors stacked; ``None`` before :meth:`build`."""
        if not self.ready:
            return None
        bad = ~torch.isfinite(self.state[1:]).all(0)
        column = torch.argmax(bad.to(torch.uint8))
        slot = torch.searchsorted(self._ends, column, right=True)
        return torch.stack([bad.any().to(torch.long), slot])


@dataclass
class Moments:
    """Merged per-channel statistics on the CPU (float64): ``count``, ``mean``, ``m2`` of shape ``[C]``."""

    count: Tensor
    mean: Tensor
    m2: Tensor

    @property
    def var(self) -> Tensor:
        """Per-channel population variance."""
        return self.m2 / self.count.clamp_min(1)

    def pooled(self) -> tuple[float, float, float]:
        """(count, mean, variance) over all channels together: the channels' moments merged by Chan's
        formula (total variance = mean within-channel variance + variance of the channel means)."""
        n = float(self.count.sum())
        if n <= 0:
            return 0.0, math.nan, math.nan
        mean = float((self.count * self.mean).sum() / n)
        m2 = float(self.m2.sum() + (self.count * (self.mean - mean) ** 2).sum())
        return n, mean, m2 / n


_KINDS = ("moments", "sum", "min", "max")


class StatsPacker:
    """Collects a monitor's on-device tensors for the interval's single collective.

    Keys are free-form strings; each entry says how ranks merge: ``moments`` (Chan), ``sum``, ``min``,
    ``max``. Tensors may live on any device and have any float/int dtype; they are sent as float64.
    """

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, list[Tensor]]] = []

    def moments(self, key: str, count: Tensor, mean: Tensor, m2: Tensor) -> None:
        """Per-channel (count, mean, M2) of one rank; ``count`` may be a scalar tensor."""
        mean = mean.reshape(-1)
        count = count.reshape(-1).expand_as(mean) if count.numel() == 1 else count.reshape(-1)
        self.entries.append((key, "moments", [count, mean, m2.reshape(-1)]))

    def running(self, key: str, moments: RunningMoments | ShiftedMoments) -> None:
        """Shortcut for a :class:`RunningMoments` or :class:`ShiftedMoments` (skipped if it never saw data
        on this rank: every rank must pack the same layout, so monitors should allocate states the same
        way on each rank)."""
        if moments.state is not None:
            self.moments(key, moments.count, moments.mean, moments.m2)

    def sum(self, key: str, value: Tensor) -> None:
        self.entries.append((key, "sum", [value.reshape(-1)]))

    def min(self, key: str, value: Tensor) -> None:
        self.entries.append((key, "min", [value.reshape(-1)]))

    def max(self, key: str, value: Tensor) -> None:
        self.entries.append((key, "max", [value.reshape(-1)]))

    def __len__(self) -> int:
        return len(self.entries)

    def flat(self) -> Tensor:
        """All entries as one float64 vector (on the first entry's device)."""
        parts = [t.detach().to(torch.float64) for _, _, ts in self.entries for t in ts]
        device = parts[0].device
        return torch.cat([p.to(device) for p in parts])

    def unpack(self, gathered: Tensor) -> PackedStats:
        """Merge ``gathered`` (``[world, total]`` float64 on the CPU) into per-key results."""
        out: dict[str, Any] = {}
        offset = 0
        for key, kind, tensors in self.entries:
            sizes = [t.numel() for t in tensors]
            chunks = []
            for size in sizes:
                chunks.append(gathered[:, offset : offset + size])
                offset += size
            if kind == "moments":
                out[key] = merge_moments(*chunks)
            elif kind == "sum":
                out[key] = chunks[0].sum(0)
            elif kind == "min":
                out[key] = chunks[0].min(0).values
            else:
                out[key] = chunks[0].max(0).values
        return PackedStats(out)


def merge_moments(count: Tensor, mean: Tensor, m2: Tensor) -> Moments:
    """Chan's merge of per-rank moments along dim 0 (each ``[world, C]``) into one :class:`Moments`."""
    n = count.sum(0)
    safe = n.clamp_min(1)
    merged_mean = (count * mean).sum(0) / safe
    merged_m2 = m2.sum(0) + (count * (mean - merged_mean) ** 2).sum(0)
    return Moments(n, merged_mean, merged_m2)


class PackedStats(dict):
    """The merged statistics of one interval: ``key -> Moments`` (moments) or ``key -> Tensor`` (others),
    all on the CPU in float64, identical on every rank."""


# --------------------------------------------------------------------------------------------------
# Findings and the shared diagnosis
# --------------------------------------------------------------------------------------------------

Severity = Literal["info", "warning", "error"]
_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass
class Finding:
    """One line of the diagnosis.

    Args:
        monitor: the monitor that found it (its ``monitor_name``).
        severity: ``"error"`` (training is broken: NaN/Inf), ``"warning"`` (likely to hurt), ``"info"``.
        layers: the layer names concerned (module names in the LightningModule).
        message: what was measured, with the numbers.
        suggestion: a concrete thing to try.
        step: the optimizer step it refers to, if any.
        values: the key numbers, for machine reading (``diagnosis.json``).
        kind: what was found, machine-readable (``"variance_exponential"``, ``"shattered"``,
            ``"nonfinite"``...: the constants of :mod:`lightning_convnets.callbacks.diagnosis`); ``""`` when
            unclassified. Tools (and the diagnosis zoo) match on it rather than on the wording.

    Example:
        >>> Finding("activation_variance", "warning", ["net.layer3"], "variance grows 1.9x per block",
        ...         "add BN or scale the residual branch", kind="variance_exponential").severity
        'warning'
    """

    monitor: str
    severity: Severity
    layers: list[str]
    message: str
    suggestion: str = ""
    step: int | None = None
    values: dict[str, float] = field(default_factory=dict)
    kind: str = ""

    def __post_init__(self) -> None:
        if self.severity not in _SEVERITY_ORDER:
            raise ValueError(
                f"Finding.severity must be one of {list(_SEVERITY_ORDER)}, got {self.severity!r}"
            )
        self.layers = list(self.layers)


class Diagnosis:
    """The findings of every monitor of one run, rendered once at the end of fit.

    Example:
        >>> d = Diagnosis()
        >>> d.add([Finding("m", "info", ["layer1"], "all good")])
        >>> "layer1" in d.to_markdown()
        True
    """

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self._contributors: set[int] = set()

    def add(self, findings: list[Finding]) -> None:
        self.findings.extend(findings)

    def sorted(self) -> list[Finding]:
        return sorted(self.findings, key=lambda f: (_SEVERITY_ORDER[f.severity], f.monitor))

    def to_markdown(self) -> str:
        lines = [
            "# Diagnosis",
            "",
            "| severity | monitor | kind | layers | finding | suggestion |",
            "|---|---|---|---|---|---|",
        ]
        for f in self.sorted():
            layers = ", ".join(f.layers) or "-"
            cells = [f.severity, f.monitor, f.kind or "-", layers, f.message, f.suggestion or "-"]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        if not self.findings:
            lines.append("| info | - | - | - | no monitor reported anything | - |")
        return "\n".join(lines) + "\n"

    def table(self) -> Any:
        """The findings as a ``rich.table.Table``."""
        from rich.table import Table

        table = Table(title="lightning-convnets diagnosis", show_lines=True)
        for column in ("severity", "monitor", "layers", "finding", "suggestion"):
            table.add_column(column, overflow="fold")
        colour = {"error": "bold red", "warning": "yellow", "info": "green"}
        for f in self.sorted():
            table.add_row(
                f"[{colour[f.severity]}]{f.severity}[/]",
                f.monitor,
                ", ".join(f.layers) or "-",
                f.message,
                f.suggestion or "-",
            )
        return table

    def write(self, directory: str | Path) -> Path:
        """Write ``diagnosis.md`` and ``diagnosis.json`` into ``directory``; returns the markdown path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "diagnosis.json").write_text(json.dumps([asdict(f) for f in self.sorted()], indent=2))
        path = directory / "diagnosis.md"
        path.write_text(self.to_markdown())
        return path

    def blocks(self) -> Any:
        """The findings as one block of text per finding (``rich`` renderables): a heading with the
        severity, monitor and kind, then the finding as a sentence, the layers and the suggestion, each
        wrapped to the console's width. Reads at 80 columns, where the five-column :meth:`table` folds
        every cell into a narrow strip."""
        from rich.console import Group
        from rich.padding import Padding
        from rich.text import Text

        colour = {"error": "bold red", "warning": "bold yellow", "info": "green"}
        parts: list[Any] = [Text("lightning-convnets diagnosis", style="bold")]
        if not self.findings:
            parts.append(Text("no monitor reported anything"))
        for f in self.sorted():
            head = Text()
            head.append(f.severity.upper(), style=colour[f.severity])
            head.append(f"  {f.monitor}" + (f" / {f.kind}" if f.kind else ""), style="bold")
            body = [Text(f.message)]
            if f.layers:
                body.append(Text("layers: " + ", ".join(f.layers), style="dim"))
            if f.suggestion:
                body.append(Text("try: " + f.suggestion, style="italic"))
            parts.extend([Text(""), head, Padding(Group(*body), (0, 0, 0, 2))])
        return Group(*parts)

    def print(self) -> None:
        """Print the findings (rank zero), one block per finding (:meth:`blocks`)."""
        from rich.console import Console

        Console().print(self.blocks())


_DIAGNOSES: weakref.WeakKeyDictionary[Any, Diagnosis] = weakref.WeakKeyDictionary()


def diagnosis_for(trainer: pl.Trainer) -> Diagnosis:
    """The shared :class:`Diagnosis` of ``trainer`` (created on first use)."""
    report = _DIAGNOSES.get(trainer)
    if report is None:
        report = _DIAGNOSES[trainer] = Diagnosis()
    return report


def log_dir(trainer: pl.Trainer) -> Path:
    """The run's log directory: the first logger's ``log_dir`` (or ``save_dir``), else the trainer's
    ``default_root_dir``: where the diagnosis and (under ``figures/``) the PNGs go."""
    from lightning_convnets.figures import figure_dir

    return figure_dir(trainer).parent


# --------------------------------------------------------------------------------------------------
# The base callback
# --------------------------------------------------------------------------------------------------


STRICT_ENV = "LIGHTNING_CONVNETS_STRICT_MONITORS"
"""Environment variable: ``1`` makes every monitor built with ``strict=None`` strict (CI, tests)."""


def strict_default() -> bool:
    """Whether monitors built with ``strict=None`` re-raise (``LIGHTNING_CONVNETS_STRICT_MONITORS=1``)."""
    import os

    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes")


class MonitorConfigError(ValueError):
    """A mistake in a monitor's configuration that is visible before training (a bad argument, an option
    naming a module the model does not have). The guard always lets it through: it is raised in
    ``setup``, before any training step, so nothing of the run is lost."""


# Lightning hooks (and checkpoint hooks) whose body runs under the guard in every monitor class
_GUARDED_HOOKS = frozenset(
    {name for name in vars(Callback) if name.startswith("on_")} | {"setup", "teardown", "load_state_dict"}
)
# hooks that still run once the monitor is off: hook removal, and the end-of-fit report (which then
# carries the monitor's ``error`` row)
_ALWAYS_RUN = frozenset({"teardown", "on_fit_end"})


def _trainer_of(args: tuple[Any, ...]) -> Any:
    return args[0] if args and hasattr(args[0], "global_step") else None


def _guard(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` (a monitor's Lightning hook) so that an unexpected exception switches the monitor off
    instead of ending the run (see :meth:`MonitorCallback.fail`). Nested calls (``super().hook(...)``)
    run bare: the outermost guard handles the exception."""
    if getattr(fn, "_monitor_guarded", False):
        return fn

    @functools.wraps(fn)
    def guarded(self: MonitorCallback, *args: Any, **kwargs: Any) -> Any:
        if not self.active and name not in _ALWAYS_RUN:
            if name == "on_train_batch_end":
                self._failed_rank_flush(args[0])
            elif name == "on_train_end":
                self._failed_rank_flush(args[0], at_end=True)
            return None
        if self._guard_depth:
            return fn(self, *args, **kwargs)
        self._guard_depth += 1
        try:
            return fn(self, *args, **kwargs)
        except MonitorConfigError:
            raise
        except Exception as err:
            if self.strict:
                raise
            self.fail(name, err, _trainer_of(args))
            return None
        finally:
            self._guard_depth -= 1

    guarded._monitor_guarded = True  # type: ignore[attr-defined]
    return guarded



class MonitorCallback(Callback):
    """Base class of the diagnostic monitors (see the module docstring for the subclass API).

    Args:
        log_every_n_steps: optimizer steps between reductions/logs; ``None`` uses the trainer's
            ``log_every_n_steps``.
        max_history: most history entries kept (and checkpointed); when full, every other entry is
            dropped so the curve still spans the run.
        sample_every_n_steps: record statistics on one optimizer step in every ``k`` (all of its
            micro-batches, steps ``0, k, 2k, ...``); 1 records every step. ``None`` (the default of the
            monitors): the cost-derived schedule, every step below ``dense_steps``, then one step in
            ``min(DEFAULT_SAMPLE_PERIOD, log interval)`` (:meth:`records`). An explicit ``k`` wins.
        dense_steps: optimizer steps recorded every step at the start of training. ``None``:
            ``DEFAULT_DENSE_STEPS`` with the default schedule, 0 with an explicit ``sample_every_n_steps``.
        train_only: only training-mode forwards are recorded (validation does not pollute statistics).
            Hooks check ``module.training`` in any case; with ``False`` they record eval forwards too.

        strict: re-raise an unexpected exception from the monitor instead of switching the monitor off
            (use it in tests and while developing a monitor; see "The guard" below). ``None``: ``True``
            when the environment variable ``LIGHTNING_CONVNETS_STRICT_MONITORS`` is ``1`` (this project's
            test suite sets it), else ``False``.

    The guard: every Lightning hook of a monitor, and every forward hook it registers, runs under one
    guard. An unexpected exception is reported once as a warning (the monitor, the hook, the exception
    and the option that would fix it), the monitor switches itself off for the rest of the run (its
    forward hooks are removed) and the end-of-fit diagnosis gets an ``error`` row; training goes on,
    bit-identical to a run without the monitor. :class:`MonitorConfigError` (a configuration mistake
    seen in ``setup``) is always raised. Under DDP a rank that switched off keeps taking part in the
    interval's collective (a failure flag travels with it) until every rank has switched off with it.

    Raises:
        ValueError: for non-positive intervals or history caps.

    Example:
        >>> import torch
        >>> class CountingMonitor(MonitorCallback):
        ...     monitor_name = "counting"
        ...     def attach(self, trainer, pl_module):
        ...         self.seen = torch.zeros((), device=pl_module.device)
        ...         self.add_hook(pl_module, self._count)
        ...     def _count(self, module, args, output):
        ...         if self.is_recording(module):
        ...             self.seen += 1
        ...     def pack(self, trainer, pl_module, packer):
        ...         packer.sum("forwards", self.seen)
        ...     def compute_metrics(self, trainer, pl_module, stats):
        ...         return {"forwards": float(stats["forwards"])}
        ...     def reset_interval(self):
        ...         self.seen.zero_()
        >>> CountingMonitor(log_every_n_steps=10, strict=True).interval(None)
        10
    """

    monitor_name: ClassVar[str] = "monitor"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _GUARDED_HOOKS & set(vars(cls)):
            setattr(cls, name, _guard(name, vars(cls)[name]))

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        max_history: int = DEFAULT_MAX_HISTORY,
        sample_every_n_steps: int | None = 1,
        train_only: bool = True,
        strict: bool | None = None,
        dense_steps: int | None = None,
    ) -> None:
        super().__init__()
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise MonitorConfigError(
                f"{type(self).__name__}: log_every_n_steps must be >= 1, got {log_every_n_steps}"
            )
        if max_history < 2:
            raise MonitorConfigError(f"{type(self).__name__}: max_history must be >= 2, got {max_history}")
        if sample_every_n_steps is not None and (
            not isinstance(sample_every_n_steps, int) or sample_every_n_steps < 1
        ):
            raise MonitorConfigError(
                f"{type(self).__name__}: sample_every_n_steps must be an int >= 1 or None (the cost-derived "
                f"default schedule), got {sample_every_n_steps!r}"
            )
        if dense_steps is not None and (not isinstance(dense_steps, int) or dense_steps < 0):
            raise MonitorConfigError(
                f"{type(self).__name__}: dense_steps must be an int >= 0 or None, got {dense_steps!r}"
            )
        self.log_every_n_steps = log_every_n_steps
        self.max_history = max_history
        self.sample_every_n_steps = sample_every_n_steps
        self.dense_steps = dense_steps
        self.train_only = train_only
        self.strict = strict_default() if strict is None else bool(strict)
        self.enabled = True
        self.active = True  # False once the monitor stepped aside (failure, or nothing to measure)
        self.failure: Finding | None = None  # the error row of a switched-off monitor
        self.notes: list[Finding] = []  # info rows about what the monitor could not measure
        self._guard_depth = 0
        self._packed_size: int | None = None  # length of the last packed vector (for a failed rank)
        self.history: list[dict[str, float]] = []
        self.collectives = 0
        self.last_stats: PackedStats | None = None
        self._recording = False
        self._handles: list[Any] = []  # installed hooks' handles (removable handles)
        self._hook_specs: list[HookSpec] = []  # every hook registered with add_hook, installed or not
        self._hooks_installed = False
        self._hooks_pinned = False  # a compiled model: hooks stay in (a graph keeps the hooks it traced)
        self._attached = False
        self._last_flush_step = -1
        self._batches_since_flush = 0

    # ----------------------------------------------------------------------------- subclass API
    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Register hooks (with :meth:`add_hook`). Called once, in ``setup`` of the fit stage."""

    def pack(self, trainer: pl.Trainer, pl_module: pl.LightningModule, packer: StatsPacker) -> None:
        """Add this interval's on-device statistics to ``packer``."""

    def compute_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: PackedStats
    ) -> dict[str, float]:
        """Metrics (without the ``monitor_name/`` prefix) from the merged statistics."""
        return {}

    def reset_interval(self) -> None:
        """Zero the on-device accumulators (after each flush)."""

    def diagnose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Finding]:
        """Findings for the end-of-fit diagnosis."""
        return []

    def figures(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Figure]:
        """End-of-fit figures, ``key -> matplotlib Figure`` (logged as ``monitors/<name>/<key>``)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Checkpointed state besides ``history``."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    # ----------------------------------------------------------------------------- helpers
    def is_recording(self, module: nn.Module) -> bool:
        """The gate every hook checks first: the monitor is on for this step, nothing paused it, and the
        module is in training mode (unless ``train_only=False``)."""
        return self._recording and _PAUSED == 0 and (module.training or not self.train_only)

    def add_hook(
        self,
        module: nn.Module,
        hook: Callable[..., Any],
        *,
        pre: bool = False,
        with_kwargs: bool = False,
        guard: bool = True,
    ) -> HookSpec:
        """Register a forward (or forward-pre) hook on ``module``, under the guard; removed at teardown.

        An exception inside the hook switches the monitor off (or is raised with ``strict=True``); the
        forward it observed goes on untouched. ``guard=False`` registers ``hook`` as it is: for hooks that
        run on every forward of many modules and guard their own body (``try`` around it, the exception to
        :meth:`hook_error`), one Python frame less per forward.

        The hook is installed only while the monitor records (:meth:`records`): the core takes it out of
        the module after a recorded step and puts it back before the next one (in order, so hooks keep
        their relative order). Returns a :class:`HookSpec`; its ``remove()`` drops the hook for good."""

        def failed(err: Exception) -> None:
            self.hook_error(module, err, pre)

        if not guard:
            fn = hook
        # fixed signatures where they suffice: a hook runs on every forward of a hooked module, and packing
        # *args/**kwargs is a measurable part of it on networks with hundreds of hooked modules
        elif with_kwargs:

            def fn(*args: Any, **kwargs: Any) -> Any:
                try:
                    return hook(*args, **kwargs)
                except Exception as err:
                    failed(err)
                    return None

        elif pre:

            def fn(mod: nn.Module, args: Any) -> Any:  # type: ignore[misc]
                try:
                    return hook(mod, args)
                except Exception as err:
                    failed(err)
                    return None

        else:

            def fn(mod: nn.Module, args: Any, output: Any) -> Any:  # type: ignore[misc]
                try:
                    return hook(mod, args, output)
                except Exception as err:
                    failed(err)
                    return None

        spec = HookSpec(self, module, fn, pre, with_kwargs)
        self._hook_specs.append(spec)
        spec.install()
        self._hooks_installed = True
        return spec

    def install_hooks(self) -> None:
        """Put every registered forward hook into its module (a recorded step begins)."""
        if not self._hooks_installed:
            for spec in self._hook_specs:
                spec.install()
            self._hooks_installed = True

    def uninstall_hooks(self) -> None:
        """Take the forward hooks out of the modules until the next recorded step: a step the schedule
        skips runs exactly the model's own forward (no hook dispatch at all). Kept in for compiled models."""
        if self._hooks_installed and not self._hooks_pinned:
            for spec in self._hook_specs:
                spec.uninstall()
            self._hooks_installed = False

    # ----------------------------------------------------------------------------- the guard
    def hook_error(self, module: nn.Module, error: Exception, pre: bool = False) -> None:
        """What a guarded forward hook does with an exception from its body: re-raise it with
        ``strict=True``, else switch the monitor off (:meth:`fail`)."""
        if self.strict:
            raise error
        self.fail(f"forward {'pre-' if pre else ''}hook on {type(module).__name__}", error, None)

    def failure_hint(self, hook: str, error: BaseException) -> str:
        """The option that would avoid ``error`` (monitors override it); ends the guard's warning."""
        return "report it with the model's structure if it looks like a bug of the monitor"

    def fail(self, hook: str, error: BaseException, trainer: pl.Trainer | None = None) -> None:
        """Switch the monitor off after ``error`` in ``hook``: hooks removed, one warning, an ``error``
        row for the diagnosis. Training is not touched."""
        first = self.failure is None
        self.active = False
        self._recording = False
        self.remove_hooks()
        if not first:
            return
        step = int(trainer.global_step) if trainer is not None else None
        where = f" at step {step}" if step is not None else ""
        message = (
            f"{type(self).__name__} switched itself off{where}: {hook} raised {type(error).__name__}: "
            f"{error}"
        )
        hint = self.failure_hint(hook, error)
        self.failure = Finding(
            self.monitor_name,
            "error",
            [],
            message,
            f"{hint}; training went on without this monitor (strict=True raises instead)",
            step=step,
            kind="monitor_error",
        )
        rank_zero_warn(f"{message}. Training goes on without it. Fix: {hint} (or pass strict=True to raise).")

    def step_aside(self, reason: str, suggestion: str = "") -> None:
        """Switch the monitor off because the model gives it nothing to measure (not an error): one info
        line now and one ``info`` row in the diagnosis; no work per step from then on."""
        self.active = False
        self._recording = False
        self.remove_hooks()
        self.notes.append(Finding(self.monitor_name, "info", [], reason, suggestion, kind="not_applicable"))
        rank_zero_info(f"{type(self).__name__}: {reason}")

    def remove_hooks(self) -> None:
        for spec in self._hook_specs:
            spec.uninstall()
        self._hook_specs.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooks_installed = False
        self._attached = False

    def sample_period(self, trainer: pl.Trainer | None) -> int:
        """Optimizer steps between recorded steps after the dense phase: ``sample_every_n_steps`` when
        given, else ``min(DEFAULT_SAMPLE_PERIOD, log interval)`` (every logging interval gets at least one
        recorded step)."""
        if self.sample_every_n_steps is not None:
            return self.sample_every_n_steps
        return max(1, min(DEFAULT_SAMPLE_PERIOD, self.interval(trainer)))

    def dense_until(self) -> int:
        """The first optimizer step of the sparse phase (every step before it is recorded)."""
        if self.dense_steps is not None:
            return self.dense_steps
        return DEFAULT_DENSE_STEPS if self.sample_every_n_steps is None else 0

    def records(self, step: int, trainer: pl.Trainer | None = None) -> bool:
        """Whether the schedule records optimizer step ``step``: a pure function of the step and the
        monitor's settings (the same run records the same steps; a resumed run goes on where it stopped,
        with nothing to restore)."""
        return step < self.dense_until() or step % self.sample_period(trainer) == 0

    def interval(self, trainer: pl.Trainer | None) -> int:
        """Optimizer steps between flushes."""
        return int(self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 50) or 50)

    def collective(self, trainer: pl.Trainer, packed: Tensor) -> Tensor:
        """The monitor's ONE collective per interval: ``trainer.strategy.all_gather`` of the packed
        vector, returned as ``[world, total]`` float64 on the CPU (the only host sync of the interval)."""
        self.collectives += 1
        gathered = trainer.strategy.all_gather(packed)
        if gathered.dim() == packed.dim():  # single process: the strategy returns the tensor itself
            gathered = gathered.unsqueeze(0)
        return gathered.reshape(gathered.shape[0], -1).to("cpu", torch.float64)

    def log_metrics(self, trainer: pl.Trainer, metrics: dict[str, float], step: int | None = None) -> None:
        """One dict to every logger, from global rank zero only (not ``self.log``: it would drop
        values off the trainer's logging steps and cost a call per key)."""
        if not trainer.is_global_zero or not metrics:
            return
        step = int(trainer.global_step if step is None else step)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()

    def append_history(self, entry: dict[str, float]) -> None:
        """Add an entry; halve the history (keep every other entry, always the newest) past the cap."""
        self.history.append(entry)
        if len(self.history) > self.max_history:
            last = self.history[-1]
            self.history = self.history[:-1:2] + [last]

    def flush(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Reduce the interval across ranks (one collective), log one dict, extend the history, reset.

        Every rank must call it at the same point (the core does so on the same optimizer steps).
        Returns the prefixed metrics (identical on every rank).
        """
        packer = StatsPacker()
        self.pack(trainer, pl_module, packer)
        if len(packer):
            flat = packer.flat()
            if getattr(trainer, "world_size", 1) > 1:
                # a failure flag (summed over ranks) rides along: a rank that switched off keeps sending
                # this layout, so nobody waits for it alone, and every rank stops at the same step
                flag = torch.zeros(1, dtype=flat.dtype, device=flat.device)
                gathered = self.collective(trainer, torch.cat([flag, flat]))
                self._packed_size = int(flat.numel())
                if float(gathered[:, 0].sum()) > 0:
                    self._packed_size = None  # every rank is off after this collective
                    self.fail("flush", RuntimeError("another rank switched this monitor off"), trainer)
                    return {}
                stats = packer.unpack(gathered[:, 1:])
            else:
                stats = packer.unpack(self.collective(trainer, flat))
        else:
            stats = PackedStats()
        self.last_stats = stats
        metrics = self.compute_metrics(trainer, pl_module, stats)
        self.reset_interval()
        self._batches_since_flush = 0
        self._last_flush_step = trainer.global_step
        if not metrics:
            return {}
        prefixed = {f"{self.monitor_name}/{k}": float(v) for k, v in metrics.items()}
        self.append_history({"step": float(trainer.global_step), **prefixed})
        self.log_metrics(trainer, prefixed)
        return prefixed

    # ----------------------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not self._attached:
            compiled = is_compiled(pl_module)
            if compiled:
                _forget_compiled_graphs(type(self).__name__)
            self.attach(trainer, pl_module)
            self._attached = True
            self._hooks_pinned = compiled

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.remove_hooks()
            self._recording = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # all micro-batches of one optimizer step share global_step, so accumulation samples whole steps
        self._recording = self.enabled and self.records(trainer.global_step, trainer)
        if self._recording:
            self.install_hooks()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._recording and not (self.enabled and self.records(trainer.global_step, trainer)):
            self.uninstall_hooks()  # the next step is quiet (global_step is the next step's now)
        self._recording = False
        self._batches_since_flush += 1
        if self._flush_due(trainer):
            self.flush(trainer, pl_module)

    def _flush_due(self, trainer: pl.Trainer) -> bool:
        step = trainer.global_step
        # global_step only moves on optimizer steps: with accumulation the later micro-batches of a
        # logged step see the same value and must not flush again
        return step > 0 and step != self._last_flush_step and step % self.interval(trainer) == 0

    def _failed_rank_flush(self, trainer: pl.Trainer, at_end: bool = False) -> None:
        """On a rank where the monitor failed (DDP): send the flag and a NaN payload of the usual length
        at the usual steps, so the other ranks' collective completes and they switch off too."""
        if self.failure is None or self._packed_size is None or getattr(trainer, "world_size", 1) <= 1:
            return
        due = trainer.global_step != self._last_flush_step if at_end else self._flush_due(trainer)
        if not due:
            return
        self._last_flush_step = trainer.global_step
        device = trainer.strategy.root_device
        payload = torch.full((self._packed_size + 1,), math.nan, dtype=torch.float64, device=device)
        payload[0] = 1.0
        self.collective(trainer, payload)
        self._packed_size = None  # every rank is off after this collective: no more of them

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the tail of a run shorter than an interval still counts; every rank saw the same batches
        if self._batches_since_flush > 0 and trainer.global_step != self._last_flush_step:
            self.flush(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_convnets.figures import log_figure

        report = diagnosis_for(trainer)
        if self.failure is None:
            try:
                for key, fig in self.figures(trainer, pl_module).items():
                    log_figure(trainer, f"monitors/{self.monitor_name}/{key}", fig)
            except Exception as err:  # a plotting problem must not hide the diagnosis
                if self.strict:
                    raise
                rank_zero_warn(f"{type(self).__name__}: could not draw its figures: {err}")
            try:
                report.add(self.diagnose(trainer, pl_module))
            except Exception as err:
                if self.strict:
                    raise
                self.fail("diagnose", err, trainer)
        report.add(self.notes)
        if self.failure is not None:
            report.add([self.failure])
        report._contributors.add(id(self))
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, MonitorCallback)]
        if all(id(cb) in report._contributors for cb in monitors):
            if trainer.is_global_zero:
                try:
                    report.print()
                    report.write(log_dir(trainer))
                except Exception as err:  # the report is the last thing: never end a fit on it
                    if self.strict:
                        raise
                    rank_zero_warn(f"lightning-convnets: could not print or write the diagnosis: {err}")
            _DIAGNOSES.pop(trainer, None)

    @property
    def state_key(self) -> str:
        # distinct per monitor kind and interval, so several monitors (or two of one kind with other
        # settings) can share a checkpoint
        return _cached_state_key(
            self, monitor=self.monitor_name, every=self.log_every_n_steps, sample=self.sample_every_n_steps
        )

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "history": list(self.history), "extra": self.extra_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "history" not in state_dict:
            raise KeyError(
                f"{type(self).__name__}.load_state_dict: checkpoint state has no 'history' "
                f"(keys: {sorted(state_dict)})"
            )
        self.history = list(state_dict["history"])[-self.max_history :]
        self.load_extra_state(state_dict.get("extra", {}))


for _name in _GUARDED_HOOKS & set(vars(MonitorCallback)):
    setattr(MonitorCallback, _name, _guard(_name, vars(MonitorCallback)[_name]))
del _name


class HookSpec:
    """One forward (pre-)hook a monitor registered: installed in its module on recorded steps, out of it
    on quiet ones (:meth:`MonitorCallback.uninstall_hooks`). ``remove()`` drops it for good."""

    __slots__ = ("fn", "handle", "module", "owner", "pre", "removed", "with_kwargs")

    def __init__(
        self, owner: MonitorCallback, module: nn.Module, fn: Callable[..., Any], pre: bool, with_kwargs: bool
    ) -> None:
        self.owner, self.module, self.fn, self.pre, self.with_kwargs = owner, module, fn, pre, with_kwargs
        self.handle: Any = None
        self.removed = False

    def install(self) -> None:
        if self.handle is None and not self.removed:
            register = self.module.register_forward_pre_hook if self.pre else self.module.register_forward_hook
            self.handle = register(self.fn, with_kwargs=self.with_kwargs)

    def uninstall(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def remove(self) -> None:
        """Drop the hook for good (now and on every later recorded step)."""
        self.uninstall()
        self.removed = True
        if self in self.owner._hook_specs:
            self.owner._hook_specs.remove(self)


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` runs compiled graphs (Lightning's ``from_compiled``, or a compiled submodule)."""
    if getattr(model, "_compiler_ctx", None):
        return True
    return any(type(m).__name__ == "OptimizedModule" for m in model.modules())


_COMPILE_NOTICE = [False]


def _forget_compiled_graphs(who: str) -> None:
    """A model compiled before the monitors attach may already hold graphs traced without their hooks,
    and dynamo does not guard on hooks added to inner modules later (it would reuse those graphs and the
    hooks would never run). ``torch.compiler.reset()`` drops every cached graph, so the next call traces
    the model again with the hooks in; said once per process."""
    torch.compiler.reset()
    if not _COMPILE_NOTICE[0]:
        _COMPILE_NOTICE[0] = True
        rank_zero_info(
            f"{who}: the model is compiled; its graphs are traced again with the monitors' hooks in "
            "(torch.compiler.reset(): other compiled functions recompile on their next call)"
        )


def _cached_state_key(callback: Callback, **key: Any) -> str:
    """``callback._generate_state_key(**key)``, formatted once per distinct ``key``: Lightning reads
    ``state_key`` around every callback hook call (several per step and callback), and formatting it costs
    about a microsecond each time."""
    values = tuple(key.values())
    cached = callback.__dict__.get("_state_key_cache")
    if cached is None or cached[0] != values:
        cached = callback.__dict__["_state_key_cache"] = (values, callback._generate_state_key(**key))
    return cached[1]
