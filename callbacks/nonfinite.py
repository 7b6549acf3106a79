"""Where the first NaN/Inf activation came from: the activation monitor's non-finite search.

Owns :class:`FirstNonFinite`: after each recorded batch, a handful of tensor ops on the device (no host
read) find the first measured module, in target order, whose moments turned non-finite, and keep the
earliest as one number, ``step * 2^20 + target index``, which the monitor's one collective reduces with a
``min`` across ranks (the earliest step, then the shallowest module) and :func:`decode` reads back at a
logging step. The monitor is
:class:`~lightning_convnets.callbacks.activation_variance.ActivationVarianceMonitor`; the search is
described in ``docs/monitors.md``.

Also :func:`training_findings`: the diagnosis rows of what the task's ``nonfinite`` policy did (each
rollback, the skipped steps), read by duck typing from the module's ``nonfinite_guard`` (callbacks know
nothing of tasks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .diagnosis import Finding
from .moments import MomentBank, ShiftedMoments
from .packing import StatsPacker

__all__ = [
    "KIND_ROLLBACK",
    "KIND_SKIPPED_STEPS",
    "NO_NONFINITE",
    "STEP_SCALE",
    "FirstNonFinite",
    "decode",
    "training_findings",
]

KIND_ROLLBACK = "rollback"
KIND_SKIPPED_STEPS = "skipped_steps"

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


def training_findings(pl_module: Any) -> list[Finding]:
    """The diagnosis rows of the ``nonfinite`` policy of ``pl_module`` (duck-typed: any module with a
    ``nonfinite_guard`` holding ``rollbacks`` and ``skipped_steps``): one ``warning`` per rollback (step,
    loss, cause, first non-finite module, what was done) and one ``warning`` listing the skipped steps of
    ``nonfinite="skip"``; ``[]`` without such a guard.

    Example:
        >>> class Guard:
        ...     mode, skipped_steps = "rollback", [12]
        ...     rollbacks = [{"step": 12, "loss": float("nan"), "cause": "non-finite loss",
        ...                   "module": "backbone.conv1", "action": "restored the snapshot of step 10"}]
        >>> class Task:
        ...     nonfinite_guard = Guard()
        >>> [(f.kind, f.step, f.layers) for f in training_findings(Task())]
        [('rollback', 12, ['backbone.conv1'])]
    """
    guard = getattr(pl_module, "nonfinite_guard", None)
    if guard is None:
        return []
    findings = []
    for record in list(getattr(guard, "rollbacks", None) or []):
        module = record.get("module")
        findings.append(
            Finding(
                "nonfinite",
                "warning",
                [m.strip() for m in module.split(",")] if module else [],
                f"rollback at optimizer step {record['step']}: {record['cause']} (loss {record['loss']:.4g}); "
                f"{record['action']}",
                "if rollbacks repeat: lower the learning rate, add gradient clipping "
                "(trainer.gradient_clip_val), check the data of those steps",
                step=int(record["step"]),
                values={"loss": float(record["loss"])},
                kind=KIND_ROLLBACK,
            )
        )
    skipped = list(getattr(guard, "skipped_steps", None) or [])
    if skipped and getattr(guard, "mode", "") == "skip":
        shown = ", ".join(str(s) for s in skipped[:20]) + (" ..." if len(skipped) > 20 else "")
        findings.append(
            Finding(
                "nonfinite",
                "warning",
                [],
                f"{len(skipped)} optimizer step(s) skipped (non-finite loss or gradient, or a loss spike): {shown}",
                "a few are harmless; many point at the learning rate or the data",
                step=int(skipped[0]),
                values={"skipped_steps": float(len(skipped))},
                kind=KIND_SKIPPED_STEPS,
            )
        )
    return findings
