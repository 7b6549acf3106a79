"""The monitors' core: :class:`MonitorCallback`, the base class of every monitor.

Owns the subclass API (``attach``, ``pack``, ``compute_metrics``, ``reset_interval``, ``diagnose``,
``figures``, ``tables``, ``extra_state``), what the guard does with a failure (an unexpected exception
switches one monitor off with one warning and an ``error`` row: :meth:`MonitorCallback.fail`; a rank that
switched off keeps taking part in the collective), the one collective per logging interval
(:meth:`MonitorCallback.flush`), the any-logger output, the bounded history, and
:func:`observers_paused`. Around it: :mod:`~lightning_convnets.callbacks.guard` (the wrapper of every
Lightning hook, ``strict``, :class:`MonitorConfigError`), :mod:`~lightning_convnets.callbacks.moments`
(streaming moments), :mod:`~lightning_convnets.callbacks.packing` (what travels in the collective),
:mod:`~lightning_convnets.callbacks.schedule` (which steps are recorded),
:mod:`~lightning_convnets.callbacks.hooks` (forward hooks, compiled models),
:mod:`~lightning_convnets.callbacks.monitor_state` (the checkpointed state: versions, the per-rank gather,
the resume), :mod:`~lightning_convnets.callbacks.end_of_fit` (the monitor's part of the end-of-fit
diagnosis) and :mod:`~lightning_convnets.callbacks.diagnosis` (findings and the report). The full API and
the cost model are in ``docs/monitors.md``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from . import diagnosis, end_of_fit, hooks, moments, packing, schedule
from .deprecated import moved_names
from .guard import GUARDED_HOOKS, STRICT_ENV, MonitorConfigError, guard_hook, strict_default
from .hooks import ForwardHooks
from .monitor_state import MonitorState, share_rank_states
from .monitor_state import cached_state_key as _cached_state_key  # the monitors' state_key (shattering)
from .schedule import RecordingSchedule

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl
    from matplotlib.figure import Figure

    from .diagnosis import Finding
    from .packing import PackedStats, StatsPacker

__all__ = [
    "DEFAULT_MAX_HISTORY",
    "STRICT_ENV",
    "MonitorCallback",
    "MonitorConfigError",
    "observers_paused",
    "strict_default",
]

DEFAULT_MAX_HISTORY = 1000
"""History cap (entries) of every monitor unless ``max_history`` says otherwise."""

_PAUSED = 0  # module-level so a hook's gate is one global read (dynamo guards on it under compile)


@contextlib.contextmanager
def observers_paused() -> Iterator[None]:
    """Silence every monitor's hooks inside the block (probes, extra forwards that are not training).

    Example:
        >>> import torch
        >>> with observers_paused():  # no monitor records this forward
        ...     out = torch.nn.Linear(2, 2)(torch.zeros(1, 2))
    """
    global _PAUSED
    _PAUSED += 1
    try:
        yield
    finally:
        _PAUSED -= 1


class MonitorCallback(ForwardHooks, RecordingSchedule, Callback):
    """Base class of the diagnostic monitors (see the module docstring for the subclass API).

    Args:
        log_every_n_steps: optimizer steps between reductions/logs; ``None`` uses the trainer's
            ``log_every_n_steps``.
        max_history: most history entries kept (and checkpointed); when full, every other entry is
            dropped so the curve still spans the run.
        sample_every_n_steps: record statistics on one optimizer step in every ``k`` (all of its
            micro-batches, steps ``0, k, 2k, ...``); 1 records every step. ``None`` (the default of the
            monitors): the cost-derived schedule, every step below ``dense_steps``, then one step in
            ``min(DEFAULT_SAMPLE_PERIOD, log interval)`` (:meth:`records`). An explicit ``k`` wins.
        dense_steps: optimizer steps recorded every step at the start of training. ``None``:
            ``DEFAULT_DENSE_STEPS`` with the default schedule, 0 with an explicit ``sample_every_n_steps``.
        train_only: only training-mode forwards are recorded (validation does not pollute statistics).
            Hooks check ``module.training`` in any case; with ``False`` they record eval forwards too.

        strict: re-raise an unexpected exception from the monitor instead of switching the monitor off
            (use it in tests and while developing a monitor; see "The guard" below). ``None``: ``True``
            when the environment variable ``LIGHTNING_CONVNETS_STRICT_MONITORS`` is ``1`` (this project's
            test suite sets it), else ``False``.

    The guard: every Lightning hook of a monitor, and every forward hook it registers, runs under one
    guard. An unexpected exception is reported once as a warning (the monitor, the hook, the exception
    and the option that would fix it), the monitor switches itself off for the rest of the run (its
    forward hooks are removed) and the end-of-fit diagnosis gets an ``error`` row; training goes on,
    bit-identical to a run without the monitor. :class:`MonitorConfigError` (a configuration mistake
    seen in ``setup``) is always raised. Under DDP a rank that switched off keeps taking part in the
    interval's collective (a failure flag travels with it) until every rank has switched off with it.

    Raises:
        ValueError: for non-positive intervals or history caps.

    Example:
        >>> import torch
        >>> class CountingMonitor(MonitorCallback):
        ...     monitor_name = "counting"
        ...     def attach(self, trainer, pl_module):
        ...         self.seen = torch.zeros((), device=pl_module.device)
        ...         self.add_hook(pl_module, self._count)
        ...     def _count(self, module, args, output):
        ...         if self.is_recording(module):
        ...             self.seen += 1
        ...     def pack(self, trainer, pl_module, packer):
        ...         packer.sum("forwards", self.seen)
        ...     def compute_metrics(self, trainer, pl_module, stats):
        ...         return {"forwards": float(stats["forwards"])}
        ...     def reset_interval(self):
        ...         self.seen.zero_()
        >>> CountingMonitor(log_every_n_steps=10, strict=True).interval(None)
        10
    """

    monitor_name: ClassVar[str] = "monitor"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in GUARDED_HOOKS & set(vars(cls)):
            setattr(cls, name, guard_hook(name, vars(cls)[name]))

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        max_history: int = DEFAULT_MAX_HISTORY,
        sample_every_n_steps: int | None = 1,
        train_only: bool = True,
        strict: bool | None = None,
        dense_steps: int | None = None,
    ) -> None:
        super().__init__()  # ForwardHooks: no hook yet
        problem = self.set_schedule(log_every_n_steps, sample_every_n_steps, dense_steps)
        if problem:
            raise MonitorConfigError(f"{type(self).__name__}: {problem}")
        if max_history < 2:
            raise MonitorConfigError(f"{type(self).__name__}: max_history must be >= 2, got {max_history}")
        self.max_history = max_history
        self.train_only = train_only
        self.strict = strict_default() if strict is None else bool(strict)
        self.enabled = True
        self.active = True  # False once the monitor stepped aside (failure, or nothing to measure)
        self.failure: Finding | None = None  # the error row of a switched-off monitor
        self.notes: list[Finding] = []  # info rows about what the monitor could not measure
        self._guard_depth = 0
        self._packed_size: int | None = None  # length of the last packed vector (for a failed rank)
        self.history: list[dict[str, float]] = []
        self.collectives = 0
        self.last_stats: PackedStats | None = None
        self._recording = False
        self._attached = False
        self._last_flush_step = -1
        self._batches_since_flush = 0

    # ----------------------------------------------------------------------------- subclass API
    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Register hooks (with :meth:`add_hook`). Called once, in ``setup`` of the fit stage."""

    def pack(self, trainer: pl.Trainer, pl_module: pl.LightningModule, packer: StatsPacker) -> None:
        """Add this interval's on-device statistics to ``packer``."""

    def compute_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: PackedStats
    ) -> dict[str, float]:
        """Metrics (without the ``monitor_name/`` prefix) from the merged statistics."""
        return {}

    def reset_interval(self) -> None:
        """Zero the on-device accumulators (after each flush)."""

    def diagnose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Finding]:
        """Findings for the end-of-fit diagnosis."""
        return []

    def figures(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Figure]:
        """End-of-fit figures, ``key -> matplotlib Figure`` (logged as ``monitors/<name>/<key>``)."""
        return {}

    def tables(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, list[dict[str, Any]]]:
        """End-of-fit tables for the HTML report, ``title -> rows`` (a row is a dict ``column -> value``,
        e.g. one per layer). Called once, on global rank zero, at the end of fit; keep it cheap (read the
        history, no collective). A monitor that does not override it gets the latest history entry as one
        row per layer (:func:`~lightning_convnets.callbacks.report.history_tables`)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Checkpointed state besides ``history``."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    # ----------------------------------------------------------------------------- helpers
    def is_recording(self, module: nn.Module) -> bool:
        """The gate every hook checks first: the monitor is on for this step, nothing paused it, and the
        module is in training mode (unless ``train_only=False``)."""
        return self._recording and _PAUSED == 0 and (module.training or not self.train_only)

    # ----------------------------------------------------------------------------- the guard
    def hook_error(self, module: nn.Module, error: Exception, pre: bool = False) -> None:
        """What a guarded forward hook does with an exception from its body: re-raise it with
        ``strict=True``, else switch the monitor off (:meth:`fail`)."""
        if self.strict:
            raise error
        self.fail(f"forward {'pre-' if pre else ''}hook on {type(module).__name__}", error, None)

    def failure_hint(self, hook: str, error: BaseException) -> str:
        """The option that would avoid ``error`` (monitors override it); ends the guard's warning."""
        return "report it with the model's structure if it looks like a bug of the monitor"

    def fail(self, hook: str, error: BaseException, trainer: pl.Trainer | None = None) -> None:
        """Switch the monitor off after ``error`` in ``hook``: hooks removed, one warning, an ``error``
        row for the diagnosis. Training is not touched."""
        first = self.failure is None
        self.active = False
        self._recording = False
        self.remove_hooks()
        if not first:
            return
        step = int(trainer.global_step) if trainer is not None else None
        where = f" at step {step}" if step is not None else ""
        message = (
            f"{type(self).__name__} switched itself off{where}: {hook} raised {type(error).__name__}: {error}"
        )
        hint = self.failure_hint(hook, error)
        suggestion = f"{hint}; training went on without this monitor (strict=True raises instead)"
        self.failure = diagnosis.monitor_error(self.monitor_name, message, suggestion, step)
        rank_zero_warn(f"{message}. Training goes on without it. Fix: {hint} (or pass strict=True to raise).")

    def step_aside(self, reason: str, suggestion: str = "") -> None:
        """Switch the monitor off because the model gives it nothing to measure (not an error): one info
        line now and one ``info`` row in the diagnosis; no work per step from then on."""
        self.active = False
        self._recording = False
        self.remove_hooks()
        self.notes.append(diagnosis.not_applicable(self.monitor_name, reason, suggestion))
        rank_zero_info(f"{type(self).__name__}: {reason}")

    def collective(self, trainer: pl.Trainer, packed: Tensor) -> Tensor:
        """The monitor's ONE collective per interval: ``trainer.strategy.all_gather`` of the packed
        vector, returned as ``[world, total]`` float64 on the CPU (the only host sync of the interval)."""
        self.collectives += 1
        gathered = trainer.strategy.all_gather(packed)
        if gathered.dim() == packed.dim():  # single process: the strategy returns the tensor itself
            gathered = gathered.unsqueeze(0)
        return gathered.reshape(gathered.shape[0], -1).to("cpu", torch.float64)

    def log_metrics(self, trainer: pl.Trainer, metrics: dict[str, float], step: int | None = None) -> None:
        """One dict to every logger, from global rank zero only (not ``self.log``: it would drop
        values off the trainer's logging steps and cost a call per key)."""
        if not trainer.is_global_zero or not metrics:
            return
        step = int(trainer.global_step if step is None else step)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()

    def append_history(self, entry: dict[str, float]) -> None:
        """Add an entry; halve the history (keep every other entry, always the newest) past the cap."""
        self.history.append(entry)
        if len(self.history) > self.max_history:
            last = self.history[-1]
            self.history = self.history[:-1:2] + [last]

    def flush(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Reduce the interval across ranks (one collective), log one dict, extend the history, reset.

        Every rank must call it at the same point (the core does so on the same optimizer steps).
        Returns the prefixed metrics (identical on every rank).
        """
        packer = packing.StatsPacker()
        self.pack(trainer, pl_module, packer)
        if len(packer):
            flat = packer.flat()
            if getattr(trainer, "world_size", 1) > 1:
                # a failure flag (summed over ranks) rides along: a rank that switched off keeps sending
                # this layout, so nobody waits for it alone, and every rank stops at the same step
                flag = torch.zeros(1, dtype=flat.dtype, device=flat.device)
                gathered = self.collective(trainer, torch.cat([flag, flat]))
                self._packed_size = int(flat.numel())
                if float(gathered[:, 0].sum()) > 0:
                    self._packed_size = None  # every rank is off after this collective
                    self.fail("flush", RuntimeError("another rank switched this monitor off"), trainer)
                    return {}
                stats = packer.unpack(gathered[:, 1:])
            else:
                stats = packer.unpack(self.collective(trainer, flat))
        else:
            stats = packing.PackedStats()
        self.last_stats = stats
        metrics = self.compute_metrics(trainer, pl_module, stats)
        self.reset_interval()
        self._batches_since_flush = 0
        self._last_flush_step = trainer.global_step
        if not metrics:
            return {}
        prefixed = {f"{self.monitor_name}/{k}": float(v) for k, v in metrics.items()}
        guard = getattr(pl_module, "nonfinite_guard", None)
        if getattr(guard, "mode", None) in ("skip", "rollback"):
            # the steps the task skipped so far (a host counter: no sync), next to what the monitor saw
            prefixed[f"{self.monitor_name}/skipped_steps"] = float(getattr(guard, "skipped", 0))
        self.append_history({"step": float(trainer.global_step), **prefixed})
        self.log_metrics(trainer, prefixed)
        return prefixed

    # ----------------------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not self._attached:
            compiled = hooks.is_compiled(pl_module)
            if compiled:
                hooks.forget_compiled_graphs(type(self).__name__)
            self.attach(trainer, pl_module)
            self._attached = True
            self._hooks_pinned = compiled

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.remove_hooks()
            self._recording = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # all micro-batches of one optimizer step share global_step, so accumulation samples whole steps
        self._recording = self.enabled and self.records(trainer.global_step, trainer)
        if self._recording:
            self.install_hooks()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._recording and not (self.enabled and self.records(trainer.global_step, trainer)):
            self.uninstall_hooks()  # the next step is quiet (global_step is the next step's now)
        self._recording = False
        self._batches_since_flush += 1
        if self._flush_due(trainer):
            self.flush(trainer, pl_module)

    def _failed_rank_flush(self, trainer: pl.Trainer, at_end: bool = False) -> None:
        """On a rank where the monitor failed (DDP): send the flag and a NaN payload of the usual length
        at the usual steps, so the other ranks' collective completes and they switch off too."""
        if self.failure is None or self._packed_size is None or getattr(trainer, "world_size", 1) <= 1:
            return
        due = trainer.global_step != self._last_flush_step if at_end else self._flush_due(trainer)
        if not due:
            return
        self._last_flush_step = trainer.global_step
        device = trainer.strategy.root_device
        payload = torch.full((self._packed_size + 1,), math.nan, dtype=torch.float64, device=device)
        payload[0] = 1.0
        self.collective(trainer, payload)
        self._packed_size = None  # every rank is off after this collective: no more of them

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the tail of a run shorter than an interval still counts; every rank saw the same batches
        if self._batches_since_flush > 0 and trainer.global_step != self._last_flush_step:
            self.flush(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # figures, tables, findings, notes, the error row; the last monitor adds the task's rollback rows
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, MonitorCallback)]
        own_tables = type(self).tables is not MonitorCallback.tables
        end_of_fit.contribute(self, trainer, pl_module, monitors, own_tables=own_tables)

    @property
    def state_key(self) -> str:
        # distinct per monitor kind and interval, so several monitors (or two of one kind with other
        # settings) can share a checkpoint
        return _cached_state_key(
            self, monitor=self.monitor_name, every=self.log_every_n_steps, sample=self.sample_every_n_steps
        )

    def state_dict(self) -> dict[str, Any]:
        """The checkpointed state (:class:`~lightning_convnets.callbacks.monitor_state.MonitorState`): the
        history, where the logging interval stands (``last_flush_step``, ``batches_since_flush``: a resumed
        run flushes on the same steps, and under gradient accumulation never flushes the checkpoint's step a
        second time) and this rank's :meth:`extra_state`. Under DDP :meth:`on_save_checkpoint` adds every
        rank's ``extra`` as ``extra_ranks`` (rank order)."""
        try:
            extra = self.extra_state()
        except Exception as err:  # a monitor must not cost the run its checkpoint
            if self.strict:
                raise
            self.fail("state_dict", err)
            extra = {}
        return MonitorState(self.history, extra, self._last_flush_step, self._batches_since_flush).to_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = MonitorState.from_dict(state_dict, owner=type(self).__name__)  # this rank's extra
        self.history = state.history[-self.max_history :]
        # version 1 checkpoints have neither: the interval restarts (at most one duplicate row)
        self._last_flush_step = state.last_flush_step
        self._batches_since_flush = state.batches_since_flush
        self.load_extra_state(state.extra)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Nothing of its own; under DDP the guard then gathers every rank's ``extra`` into the
        checkpoint (:meth:`_share_rank_states`), whatever a subclass's override did."""

    def _share_rank_states(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Under DDP, every rank's ``extra`` into the checkpoint as ``extra_ranks``
        (:func:`~lightning_convnets.callbacks.monitor_state.share_rank_states`: one ``all_gather_object`` per
        monitor and save). It runs from the guard of ``on_save_checkpoint`` on every rank, active or not, so
        every rank takes part; no other step pays anything."""
        if int(getattr(trainer, "world_size", 1) or 1) <= 1:
            return
        try:
            share_rank_states(checkpoint, self.state_key)
        except Exception as err:
            if self.strict:
                raise
            self.fail("on_save_checkpoint (gathering every rank's state)", err, trainer)


for _name in GUARDED_HOOKS & set(vars(MonitorCallback)):
    setattr(MonitorCallback, _name, guard_hook(_name, vars(MonitorCallback)[_name]))
del _name


# names that lived here before the split (one release, with a DeprecationWarning naming their home)
__getattr__ = moved_names(
    __name__,
    {
        moments: "MomentBank Moments RunningMoments ShiftedMoments batch_moments channel_dims merge_moments",
        packing: "PackedStats StatsPacker",
        diagnosis: "Diagnosis Finding Severity diagnosis_for log_dir",
        hooks: "HookSpec is_compiled",
        schedule: "DEFAULT_DENSE_STEPS DEFAULT_SAMPLE_PERIOD",
    },
)
