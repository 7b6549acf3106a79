"""Findings and the rules that produce them: what the monitors' measurements mean.

Owns :class:`Finding` (one line of the report, with a machine-readable ``kind``: the ``KIND_*``
constants, and what to try: the ``FIX_*`` constants), :class:`Diagnosis` (every monitor's findings,
figures and tables of one run, printed and written once at the end of fit as ``diagnosis.md``, ``.json``
and the HTML page of :mod:`lightning_convnets.callbacks.report`; :func:`diagnosis_for` gives a trainer's)
and the judging rules. The monitors *measure*, this
module *judges*, :mod:`lightning_convnets.callbacks.plots` *draws*. Every rule is one small function
taking plain numbers and returning one :class:`Finding` or ``None``; thresholds are module constants
passed as arguments. Start with :func:`variance_growth_shape` (exponential vs linear growth, told apart by
the shape of the increments). The reasoning behind each rule is in ``docs/monitors.md``; the zoo that
scores them is ``benchmarks/diagnosis_zoo.py``.
"""

from __future__ import annotations

import itertools
import json
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lightning.pytorch.utilities import rank_zero_warn

from . import report

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

__all__ = [
    "DepthPoint",
    "Diagnosis",
    "Finding",
    "GrowthShape",
    "bn_noisy_batch_stats",
    "bn_rank_disagreement",
    "bn_still_drifting",
    "bn_train_test_shift",
    "bn_variance_mismatch",
    "bn_zshift_spike",
    "constant_gradient",
    "dead_relus",
    "diagnosis_for",
    "dominant_branches",
    "forget_diagnosis",
    "log_dir",
    "monitor_error",
    "nonfinite_activation",
    "nonfinite_gradient",
    "not_applicable",
    "shattering_decline",
    "shattering_verdict",
    "variance_growth",
    "variance_growth_shape",
]

# ---------------------------------------------------------------------------------------------- kinds
KIND_VARIANCE_EXPONENTIAL = "variance_exponential"
KIND_VARIANCE_LINEAR = "variance_linear"
KIND_VARIANCE_STABLE = "variance_stable"
KIND_VARIANCE_VANISHING = "variance_vanishing"
KIND_NONFINITE = "nonfinite"
KIND_DEAD_RELU = "dead_relu"
KIND_BRANCH_DOMINATES = "branch_dominates"
KIND_SHATTERED = "shattered"
KIND_PARTLY_SHATTERED = "partly_shattered"
KIND_SMOOTH = "smooth_gradients"
KIND_CONSTANT_GRADIENT = "constant_gradient"
KIND_SHATTERING_DECLINE = "shattering_decline"
KIND_BN_VARIANCE_MISMATCH = "bn_variance_mismatch"
KIND_BN_TRAIN_TEST_SHIFT = "bn_train_test_shift"
KIND_BN_ZSHIFT_SPIKE = "bn_zshift_spike"
KIND_BN_RANK_DISAGREEMENT = "bn_rank_disagreement"
KIND_BN_DRIFT = "bn_drift"
KIND_BN_NOISY_BATCH_STATS = "bn_noisy_batch_stats"
KIND_MONITOR_ERROR = "monitor_error"
KIND_NOT_APPLICABLE = "not_applicable"

# ------------------------------------------------------------------------------ findings and the report
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
    """The findings of every monitor of one run, rendered once at the end of fit (the terminal, then
    ``diagnosis.md``, ``diagnosis.json`` and ``diagnosis.html`` in the log folder), with the figures
    (:meth:`add_figure`) and tables (:meth:`add_tables`) the HTML page embeds.

    Example:
        >>> d = Diagnosis()
        >>> d.add([Finding("m", "info", ["layer1"], "all good")])
        >>> "layer1" in d.to_markdown()
        True
    """

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.contributors: set[int] = set()  # ids of the monitors that added their findings
        self.figures: list[tuple[str, str, bytes]] = []  # (monitor, key, PNG bytes) for the HTML page
        self.layer_tables: list[tuple[str, str, list[dict[str, Any]]]] = []  # (monitor, title, rows)
        self.meta: dict[str, str] = {}  # a few lines under the HTML page's heading

    def add(self, findings: list[Finding]) -> None:
        self.findings.extend(findings)

    def add_figure(self, monitor: str, key: str, png: bytes | str | Path) -> None:
        """Embed a figure in the HTML page: its PNG bytes, or the path of a PNG file (read now).

        Raises:
            ValueError: when the bytes are not a PNG.
        """
        data = png if isinstance(png, bytes) else Path(png).read_bytes()
        if not data.startswith(report.PNG_SIGNATURE):
            raise ValueError(f"Diagnosis.add_figure: figure {monitor}/{key} is not a PNG ({str(png)[:80]!r})")
        self.figures.append((monitor, key, data))

    def add_tables(self, monitor: str, tables: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        """Add a monitor's tables (``title -> rows``, a row a dict ``column -> value``) to the HTML page.

        Raises:
            TypeError: when ``tables`` is not a mapping of titles to lists of dicts.
        """
        if not isinstance(tables, Mapping):
            got = type(tables).__name__
            raise TypeError(f"{monitor}: tables() must return a dict title -> rows, got {got}")
        for title, rows in tables.items():
            if isinstance(rows, (str, bytes)) or not all(isinstance(r, Mapping) for r in rows):
                raise TypeError(f"{monitor}: table {title!r} must be a list of dicts (column -> value)")
            self.layer_tables.append((monitor, str(title), [dict(r) for r in rows]))

    def to_html(self) -> str:
        """The self-contained HTML page (:func:`lightning_convnets.callbacks.report.render_html`): the
        findings, the figures and the tables added so far."""
        return report.render_html(
            [asdict(f) for f in self.sorted()], self.figures, self.layer_tables, meta=self.meta
        )

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

    def write(self, directory: str | Path, strict: bool = False) -> Path:
        """Write ``diagnosis.md``, ``diagnosis.json`` and ``diagnosis.html`` (:meth:`to_html`) into
        ``directory``; returns the markdown path. A failure to build or write the HTML page is one warning
        (the other two files are written first), raised with ``strict``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "diagnosis.json").write_text(json.dumps([asdict(f) for f in self.sorted()], indent=2))
        path = directory / "diagnosis.md"
        path.write_text(self.to_markdown())
        try:
            (directory / "diagnosis.html").write_text(self.to_html(), encoding="utf-8")
        except Exception as err:
            if strict:
                raise
            rank_zero_warn(f"lightning-convnets: could not write diagnosis.html: {type(err).__name__}: {err}")
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

    def contribute(
        self, trainer: pl.Trainer, monitor: object, monitors: Sequence[object], strict: bool = False
    ) -> None:
        """Note that ``monitor`` added its findings; once every one of ``monitors`` has, print and write the
        report (global rank zero, into the run's :func:`log_dir`) and forget it. A failure to print or write
        is a warning (the report is the last thing of a fit: it never ends one), raised with ``strict``."""
        self.contributors.add(id(monitor))
        if not all(id(m) in self.contributors for m in monitors):
            return
        if trainer.is_global_zero:
            try:
                directory = log_dir(trainer)
                self.meta.setdefault("log folder", str(directory))
                self.meta.setdefault("optimizer steps", str(int(trainer.global_step)))
                self.print()
                self.write(directory, strict=strict)
            except Exception as err:
                if strict:
                    raise
                rank_zero_warn(f"lightning-convnets: could not print or write the diagnosis: {err}")
        forget_diagnosis(trainer)

    def print(self) -> None:
        """Print the findings (rank zero), one block per finding (:meth:`blocks`)."""
        from rich.console import Console

        Console().print(self.blocks())


_DIAGNOSES: weakref.WeakKeyDictionary[Any, Diagnosis] = weakref.WeakKeyDictionary()


def monitor_error(monitor: str, message: str, suggestion: str, step: int | None) -> Finding:
    """The ``error`` row of a monitor that switched itself off (its guard caught ``message``)."""
    return Finding(monitor, "error", [], message, suggestion, step=step, kind=KIND_MONITOR_ERROR)


def not_applicable(monitor: str, reason: str, suggestion: str = "") -> Finding:
    """The ``info`` row of a monitor that stepped aside: the model gives it nothing to measure."""
    return Finding(monitor, "info", [], reason, suggestion, kind=KIND_NOT_APPLICABLE)


def diagnosis_for(trainer: pl.Trainer) -> Diagnosis:
    """The shared :class:`Diagnosis` of ``trainer`` (created on first use)."""
    report = _DIAGNOSES.get(trainer)
    if report is None:
        report = _DIAGNOSES[trainer] = Diagnosis()
    return report


def forget_diagnosis(trainer: pl.Trainer) -> None:
    """Drop ``trainer``'s :class:`Diagnosis` (once it is written: the next fit starts a new one)."""
    _DIAGNOSES.pop(trainer, None)


def log_dir(trainer: pl.Trainer) -> Path:
    """The run's log directory: the first logger's ``log_dir`` (or ``save_dir``), else the trainer's
    ``default_root_dir``: where the diagnosis and (under ``figures/``) the PNGs go."""
    from lightning_convnets.figures import figure_dir

    return figure_dir(trainer).parent


# ----------------------------------------------------------------------------------------- thresholds
EXPLODE_GROWTH = 1.2
"""Per-block variance growth (geometric mean, first block to last) above which exponential growth is a
warning; below it (and above 1) it is reported as slow, as info."""
VANISH_GROWTH = 0.67
"""Per-block variance growth below which the variance is reported as vanishing."""
INCREMENT_GROWTH = 1.15
"""Per-block growth of the increments (branch variances) from which growth counts as exponential: flat
increments (about 1x per block) are the linear regime."""
LINEAR_MIN_OVERALL = 1.25
"""Overall growth (last block / first) from which flat increments are reported as linear growth rather
than a stable variance."""
LINEAR_MIN_STAGE = 1.1
"""...or geometric-mean growth between the blocks of one stage from which they are (a BN net whose
projection shortcuts reset the level at each stage grows within stages, not overall)."""
MIN_INCREMENTS = 3
"""Increments needed to fit their growth; with fewer the shape is undetermined."""
UNDETERMINED_GROWTH = 2.0
"""With too few blocks to see the shape, per-block growth from which the variance is still reported (a
warning): doubling per block, the rate of a norm-free residual net. Linear growth over two blocks can reach
1.5-2x per block, so a lower bound would flag healthy short BN nets."""
DEAD_FRACTION = 0.25
"""Fraction of always-zero channels of a layer that makes a dead-ReLU finding."""
BRANCH_RATIO = 4.0
"""Var(F(x)) / Var(x) above which a residual branch dominates its shortcut."""
SHATTERED_MARGIN = 0.5
"""rho(1) below this (but outside the white-noise band) is reported as partly shattered."""
SHATTERING_DROP = 0.3
"""A fall of rho(1) by more than this between the first and the latest probe is reported."""
Z_THRESHOLD = 0.5
"""RMS z-shift (running standard deviations) of a BN layer that makes a train/test shift finding."""
VAR_RATIO_THRESHOLD = 2.0
"""Batch/running variance ratio (or its inverse) of a BN layer that makes a finding."""
RANK_THRESHOLD = 0.05
"""Cross-rank spread of BN running means (running standard deviations) that makes a finding..."""
RANK_NOISE_RATIO = 10.0
"""...when it is also this many times the spread expected from batch noise alone (measured: below 1 with
i.i.d. shards, 50-750 with one shard shifted by 2 std)."""
DRIFT_THRESHOLD = 0.1
"""Running-mean drift per interval at the end of training that is reported as still drifting."""
SPIKE_FACTOR = 3.0
"""A z-shift peak above this many times the run's median before it is a spike."""
NOISY_ELEMENTS = 32
"""Batch elements per channel (images x positions) below which a BN layer's batch statistics are noisy:
the batch variance is then off by more than 25% (``sqrt(2 / (n - 1))``) from one step to the next."""
NOISY_Z = 0.1
"""Mean z-shift of those layers from which the noise is reported (pure sampling noise of n independent
elements gives ``1 / sqrt(n)``: 0.18 at n = 32)."""
NOISY_LAYER_FRACTION = 0.2
"""Fraction of the BN layers that must be starved (fewer than ``NOISY_ELEMENTS``)."""


# ---------------------------------------------------------------------------------------- suggestions
# what each finding suggests trying (its ``suggestion``), one constant per finding kind
FIX_NONFINITE_ACTIVATION = (
    "lower the learning rate or clip gradients (Trainer(gradient_clip_val=1.0)); check the inputs and "
    "this layer's operation for division by zero / log of <= 0; prefer bf16 to fp16"
)
FIX_DEAD_RELU = (
    "lower the learning rate, use a warm-up, or a leaky activation; check the bias/BN initialisation of "
    "the layer before"
)
FIX_BRANCH_DOMINATES = (
    "start each branch at zero so that blocks begin as the identity (`backbone_kwargs: "
    "{zero_init_residual: true}`: the gamma of the BN closing the branch, or the last conv of a "
    "pre-activation block), or lower the learning rate"
)
FIX_NONFINITE_GRADIENT = (
    "the network itself overflows or produced NaN: lower the learning rate, check the first non-finite "
    "layer reported by ActivationVarianceMonitor"
)
FIX_CONSTANT_GRADIENT = (
    "the output barely depends on the input: look for dead ReLUs, a collapsed BN scale or a detached input"
)
FIX_SHATTERED = (
    "add skip connections (residual blocks), add BatchNorm, or reduce depth: neighbouring inputs get "
    "unrelated gradients, so SGD steps are close to random"
)
FIX_PARTLY_SHATTERED = (
    "residual connections with BN (or a smaller residual-branch scale) keep gradients correlated; "
    "watch whether rho(1) keeps falling"
)
FIX_SHATTERING_DECLINE = (
    "the gradient decorrelates as training goes on; compare with a residual/normalised variant"
)
FIX_BN_VARIANCE_MISMATCH = (
    "recalibrate BN before evaluation (recalibrate_batchnorm, or recalibrate_batches= on this monitor); "
    "check that train and eval inputs are preprocessed alike; if it persists, lower BN momentum or the "
    "learning rate late in training"
)
FIX_BN_TRAIN_TEST_SHIFT = (
    "recalibrate BN before evaluation (PreciseBN); check that train and eval inputs are preprocessed alike"
)
FIX_BN_ZSHIFT_SPIKE = (
    "check the data pipeline at that step (a new source, augmentation or domain); recalibrate BN before "
    "evaluating on the new distribution"
)
FIX_BN_RANK_DISAGREEMENT = (
    "shuffle the data across ranks (DistributedSampler(shuffle=True)); use sync_batchnorm=True (GPU), or "
    "sync='pooled' on this monitor so that validation and checkpoints see one set of statistics"
)
FIX_BN_DRIFT = (
    "train longer or decay the learning rate; recalibrate BN before evaluation"
)
FIX_BN_NOISY_BATCH_STATS = (
    "use a larger batch per step, or GroupNorm instead of BN (norm='group', nn.GroupNorm); recalibrate "
    "the running statistics before evaluating (recalibrate_batchnorm / PreciseBN, or recalibrate_batches= "
    "on this monitor)"
)

# ------------------------------------------------------------------------------------ helpers
def _finite(*values: float | None) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def _log_slope(values: Sequence[float], positions: Sequence[float] | None = None) -> float:
    """Least-squares slope of ``log(values)`` against ``positions`` (default 0, 1, 2...)."""
    xs = list(positions) if positions is not None else [float(i) for i in range(len(values))]
    ys = [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    if den == 0:
        return math.nan
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den


def _stage(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _sorted_hits(
    entry: Mapping[str, float], prefix: str, layers: Sequence[str], key: str, test: Callable[[float], bool]
) -> list[tuple[str, float]]:
    """``(layer, value)`` of the layers whose ``<prefix>/<layer>/<key>`` is finite and passes ``test``,
    largest magnitude first."""
    hits = [(n, entry.get(f"{prefix}/{n}/{key}")) for n in layers]
    hits = [(n, float(v)) for n, v in hits if v is not None and math.isfinite(v) and test(v)]
    return sorted(hits, key=lambda h: -abs(h[1]))


# ------------------------------------------------------------------------- activation variance
@dataclass
class DepthPoint:
    """One measured block along the depth.

    Args:
        name: the block's qualified name (its parent module is its stage: ``layer2.1`` -> ``layer2``).
        var: Var(block output).
        shortcut_var: Var(x) on the shortcut (after a projection), or NaN when not measured.
        branch_var: Var(F(x)), or NaN when not measured.

    Example:
        >>> DepthPoint("layer1.0", 2.0, shortcut_var=1.0, branch_var=1.0).stage
        'layer1'
    """

    name: str
    var: float
    shortcut_var: float = math.nan
    branch_var: float = math.nan

    @property
    def stage(self) -> str:
        return _stage(self.name)


def latest_values(
    entry: Mapping[str, float], names: Sequence[str], key: str, prefix: str
) -> dict[str, float]:
    """``{name: entry["<prefix>/<name>/<key>"]}`` for each of ``names`` (in their order) the history entry
    has that key for.

    Example:
        >>> latest_values({"m/a/var": 1.0, "m/b/mean": 0.0}, ["a", "b"], "var", "m")
        {'a': 1.0}
    """
    return {name: entry[f"{prefix}/{name}/{key}"] for name in names if f"{prefix}/{name}/{key}" in entry}


def depth_points(entry: Mapping[str, float], names: Sequence[str], prefix: str) -> list[DepthPoint]:
    """The :class:`DepthPoint` of each of the blocks ``names`` (in depth order) whose variance the history
    entry holds, with its shortcut and branch variances where measured.

    Example:
        >>> depth_points({"m/b1/var": 2.0, "m/b1/branch_var": 1.0}, ["b0", "b1"], "m")
        [DepthPoint(name='b1', var=2.0, shortcut_var=nan, branch_var=1.0)]
    """
    return [
        DepthPoint(
            name,
            entry[f"{prefix}/{name}/var"],
            entry.get(f"{prefix}/{name}/shortcut_var", math.nan),
            entry.get(f"{prefix}/{name}/branch_var", math.nan),
        )
        for name in names
        if f"{prefix}/{name}/var" in entry
    ]


@dataclass
class GrowthShape:
    """How the variance evolves along the depth (see the module docstring).

    Attributes:
        regime: ``"exponential"``, ``"linear"``, ``"stable"``, ``"vanishing"`` or ``"undetermined"`` (too
            few increments to fit, growing faster than ``explode_growth``).
        per_block: geometric-mean growth from the first block to the last.
        overall: Var(last block) / Var(first block).
        increment_growth: per-block growth of the increments (NaN when fewer than ``MIN_INCREMENTS``).
        increments: how many increments were fitted; ``source`` says whether they are measured branch
            variances (``"branch"``) or rises of the block outputs within stages (``"chain"``).
        blocks: blocks along the depth.
        within_stage: geometric-mean growth between consecutive blocks of one stage (boundary ratios, where
            a projection may reset the level, left out); NaN when no two blocks share a stage.
    """

    regime: str
    per_block: float
    overall: float
    increment_growth: float
    increments: int
    source: str
    blocks: int
    within_stage: float = math.nan


def variance_growth_shape(
    points: Sequence[DepthPoint],
    explode_growth: float = EXPLODE_GROWTH,
    vanish_growth: float = VANISH_GROWTH,
    increment_growth: float = INCREMENT_GROWTH,
) -> GrowthShape | None:
    """Classify the variance along the blocks ``points`` (depth order); ``None`` with fewer than two
    blocks or a non-finite / non-positive first or last variance.

    Example:
        >>> exp = [DepthPoint(f"s.{i}", 2.0**i, 2.0 ** (i - 1), 2.0 ** (i - 1)) for i in range(1, 9)]
        >>> variance_growth_shape(exp).regime
        'exponential'
        >>> lin = [DepthPoint(f"s.{i}", 1.0 + i, float(i), 1.0) for i in range(1, 9)]
        >>> variance_growth_shape(lin).regime
        'linear'
    """
    if len(points) < 2:
        return None
    first, last = points[0].var, points[-1].var
    if not (_finite(first, last) and first > 0 and last > 0):
        return None
    overall = last / first
    per_block = overall ** (1.0 / (len(points) - 1))
    increments: list[tuple[float, float]] = []  # (block index, increment)
    source = "branch"
    for i, p in enumerate(points):
        if _finite(p.branch_var) and p.branch_var > 0:
            increments.append((float(i), p.branch_var))
    if len(increments) < MIN_INCREMENTS:
        source, increments = "chain", []
        for i in range(1, len(points)):
            a, b = points[i - 1], points[i]
            if a.stage == b.stage and _finite(a.var, b.var) and b.var > a.var:
                increments.append((float(i), b.var - a.var))
    within = [
        math.log(b.var / a.var)
        for a, b in itertools.pairwise(points)
        if a.stage == b.stage and _finite(a.var, b.var) and a.var > 0 and b.var > 0
    ]
    within_stage = math.exp(sum(within) / len(within)) if within else math.nan
    fitted = len(increments) >= MIN_INCREMENTS
    growth = (
        math.exp(_log_slope([v for _, v in increments], [i for i, _ in increments])) if fitted else math.nan
    )
    if per_block < vanish_growth:
        regime = "vanishing"
    elif not fitted:
        regime = "undetermined" if per_block > max(explode_growth, UNDETERMINED_GROWTH) else "stable"
    elif growth >= increment_growth and per_block > 1.0:
        regime = "exponential"
    elif growth < increment_growth and (overall >= LINEAR_MIN_OVERALL or within_stage >= LINEAR_MIN_STAGE):
        regime = "linear"
    else:
        regime = "stable"
    return GrowthShape(regime, per_block, overall, growth, len(increments), source, len(points), within_stage)


def variance_growth(
    points: Sequence[DepthPoint],
    step: int,
    monitor: str = "activation_variance",
    explode_growth: float = EXPLODE_GROWTH,
    vanish_growth: float = VANISH_GROWTH,
    increment_growth: float = INCREMENT_GROWTH,
) -> Finding | None:
    """The variance-along-the-depth finding: exponential growth (a warning from ``explode_growth`` per
    block, info below), vanishing (warning), linear growth or a stable variance (info).

    Example:
        >>> pts = [DepthPoint(f"s.{i}", 1.37**i, 1.37 ** (i - 1), 0.37 * 1.37 ** (i - 1)) for i in range(16)]
        >>> f = variance_growth(pts, step=3)
        >>> f.severity, f.kind, f.message.split(":")[0]
        ('warning', 'variance_exponential', 'variance grows exponentially along the depth')
    """
    shape = variance_growth_shape(points, explode_growth, vanish_growth, increment_growth)
    if shape is None:
        return None
    names = [points[0].name, points[-1].name]
    n = shape.blocks
    rates = f"{shape.per_block:.2f}x per block, {shape.overall:.3g}x over {n} blocks"
    span = f"from {names[0]} to {names[1]} at step {step}"
    what = "branch variance Var(F(x))" if shape.source == "branch" else "rise from block to block"
    inc = f"the {what} grows {shape.increment_growth:.2f}x per block"
    values = {
        "growth_per_block": shape.per_block,
        "overall": shape.overall,
        "increment_growth": shape.increment_growth,
        "within_stage_growth": shape.within_stage,
    }
    scale_branch = (
        "add BatchNorm to the blocks or scale the residual branch (zero-init its last norm/conv, or multiply "
        "F(x) by ~1/sqrt(number of blocks))"
    )

    def finding(severity: str, kind: str, message: str, suggestion: str = "") -> Finding:
        return Finding(monitor, severity, names, message, suggestion, step=step, values=values, kind=kind)

    if shape.regime == "vanishing":
        return finding(
            "warning",
            KIND_VARIANCE_VANISHING,
            f"variance shrinks to {shape.per_block:.2f}x per block over {n} blocks ({shape.overall:.3g}x "
            f"overall) {span}",
            "check the initialisation (He/fan_in for ReLU), add normalisation, or use residual connections "
            "so the signal is not lost with depth",
        )
    if shape.regime == "exponential":
        severity = "warning" if shape.per_block > explode_growth else "info"
        slow = "" if severity == "warning" else " (slowly)"
        return finding(
            severity,
            KIND_VARIANCE_EXPONENTIAL,
            f"variance grows exponentially along the depth{slow}: {rates}, {span}; each block adds variance "
            f"in proportion to what it receives ({inc})",
            scale_branch if severity == "warning" else "",
        )
    if shape.regime == "undetermined":
        return finding(
            "warning",
            KIND_VARIANCE_EXPONENTIAL,
            f"variance grows {rates}, {span} (too few blocks to tell exponential from linear growth)",
            scale_branch,
        )
    if shape.regime == "linear":
        stages = (
            f"{shape.within_stage:.2f}x per block within stages, "
            if math.isfinite(shape.within_stage)
            else ""
        )
        return finding(
            "info",
            KIND_VARIANCE_LINEAR,
            f"variance grows linearly along the depth, as expected with BatchNorm: each block adds about the "
            f"same variance ({inc}); {stages}{rates}, {span}",
        )
    return finding(
        "info",
        KIND_VARIANCE_STABLE,
        f"variance is stable along the depth: {rates}, {span}",
    )


def nonfinite_activation(
    record: Mapping[str, object] | None, monitor: str = "activation_variance"
) -> Finding | None:
    """The first module that produced NaN/Inf (``record = {"step", "layer"}``), as an error."""
    if record is None:
        return None
    layer, step = str(record["layer"]), int(record["step"])  # type: ignore[call-overload]
    return Finding(
        monitor, "error", [layer],
        f"first non-finite activation (NaN/Inf) produced by {layer} at step {step}",
        FIX_NONFINITE_ACTIVATION, step=step, kind=KIND_NONFINITE,
    )


def dead_relus(
    dead_fractions: Mapping[str, float],
    step: int,
    threshold: float = DEAD_FRACTION,
    monitor: str = "activation_variance",
) -> Finding | None:
    """Layers with at least ``threshold`` of their channels exactly zero for a whole interval (``layer ->
    fraction``, depth order), as one warning naming them all, the worst first in the message."""
    dead = [(n, f) for n, f in dead_fractions.items() if _finite(f) and f >= threshold]
    if not dead:
        return None
    name, worst = max(dead, key=lambda h: h[1])
    more = f" ({len(dead) - 1} more layer(s) at {threshold:.0%} or above)" if len(dead) > 1 else ""
    return Finding(
        monitor, "warning", [n for n, _ in dead],
        f"{worst:.0%} of the channels of {name} output exactly zero for a whole interval (dead ReLUs) at "
        f"step {step}{more}",
        FIX_DEAD_RELU, step=step, values={"dead_fraction": worst}, kind=KIND_DEAD_RELU,
    )


def dominant_branches(
    branch_ratios: Mapping[str, float],
    step: int,
    limit: float = BRANCH_RATIO,
    monitor: str = "activation_variance",
) -> Finding | None:
    """Residual branches whose variance exceeds ``limit`` times their identity shortcut's (``block -> ratio``;
    the caller leaves out blocks with a learned projection shortcut)."""
    big = [(n, r) for n, r in branch_ratios.items() if _finite(r) and r > limit]
    if not big:
        return None
    top = max(r for _, r in big)
    return Finding(
        monitor, "warning", [n for n, _ in big],
        f"residual branches dominate their shortcut (Var(F(x))/Var(x) up to {top:.3g}) in {len(big)} "
        f"block(s) at step {step}",
        FIX_BRANCH_DOMINATES, step=step, values={"max_branch_ratio": top}, kind=KIND_BRANCH_DOMINATES,
    )


# ------------------------------------------------------------------------------ shattering
def nonfinite_gradient(finite: bool, where: list[str], step: int, values: dict[str, float]) -> Finding | None:
    """The input gradient along the probe line holds NaN/Inf: an error."""
    if finite:
        return None
    return Finding(
        "shattering", "error", where,
        f"the input gradient along the probe line is not finite (NaN/Inf) at step {step}",
        FIX_NONFINITE_GRADIENT, step=step, values=values, kind=KIND_NONFINITE,
    )


def constant_gradient(lag1: float, where: list[str], step: int, values: dict[str, float]) -> Finding | None:
    """s(t) has no variance (rho(1) undefined): the output barely depends on the input."""
    if math.isfinite(lag1):
        return None
    return Finding(
        "shattering", "warning", where,
        f"the gradient along the probe line is constant (s(t) has no variance) at step {step}",
        FIX_CONSTANT_GRADIENT, step=step, values=values, kind=KIND_CONSTANT_GRADIENT,
    )


def shattering_verdict(
    verdict: float,
    band: float,
    numbers: str,
    where: list[str],
    step: int,
    values: dict[str, float],
    margin: float = SHATTERED_MARGIN,
) -> Finding:
    """The verdict on rho(1) (``verdict``: the mean of the recent probes): inside the white-noise band
    ``band`` is a warning (shattered), below ``margin`` partly shattered (info), else smooth (info)."""
    if abs(verdict) <= band:
        return Finding(
            "shattering", "warning", where,
            f"gradients are shattered (white noise): {numbers}",
            FIX_SHATTERED, step=step, values=values, kind=KIND_SHATTERED,
        )
    if verdict < margin:
        return Finding(
            "shattering", "info", where,
            f"gradients are partly shattered: {numbers}",
            FIX_PARTLY_SHATTERED, step=step, values=values, kind=KIND_PARTLY_SHATTERED,
        )
    return Finding(
        "shattering", "info", where,
        f"gradients are smooth: {numbers}",
        step=step, values=values, kind=KIND_SMOOTH,
    )


def shattering_decline(
    first_lag1: float,
    first_step: int,
    last_lag1: float,
    last_step: int,
    where: list[str],
    drop: float = SHATTERING_DROP,
) -> Finding | None:
    """rho(1) fell by more than ``drop`` between the first probe and the latest (info)."""
    if first_step == last_step or not first_lag1 - last_lag1 > drop:
        return None
    return Finding(
        "shattering", "info", where,
        f"rho(1) fell from {first_lag1:.2f} (step {first_step}) to {last_lag1:.2f} (step {last_step}) during "
        "training",
        FIX_SHATTERING_DECLINE, step=last_step,
        values={"lag1_first": float(first_lag1), "lag1_last": float(last_lag1)}, kind=KIND_SHATTERING_DECLINE,
    )


# ------------------------------------------------------------------------------- BatchNorm
def bn_variance_mismatch(
    entry: Mapping[str, float],
    layers: Sequence[str],
    step: int,
    threshold: float = VAR_RATIO_THRESHOLD,
    prefix: str = "batchnorm",
) -> Finding | None:
    """Running variance off the batch variance by more than ``threshold`` (either way) at the end."""
    lag = math.log(threshold)
    hits = _sorted_hits(entry, prefix, layers, "log_var_ratio", lambda v: abs(v) > lag)
    if not hits:
        return None
    name, value = hits[0]
    factor = math.exp(abs(value))
    direction = "lags" if value > 0 else "overshoots"
    return Finding(
        prefix, "warning", [n for n, _ in hits[:5]],
        f"running variance {direction} the batch variance by {factor:.1f}x in {name} at the end of training "
        f"({len(hits)} layers beyond {threshold:g}x): eval-mode outputs differ from training-mode ones",
        FIX_BN_VARIANCE_MISMATCH, step=step,
        values={"variance_factor": factor}, kind=KIND_BN_VARIANCE_MISMATCH,
    )


def bn_train_test_shift(
    entry: Mapping[str, float],
    layers: Sequence[str],
    step: int,
    threshold: float = Z_THRESHOLD,
    prefix: str = "batchnorm",
) -> Finding | None:
    """Batch means more than ``threshold`` running standard deviations from the running means."""
    hits = _sorted_hits(entry, prefix, layers, "z_shift", lambda v: v > threshold)
    if not hits:
        return None
    name, value = hits[0]
    return Finding(
        prefix, "warning", [n for n, _ in hits[:5]],
        f"batch means sit {value:.2f} running std away from the running means in {name} at the end of "
        f"training ({len(hits)} layers beyond {threshold:g}): eval-mode outputs differ from training-mode ones",
        FIX_BN_TRAIN_TEST_SHIFT, step=step, values={"z_shift": value}, kind=KIND_BN_TRAIN_TEST_SHIFT,
    )


def bn_zshift_spike(
    series: Mapping[str, Sequence[tuple[int, float]]],
    threshold: float = Z_THRESHOLD,
    factor: float = SPIKE_FACTOR,
    prefix: str = "batchnorm",
) -> Finding | None:
    """The largest z-shift of the run (``layer -> [(step, z_shift)]``) if it stands ``factor`` times above
    the median before it and above ``threshold`` (info). The first two entries (running statistics at their
    initial values) are never a spike."""
    peaks = []
    for name, points in series.items():
        if len(points) < 3:
            continue
        at = max(range(len(points)), key=lambda j: points[j][1])
        peak_step, peak = points[at]
        earlier = sorted(v for _, v in points[:at])
        if len(earlier) < 2:
            continue
        typical = earlier[len(earlier) // 2]
        if peak > threshold and peak > factor * typical:
            peaks.append((name, peak_step, peak, typical))
    if not peaks:
        return None
    peaks.sort(key=lambda p: -p[2])
    name, peak_step, peak, typical = peaks[0]
    return Finding(
        prefix, "info", [p[0] for p in peaks[:5]],
        f"z-shift spiked to {peak:.2f} (median before: {typical:.2f}) at step {peak_step} in {name}: the input "
        "distribution changed faster than the running statistics follow",
        FIX_BN_ZSHIFT_SPIKE, step=peak_step, kind=KIND_BN_ZSHIFT_SPIKE,
        values={"z_shift": peak, "median": typical},
    )


def bn_rank_disagreement(
    entry: Mapping[str, float],
    layers: Sequence[str],
    step: int,
    threshold: float = RANK_THRESHOLD,
    noise_ratio: float = RANK_NOISE_RATIO,
    prefix: str = "batchnorm",
) -> Finding | None:
    """Ranks whose running means spread more than ``threshold`` running std apart *and* more than
    ``noise_ratio`` times the spread batch noise alone would give (when that ratio was measured)."""

    def disagree(name: str, spread: float) -> bool:
        ratio = entry.get(f"{prefix}/{name}/rank_noise_ratio", math.nan)
        return spread > threshold and (not math.isfinite(ratio) or ratio > noise_ratio)

    hits = [(n, v) for n, v in _sorted_hits(entry, prefix, layers, "rank_spread", lambda v: v > threshold)]
    hits = [(n, v) for n, v in hits if disagree(n, v)]
    if not hits:
        return None
    name, value = hits[0]
    ratio = entry.get(f"{prefix}/{name}/rank_noise_ratio", math.nan)
    values = {"rank_spread": value, "rank_noise_ratio": ratio}
    return Finding(
        prefix, "warning", [n for n, _ in hits[:5]],
        f"ranks disagree on BN running stats in {name}: spread {value:.3f} running std ({ratio:.1f}x the "
        "batch-noise floor) after the last step: the ranks see different data (non-i.i.d. shards?)",
        FIX_BN_RANK_DISAGREEMENT, step=step, values=values, kind=KIND_BN_RANK_DISAGREEMENT,
    )


def bn_still_drifting(
    entry: Mapping[str, float],
    layers: Sequence[str],
    step: int,
    intervals: int,
    threshold: float = DRIFT_THRESHOLD,
    prefix: str = "batchnorm",
) -> Finding | None:
    """Running means still moving more than ``threshold`` running std per interval at the end (info; needs
    two intervals or more, the first one always moves)."""
    hits = _sorted_hits(entry, prefix, layers, "mean_drift", lambda v: v > threshold)
    if not hits or intervals < 2:
        return None
    name, value = hits[0]
    return Finding(
        prefix, "info", [n for n, _ in hits[:5]],
        f"running means still move {value:.2f} running std per interval in {name} at the end",
        FIX_BN_DRIFT, step=step, values={"mean_drift": value}, kind=KIND_BN_DRIFT,
    )


def bn_noisy_batch_stats(
    entry: Mapping[str, float],
    elements: Mapping[str, float],
    step: int,
    min_elements: float = NOISY_ELEMENTS,
    min_z: float = NOISY_Z,
    layer_fraction: float = NOISY_LAYER_FRACTION,
    prefix: str = "batchnorm",
) -> Finding | None:
    """Batch statistics too noisy to train with: at least ``layer_fraction`` of the BN layers normalise over
    fewer than ``min_elements`` elements per channel (``elements``: layer -> batch elements per channel of
    its last training forward, the batch size times the positions) and, there, the batch means scatter at
    least ``min_z`` running std around the running means (``z_shift``, the evidence that the noise is real).
    Each training step then normalises with noisy statistics (a batch variance from n elements is off by
    ``sqrt(2 / (n - 1))`` relative, 50% at n = 8, and biased low), and the running averages used at test
    time inherit the noise."""
    starved = {n: e for n, e in elements.items() if 0 < e < min_elements}
    if not elements or len(starved) < max(1, math.ceil(layer_fraction * len(elements))):
        return None
    z = [entry.get(f"{prefix}/{n}/z_shift") for n in starved]
    z = [float(v) for v in z if _finite(v)]
    if not z or sum(z) / len(z) < min_z:
        return None
    z_mean = sum(z) / len(z)
    fewest = min(starved.values())
    ratios = [entry.get(f"{prefix}/{n}/log_var_ratio") for n in starved]
    ratios = [float(v) for v in ratios if _finite(v)]
    ratio = math.exp(sum(ratios) / len(ratios)) if ratios else math.nan
    var_note = f" and batch variances run {ratio:.2f}x the running ones" if math.isfinite(ratio) else ""
    return Finding(
        prefix, "warning", list(starved)[:5],
        f"noisy batch statistics: {len(starved)} of {len(elements)} BN layers normalise over fewer than "
        f"{min_elements:g} elements per channel (fewest {fewest:g}: batch size x positions); there the batch "
        f"means scatter {z_mean:.2f} running std around the running means{var_note} at step {step}",
        FIX_BN_NOISY_BATCH_STATS, step=step, kind=KIND_BN_NOISY_BATCH_STATS,
        values={"fewest_elements": float(fewest), "z_shift": z_mean, "variance_factor": ratio},
    )


def series(history: Sequence[Mapping[str, float]], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``key`` in every history entry that has it, in order.

    Example:
        >>> series([{"step": 10, "a": 1.0}, {"step": 20}, {"step": 30, "a": 2.0}], "a")
        [(10, 1.0), (30, 2.0)]
    """
    return [(int(e["step"]), e[key]) for e in history if key in e]


def batchnorm_findings(
    history: Sequence[Mapping[str, float]],
    layers: Sequence[str],
    elements: Mapping[str, float],
    z_threshold: float = Z_THRESHOLD,
    var_ratio_threshold: float = VAR_RATIO_THRESHOLD,
    rank_threshold: float = RANK_THRESHOLD,
    drift_threshold: float = DRIFT_THRESHOLD,
    prefix: str = "batchnorm",
) -> list[Finding]:
    """The BatchNorm monitor's findings, from its latest history entry and the z-shift series of each of
    ``layers`` (``elements``: layer -> batch elements per channel of its last training forward): noisy
    batch statistics (few elements per channel and large z-shifts: it explains a z-shift, which is then not
    reported again as a train/test shift), running variance off the batch variance, batch means off the
    running means, z-shift spikes, ranks that disagree, running statistics still drifting.

    Example:
        >>> entry = {"step": 100, "bn/1/z_shift": 0.9, "bn/1/log_var_ratio": 0.0}
        >>> [f.kind for f in batchnorm_findings([entry], ["1"], {"1": 4096.0}, prefix="bn")]
        ['bn_train_test_shift']
    """
    if not history:
        return []
    last = history[-1]
    step = int(last["step"])
    noisy = bn_noisy_batch_stats(last, elements, step, prefix=prefix)
    findings = [
        noisy,
        bn_variance_mismatch(last, layers, step, var_ratio_threshold, prefix),
        None if noisy else bn_train_test_shift(last, layers, step, z_threshold, prefix),
        bn_zshift_spike(
            {name: series(history, f"{prefix}/{name}/z_shift") for name in layers}, z_threshold, prefix=prefix
        ),
        bn_rank_disagreement(last, layers, step, rank_threshold, prefix=prefix),
        bn_still_drifting(last, layers, step, len(history), drift_threshold, prefix),
    ]
    return [f for f in findings if f is not None]
