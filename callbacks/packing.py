"""The one collective of a logging interval: :class:`StatsPacker` collects a monitor's on-device
statistics into one float64 vector, :class:`PackedStats` holds what comes back merged across ranks.

Owns the packing layout and the merge rule of each entry (``moments`` by Chan's formula, ``sum``, ``min``,
``max``); :meth:`lightning_convnets.callbacks.core.MonitorCallback.flush` runs the collective itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .moments import RunningMoments, ShiftedMoments, merge_moments

__all__ = ["PackedStats", "StatsPacker"]


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


class PackedStats(dict):
    """The merged statistics of one interval: ``key -> Moments`` (moments) or ``key -> Tensor`` (others),
    all on the CPU in float64, identical on every rank."""
