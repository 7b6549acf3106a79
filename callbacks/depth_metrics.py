"""The activation monitor's metrics along the depth, from an interval's merged moments.

Owns the arithmetic from the :class:`~lightning_convnets.callbacks.moments.Moments` of each measured
target (its output, and for a residual block its shortcut, branch and sum) to the logged values: mean,
variance, per-channel variance range, dead channels, growth from the previous target, the residual
branch's variance and ratio (:func:`target_metrics`), and the growth per block (:func:`geomean_growth`).
Pure functions of what :class:`~lightning_convnets.callbacks.packing.StatsPacker` returns; the hooks that
feed the moments are
:class:`~lightning_convnets.callbacks.activation_variance.ActivationVarianceMonitor`'s, the judging is
:mod:`lightning_convnets.callbacks.diagnosis`'s. The keys are listed in ``docs/monitors.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .moments import Moments
from .targets import Target

__all__ = ["geomean_growth", "growth_ratio", "target_metrics"]


def target_metrics(
    targets: Sequence[Target], aliases: Mapping[str, str], stats: Mapping[str, Any]
) -> tuple[dict[str, float], list[float], str | None]:
    """The metrics of each target with data in ``stats`` (keys ``<index>/out``, ``/shortcut``, ``/branch``,
    ``/sum``; an identity shortcut measured once is read through ``aliases``), in depth order.

    Returns:
        ``(metrics, block_variances, first_nonfinite)``: the metrics keyed ``<target name>/<metric>``; the
        output variances of the blocks (kind ``"block"`` or ``"plain"``) in depth order, whose
        :func:`geomean_growth` is the growth per block; the name of the first target whose statistics are
        not finite (``None`` when all are).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_convnets.callbacks.moments import merge_moments
        >>> one = lambda v: merge_moments(torch.tensor([[4.0]]), torch.tensor([[0.0]]), torch.tensor([[4.0 * v]]))
        >>> targets = [Target("stem", nn.Identity(), "stem"), Target("block", nn.Identity(), "block")]
        >>> metrics, blocks, bad = target_metrics(targets, {}, {"0/out": one(1.0), "1/out": one(2.0)})
        >>> metrics["block/var"], metrics["block/growth"], blocks, bad
        (2.0, 2.0, [2.0], None)
    """
    metrics: dict[str, float] = {}
    chain: list[tuple[str, float]] = []  # (name, var) of every measured target output, in depth order
    block_vars: list[float] = []
    first_bad: str | None = None
    for index, target in enumerate(targets):
        out = stats.get(f"{index}/out")
        if not isinstance(out, Moments) or float(out.count.sum()) == 0:
            continue
        name = target.name
        _, mean, var = out.pooled()
        metrics[f"{name}/mean"] = mean
        metrics[f"{name}/var"] = var
        channel_var = out.var
        metrics[f"{name}/var_ch_min"] = float(channel_var.min())
        metrics[f"{name}/var_ch_max"] = float(channel_var.max())
        dead = (out.mean == 0) & (out.m2 == 0)
        metrics[f"{name}/dead_fraction"] = float(dead.double().mean())
        if chain:
            metrics[f"{name}/growth"] = growth_ratio(var, chain[-1][1])
        chain.append((name, var))
        if target.kind in ("block", "plain"):
            block_vars.append(var)
        finite = math.isfinite(var) and math.isfinite(mean)
        if target.residual:
            shortcut_key = aliases.get(f"{index}/shortcut", f"{index}/shortcut")
            shortcut, branch = stats.get(shortcut_key), stats.get(f"{index}/branch")
            total = stats.get(f"{index}/sum", out)
            if isinstance(shortcut, Moments) and isinstance(branch, Moments):
                x_var, f_var = shortcut.pooled()[2], branch.pooled()[2]
                metrics[f"{name}/shortcut_var"] = x_var
                metrics[f"{name}/branch_var"] = f_var
                metrics[f"{name}/branch_ratio"] = growth_ratio(f_var, x_var)
                finite = finite and math.isfinite(x_var) and math.isfinite(f_var)
            if isinstance(total, Moments):
                metrics[f"{name}/sum_var"] = total.pooled()[2]
        if not finite and first_bad is None:
            first_bad = name  # fallback when no step was tracked (e.g. NaN already in the first batch)
    return metrics, block_vars, first_bad


def growth_ratio(a: float, b: float) -> float:
    """``a / b``; ``inf`` (``a > 0``) or ``nan`` where ``b`` is zero or not finite.

    Example:
        >>> growth_ratio(3.0, 2.0), growth_ratio(1.0, 0.0)
        (1.5, inf)
    """
    if b == 0 or not math.isfinite(b):
        return math.inf if a > 0 else math.nan
    return a / b


def geomean_growth(variances: Sequence[float]) -> float:
    """The geometric mean growth per step of ``variances`` (at least two, depth order): ``(last / first)
    ** (1 / (n - 1))``; ``nan`` where an end is not positive or not finite.

    Example:
        >>> geomean_growth([1.0, 2.0, 4.0])
        2.0
    """
    first, last = variances[0], variances[-1]
    if first <= 0 or last <= 0 or not (math.isfinite(first) and math.isfinite(last)):
        return math.nan
    return (last / first) ** (1.0 / (len(variances) - 1))
