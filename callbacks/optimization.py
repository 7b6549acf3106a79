"""The optimization monitor: is the learning rate sane for each layer, and did the loss spike?

Owns :class:`OptimizationMonitor`, which measures, per layer and per parameter group, the update-to-weight
norm ratio ``||W_after - W_before|| / ||W_before||`` of an optimizer step on the schedule's recorded
steps, every layer's gradient norm, and the training loss of every step: its Lightning hooks, when it
measures, what it logs, checkpoints and reports. The parameters' layout and the ratio arithmetic are
:mod:`~lightning_convnets.callbacks.param_updates`', the rules that judge the ratios (the band, the
``KIND_*`` constants, :func:`update_ratio_findings`: all importable from here too)
:mod:`~lightning_convnets.callbacks.update_ratio`', the loss-spike judging and the on-device ring of steps
:mod:`~lightning_convnets.callbacks.loss_spikes`'. The method, the logged keys and the costs are in
``docs/monitors.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from . import diagnosis, update_ratio
from . import loss_spikes as _spikes
from .core import MonitorCallback, MonitorConfigError
from .diagnosis import Finding
from .loss_spikes import Spike, SpikeTail, StepRing
from .param_updates import RATIO_FLOOR as RATIO_FLOOR  # re-exported
from .param_updates import ParamLayout, UpdateMeter
from .update_ratio import (  # noqa: F401  (the rules' names, re-exported: update_ratio.__all__)
    DEFAULT_WARMUP_STEPS,
    KIND_NOT_OPTIMIZED,
    KIND_UPDATE_RATIO_HIGH,
    KIND_UPDATE_RATIO_LOW,
    KIND_UPDATE_RATIO_OK,
    MIN_JUDGED_STEPS,
    RATIO_HEALTHY,
    RATIO_HIGH,
    RATIO_LOW,
    STAY_FRACTION,
    LayerTally,
    frozen_layers_finding,
    lr_rising,
    not_optimized_finding,
    ratio_rows,
    update_ratio_findings,
)

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

    from .packing import PackedStats, StatsPacker

__all__ = ["OptimizationMonitor", *update_ratio.__all__]


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
    raises the step's peak). Every step it also writes the step's loss into a ring on the device (one
    tensor op, no host read), and each parameter's gradient norm (``torch._foreach_norm``, before clipping,
    after AMP unscaling): every step on a GPU (one fused kernel), on the recorded steps only on a CPU (where
    it loops over the parameters and reads every gradient; ``grad_norms_every_step``). Everything is
    reduced in the core's one collective per logging interval.

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
        grad_norms_every_step: measure every layer's gradient norm on every step (with ``loss_spikes``),
            so that a spike names the layer whose norm jumped first. ``None`` (default): on a GPU yes; on
            a CPU only on the recorded steps (every step of the dense phase, then one in 50), where a
            spike after the dense phase is still found (the loss is recorded every step) but its cause is
            not named, and ``<layer>/grad_norm`` is the mean over the interval's recorded steps.
        sample_every_n_steps, dense_steps, max_history, strict: as in
            :class:`~lightning_convnets.callbacks.core.MonitorCallback`.

    Logged (under ``optimization/``): ``<layer>/update_ratio`` (geometric mean over the interval's recorded
    steps), ``<layer>/grad_norm`` (mean over its steps with norms), ``param_group/<group>/update_ratio`` and ``/lr``,
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
        grad_norms_every_step: bool | None = None,
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
        self.grad_norms_every_step = grad_norms_every_step
        self._norms_every_step = bool(grad_norms_every_step)  # resolved for the device by _build
        self.layout: ParamLayout | None = None
        self.tallies: dict[str, LayerTally] = {}
        self.spikes: list[Spike] = []
        self.judged_from: int | None = None
        self.setup_findings: list[Finding] = []
        self._ring: StepRing | None = None
        self._tail = SpikeTail(spike_window + _spikes.JUMP_LOOKBACK)
        self._meter: UpdateMeter | None = None
        self._lrs: dict[int, list[Any]] = {}
        self._previous_lrs: dict[int, list[Any]] = {}
        self._spikes_on = self.loss_spikes
        self._loss_checked = False
        self._restored_interval: dict[str, Any] | None = None  # a checkpoint's open interval (a resume)

    def failure_hint(self, hook: str, error: BaseException) -> str:
        return (
            "pass loss_spikes=False (no per-step gradient norms), or leave OptimizationMonitor out for this "
            "model (parameters of several devices or sparse gradients are not supported)"
        )

    # ------------------------------------------------------------------ the layout
    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = trainer.strategy.root_device
        layout = self.layout = ParamLayout.build(trainer.optimizers, pl_module, device)
        self._meter = UpdateMeter(layout)
        capacity, total = self.interval(trainer) + 2, layout.total
        every = self.grad_norms_every_step
        # default: one fused kernel on a GPU; on a CPU _foreach_norm loops over the parameters, reading
        # every gradient (~0.5% of a small network's step), so the norms wait for the recorded steps
        self._norms_every_step = device.type != "cpu" if every is None else bool(every)
        self._ring = StepRing(capacity, total, device, layout.dtype) if total else None
        # trainable parameters that no optimizer holds never change: a frequent bug
        stray = layout.stray(pl_module) if layout.optimizers else []
        self.setup_findings = [not_optimized_finding(stray, self.monitor_name)] if stray else []

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._build(trainer, pl_module)
        self._restore_interval()
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
        if not (self._recording or (self.loss_spikes and self._norms_every_step)):
            if self.loss_spikes:  # a quiet step with per-step norms off: the loss counts, no norms, no op
                self._ring.stepped_unmeasured(o)
            return
        start = layout.starts[o]
        with torch.no_grad():
            grads = [p.grad if p.grad is not None else layout.zero for p in params]
            norms = torch._foreach_norm(grads, 2, dtype=layout.dtype)
            self._ring.put_grads(o, start, start + len(params), list(norms))
            meter = self._meter
            if self._recording and meter is not None and o not in meter.pending:
                meter.snapshot(o, trainer.global_step)  # the step being taken (it moves on after it)
                self._lrs[o] = [group["lr"] for group in optimizer.param_groups]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._meter is not None and self._meter.pending:
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
        """The update/weight ratios of the optimizers that stepped into the interval's accumulators."""
        meter = self._meter
        assert meter is not None
        meter.measure(self._judged(meter.step), self.low, self.high)

    def _judged(self, step: int) -> bool:
        """Whether this recorded step counts for the findings: past ``warmup_steps`` and no learning rate
        rising since the previous recorded step (a warmup schedule)."""
        rising = lr_rising(self._lrs, self._previous_lrs)
        self._previous_lrs.update(self._lrs)
        judged = step >= self.warmup_steps and not rising
        if judged and self.judged_from is None:
            self.judged_from = step
        return judged

    # ------------------------------------------------------------------ the interval
    def pack(self, trainer: pl.Trainer, pl_module: pl.LightningModule, packer: StatsPacker) -> None:
        layout = self.layout
        if layout is None or self._meter is None or self._ring is None:
            return
        # every rank measures the same parameters: max merges them exactly; the loss is averaged
        packer.max("ratios", self._meter.acc)
        packer.max("grad_norms", layout.per_layer_norms(self._ring.grads))
        if self._spikes_on:
            packer.sum("loss", self._ring.loss)

    def compute_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: PackedStats
    ) -> dict[str, float]:
        layout = self.layout
        if layout is None or self._meter is None or "ratios" not in stats or self._ring is None:
            return {}
        metrics = self._meter.read(stats["ratios"], self.tallies)
        for g, lr in layout.group_lrs().items():
            if lr is not None:
                metrics[f"param_group/{g}/lr"] = lr
        # the steps of the interval, host side: the loss, and each layer's gradient norm (NaN where not written)
        rows = self._ring.rows()
        n_layers = len(layout.layer_names)
        grads_all = stats["grad_norms"].reshape(-1, n_layers)
        world = max(1, int(getattr(trainer, "world_size", 1) or 1))
        steps, losses, slots, partial = [], [], [], []
        loss_values = stats["loss"].tolist() if self._spikes_on and "loss" in stats else None
        divide_by_parts = not pl_module.automatic_optimization
        every = len(layout.optimizers)
        for (step, slot, parts, written), unmeasured in zip(rows, self._ring.unmeasured()):
            if not written and not unmeasured:
                continue
            if len(written) < every:
                partial.append((len(slots), written))
            steps.append(step)
            slots.append(slot)
            loss = None
            if loss_values is not None and parts > 0:
                loss = float(loss_values[slot]) / (world * (parts if divide_by_parts else 1))
            losses.append(loss)
        if slots:
            # one gather of the interval's rows (host side), then the marks: a NaN gradient is non-finite
            # (inf), NaN from here on means not written (an optimizer that did not step, or no norms)
            block = grads_all[torch.tensor(slots, dtype=torch.long)]
            block[block.isnan()] = math.inf
            if partial:
                owners = layout.layer_optimizer
                for i, written in partial:
                    if not written:
                        block[i] = math.nan
                    else:
                        block[i, torch.tensor([int(o) not in written for o in owners])] = math.nan
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
        if self._meter is not None:
            self._meter.reset()
        if self._ring is not None:
            self._ring.clear()

    # ------------------------------------------------------------------ the report
    def diagnose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Finding]:
        findings = list(self.setup_findings)
        layout = self.layout
        if layout is not None:
            lrs = {g: math.nan if lr is None else lr for g, lr in layout.group_lrs().items()}
            findings += update_ratio_findings(
                self.tallies,
                layout.judged_layers(),
                lrs,
                self.monitor_name,
                self.judged_from,
                self.low,
                self.high,
            )
            frozen = [n for n, ps in layout.layer_params().items() if not any(p.requires_grad for p in ps)]
            if frozen:
                findings.append(frozen_layers_finding(frozen, self.monitor_name))
        return findings + _spikes.spike_findings(self.spikes, self.monitor_name)

    def tables(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, list[dict[str, Any]]]:
        """Per-layer update/weight ratios and the loss spikes, for the HTML report (never raises)."""
        try:
            layout = self.layout
            out: dict[str, list[dict[str, Any]]] = {}
            if layout is not None:
                last = self.history[-1] if self.history else {}
                norms = {
                    n: last.get(f"{self.monitor_name}/{n}/grad_norm", math.nan) for n in layout.layer_names
                }
                groups = [layout.group_names[g] for g in layout.group_of_layer]
                out["update/weight ratio per layer"] = ratio_rows(
                    layout.layer_names, groups, layout.judged, self.tallies, norms
                )
            if self.spikes:
                out["loss spikes"] = _spikes.spike_rows(self.spikes)
            return out
        except Exception:  # the report must never fail because of a table
            return {}

    # ------------------------------------------------------------------ checkpointing
    def extra_state(self) -> dict[str, Any]:
        """The run so far (tallies, spikes, the band's tail, where judging began, the learning rates of the
        latest recorded steps) and the open logging interval (CPU copies): the update-ratio accumulators
        and the ring of steps (losses, gradient norms). A checkpoint inside an interval then resumes it
        exactly: the resumed run's next flush is the uninterrupted run's."""
        state: dict[str, Any] = {
            "tallies": {k: [t.steps, t.below, t.above, t.sum_log] for k, t in self.tallies.items()},
            "spikes": [s.to_dict() for s in self.spikes],
            "tail": self._tail.state(),
            "judged_from": self.judged_from,
            "previous_lrs": _lrs_state(self._previous_lrs),
            "lrs": _lrs_state(self._lrs),
        }
        if self._meter is not None:
            state["interval"] = {
                **self._meter.state(),
                "ring": self._ring.state() if self._ring is not None else None,
            }
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.tallies = {k: LayerTally(*map(float, v)) for k, v in state.get("tallies", {}).items()}
        self.spikes = [Spike.from_dict(s) for s in state.get("spikes", [])]
        self._tail.load(state.get("tail", {}))
        self.judged_from = state.get("judged_from")
        self._previous_lrs = {int(k): list(v) for k, v in state.get("previous_lrs", {}).items()}
        self._lrs = {int(k): list(v) for k, v in (state.get("lrs") or {}).items()}
        # put back by on_train_start once the layout is built (a checkpoint without it: a fresh interval)
        self._restored_interval = state.get("interval")

    def _restore_interval(self) -> None:
        """Continue the checkpoint's logging interval (:meth:`extra_state`) if it was measured on these
        layers and groups; else the interval starts afresh (at most one interval's numbers lost)."""
        saved, self._restored_interval = self._restored_interval, None
        meter = self._meter
        if not saved or meter is None:
            return
        if not meter.load(saved):
            rank_zero_info(
                f"{type(self).__name__}: the checkpoint's open logging interval was measured on other layers "
                "or parameter groups; the interval starts afresh"
            )
            return
        ring = saved.get("ring")
        if ring is not None and self._ring is not None and not self._ring.load(ring):
            meter.reset()  # the ratios without their steps' gradient norms and losses: start afresh together


def _lrs_state(lrs: dict[int, list[Any]]) -> dict[str, list[Any]]:
    """Recorded learning rates for a checkpoint: string keys, a tensor rate as a CPU copy."""

    def cpu(value: Any) -> Any:
        return value.detach().cpu().clone() if isinstance(value, Tensor) else value

    return {str(k): [cpu(v) for v in rates] for k, rates in lrs.items()}
