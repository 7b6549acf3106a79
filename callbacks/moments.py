"""Streaming per-channel moments on the device: what the monitors accumulate between two logging steps.

Owns the moment algebra: :func:`batch_moments` (one batch, corrected two-pass), :class:`RunningMoments`
(Chan's merge per update), :class:`ShiftedMoments` (shifted sums, the hot-path form), :class:`MomentBank`
(many shifted moments in three flat buffers), :class:`Moments` (merged statistics on the CPU) and
:func:`merge_moments` (Chan's merge across ranks). Nothing here syncs with the host or knows about
Lightning; :mod:`lightning_convnets.callbacks.packing` sends these moments across ranks. The algebra is
explained in ``docs/monitors.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "MomentBank",
    "Moments",
    "RunningMoments",
    "ShiftedMoments",
    "batch_moments",
    "channel_dims",
    "merge_moments",
]


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

    def saved(self) -> dict[str, Tensor] | None:
        """The sums and the shift, on the CPU (a checkpoint's copy); ``None`` before the first update."""
        if self.state is None or self.shift is None:
            return None
        return {"state": self.state.detach().cpu().clone(), "shift": self.shift.detach().cpu().clone()}

    def restore(self, saved: dict[str, Tensor], device: torch.device | str) -> None:
        """Continue from :meth:`saved` on ``device``: the next update adds to the saved sums exactly."""
        self.state = saved["state"].to(device, torch.float64)
        self._rows = (self.state[0], self.state[1], self.state[2])
        self.shift = saved["shift"].to(device)

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

    def saved(self) -> dict[str, dict[str, Tensor]]:
        """Every moment's :meth:`ShiftedMoments.saved` by key, counts settled first (a checkpoint's copy:
        a resumed run continues the interval's partial sums and the shifts exactly)."""
        self.settle()
        return {key: saved for key, m in zip(self.keys, self.moments) if (saved := m.saved()) is not None}

    def restore(self, saved: Mapping[str, dict[str, Tensor]], device: torch.device | str) -> None:
        """Put :meth:`saved` moments back on ``device``, into the moments of those keys that have not seen
        data yet; nothing once the bank is built."""
        if self.ready:
            return
        for key, moments in zip(self.keys, self.moments):
            if key in saved and moments.state is None:
                moments.restore(saved[key], device)

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


def merge_moments(count: Tensor, mean: Tensor, m2: Tensor) -> Moments:
    """Chan's merge of per-rank moments along dim 0 (each ``[world, C]``) into one :class:`Moments`."""
    n = count.sum(0)
    safe = n.clamp_min(1)
    merged_mean = (count * mean).sum(0) / safe
    merged_m2 = m2.sum(0) + (count * (mean - merged_mean) ** 2).sum(0)
    return Moments(n, merged_mean, merged_m2)
