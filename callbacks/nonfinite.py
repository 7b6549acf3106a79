"""Where the first NaN/Inf activation came from: the activation monitor's non-finite search.

Owns :class:`FirstNonFinite`: after each recorded batch, a handful of tensor ops on the device (no host
read) find the first measured module, in target order, whose moments turned non-finite, and keep the
earliest as one number, ``step * 2^20 + target index``, which the monitor's one collective reduces with a
``min`` across ranks (the earliest step, then the shallowest module) and :func:`decode` reads back at a
logging step. The monitor is
:class:`~lightning_convnets.callbacks.activation_variance.ActivationVarianceMonitor`; the search is
described in ``docs/monitors.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .moments import MomentBank, ShiftedMoments
from .packing import StatsPacker

__all__ = ["NO_NONFINITE", "STEP_SCALE", "FirstNonFinite", "decode"]

STEP_SCALE = 2**20  # code = step * STEP_SCALE + target index (exact in float64 to 2^33 steps)
NO_NONFINITE = float(2**53)  # the code while every activation has been finite


class FirstNonFinite:
    """The earliest (step, target) at which a measured activation's moments went non-finite, kept on the
    device as :attr:`code` (``step * STEP_SCALE + target index``, :data:`NO_NONFINITE` while none).

    Every state was finite after the previous recorded batch (or the code would have been set then), so
    the first non-finite entry, in target order, of all the states is the first module that produced
    NaN/Inf in this batch. The code is never reset: the first one found stays.

    Example:
        >>> import torch
        >>> from lightning_convnets.callbacks.moments import ShiftedMoments
        >>> moments = {"0/out": ShiftedMoments(), "1/out": ShiftedMoments()}
        >>> moments["0/out"].update(torch.ones(2, 3))
        >>> moments["1/out"].update(torch.full((2, 3), float("nan")))
        >>> tracker = FirstNonFinite()
        >>> tracker.track(7, None, [], moments)
        >>> decode(tracker.code)
        (7, 1)
    """

    def __init__(self) -> None:
        self.code: Tensor | None = None  # on device: step * STEP_SCALE + target index, or NO_NONFINITE
        self._layout: tuple[tuple[str, int], ...] = ()
        self._segments: Tensor | None = None

    def track(
        self,
        step: int,
        bank: MomentBank | None,
        slot_target: Sequence[int],
        moments: Mapping[str, ShiftedMoments],
    ) -> None:
        """Look at the moments after a recorded batch of ``step``: the bank's flat buffer once built (its
        slot ``i`` belongs to target ``slot_target[i]``), else every state of ``moments`` (keys
        ``"<target index>/..."``). A handful of tensor ops, no host sync."""
        if bank is not None and bank.ready:  # one flat buffer: no concatenation per batch
            # the same few tensor ops on every device and step: no host read (a CPU-only shortcut would hide
            # from the CPU tests what a GPU pays)
            found = bank.first_nonfinite_slot()
            if self.code is None:
                self.code = torch.full((), NO_NONFINITE, dtype=torch.float64, device=found.device)
            if self._segments is None or self._layout != ("bank",):
                self._segments = torch.tensor(slot_target, dtype=torch.float64, device=found.device)
                self._layout = ("bank",)
            fresh = found[0].bool() & (self.code >= NO_NONFINITE)
            # index_select, not [tensor]: indexing with a 0-d tensor reads it on the host
            target = torch.index_select(self._segments, 0, found[1:2])[0]
            self.code = torch.where(fresh, step * STEP_SCALE + target, self.code)
            return
        states = [(key, m.state) for key, m in moments.items() if m.state is not None]
        if not states:
            return
        device = states[0][1].device
        layout = tuple((key, state.shape[1]) for key, state in states)
        if self._layout != layout:
            ids = [int(key.split("/", 1)[0]) for key, _ in states]
            self._segments = torch.cat(
                [torch.full((2 * c,), i, dtype=torch.float64) for i, (_, c) in zip(ids, layout)]
            ).to(device)
            self._layout = layout
        if self.code is None:
            self.code = torch.full((), NO_NONFINITE, dtype=torch.float64, device=device)
        bad = ~torch.isfinite(torch.cat([state[1:].reshape(-1) for _, state in states]))
        target = torch.index_select(self._segments, 0, torch.argmax(bad.to(torch.uint8)).reshape(1))[0]
        fresh = bad.any() & (self.code >= NO_NONFINITE)
        self.code = torch.where(fresh, step * STEP_SCALE + target, self.code)

    def pack(self, packer: StatsPacker, device: torch.device | str) -> None:
        """Add the code to the interval's collective as ``"nonfinite"``, reduced with ``min`` across ranks."""
        code = self.code if self.code is not None else torch.tensor(NO_NONFINITE, device=device)
        # step * 2^20 + target index: the min over ranks is the earliest step, then the shallowest module
        packer.min("nonfinite", code)


def decode(code: Tensor | float | None) -> tuple[int, int] | None:
    """``(step, target index)`` of a (reduced) code, ``None`` when no activation went non-finite.

    Example:
        >>> decode(3 * STEP_SCALE + 2), decode(NO_NONFINITE)
        ((3, 2), None)
    """
    value = float(code.min()) if isinstance(code, Tensor) else NO_NONFINITE if code is None else float(code)
    if value >= NO_NONFINITE:
        return None
    return divmod(int(value), STEP_SCALE)
