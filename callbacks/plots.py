"""The drawing code of the monitors: end-of-fit matplotlib figures from what they measured.

The monitors measure, :mod:`lightning_convnets.callbacks.diagnosis` judges, this module draws. Each
function takes plain data (a history list, layer names, profile curves) and returns a ``Figure`` drawn
with the non-interactive Agg backend (unless another backend was already chosen).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["batchnorm_discrepancy", "shattering_profiles", "variance_vs_depth"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def variance_vs_depth(
    history: Sequence[Mapping[str, float]],
    names: Sequence[str],
    num_curves: int = 6,
    prefix: str = "activation_variance",
) -> Figure:
    """Variance vs depth (log scale), one curve per chosen history entry (evenly spaced, first and last
    included), and the residual branch ratio below when blocks were measured.

    Args:
        history: the monitor's history entries (``{"step", "<prefix>/<name>/var", ...}``).
        names: the measured modules in depth order (the x axis).
        num_curves: at most this many curves.
        prefix: the metric prefix (the monitor's name).

    Example:
        >>> fig = variance_vs_depth([{"step": 0.0, "a/l1/var": 1.0, "a/l2/var": 2.0}], ["l1", "l2"], prefix="a")
        >>> len(fig.axes)
        1
    """
    plt = _pyplot()
    prefix = f"{prefix}/"
    count = min(num_curves, len(history))
    picks = sorted({round(i * (len(history) - 1) / max(count - 1, 1)) for i in range(count)})
    has_ratio = any(f"{prefix}{n}/branch_ratio" in e for e in history for n in names)
    fig, axes = plt.subplots(
        2 if has_ratio else 1,
        1,
        figsize=(max(6, 0.35 * len(names)), 6 if has_ratio else 4),
        squeeze=False,
        sharex=True,
    )
    cmap = plt.get_cmap("viridis")
    for rank, pick in enumerate(picks):
        entry = history[pick]
        colour = cmap(rank / max(len(picks) - 1, 1))
        xs = [i for i, n in enumerate(names) if f"{prefix}{n}/var" in entry]
        ys = [max(entry[f"{prefix}{names[i]}/var"], 1e-30) for i in xs]
        axes[0][0].plot(xs, ys, marker="o", ms=3, color=colour, label=f"step {int(entry['step'])}")
        if has_ratio:
            rx = [i for i, n in enumerate(names) if f"{prefix}{n}/branch_ratio" in entry]
            ry = [max(entry[f"{prefix}{names[i]}/branch_ratio"], 1e-30) for i in rx]
            axes[1][0].plot(rx, ry, marker="o", ms=3, color=colour)
    axes[0][0].set_yscale("log")
    axes[0][0].set_ylabel("Var(output)")
    axes[0][0].set_title("activation variance along the depth")
    axes[0][0].legend(fontsize="small")
    if has_ratio:
        axes[1][0].set_yscale("log")
        axes[1][0].set_ylabel("Var(F(x)) / Var(x)")
    bottom = axes[-1][0]
    bottom.set_xticks(range(len(names)))
    bottom.set_xticklabels(names, rotation=90, fontsize="x-small")
    fig.tight_layout()
    return fig


def batchnorm_discrepancy(
    series: Mapping[str, tuple[Sequence[tuple[int, float]], Sequence[tuple[int, float]]]],
) -> Figure:
    """z-shift and batch/running variance ratio of every BN layer over training (one line per layer).

    Args:
        series: ``layer -> (z_shift points, log_var_ratio points)``, each a list of ``(step, value)``, in
            depth order (dark: shallow, light: deep).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    cmap = plt.get_cmap("viridis")
    for i, (name, (z_shift, log_ratio)) in enumerate(series.items()):
        colour = cmap(i / max(len(series) - 1, 1))
        if z_shift:
            axes[0].plot(*zip(*z_shift), color=colour, lw=1, label=name)
        if log_ratio:
            axes[1].plot([s for s, _ in log_ratio], [math.exp(v) for _, v in log_ratio], color=colour, lw=1)
    axes[0].set_ylabel("z-shift (RMS)")
    axes[0].set_title("BN train/test discrepancy per layer (dark: shallow, light: deep)")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("batch var / running var")
    axes[1].set_xlabel("step")
    if len(series) <= 8:
        axes[0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def shattering_profiles(
    profiles: Sequence[Mapping[str, Any]],
    band: float,
    lag1_history: Sequence[tuple[float, float]],
) -> Figure:
    """Autocorrelation of s(t) with the white-noise band, s(t) itself (unit std), and rho(1) over training.

    Args:
        profiles: the profiles to draw (``{"step", "autocorrelation", "s"}``, tensors), e.g. the first and
            the latest.
        band: the white-noise band 1.96/sqrt(K).
        lag1_history: ``(step, rho(1))`` of every probe.
    """
    plt = _pyplot()
    fig, (ax_rho, ax_s, ax_lag) = plt.subplots(1, 3, figsize=(13, 3.6))
    for p in profiles:
        rho = p["autocorrelation"]
        lags = min(rho.numel(), max(rho.numel() // 4, 2))
        ax_rho.plot(range(lags), rho[:lags].numpy(), marker=".", label=f"step {p['step']}")
        s = p["s"]
        t = torch.linspace(0, 1, s.numel())
        ax_s.plot(t.numpy(), (s / s.std().clamp_min(1e-30)).numpy(), lw=0.8, label=f"step {p['step']}")
    for ax in (ax_rho, ax_lag):
        ax.axhspan(-band, band, color="grey", alpha=0.25, label="white-noise band")
        ax.axhline(0.0, color="black", lw=0.5)
    ax_rho.set(title="autocorrelation of s(t)", xlabel="lag k (points)", ylabel="rho(k)")
    ax_s.set(title="s(t) = d/dt f(x(t)) (unit std)", xlabel="t along the probe line", ylabel="s / std(s)")
    ax_lag.plot([s for s, _ in lag1_history], [v for _, v in lag1_history], marker="o")
    ax_lag.set(title="rho(1) during training", xlabel="optimizer step", ylabel="rho(1)", ylim=(-1.05, 1.05))
    for ax in (ax_rho, ax_s):
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
