"""Activation variance per layer along the depth: the seed's "the variance doubles at each layer".

Owns :class:`ActivationVarianceMonitor`: its hooks on the stem and every residual block it recognises
(ours, torchvision's, timm's, and user blocks declaring ``residual_branch``), or on the conv/linear layers
of a model without blocks, the moments they feed, its interval, checkpointed state and figure, and
:func:`activation_findings` (which rule reads which layers of the latest history entry). Which modules are
measured is :func:`~lightning_convnets.callbacks.targets.find_targets` (the targets protocol); the metrics
from the merged moments are :func:`~lightning_convnets.callbacks.depth_metrics.target_metrics`; the dead
and saturated units are :class:`~lightning_convnets.callbacks.units.UnitCounts` (whose names are
re-exported here); where the first NaN/Inf came from is
:class:`~lightning_convnets.callbacks.nonfinite.FirstNonFinite`; the rules live in
:mod:`lightning_convnets.callbacks.diagnosis`. Details (targets protocol, logged keys, the non-finite
search) are in ``docs/monitors.md``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from . import diagnosis, plots
from .core import MonitorCallback, MonitorConfigError
from .depth_metrics import geomean_growth, target_metrics
from .diagnosis import Finding
from .hooks import is_compiled
from .moments import MomentBank, ShiftedMoments
from .nonfinite import FirstNonFinite, decode
from .packing import PackedStats, StatsPacker
from .targets import Target, find_targets, identity_aliases
from .units import (
    KIND_SATURATED,
    SATURATED_FRACTION,
    SATURATION_MARGIN,
    UnitCounts,
    alive_per_channel,
    saturated_units,
    unit_kind,
)

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl
    from matplotlib.figure import Figure

__all__ = [
    "KIND_SATURATED",
    "SATURATED_FRACTION",
    "SATURATION_MARGIN",
    "ActivationVarianceMonitor",
    "UnitCounts",
    "activation_findings",
    "alive_per_channel",
    "measured_targets",
    "saturated_units",
    "unit_kind",
]


class ActivationVarianceMonitor(MonitorCallback):
    """Per-layer activation mean and variance along the depth, residual branch ratios, dead ReLUs,
    explosion / vanishing and the first non-finite module.

    ``docs/monitors.md`` has the targets protocol and the logged keys (all under
    ``activation_variance/``). Hooks are registered in ``setup`` (before Lightning compiles the model) and
    gated on ``module.training``: under ``torch.compile`` they are traced into the graph, the monitor's
    on/off switch and ``sample_every_n_steps`` become guards (two graph variants: recording and not),
    and a module called several times per forward is merged across its calls.

    Args:
        log_every_n_steps: optimizer steps between reductions and logs (default: the trainer's).
        blocks: measure residual (and plain) blocks found by the protocol.
        stem: measure the stem output.
        types: extra targets by type: ``"conv"``, ``"bn"``, ``"norm"``, ``"linear"``, ``"relu"`` or classes.
        names: extra targets whose qualified name matches this regex (``re.search``).
        explode_growth: per-block growth (geometric mean over the blocks) above which variance growth
            judged exponential by its shape (the branch variances grow along the depth, see
            :mod:`~lightning_convnets.callbacks.diagnosis`) is a warning; linear growth (BatchNorm) never is.
        vanish_growth: per-block growth below which it is reported as vanishing.
        dead_threshold: fraction of dead channels in a layer that makes a finding.
        units: also count, after every ``nn.ReLU``, ``nn.Sigmoid`` and ``nn.Tanh`` module, the channels that
            are dead (ReLU: never positive) or saturated (sigmoid/tanh: within :data:`SATURATION_MARGIN` of a
            bound) on every element of every recorded example of an interval (``<layer>/dead_fraction``,
            ``<layer>/saturated_fraction``). Functional activations (``torch.tanh(x)``) are not seen.
        saturated_threshold: fraction of saturated channels in a layer that makes a finding.
        sample_every_n_steps: record one optimizer step in every ``k`` (all its micro-batches; the cost
            scales with ``1/k``). ``None`` (default): the cost-derived schedule of
            :class:`~lightning_convnets.callbacks.core.MonitorCallback`: every step for the first
            ``dense_steps`` (50), then one in 50 (or one per logging interval if shorter), which keeps the
            monitor well under 1% of a step (``docs/monitors.md``, "Schedules and cost"). Use 1 for
            statistics of every batch, and to pin a non-finite value to the exact step and module: with
            ``k > 1`` a NaN born in an unrecorded step is seen at the next recorded one, where it may
            already have spread upstream through the weights update.
        dense_steps: steps recorded every step at the start (default 50 with the default schedule, 0 with
            an explicit ``sample_every_n_steps``).
        max_history: history cap (entries; an entry holds ~10 numbers per target, ~100 for a ResNet-18,
            and goes into every checkpoint); see :class:`~lightning_convnets.callbacks.core.MonitorCallback`.
        num_curves: curves (history entries, evenly spaced) in the variance-vs-depth plot.
        train_only: record training-mode forwards only.
        strict: re-raise unexpected exceptions instead of switching off (see
            :class:`~lightning_convnets.callbacks.core.MonitorCallback`).

    Raises:
        ValueError: for an unknown ``types`` alias, a bad regex, non-positive thresholds, or (in ``setup``)
            a model in which nothing matches.

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[ActivationVarianceMonitor(log_every_n_steps=20)], logger=False)
        >>> # trainer.fit(model, datamodule) then
        >>> # logs activation_variance/<layer>/var ..., plots monitors/activation_variance/variance_vs_depth
        >>> # and adds its findings to the end-of-fit diagnosis
    """

    monitor_name = "activation_variance"

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        blocks: bool = True,
        stem: bool = True,
        types: Sequence[str | type[nn.Module]] = (),
        names: str | None = None,
        explode_growth: float = diagnosis.EXPLODE_GROWTH,
        vanish_growth: float = diagnosis.VANISH_GROWTH,
        dead_threshold: float = 0.25,
        units: bool = True,
        saturated_threshold: float = SATURATED_FRACTION,
        sample_every_n_steps: int | None = None,
        max_history: int = 256,
        num_curves: int = 6,
        train_only: bool = True,
        strict: bool | None = None,
        dense_steps: int | None = None,
    ) -> None:
        super().__init__(
            log_every_n_steps, max_history, sample_every_n_steps, train_only, strict, dense_steps
        )
        _check_options(explode_growth, vanish_growth, dead_threshold, saturated_threshold, names)
        self.blocks = blocks
        self.stem = stem
        self.types = tuple(types)
        self.names = names
        self.explode_growth = explode_growth
        self.vanish_growth = vanish_growth
        self.dead_threshold = dead_threshold
        self.units = units
        self.saturated_threshold = saturated_threshold
        self.unit_counts = UnitCounts()  # per ReLU/sigmoid/tanh module: alive elements per channel
        self.num_curves = num_curves
        self.targets: list[Target] = []
        self._moments: dict[str, ShiftedMoments] = {}
        self._aliases: dict[str, str] = {}  # identity shortcut key -> the previous target's output key
        self._first_nonfinite = FirstNonFinite()  # on device: the earliest (step, target) that went NaN/Inf
        self._batch_step = 0
        self.nonfinite: dict[str, Any] | None = None  # {"step": int, "layer": str} once seen

    # ------------------------------------------------------------------ hooks
    def attach(self, trainer: pl.Trainer | None, pl_module: nn.Module) -> None:
        self.targets = measured_targets(
            pl_module, blocks=self.blocks, stem=self.stem, types=self.types, names=self.names
        )
        if not self.targets:
            self.step_aside(
                f"nothing to measure in {type(pl_module).__name__}: no residual block, stem, conv or linear "
                "layer",
                "choose layers with types=(...) or names=r'...'",
            )
            return
        self._moments = {}
        self._bank = MomentBank()
        self._bank_allowed = not is_compiled(pl_module)  # compiled graphs keep the tensors they traced
        self._slot_target = []
        self._aliases = identity_aliases(pl_module, self.targets)
        out: Callable[..., Any] = lambda a, o: o  # noqa: E731
        for index, target in enumerate(self.targets):
            shortcut_key = f"{index}/shortcut"
            measure_shortcut = shortcut_key not in self._aliases
            if target.add is not None and target.sum_is_output:
                self._hook_sum_output(index, target.module, target.add, measure_shortcut)
                continue
            self._hook(target.module, [(f"{index}/out", out)])
            if target.add is not None:
                selects = [(f"{index}/branch", lambda a, o: a[1])]
                if measure_shortcut:
                    selects.append((shortcut_key, lambda a, o: a[0]))
                if not target.sum_is_output:
                    selects.append((f"{index}/sum", out))
                self._hook(target.add, selects)
            elif target.branch is not None:
                self._hook(target.branch, [(f"{index}/branch", out)])
                if target.shortcut is not None:
                    self._hook(target.shortcut, [(shortcut_key, out)])
                elif measure_shortcut:
                    self._hook(target.module, [(shortcut_key, lambda a: a[0])], pre=True)
        self.unit_counts = UnitCounts()
        if self.units:
            added = self.unit_counts.add_modules(pl_module, {id(t.module) for t in self.targets})
            for name, module in added:
                self._hook_unit(name, module)
            if not added and not any(unit_kind(t.module) for t in self.targets):
                self._note_once(
                    f"dead and saturated units not counted: {type(pl_module).__name__} has no nn.ReLU, "
                    "nn.Sigmoid or nn.Tanh module (functional calls such as F.relu are invisible to module "
                    "hooks; GELU, SiLU and the like have no dead-unit rule); the variances go on",
                    "write the activations as modules (nn.ReLU(inplace=True) costs the same as F.relu)",
                )

    def _note_once(self, reason: str, suggestion: str) -> None:
        """An ``info`` row (and one log line) about what this model does not let the monitor measure, once
        per fit however often the hooks are attached."""
        if any(note.message == reason for note in self.notes):
            return
        self.notes.append(diagnosis.not_applicable(self.monitor_name, reason, suggestion))
        rank_zero_info(f"{type(self).__name__}: {reason}")

    def _hook_unit(self, name: str, module: nn.Module) -> None:
        """Count the alive units of ``module``'s output (:meth:`UnitCounts.update`: on the device)."""
        update = self.unit_counts.update

        def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            try:  # registered unwrapped (guard=False): one frame less on every forward
                if self.is_recording(mod):
                    update(name, output)
            except Exception as err:
                self.hook_error(mod, err)

        self.add_hook(module, hook, guard=False)

    def _slots(self, selects: list[tuple[str, Callable[..., Any]]]) -> list[tuple[int, ShiftedMoments, Any]]:
        """A moment in the bank per ``(key, select)``: ``(slot, moments, select)``."""
        slots = []
        for key, select in selects:
            self._moments[key] = self._bank.add(key)
            self._slot_target.append(int(key.split("/", 1)[0]))
            slots.append((len(self._bank.keys) - 1, self._moments[key], select))
        return slots

    def _record(self, slot: int, moments: ShiftedMoments, x: Any) -> None:
        """Add the tensor ``x`` to a moment: the bank's four ops, else the moment's own update."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return
        state = moments.state
        # a module reused at another width (e.g. one ReLU module called on 64 and 128 channels):
        # keep the first width only; shapes are static, so this is no host sync
        if state is not None and (x.dim() >= 2 and x.shape[1] != state.shape[1]):
            return
        if not self._bank.take(slot, x):
            moments.update(x)

    def _hook_sum_output(self, index: int, block: nn.Module, add: nn.Module, measure_shortcut: bool) -> None:
        """A pre-activation block returns its :class:`~lightning_convnets.nn.ResidualAdd`'s sum: measure its
        output in the add's hook, one forward hook per block instead of two (each hooked module costs a few
        microseconds of dispatch per forward, recorded or not). Until the first recorded eager forward has
        shown that the block called its add once and returned that very tensor, the block keeps its own
        hook for ``out``; a block that returns something else (or calls its add twice) keeps it for good.
        The same tensors are measured either way."""
        out_slot, out_moments, _ = self._slots([(f"{index}/out", None)])[0]
        selects = [(f"{index}/branch", lambda a, o: a[1])]
        if measure_shortcut:
            selects.append((f"{index}/shortcut", lambda a, o: a[0]))
        slots = self._slots(selects)
        record = self._record
        merged = False
        # the add's output and its number of calls in this forward, until the block hook compares
        last_sum: list[Any] = [None, 0]

        def add_hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            try:  # registered unwrapped (guard=False): it runs on every forward of every block
                if self.is_recording(mod):
                    for slot, moments, select in slots:
                        record(slot, moments, select(args, output))
                    if merged:
                        record(out_slot, out_moments, output)
                    elif not torch.compiler.is_compiling():
                        last_sum[0] = output
                        last_sum[1] += 1
            except Exception as err:
                self.hook_error(mod, err)

        def block_hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            nonlocal merged
            if merged or not self.is_recording(mod):
                return
            record(out_slot, out_moments, output)
            # one add call whose output the block returned: only then is "the add's output" the block's
            if last_sum[1] == 1 and output is last_sum[0] and not torch.compiler.is_compiling():
                merged = True  # from the next forward on, the add's hook measures the output
                block_handle.remove()
            last_sum[0], last_sum[1] = None, 0

        self.add_hook(add, add_hook, guard=False)
        block_handle = self.add_hook(block, block_hook)

    def _hook(
        self, module: nn.Module, selects: list[tuple[str, Callable[..., Any]]], pre: bool = False
    ) -> None:
        """One hook on ``module`` feeding one :class:`ShiftedMoments` per ``(key, select)``."""
        slots = self._slots(selects)
        record = self._record
        if pre:

            def pre_hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
                try:  # registered unwrapped (guard=False): one frame less on every forward
                    if self.is_recording(mod) and args:
                        for slot, moments, select in slots:
                            record(slot, moments, select(args))
                except Exception as err:
                    self.hook_error(mod, err, pre=True)

            self.add_hook(module, pre_hook, pre=True, guard=False)
        else:

            def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                try:  # registered unwrapped (guard=False): one frame less on every forward
                    if self.is_recording(mod):
                        for slot, moments, select in slots:
                            record(slot, moments, select(args, output))
                except Exception as err:
                    self.hook_error(mod, err)

            self.add_hook(module, hook, guard=False)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_step = trainer.global_step
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._recording:  # the step this batch ran in: global_step moved on if the optimizer stepped
            self._bank.fold()
            if not self._bank.ready and self._bank_allowed:
                self._bank.build()  # every state has its width now: from the next batch on, the fast path
            self._first_nonfinite.track(self._batch_step, self._bank, self._slot_target, self._moments)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        # the forward is over: the bank's reused difference buffer goes before the backward's peak
        if not self._recording:  # a quiet step used no buffer
            return
        bank = getattr(self, "_bank", None)  # none before attach, or when the monitor stepped aside
        if bank is not None:
            bank.release()

    # ------------------------------------------------------------------ reduction
    def pack(self, trainer: pl.Trainer | None, pl_module: nn.Module, packer: StatsPacker) -> None:
        bank = getattr(self, "_bank", None)
        if bank is not None:
            bank.settle()  # the folded batches' counts (deferred by fold)
        for key, moments in self._moments.items():
            packer.running(key, moments)
        self.unit_counts.pack(packer)
        if packer.entries:
            self._first_nonfinite.pack(packer, packer.entries[0][2][0].device)

    def reset_interval(self) -> None:
        self._bank.reset()
        self.unit_counts.reset()

    def compute_metrics(
        self, trainer: pl.Trainer | None, pl_module: nn.Module, stats: PackedStats
    ) -> dict[str, float]:
        metrics, block_vars, first_bad = target_metrics(self.targets, self._aliases, stats)
        metrics.update(self.unit_counts.metrics(stats))
        if len(block_vars) >= 2:
            metrics["growth_per_block"] = geomean_growth(block_vars)
        found = decode(stats.get("nonfinite"))  # (step, target index), None while every value was finite
        if self.nonfinite is None and (found is not None or first_bad is not None):
            if found is not None:
                step, layer = found[0], self.targets[found[1]].name
            else:
                step, layer = (trainer.global_step if trainer else 0), first_bad
            self.nonfinite = {"step": step, "layer": layer}
            rank_zero_warn(
                f"ActivationVarianceMonitor: first non-finite activation (NaN/Inf) produced by {layer!r} "
                f"at step {step}"
            )
        metrics["nonfinite_step"] = float(self.nonfinite["step"]) if self.nonfinite else -1.0
        return metrics

    # ------------------------------------------------------------------ standalone use
    @torch.no_grad()
    def measure(self, model: nn.Module, *inputs: Any) -> dict[str, float]:
        """Run ``model(*inputs)`` once in training mode (no gradients) and return this monitor's metrics
        for that forward, without a trainer: the same hooks, merging and metrics as during ``fit``.

        The model's mode is restored; BatchNorm running statistics are updated as in any training
        forward.

        Example:
            >>> import torch
            >>> from lightning_convnets.backbones import create_backbone
            >>> with torch.random.fork_rng(devices=[]):  # a fixed initialisation; the global RNG is left alone
            ...     _ = torch.manual_seed(0)
            ...     net = create_backbone("preact_resnet18", stem="cifar", width=8, norm="none")
            >>> x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
            >>> m = ActivationVarianceMonitor().measure(net, x)
            >>> m["growth_per_block"] > 1.2
            True
        """
        was_training = model.training
        self.attach(None, model)
        if not self.active:
            self.active = True  # standalone: report it, and stay usable for another model
            raise MonitorConfigError(f"ActivationVarianceMonitor.measure: {self.notes.pop().message}")
        self._recording = True
        try:
            model.train()
            model(*inputs)
            self._first_nonfinite.track(0, self._bank, self._slot_target, self._moments)
            packer = StatsPacker()
            self.pack(None, model, packer)
            gathered = packer.flat().to("cpu", torch.float64).unsqueeze(0)
            return self.compute_metrics(None, model, packer.unpack(gathered))
        finally:
            self._recording = False
            self.remove_hooks()
            model.train(was_training)

    # ------------------------------------------------------------------ reporting
    def diagnose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Finding]:
        """:func:`activation_findings` of the latest history entry (the rules' calls, in one pure function)."""
        return activation_findings(
            self.history[-1] if self.history else None,
            self.nonfinite,
            self.targets,
            self.unit_counts,
            self.explode_growth,
            self.vanish_growth,
            self.dead_threshold,
            self.saturated_threshold,
            self.monitor_name,
        )

    def figures(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Figure]:
        if not self.history or not trainer.is_global_zero:
            return {}
        return {"variance_vs_depth": self.plot()}

    def plot(self) -> Figure:
        """Variance vs depth (log scale), one curve per chosen history entry (evenly spaced, first and
        last included), and the residual branch ratio below when blocks were measured
        (:func:`lightning_convnets.callbacks.plots.variance_vs_depth`)."""
        return plots.variance_vs_depth(
            self.history, [t.name for t in self.targets], self.num_curves, self.monitor_name
        )

    # ------------------------------------------------------------------ checkpointing
    def extra_state(self) -> dict[str, Any]:
        # this rank's logging interval so far: the moments' shifts and partial sums, the units' alive counts
        # and the earliest non-finite activation not yet reduced: a resumed run continues them exactly
        bank = getattr(self, "_bank", None)  # none before attach, or when the monitor stepped aside
        code = self._first_nonfinite.code
        return {
            "nonfinite": self.nonfinite,
            "moments": bank.saved() if bank is not None else {},
            "units": self.unit_counts.state_dict(),
            "nonfinite_code": None if code is None else float(code),  # a save reads the device anyway
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.nonfinite = state.get("nonfinite")
        self._restored_moments = dict(state.get("moments") or {})
        self._restored_units = dict(state.get("units") or {})
        self._restored_code = state.get("nonfinite_code")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put restored moments, unit counts and non-finite code (a resumed run) back, on the model's
        device."""
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        restored = getattr(self, "_restored_moments", None)
        self._restored_moments = {}
        bank = getattr(self, "_bank", None)  # none when the monitor stepped aside
        if restored and bank is not None:
            bank.restore(restored, device)
        self.unit_counts.load_state_dict(self.__dict__.pop("_restored_units", None) or {}, device)
        code = self.__dict__.pop("_restored_code", None)
        if code is not None and self._first_nonfinite.code is None:
            self._first_nonfinite.code = torch.tensor(float(code), dtype=torch.float64, device=device)


def _check_options(
    explode_growth: float,
    vanish_growth: float,
    dead_threshold: float,
    saturated_threshold: float,
    names: str | None,
) -> None:
    """Raise :class:`MonitorConfigError` naming the first of the monitor's options out of its range."""
    if not explode_growth > 1:
        raise MonitorConfigError(
            f"ActivationVarianceMonitor: explode_growth must be > 1, got {explode_growth}"
        )
    if not 0 < vanish_growth < 1:
        raise MonitorConfigError(
            f"ActivationVarianceMonitor: vanish_growth must be in (0, 1), got {vanish_growth}"
        )
    for arg, value in (("dead_threshold", dead_threshold), ("saturated_threshold", saturated_threshold)):
        if not 0 < value <= 1:
            raise MonitorConfigError(f"ActivationVarianceMonitor: {arg} must be in (0, 1], got {value}")
    if names is not None:
        try:
            re.compile(names)
        except re.error as err:
            raise MonitorConfigError(
                f"ActivationVarianceMonitor: names is not a valid regex ({names!r}): {err}"
            ) from err


def measured_targets(model: nn.Module, **options: Any) -> list[Target]:
    """The targets the monitor measures in ``model``: :func:`~lightning_convnets.callbacks.targets.find_targets`
    with ``options`` (its keyword arguments: ``blocks``, ``stem``, ``types``, ``names``); when it finds nothing
    (no residual block or stem: a U-Net, a plain CNN, a transformer) and no ``types``/``names`` were asked
    for, the conv layers, else the linear layers. ``[]`` when there is nothing to measure.

    Raises:
        MonitorConfigError: ``types`` or ``names`` given and no module matches.

    Example:
        >>> [t.name for t in measured_targets(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)))]
        ['0', '2']
    """
    targets = find_targets(model, **options)
    types, names = tuple(options.get("types", ())), options.get("names")
    if not targets and (types or names):
        raise MonitorConfigError(
            f"ActivationVarianceMonitor: no module of {type(model).__name__} matches types="
            f"{list(types)} / names={names!r}; check the names against "
            "[n for n, _ in model.named_modules()]"
        )
    if not targets:
        # no residual block and no stem (a U-Net, a plain CNN, a transformer): per-layer statistics
        for fallback in ("conv", "linear"):
            targets = find_targets(model, blocks=False, stem=False, types=(fallback,))
            if targets:
                rank_zero_info(
                    f"ActivationVarianceMonitor: no residual block or stem in {type(model).__name__}; "
                    f"measuring its {len(targets)} {fallback} layers instead"
                )
                break
    return targets


def activation_findings(
    entry: Mapping[str, float] | None,
    nonfinite: Mapping[str, Any] | None,
    targets: Sequence[Target],
    units: UnitCounts,
    explode_growth: float = diagnosis.EXPLODE_GROWTH,
    vanish_growth: float = diagnosis.VANISH_GROWTH,
    dead_threshold: float = 0.25,
    saturated_threshold: float = SATURATED_FRACTION,
    monitor: str = "activation_variance",
) -> list[Finding]:
    """The activation monitor's findings: the first non-finite module (``nonfinite = {"step", "layer"}``),
    then, from the latest history ``entry`` (keys ``<monitor>/<layer>/<metric>``), the variance along the
    depth of the blocks, dead ReLUs (targets and counted ReLU units), dominant residual branches (identity
    shortcuts only) and saturated sigmoid/tanh units: one call of a rule each
    (:mod:`lightning_convnets.callbacks.diagnosis`, :func:`saturated_units`).

    Example:
        >>> from lightning_convnets.callbacks.targets import Target
        >>> entry = {"step": 9.0, "activation_variance/net.1/dead_fraction": 0.5}
        >>> [f.kind for f in activation_findings(entry, None, [Target("net.1", nn.Identity(), "layer")], UnitCounts())]
        ['dead_relu']
    """
    findings = [diagnosis.nonfinite_activation(nonfinite, monitor)]
    if entry is not None:
        step = int(entry["step"])
        names = [t.name for t in targets] + units.names("relu")
        blocks = [t.name for t in targets if t.kind in ("block", "plain")]
        # a branch ratio says how far a block is from the identity only where the shortcut is one
        identity = [t.name for t in targets if t.residual and not t.projection]
        findings += [
            diagnosis.variance_growth(
                diagnosis.depth_points(entry, blocks, monitor), step, monitor, explode_growth, vanish_growth
            ),
            diagnosis.dead_relus(
                diagnosis.latest_values(entry, names, "dead_fraction", monitor), step, dead_threshold, monitor
            ),
            diagnosis.dominant_branches(
                diagnosis.latest_values(entry, identity, "branch_ratio", monitor), step, monitor=monitor
            ),
            saturated_units(
                diagnosis.latest_values(entry, units.names("sigmoid", "tanh"), "saturated_fraction", monitor),
                step,
                saturated_threshold,
                monitor,
            ),
        ]
    return [f for f in findings if f is not None]
