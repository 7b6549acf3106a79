"""The update-to-weight ratio rules: is the learning rate sane for each layer?

Owns the judging of :class:`~lightning_convnets.callbacks.optimization.OptimizationMonitor`'s ratios,
small functions of plain numbers with their thresholds and ``KIND_*`` constants as module constants:
:class:`LayerTally` (a layer's judged steps), which recorded steps are judged (:func:`lr_rising`), the
findings (:func:`update_ratio_findings`, :func:`not_optimized_finding`, :func:`frozen_layers_finding`)
and the report's per-layer table (:func:`ratio_rows`). The measuring is
:mod:`~lightning_convnets.callbacks.param_updates`'; the method, the logged keys and the costs are in
``docs/monitors.md``.

The healthy band: an update of about a thousandth of the weights per step (``RATIO_HEALTHY = 1e-3``) is
the rule of thumb of Karpathy's CS231n notes ("Neural Networks Part 3: Learning and Evaluation",
*Ratio of weights:updates*: "a rough heuristic is that this ratio should be somewhere around 1e-3. If it
is lower than this then the learning rate might be too low. If it is higher then the learning rate is
likely too high"). The rules here flag a layer only when it stays far from it: below ``RATIO_LOW`` (100x
under: the layer barely moves) or above ``RATIO_HIGH`` on at least ``STAY_FRACTION`` of the recorded steps
after the warmup (not one outlier).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .diagnosis import Finding, not_applicable

__all__ = [
    "DEFAULT_WARMUP_STEPS",
    "KIND_NOT_OPTIMIZED",
    "KIND_UPDATE_RATIO_HIGH",
    "KIND_UPDATE_RATIO_LOW",
    "KIND_UPDATE_RATIO_OK",
    "MIN_JUDGED_STEPS",
    "RATIO_HEALTHY",
    "RATIO_HIGH",
    "RATIO_LOW",
    "STAY_FRACTION",
    "LayerTally",
    "frozen_layers_finding",
    "lr_rising",
    "not_optimized_finding",
    "ratio_rows",
    "update_ratio_findings",
]

KIND_UPDATE_RATIO_LOW = "update_ratio_low"
"""Finding kind: layers whose update/weight ratio stays far below the band (barely learning)."""
KIND_UPDATE_RATIO_HIGH = "update_ratio_high"
"""Finding kind: layers whose update/weight ratio stays far above the band (about to diverge)."""
KIND_UPDATE_RATIO_OK = "update_ratio_ok"
"""Finding kind (info): every judged layer stayed within the band most of the time."""
KIND_NOT_OPTIMIZED = "not_optimized"
"""Finding kind: trainable parameters (``requires_grad``) that no optimizer holds: they never change."""

RATIO_HEALTHY = 1e-3
"""The rule of thumb (CS231n): updates of about a thousandth of the weights per step."""
RATIO_LOW = 1e-5
"""Below this (100x under the rule of thumb) a layer barely moves: the learning rate is too low for it."""
RATIO_HIGH = 1e-1
"""Above this (a tenth of the weights each step, 100x over the rule of thumb) a layer is about to
diverge; healthy SGD runs of small convnets measure 1e-3 to 3e-2 in their first steps."""
STAY_FRACTION = 0.75
"""A layer is flagged when it is out of the band on at least this share of the judged steps."""
MIN_JUDGED_STEPS = 3
"""Recorded steps after the warmup needed before a layer is judged."""
DEFAULT_WARMUP_STEPS = 10
"""Steps not judged at the start (the ratio moves fastest there), nor any step while a learning rate rises
(a warmup schedule)."""


@dataclass
class LayerTally:
    """The judged recorded steps of one layer (or parameter group), summed over the run.

    Example:
        >>> LayerTally(steps=2, below=2, above=0, sum_log=-8.0).ratio
        0.0001
    """

    steps: float = 0.0
    below: float = 0.0
    above: float = 0.0
    sum_log: float = 0.0

    @property
    def ratio(self) -> float:
        """Geometric mean of the judged ratios (nan before any)."""
        return 10 ** (self.sum_log / self.steps) if self.steps else math.nan


def _fmt(x: float) -> str:
    return f"{x:.1e}" if math.isfinite(x) else str(x)


def lr_rising(lrs: Mapping[int, Sequence[Any]], previous: Mapping[int, Sequence[Any]]) -> bool:
    """Whether a learning rate rose since the previous recorded step (a warmup schedule: not judged).
    ``lrs`` and ``previous`` map an optimizer's index to its groups' rates; an optimizer whose group count
    changed, or a rate that is not a float, says nothing.

    Example:
        >>> lr_rising({0: [0.1, 0.02]}, {0: [0.1, 0.01]}), lr_rising({0: [0.1]}, {0: [0.2]})
        (True, False)
    """
    rising = False
    for o, rates in lrs.items():
        before = previous.get(o)
        if before is not None and len(before) == len(rates):
            rising = rising or any(
                isinstance(a, float) and isinstance(b, float) and a > b * (1 + 1e-6)
                for a, b in zip(rates, before)
            )
    return rising


def update_ratio_findings(
    tallies: dict[str, LayerTally],
    groups: dict[str, list[str]],
    group_lrs: dict[str, float],
    monitor: str,
    since: int | None,
    low: float = RATIO_LOW,
    high: float = RATIO_HIGH,
    stay: float = STAY_FRACTION,
    min_steps: int = MIN_JUDGED_STEPS,
) -> list[Finding]:
    """One finding per parameter group and direction whose judged layers stay out of the band, naming the
    layers (worst first), their ratios, the group's learning rate and the fix; an ``info`` line when every
    judged layer stayed in. ``groups`` maps a group's name to its judged layers.

    Example:
        >>> t = {"fc": LayerTally(10, 10, 0, -80.0)}
        >>> [f.kind for f in update_ratio_findings(t, {"group0": ["fc"]}, {"group0": 1e-6}, "optimization", 10)]
        ['update_ratio_low']
    """
    findings = []
    after = f" after step {since}" if since is not None else ""
    judged_any = []
    for group, layers in groups.items():
        lr = group_lrs.get(group, math.nan)
        lr_text = f"learning rate {lr:.3g}" if math.isfinite(lr) else "its learning rate"
        seen = [
            (name, tallies[name]) for name in layers if name in tallies and tallies[name].steps >= min_steps
        ]
        judged_any += [t.ratio for _, t in seen]
        for direction in ("low", "high"):
            out = [(n, t) for n, t in seen if (t.below if direction == "low" else t.above) >= stay * t.steps]
            if not out:
                continue
            out.sort(key=lambda nt: nt[1].ratio, reverse=direction == "high")
            worst = out[0][1].ratio
            shown = ", ".join(f"{n} {_fmt(t.ratio)}" for n, t in out[:3]) + (
                f" and {len(out) - 3} more" if len(out) > 3 else ""
            )
            share = f"{len(out)} of {len(seen)} layers" if len(seen) > 1 else "its layer"
            steps = int(max(t.steps for _, t in out))
            if direction == "low":
                factor = RATIO_HEALTHY / worst if worst > 0 else math.inf
                message = (
                    f"parameter group {group} ({lr_text}) barely learns: the update/weight ratio of {share} "
                    f"stays below {low:.0e} ({shown}; geometric mean over {steps} recorded steps{after}; "
                    f"healthy ~{RATIO_HEALTHY:.0e})"
                )
                suggestion = (
                    f"raise this group's learning rate (~{min(factor, 1e6):.0f}x to reach ~{RATIO_HEALTHY:.0e}); "
                    "if it should not learn, freeze it (requires_grad=False: frozen layers are skipped); "
                    "else check that its gradients reach it"
                )
                kind = KIND_UPDATE_RATIO_LOW
            else:
                factor = worst / RATIO_HEALTHY
                message = (
                    f"parameter group {group} ({lr_text}) moves too fast: the update/weight ratio of {share} "
                    f"stays above {high:.0e} ({shown}; geometric mean over {steps} recorded steps{after}; "
                    f"healthy ~{RATIO_HEALTHY:.0e}): about to diverge"
                )
                suggestion = (
                    f"lower this group's learning rate (~{factor:.0f}x to reach ~{RATIO_HEALTHY:.0e}) or add "
                    "warmup; with AdamW, check that weight decay is not set too high (lr x weight_decay moves "
                    "every weight each step)"
                )
                kind = KIND_UPDATE_RATIO_HIGH
            values = {
                "ratio": worst,
                "lr": lr,
                "layers_out": float(len(out)),
                "layers_judged": float(len(seen)),
            }
            findings.append(
                Finding(
                    monitor,
                    "warning",
                    [n for n, _ in out],
                    message,
                    suggestion,
                    step=None,
                    values=values,
                    kind=kind,
                )
            )
    if not findings and judged_any:
        ordered = sorted(judged_any)
        median = ordered[len(ordered) // 2]
        findings.append(
            Finding(
                monitor,
                "info",
                [],
                f"update/weight ratios within the band: median {_fmt(median)} over {len(ordered)} layers "
                f"(range {_fmt(ordered[0])} to {_fmt(ordered[-1])}){after}",
                values={"median_ratio": median, "min_ratio": ordered[0], "max_ratio": ordered[-1]},
                kind=KIND_UPDATE_RATIO_OK,
            )
        )
    return findings


def not_optimized_finding(stray: Sequence[str], monitor: str) -> Finding:
    """The warning for trainable parameters that no optimizer's parameter groups hold (they never change).

    Example:
        >>> not_optimized_finding(["extra.weight"], "optimization").kind
        'not_optimized'
    """
    shown = ", ".join(stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
    return Finding(
        monitor,
        "warning",
        list(stray),
        f"{len(stray)} trainable parameter(s) are in no optimizer's parameter groups and never change: {shown}",
        "add them to configure_optimizers' parameter groups, or set requires_grad=False",
        kind=KIND_NOT_OPTIMIZED,
    )


def frozen_layers_finding(frozen: Sequence[str], monitor: str) -> Finding:
    """The ``info`` line naming the frozen layers (``requires_grad=False`` at the end) the ratio skipped.

    Example:
        >>> frozen_layers_finding(["net.0"], "optimization").message
        '1 frozen layer(s) (requires_grad=False at the end) skipped by the update/weight ratio: net.0'
    """
    return not_applicable(
        monitor,
        f"{len(frozen)} frozen layer(s) (requires_grad=False at the end) skipped by the update/weight ratio: "
        f"{', '.join(frozen[:3])}{' ...' if len(frozen) > 3 else ''}",
    )


def ratio_rows(
    layers: Sequence[str],
    groups: Sequence[str],
    judged: Sequence[bool],
    tallies: Mapping[str, LayerTally],
    grad_norms: Mapping[str, float],
) -> list[dict[str, Any]]:
    """The report's per-layer table: each layer's group, whether it is judged, its judged ratio, the share
    of its judged steps below and above the band, and its gradient norm of the last interval
    (``grad_norms`` by layer; nan where absent).

    Example:
        >>> row = ratio_rows(["fc"], ["group0"], [True], {"fc": LayerTally(4, 1, 0, -12.0)}, {})[0]
        >>> row["update/weight (judged steps)"], row["share below band"]
        (0.001, 0.25)
    """
    rows = []
    for name, group, is_judged in zip(layers, groups, judged):
        tally = tallies.get(name, LayerTally())
        rows.append(
            {
                "layer": name,
                "group": group,
                "judged": is_judged,
                "update/weight (judged steps)": tally.ratio,
                "share below band": tally.below / tally.steps if tally.steps else math.nan,
                "share above band": tally.above / tally.steps if tally.steps else math.nan,
                "grad norm (last interval)": grad_norms.get(name, math.nan),
            }
        )
    return rows
