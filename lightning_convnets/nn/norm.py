"""The one normalisation-layer factory of the backbones: :func:`make_norm` over the kinds in :data:`NORMS`."""

from __future__ import annotations

import math
from typing import Literal

from torch import nn

NormKind = Literal["batch", "group", "none"]
NORMS: tuple[str, ...] = ("batch", "group", "none")


def check_norm(norm: str, where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` unless ``norm`` is one of :data:`NORMS`."""
    if norm not in NORMS:
        raise ValueError(f"{where}: norm must be one of {NORMS}, got {norm!r}")


def make_norm(norm: str, channels: int) -> nn.Module:
    """The normalisation layer named by ``norm`` (``"batch"``, ``"group"`` or ``"none"``) for ``channels``.

    ``"group"`` uses 32 groups, or ``gcd(channels, 32)`` when the channel count does not allow 32 (so tiny
    test widths still work).

    Example:
        >>> make_norm("group", 48).num_groups
        16
        >>> make_norm("none", 8)
        Identity()
    """
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(channels, 32), channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


#: The BatchNorm layers of torch (what folding, ``freeze_bn`` and ``fast_predict`` look for).
BATCHNORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
