"""The optimization monitor: is the learning rate sane for each layer, and did the loss spike?

Owns :class:`OptimizationMonitor`, which measures, per layer and per parameter group, the update-to-weight
norm ratio ``||W_after - W_before|| / ||W_before||`` of an optimizer step on the schedule's recorded
steps, every layer's gradient norm, and the training loss of every step; and the rules that judge the
ratios (:func:`update_ratio_findings`, thresholds as module constants). The loss-spike judging and the
on-device ring of steps are :mod:`~lightning_convnets.callbacks.loss_spikes`'. The method, the logged
keys and the costs are in ``docs/monitors.md``.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from . import diagnosis
from . import loss_spikes as _spikes
from .core import MonitorCallback, MonitorConfigError
from .diagnosis import Finding
from .loss_spikes import Spike, SpikeTail, StepRing

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

    from .packing import PackedStats, StatsPacker

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
    "OptimizationMonitor",
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
RATIO_FLOOR = 1e-12
"""Ratios are floored here before their logarithm (an update rounded away entirely reads 1e-12)."""
_ACC_ROWS = 6  # count, sum log10 ratio, judged count, judged below, judged above, judged sum log10


@dataclass
class LayerTally:
    """The judged recorded steps of one layer (or parameter group), summed over the run."""

    steps: float = 0.0
    below: float = 0.0
    above: float = 0.0
    sum_log: float = 0.0

    @property
    def ratio(self) -> float:
        """Geometric mean of the judged ratios (nan before any)."""
        return 10 ** (self.sum_log / self.steps) if self.steps else math.nan


@dataclass
class _Layout:
    """Which parameters the monitor follows and where their numbers go (rebuilt when a parameter group
    is added)."""

    optimizers: list[Any]
    params: list[list[Tensor]]  # per optimizer, in its groups' order
    starts: list[int]  # each optimizer's first column
    groups_per_optimizer: list[int]
    layer_names: list[str]
    group_names: list[str]
    group_refs: list[tuple[int, int]]  # (optimizer, group) of each group
    judged: list[bool]  # layers holding a weight of 2+ dimensions (conv, linear): judged by the rules
    layer_optimizer: list[int]
    group_of_layer: list[int]
    layer_index: Tensor  # [P] long: each parameter's layer
    group_index: Tensor  # [P] long: each parameter's group, offset by the number of layers
    zero: Tensor
    dtype: torch.dtype
    masks: dict[Any, Tensor] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.starts[-1] + len(self.params[-1]) if self.params else 0


def _fmt(x: float) -> str:
    return f"{x:.1e}" if math.isfinite(x) else str(x)


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


class OptimizationMonitor(MonitorCallback):
    """Learning-rate sanity per layer (the update-to-weight ratio), per-layer gradient norms and loss
    spikes, judged in the end-of-fit diagnosis.

    On each recorded step (the cost-derived schedule: every step below ``dense_steps``, then one per
    logging interval or in 50) the monitor copies the trainable parameters of each optimizer that steps
    just before its step (``on_before_optimizer_step``) and, once the batch is over, measures
    ``||W_after - W_before|| / ||W_before||`` per layer (the module holding the parameters, weight and
    bias together) and per parameter group. Measured rather than derived from the optimizer's state, so
    momentum, Adam's scaling, weight decay, clipping and a skipped AMP step are all in it, for any
    optimizer. Memory: one copy of the stepping optimizer's trainable parameters, held from the optimizer
    step to the end of the batch, on recorded steps only (the activations are freed by then, so it rarely
    raises the step's peak). Every step it also writes the step's loss and each parameter's gradient norm
    (``torch._foreach_norm``, before clipping, after AMP unscaling) into a ring on the device: two or three
    tensor ops, no host read. Everything is reduced in the core's one collective per logging interval.

    The loss is the training step's output: ``outputs["loss"]`` under automatic optimization (Lightning
    divides it by the accumulation factor: the step's micro-batches are summed), the returned tensor or
    ``{"loss": ...}`` under manual optimization (averaged over the step's batches). A manual
    ``training_step`` that returns no loss gets one ``info`` line and no spike search; the ratios go on.

    Frozen layers (``requires_grad=False``) are skipped: not learning is what they are for. Layers made of
    1-D parameters only (BatchNorm, biases) are measured and logged but not judged. Under DDP the
    parameters and gradients are the same on every rank and the loss is averaged over the ranks (the
    global batch's loss); sharded strategies (FSDP) would give each rank's shard (not supported).

    Args:
        log_every_n_steps: optimizer steps between reductions/logs (default: the trainer's).
        low, high: the band of the update/weight ratio (see :data:`RATIO_LOW`, :data:`RATIO_HIGH`).
        warmup_steps: the first steps not judged (nor any step while a learning rate rises).
        loss_spikes: search loss spikes (the per-step loss and gradient norms); ``False``: gradient norms
            on recorded steps only.
        spike_sigmas: a loss this many robust sigmas above the band is a spike (with ``SPIKE_MIN_RATIO``).
        spike_window: previous steps forming the band.
        sample_every_n_steps, dense_steps, max_history, strict: as in
            :class:`~lightning_convnets.callbacks.core.MonitorCallback`.

    Logged (under ``optimization/``): ``<layer>/update_ratio`` (geometric mean over the interval's recorded
    steps), ``<layer>/grad_norm`` (mean over its steps), ``param_group/<group>/update_ratio`` and ``/lr``,
    ``loss_median`` and ``loss_spikes`` (spikes found in the interval).

    Raises:
        MonitorConfigError: for a band that is not ``0 < low < high``, a negative ``warmup_steps``, a
            non-positive ``spike_sigmas`` or a ``spike_window`` below ``MIN_BAND``.

    Example:
        >>> monitor = OptimizationMonitor(log_every_n_steps=20)
        >>> monitor.low, monitor.high
        (1e-05, 0.1)
        >>> # pl.Trainer(callbacks=[monitor]).fit(model) logs optimization/<layer>/update_ratio ... and adds
        >>> # "parameter group 1 (learning rate 1e-06) barely learns ..." to the diagnosis
    """

    monitor_name = "optimization"

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        low: float = RATIO_LOW,
        high: float = RATIO_HIGH,
        warmup_steps: int = DEFAULT_WARMUP_STEPS,
        loss_spikes: bool = True,
        spike_sigmas: float = _spikes.SPIKE_SIGMAS,
        spike_window: int = _spikes.BAND_WINDOW,
        sample_every_n_steps: int | None = None,
        dense_steps: int | None = None,
        max_history: int = 1000,
        strict: bool | None = None,
    ) -> None:
        super().__init__(
            log_every_n_steps=log_every_n_steps,
            max_history=max_history,
            sample_every_n_steps=sample_every_n_steps,
            strict=strict,
            dense_steps=dense_steps,
        )
        name = type(self).__name__
        if not (0 < low < high):
            raise MonitorConfigError(
                f"{name}: the band must satisfy 0 < low < high, got low={low}, high={high}"
            )
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise MonitorConfigError(f"{name}: warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if not spike_sigmas > 0:
            raise MonitorConfigError(f"{name}: spike_sigmas must be > 0, got {spike_sigmas}")
        if not isinstance(spike_window, int) or spike_window < _spikes.MIN_BAND:
            raise MonitorConfigError(
                f"{name}: spike_window must be an int >= {_spikes.MIN_BAND} (steps in the band), got {spike_window!r}"
            )
        self.low, self.high = float(low), float(high)
        self.warmup_steps = warmup_steps
        self.loss_spikes = bool(loss_spikes)
        self.spike_sigmas = float(spike_sigmas)
        self.spike_window = spike_window
        self.layout: _Layout | None = None
        self.tallies: dict[str, LayerTally] = {}
        self.spikes: list[Spike] = []
        self.judged_from: int | None = None
        self.setup_findings: list[Finding] = []
        self._ring: StepRing | None = None
        self._tail = SpikeTail(spike_window + _spikes.JUMP_LOOKBACK)
        self._acc: Tensor | None = None
        self._scratch: Tensor | None = None
        self._pending: dict[int, list[Tensor]] = {}
        self._pending_step = 0
        self._lrs: dict[int, list[Any]] = {}
        self._previous_lrs: dict[int, list[Any]] = {}
        self._spikes_on = self.loss_spikes
        self._loss_checked = False

    def failure_hint(self, hook: str, error: BaseException) -> str:
        return (
            "pass loss_spikes=False (no per-step gradient norms), or leave OptimizationMonitor out for this "
            "model (parameters of several devices or sparse gradients are not supported)"
        )

    # ------------------------------------------------------------------ the layout
    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = list(trainer.optimizers)
        owner: dict[int, str] = {}
        for module_name, module in pl_module.named_modules():
            for param_name, p in module.named_parameters(recurse=False):
                owner.setdefault(id(p), module_name or param_name)
        seen: set[int] = set()
        params: list[list[Tensor]] = []
        starts, per_opt, layer_names, group_names, group_refs = [], [], [], [], []
        layer_idx: list[int] = []
        group_idx: list[int] = []
        layer_of_name: dict[str, int] = {}
        layer_optimizer: list[int] = []
        group_of_layer: list[int] = []
        judged: list[bool] = []
        total = 0
        for o, opt in enumerate(optimizers):
            starts.append(total)
            per_opt.append(len(opt.param_groups))
            mine: list[Tensor] = []
            for g, group in enumerate(opt.param_groups):
                label = group.get("name") if isinstance(group.get("name"), str) else None
                prefix = f"opt{o}." if len(optimizers) > 1 else ""
                group_names.append(f"{prefix}{label or f'group{g}'}")
                group_refs.append((o, g))
                for p in group["params"]:
                    if id(p) in seen:
                        continue
                    seen.add(id(p))
                    layer = owner.get(id(p), f"param{total}")
                    if layer not in layer_of_name:
                        layer_of_name[layer] = len(layer_names)
                        layer_names.append(layer)
                        layer_optimizer.append(o)
                        group_of_layer.append(len(group_names) - 1)
                        judged.append(False)
                    index = layer_of_name[layer]
                    judged[index] = judged[index] or p.dim() >= 2
                    layer_idx.append(index)
                    group_idx.append(len(group_names) - 1)
                    mine.append(p)
                    total += 1
            params.append(mine)
        device = trainer.strategy.root_device
        flat = [p for ps in params for p in ps]
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in flat) else torch.float32
        n_layers = len(layer_names)
        self.layout = _Layout(
            optimizers, params, starts, per_opt, layer_names, group_names, group_refs, judged, layer_optimizer,
            group_of_layer,
            torch.tensor(layer_idx, dtype=torch.long, device=device),
            torch.tensor(group_idx, dtype=torch.long, device=device) + n_layers,
            torch.zeros((), device=device, dtype=dtype), dtype,
        )  # fmt: skip
        self._acc = torch.zeros(_ACC_ROWS, n_layers + len(group_names), dtype=torch.float64, device=device)
        self._scratch = torch.zeros(2, total, dtype=dtype, device=device)
        capacity = self.interval(trainer) + 2
        self._ring = StepRing(capacity, total, device, dtype) if total else None
        self._pending.clear()
        # trainable parameters that no optimizer holds never change: a frequent bug
        stray = [name for name, p in pl_module.named_parameters() if p.requires_grad and id(p) not in seen]
        self.setup_findings = []
        if stray and optimizers:
            shown = ", ".join(stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
            self.setup_findings.append(
                Finding(
                    self.monitor_name,
                    "warning",
                    stray,
                    f"{len(stray)} trainable parameter(s) are in no optimizer's parameter groups and never "
                    f"change: {shown}",
                    "add them to configure_optimizers' parameter groups, or set requires_grad=False",
                    kind=KIND_NOT_OPTIMIZED,
                )
            )

    def _param_mask(self, stepped: frozenset[int]) -> Tensor:
        """1 for a parameter that is trainable and whose optimizer stepped (cached per pattern)."""
        layout = self.layout
        assert layout is not None
        trainable = tuple(p.requires_grad for ps in layout.params for p in ps)
        key = (trainable, stepped)
        mask = layout.masks.get(key)
        if mask is None:
            owners = [o for o, ps in enumerate(layout.params) for _ in ps]
            values = [float(t and o in stepped) for t, o in zip(trainable, owners)]
            mask = torch.tensor(values, dtype=layout.dtype).to(layout.zero.device, non_blocking=True)
            if len(layout.masks) > 16:
                layout.masks.clear()
            layout.masks[key] = mask
        return mask

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._build(trainer, pl_module)
        if self.layout is not None and not self.layout.total:
            self.step_aside("no optimizer holds a trainable parameter: nothing to measure")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self._ring is not None:
            self._ring.begin(trainer.global_step)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        layout = self.layout
        if layout is None or self._ring is None:
            return
        o = next((i for i, opt in enumerate(layout.optimizers) if opt is optimizer), None)
        if o is None or len(optimizer.param_groups) != layout.groups_per_optimizer[o]:
            # an optimizer swapped or a parameter group added (fine-tuning callbacks): follow the new layout
            # from here (this interval's numbers so far are dropped, on every rank alike)
            self._build(trainer, pl_module)
            layout = self.layout
            o = next((i for i, opt in enumerate(layout.optimizers) if opt is optimizer), None)
            if o is None or self._ring is None:
                return
            self._ring.begin(trainer.global_step)
        params = layout.params[o]
        if not params:
            return
        start = layout.starts[o]
        with torch.no_grad():
            if self.loss_spikes or self._recording:
                grads = [p.grad if p.grad is not None else layout.zero for p in params]
                norms = torch._foreach_norm(grads, 2, dtype=layout.dtype)
                self._ring.put_grads(o, start, start + len(params), list(norms))
            if self._recording and o not in self._pending:
                self._pending_step = trainer.global_step  # the step being taken (it moves on after it)
                self._pending[o] = list(torch._foreach_mul(params, 1.0))
                self._lrs[o] = [group["lr"] for group in optimizer.param_groups]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending:
            self._measure_updates(trainer)
        if self._spikes_on and self._ring is not None:
            self._take_loss(pl_module, outputs)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _take_loss(self, pl_module: pl.LightningModule, outputs: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not self._loss_checked:
            self._loss_checked = True
            if not isinstance(loss, Tensor) and not pl_module.automatic_optimization:
                keys = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
                reason = (
                    f"loss spikes not searched: training_step returns no loss under manual optimization "
                    f"(got {keys}); the update/weight ratios go on"
                )
                self._spikes_on = False
                self.notes.append(
                    diagnosis.not_applicable(
                        self.monitor_name, reason, "return the loss (or {'loss': loss}) from training_step"
                    )
                )
                rank_zero_info(f"{type(self).__name__}: {reason}")
                return
        if isinstance(loss, Tensor) and loss.numel() == 1:
            self._ring.add_loss(loss)  # type: ignore[union-attr]

    def _measure_updates(self, trainer: pl.Trainer) -> None:
        """||W_after - W_before|| and ||W_before|| of the optimizers that stepped, per layer and group, into
        the interval's accumulators (on the device)."""
        layout, scratch, acc = self.layout, self._scratch, self._acc
        assert layout is not None and scratch is not None and acc is not None
        stepped = frozenset(self._pending)
        with torch.no_grad():
            scratch.zero_()
            for o, before in self._pending.items():
                params = layout.params[o]
                start, stop = layout.starts[o], layout.starts[o] + len(params)
                torch.stack(torch._foreach_norm(before, 2, dtype=layout.dtype), out=scratch[1, start:stop])
                torch._foreach_sub_(before, params)
                torch.stack(torch._foreach_norm(before, 2, dtype=layout.dtype), out=scratch[0, start:stop])
            self._pending.clear()  # the copies are freed here
            mask = self._param_mask(stepped)
            squares = scratch.square().mul_(mask).to(torch.float64)
            sums = torch.zeros(2, acc.shape[1], dtype=torch.float64, device=acc.device)
            sums.index_add_(1, layout.layer_index, squares).index_add_(1, layout.group_index, squares)
            # a layer counts when it has a trainable parameter of a stepping optimizer and a non-zero
            # weight; a non-finite update (or weight) counts as an infinite ratio: far above the band
            held = torch.zeros_like(sums[0]).index_add_(0, layout.layer_index, mask.to(torch.float64))
            held.index_add_(0, layout.group_index, mask.to(torch.float64))
            valid = (held > 0) & (sums[1] != 0)
            ratio = (sums[0] / sums[1].clamp_min(1e-300)).sqrt()
            ratio = torch.where(ratio.isnan(), math.inf, ratio)
            log_ratio = torch.where(valid, ratio.clamp_min(RATIO_FLOOR).log10(), 0.0)
            count = valid.to(torch.float64)
            if self._judged(self._pending_step):
                below = (ratio < self.low) & valid
                above = (ratio > self.high) & valid
                acc.add_(
                    torch.stack(
                        [count, log_ratio, count, below.to(count.dtype), above.to(count.dtype), log_ratio]
                    )
                )
            else:
                acc[:2].add_(torch.stack([count, log_ratio]))

    def _judged(self, step: int) -> bool:
        """Whether this recorded step counts for the findings: past ``warmup_steps`` and no learning rate
        rising since the previous recorded step (a warmup schedule)."""
        rising = False
        for o, lrs in self._lrs.items():
            before = self._previous_lrs.get(o)
            if before is not None and len(before) == len(lrs):
                rising = rising or any(
                    isinstance(a, float) and isinstance(b, float) and a > b * (1 + 1e-6)
                    for a, b in zip(lrs, before)
                )
        self._previous_lrs.update(self._lrs)
        judged = step >= self.warmup_steps and not rising
        if judged and self.judged_from is None:
            self.judged_from = step
        return judged

    # ------------------------------------------------------------------ the interval
    def pack(self, trainer: pl.Trainer, pl_module: pl.LightningModule, packer: StatsPacker) -> None:
        layout = self.layout
        if layout is None or self._acc is None or self._ring is None:
            return
        # every rank measures the same parameters: max merges them exactly; the loss is averaged
        packer.max("ratios", self._acc)
        squares = self._ring.grads.to(torch.float64).square()
        per_layer = torch.zeros(
            squares.shape[0], len(layout.layer_names), dtype=torch.float64, device=squares.device
        )
        packer.max("grad_norms", per_layer.index_add_(1, layout.layer_index, squares).sqrt())
        if self._spikes_on:
            packer.sum("loss", self._ring.loss)

    def compute_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: PackedStats
    ) -> dict[str, float]:
        layout = self.layout
        if layout is None or "ratios" not in stats or self._ring is None:
            return {}
        names = [*layout.layer_names, *(f"param_group/{g}" for g in layout.group_names)]
        acc = stats["ratios"].reshape(_ACC_ROWS, len(names))
        metrics: dict[str, float] = {}
        for k, name in enumerate(names):
            count = float(acc[0, k])
            if count > 0:
                metrics[f"{name}/update_ratio"] = 10 ** (float(acc[1, k]) / count)
            if float(acc[2, k]) > 0:
                tally = self.tallies.setdefault(name, LayerTally())
                tally.steps += float(acc[2, k])
                tally.below += float(acc[3, k])
                tally.above += float(acc[4, k])
                tally.sum_log += float(acc[5, k])
        for g, (o, index) in zip(layout.group_names, layout.group_refs):
            lr = layout.optimizers[o].param_groups[index].get("lr")
            if isinstance(lr, (float, int, Tensor)):
                metrics[f"param_group/{g}/lr"] = float(lr)
        # the steps of the interval, host side: the loss, and each layer's gradient norm (NaN where not written)
        rows = self._ring.rows()
        n_layers = len(layout.layer_names)
        grads_all = stats["grad_norms"].reshape(-1, n_layers)
        world = max(1, int(getattr(trainer, "world_size", 1) or 1))
        steps, losses, grads = [], [], []
        owner = torch.tensor(layout.layer_optimizer, dtype=torch.long)
        for step, slot, parts, written in rows:
            if not written:
                continue
            row = grads_all[slot].clone()
            row[row.isnan()] = math.inf  # a NaN gradient: non-finite (NaN from here on means not written)
            if len(written) < len(layout.optimizers):
                row[~torch.tensor([int(o) in written for o in owner.tolist()])] = math.nan
            steps.append(step)
            grads.append(row)
            loss = None
            if self._spikes_on and parts > 0 and "loss" in stats:
                divisor = world * (1 if pl_module.automatic_optimization else parts)
                loss = float(stats["loss"][slot]) / divisor
            losses.append(loss)
        if grads:
            block = torch.stack(grads)
            with torch.no_grad():
                finite = torch.where(block.isfinite(), block, math.nan)
                means = finite.nanmean(0)
            for name, value in zip(layout.layer_names, means.tolist()):
                if math.isfinite(value):
                    metrics[f"{name}/grad_norm"] = value
            if self._spikes_on:
                metrics.update(self._search_spikes(steps, losses, block, layout.layer_names))
        return metrics

    def _search_spikes(
        self, steps: list[int], losses: list[float | None], grads: Tensor, layers: Sequence[str]
    ) -> dict[str, float]:
        tail = self._tail
        if tail.grads.shape[1] != grads.shape[1]:
            tail.extend([], [], grads[:0])
        found = _spikes.find_spikes(
            tail.steps + steps,
            tail.losses + losses,
            torch.cat([tail.grads, grads.to(torch.float64)]),
            layers,
            first_new=len(tail.steps),
            window=self.spike_window,
            sigmas=self.spike_sigmas,
        )
        self.spikes += found
        tail.extend(steps, losses, grads)
        present = [v for v in losses if v is not None and math.isfinite(v)]
        out = {"loss_spikes": float(len(found))}
        if present:
            out["loss_median"] = _spikes.robust_band(present)[0]
        return out

    def reset_interval(self) -> None:
        if self._acc is not None:
            self._acc.zero_()
        if self._ring is not None:
            self._ring.clear()

    # ------------------------------------------------------------------ the report
    def diagnose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Finding]:
        findings = list(self.setup_findings)
        layout = self.layout
        if layout is not None:
            groups: dict[str, list[str]] = {g: [] for g in layout.group_names}
            for name, judged, g in zip(layout.layer_names, layout.judged, layout.group_of_layer):
                if judged:
                    groups[layout.group_names[g]].append(name)
            lrs = {}
            for g, (o, index) in zip(layout.group_names, layout.group_refs):
                lr = layout.optimizers[o].param_groups[index].get("lr")
                lrs[g] = float(lr) if isinstance(lr, (float, int, Tensor)) else math.nan
            findings += update_ratio_findings(
                self.tallies, groups, lrs, self.monitor_name, self.judged_from, self.low, self.high
            )
            frozen = [n for n, ps in self._layers_params().items() if not any(p.requires_grad for p in ps)]
            if frozen:
                findings.append(
                    diagnosis.not_applicable(
                        self.monitor_name,
                        f"{len(frozen)} frozen layer(s) (requires_grad=False at the end) skipped by the "
                        f"update/weight ratio: {', '.join(frozen[:3])}{' ...' if len(frozen) > 3 else ''}",
                    )
                )
        # one finding per episode (a spike and the spikes right after it), the largest first
        ranked = sorted(_spikes.episodes(self.spikes), key=lambda e: (-e[0].sigmas, e[0].step))
        findings += [
            _spikes.loss_spike_finding(e[0], self.monitor_name, e[1:])
            for e in ranked[: _spikes.MAX_SPIKE_FINDINGS]
        ]
        rest = ranked[_spikes.MAX_SPIKE_FINDINGS :]
        if rest:
            steps = ", ".join(str(e[0].step) for e in sorted(rest, key=lambda e: e[0].step)[:10])
            findings.append(
                Finding(
                    self.monitor_name,
                    "warning",
                    [],
                    f"{len(rest)} more loss spike episode(s), starting at steps {steps}{' ...' if len(rest) > 10 else ''}",
                    "recurring spikes: lower the learning rate, add warmup or gradient clipping",
                    kind=_spikes.KIND_LOSS_SPIKE,
                )
            )
        return findings

    def _layers_params(self) -> dict[str, list[Tensor]]:
        layout = self.layout
        out: dict[str, list[Tensor]] = {}
        if layout is None:
            return out
        index = layout.layer_index.tolist()
        flat = [p for ps in layout.params for p in ps]
        for p, k in zip(flat, index):
            out.setdefault(layout.layer_names[k], []).append(p)
        return out

    def tables(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, list[dict[str, Any]]]:
        """Per-layer update/weight ratios and the loss spikes, for the HTML report (never raises)."""
        try:
            layout = self.layout
            out: dict[str, list[dict[str, Any]]] = {}
            if layout is not None:
                last = self.history[-1] if self.history else {}
                rows = []
                for name, judged, g in zip(layout.layer_names, layout.judged, layout.group_of_layer):
                    tally = self.tallies.get(name, LayerTally())
                    rows.append(
                        {
                            "layer": name,
                            "group": layout.group_names[g],
                            "judged": judged,
                            "update/weight (judged steps)": tally.ratio,
                            "share below band": tally.below / tally.steps if tally.steps else math.nan,
                            "share above band": tally.above / tally.steps if tally.steps else math.nan,
                            "grad norm (last interval)": last.get(
                                f"{self.monitor_name}/{name}/grad_norm", math.nan
                            ),
                        }
                    )
                out["update/weight ratio per layer"] = rows
            if self.spikes:
                out["loss spikes"] = [
                    {
                        "step": s.step,
                        "loss": s.loss,
                        "median": s.median,
                        "robust sigmas": s.sigmas,
                        "x median": s.ratio,
                        "first jump": s.jump.layer if s.jump else "",
                        "jump step": s.jump.step if s.jump else None,
                    }
                    for s in self.spikes
                ]
            return out
        except Exception:  # the report must never fail because of a table
            return {}

    # ------------------------------------------------------------------ checkpointing
    def extra_state(self) -> dict[str, Any]:
        return {
            "tallies": {k: [t.steps, t.below, t.above, t.sum_log] for k, t in self.tallies.items()},
            "spikes": [s.to_dict() for s in self.spikes],
            "tail": self._tail.state(),
            "judged_from": self.judged_from,
            "previous_lrs": {str(k): v for k, v in self._previous_lrs.items()},
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.tallies = {k: LayerTally(*map(float, v)) for k, v in state.get("tallies", {}).items()}
        self.spikes = [Spike.from_dict(s) for s in state.get("spikes", [])]
        self._tail.load(state.get("tail", {}))
        self.judged_from = state.get("judged_from")
        self._previous_lrs = {int(k): list(v) for k, v in state.get("previous_lrs", {}).items()}
