"""The non-finite policy of training: what a NaN/Inf loss or gradient does (``nonfinite`` of the tasks).

:class:`NonFiniteGuard` keeps the state: the task notes each training loss (:meth:`~NonFiniteGuard.note_loss`),
hands it every optimizer step (:meth:`~NonFiniteGuard.before_optimizer_step`) and asks it to
:meth:`~NonFiniteGuard.check` at logging steps, at the end of training and before each checkpoint.
``"stop"`` and ``"warn"`` keep a flag on the device (no host sync per step); ``"skip"`` and ``"rollback"``
must decide before each optimizer step: one decision for all ranks, from one all-reduce of four numbers
(bad loss or gradient, bad BatchNorm statistics, loss sum, loss count) and one host read per step.
:func:`any_nonfinite` is the one fused check; what is saved and put back lives in
:mod:`lightning_convnets.tasks.rollback`. Reference: ``docs/reliability.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_convnets.tasks.adapters import attached_trainer
from lightning_convnets.tasks.optim import scale_learning_rate
from lightning_convnets.tasks.rollback import (
    BatchNormBuffers,
    LossSpikeRule,
    TrainingSnapshot,
    first_nonfinite_module,
    invalid_batchnorm,
    invalid_buffers,
)

__all__ = [
    "NONFINITE_MODES",
    "NonFiniteGuard",
    "NonFiniteHooks",
    "NonFiniteLossError",
    "RollbackLimitError",
    "any_nonfinite",
    "check_rollback_options",
    "monitor_report",
]

NONFINITE_MODES = ("stop", "skip", "warn", "rollback")
DECIDING_MODES = ("skip", "rollback")  # the modes that decide before every optimizer step
MAX_RECORDED = 1000  # skipped steps and rollbacks remembered (the counts go on)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss or gradient (``nonfinite="stop"``, or too many skipped steps).

    The message names the optimizer step, the loss value and, when an ``ActivationVarianceMonitor`` is
    attached, the first module whose output was non-finite.
    """


class RollbackLimitError(NonFiniteLossError):
    """``nonfinite="rollback"`` gave up: ``max_rollbacks`` rollbacks were not enough. The message lists
    every rollback (step, loss, cause, first non-finite module, what was done)."""


def any_nonfinite(tensors: list[Tensor]) -> Tensor:
    """On the device, without a sync: whether any element of ``tensors`` is NaN or Inf (a 0-d bool).

    One fused pass: the check-and-unscale kernel of mixed-precision training (``GradScaler``'s; torch has
    no public name for it, ``tests/test_tasks_nonfinite.py`` fails if it goes) with a scale of 1, which
    leaves every value as it is; 4x faster than a norm per tensor on a CPU. Falls back to
    :func:`torch.nn.utils.get_total_norm` where the kernel refuses the tensors (mixed devices or dtypes).

    Example:
        >>> bool(any_nonfinite([torch.ones(3), torch.tensor([1.0, float("nan")])]))
        True
    """
    device = tensors[0].device
    try:
        found = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones(1, device=device))
        return found[0] > 0
    except (RuntimeError, TypeError):  # the norm of a tensor holding NaN/Inf is NaN/Inf
        return ~torch.isfinite(torch.nn.utils.get_total_norm(tensors, error_if_nonfinite=False).float())


def monitor_report(callbacks: list[Any]) -> str:
    """What an attached activation monitor found (duck-typed: any callback with ``nonfinite``), as a
    clause of an error message; ``""`` without one."""
    for callback in callbacks:
        if hasattr(callback, "nonfinite") and not isinstance(callback, torch.nn.Module):
            found, name = callback.nonfinite, type(callback).__name__
            if found:
                return (
                    f"; {name}: the first non-finite activation came from module {found['layer']!r} "
                    f"at step {found['step']}"
                )
            return f"; {name}: no non-finite activation up to its last reduction"
    return ""


class NonFiniteGuard:
    """The state of the ``nonfinite`` policy over a fit.

    Args:
        mode: ``"stop"`` (raise :class:`NonFiniteLossError` at the next check), ``"skip"`` (drop the
            optimizer step; ``max_skipped_steps`` in a row raise), ``"warn"`` (one warning) or
            ``"rollback"`` (restore the last good snapshot, lower the learning rate, go on; the hooks do it).
        max_skipped_steps: consecutive skipped steps that stop the fit (``"skip"``).
        owner: the name the messages give (the task's class).
        spike_threshold: with ``"skip"``/``"rollback"``, a loss above this many robust standard deviations
            of its recent history counts as a bad step (:class:`~lightning_convnets.tasks.rollback.LossSpikeRule`);
            ``None``: no spike rule.
        max_rollbacks: rollbacks after which the next bad step raises :class:`RollbackLimitError`.

    Example:
        >>> guard = NonFiniteGuard("stop", owner="MyTask")
        >>> guard.note_loss(torch.tensor(float("nan")))
        >>> p = torch.zeros(1, requires_grad=True); p.grad = torch.zeros(1)
        >>> guard.before_optimizer_step(torch.optim.SGD([p], lr=0.1), step=3)
        False
        >>> guard.check()
        Traceback (most recent call last):
        ...
        lightning_convnets.tasks.nonfinite.NonFiniteLossError: MyTask: non-finite training loss at optimizer step 3: loss nan. The fit stops (nonfinite='stop'); ...
    """

    def __init__(
        self,
        mode: str = "stop",
        max_skipped_steps: int = 10,
        owner: str = "task",
        spike_threshold: float | None = None,
        max_rollbacks: int = 5,
    ) -> None:
        if mode not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {mode!r}")
        if max_skipped_steps < 1:
            raise ValueError(f"max_skipped_steps must be >= 1, got {max_skipped_steps}")
        if max_rollbacks < 0:
            raise ValueError(f"max_rollbacks must be >= 0, got {max_rollbacks}")
        if spike_threshold is not None and mode not in DECIDING_MODES:
            raise ValueError(
                f"spike_threshold={spike_threshold} needs nonfinite='skip' or 'rollback' (a spike must be "
                f"decided before the optimizer step), got nonfinite={mode!r}"
            )
        self.mode, self.max_skipped_steps, self.owner = mode, int(max_skipped_steps), owner
        self.max_rollbacks = int(max_rollbacks)
        self.spike = LossSpikeRule(spike_threshold) if spike_threshold is not None else None
        self.skipped = 0  # skipped steps in all (saved in checkpoints)
        self.skipped_steps: list[int] = []  # the steps skipped or rolled back (the last MAX_RECORDED)
        self.rollbacks: list[dict[str, Any]] = []  # one record per rollback
        self.held = False  # the last optimizer step did not update (its scheduler step is held back)
        self.reset()

    @property
    def deciding(self) -> bool:
        """Whether every optimizer step is decided before it runs (``"skip"``, ``"rollback"``)."""
        return self.mode in DECIDING_MODES

    def reset(self) -> None:
        """Forget the run's flags (the skipped-step count stays)."""
        self._pending: Tensor | None = None  # this optimizer step's micro-batches had a bad loss
        self._pending_loss: Tensor | None = None
        self._loss_sum: Tensor | None = None  # sum and count of this step's micro-batch losses
        self._loss_count = 0
        self._step: Tensor | None = None  # first bad optimizer step (-1: none), on the device
        self._loss: Tensor | None = None  # the loss at that step
        self._consecutive = 0
        self._warned = False
        self.checked_step = -1
        self.cause = ""  # why the last decided step was held: "loss", "gradient", "spike", "batchnorm"
        self.last_loss = math.nan

    def note_loss(self, loss: Tensor) -> None:
        """Remember a training loss (on the device); under gradient accumulation a non-finite micro-batch
        loss is kept over later finite ones."""
        value = loss.detach().float()
        bad = ~torch.isfinite(value)
        if self._pending is None:
            self._pending, self._pending_loss = bad, value
            self._loss_sum, self._loss_count = value, 1
        else:
            self._pending_loss = torch.where(bad | ~self._pending, value, self._pending_loss)
            self._pending = self._pending | bad
            self._loss_sum, self._loss_count = self._loss_sum + value, self._loss_count + 1

    def before_optimizer_step(
        self,
        optimizer: Optimizer,
        step: int,
        report: Callable[[], str] = str,
        reduce: Callable[[Tensor], Tensor] | None = None,
        buffers: Tensor | None = None,
    ) -> bool:
        """Check the step's loss and gradients; returns whether the step must not update (``"skip"``: its
        gradients are dropped here; ``"rollback"``: the caller restores the snapshot, see :attr:`cause`).

        ``reduce`` (a sum over ranks: ``strategy.reduce``) makes the decision one for all ranks;
        ``buffers`` (``"rollback"``) is a device flag for invalid BatchNorm statistics."""
        if self._pending is None:
            return False
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad_grad = any_nonfinite(grads) if grads else torch.zeros((), dtype=torch.bool)
        bad = self._pending | bad_grad.to(self._pending.device)
        loss, total, count = self._pending_loss, self._loss_sum, self._loss_count
        self._pending = self._pending_loss = self._loss_sum = None
        if not self.deciding:
            self._record_first(bad, loss, step)
            return False
        # the one decision of all ranks: [bad loss, bad gradient, bad BN buffers, loss sum, loss count]
        device = bad.device
        flags = torch.stack(
            [
                (~torch.isfinite(loss)).float(),
                bad.float(),
                (buffers if buffers is not None else torch.zeros((), dtype=torch.bool)).to(device).float(),
                total,
                torch.full((), float(count), device=device),
            ]
        )
        if reduce is not None:
            flags = reduce(flags)
        bad_loss, any_bad, bad_bn, total_sum, total_count = flags.tolist()  # the one host read of the step
        self.last_loss = total_sum / max(total_count, 1.0)  # NaN when a rank's loss was
        if any_bad > 0:
            self.cause = "loss" if bad_loss > 0 else "gradient"
        elif bad_bn > 0:
            self.cause = "batchnorm"
        elif self.spike is not None and self.spike.check(self.last_loss):
            self.cause = "spike"
        else:
            self.held, self._consecutive, self.cause = False, 0, ""
            return False
        self.held = True
        self._note_skipped(step)
        optimizer.zero_grad(set_to_none=True)
        if self.mode == "skip":
            self._skip(step, self.last_loss, report)
        return True

    def _record_first(self, bad: Tensor, loss: Tensor, step: int) -> None:
        if self._step is None:
            self._step = torch.full((), -1, dtype=torch.int64, device=bad.device)
            self._loss = torch.zeros((), dtype=torch.float32, device=bad.device)
        first = bad & (self._step < 0)
        self._step = torch.where(first, torch.full_like(self._step, step), self._step)
        self._loss = torch.where(first, loss, self._loss)

    def _note_skipped(self, step: int) -> None:
        self.skipped += 1
        self._consecutive += 1
        self.skipped_steps = (self.skipped_steps + [int(step)])[-MAX_RECORDED:]

    def describe_cause(self) -> str:
        """The last held step's cause, in words."""
        if self.cause == "spike" and self.spike is not None:
            median, sd = self.spike.last
            return f"loss spike ({self.last_loss:.4g} > median {median:.4g} + {self.spike.k:g} x robust sd {sd:.3g})"
        return {
            "loss": "non-finite loss",
            "gradient": "non-finite gradient (finite loss)",
            "batchnorm": "invalid BatchNorm running statistics (NaN/Inf or negative variance)",
        }.get(self.cause, self.cause)

    def _skip(self, step: int, loss: float, report: Callable[[], str]) -> None:
        rank_zero_warn(
            f"{self.owner}: optimizer step {step} skipped: {self.describe_cause()} (loss {loss:.6g}); "
            f"{self._consecutive} in a row, {self.skipped} in all"
        )
        if self._consecutive >= self.max_skipped_steps:
            raise NonFiniteLossError(
                f"{self._consecutive} optimizer steps in a row had a non-finite loss or gradient (last: "
                f"step {step}, loss {loss:.6g}){report()}; nonfinite='skip' stops after "
                f"max_skipped_steps={self.max_skipped_steps}. Lower the learning rate or add gradient "
                "clipping (trainer.gradient_clip_val)"
            )

    def rollback_summary(self) -> str:
        """Every rollback, one line each."""
        return "; ".join(
            f"step {r['step']}: {r['cause']} (loss {r['loss']:.4g}), first non-finite module "
            f"{r['module'] or '-'}: {r['action']}"
            for r in self.rollbacks
        )

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (plain data): skipped steps, rollbacks, the spike rule's history."""
        return {
            "skipped": self.skipped,
            "skipped_steps": list(self.skipped_steps),
            "rollbacks": [dict(r) for r in self.rollbacks],
            "spike": self.spike.state_dict() if self.spike is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.skipped = int(state.get("skipped", self.skipped))
        self.skipped_steps = [int(s) for s in state.get("skipped_steps", [])]
        self.rollbacks = [dict(r) for r in state.get("rollbacks", [])]
        if self.spike is not None and state.get("spike"):
            self.spike.load_state_dict(state["spike"])

    def check(
        self, gather: Callable[[Tensor], Tensor] | None = None, report: Callable[[], str] = str
    ) -> None:
        """Read the device flag (a host sync) and act on it: raise for ``"stop"``, warn once for
        ``"warn"``. ``gather`` (``LightningModule.all_gather`` under DDP) makes every rank see the first
        bad step of any rank."""
        if self._step is None:
            return
        step_t = self._step
        if gather is not None:
            steps = gather(step_t).reshape(-1)
            bad = steps[steps >= 0]
            step = int(bad.min()) if bad.numel() else -1
        else:
            step = int(step_t)
        if step < 0:
            return
        loss = float(self._loss) if int(step_t) == step else float("nan")
        what = "loss" if not math.isfinite(loss) else "gradient (the loss was finite)"
        message = (
            f"{self.owner}: non-finite training {what} at optimizer step {step}: loss {loss:.6g}{report()}"
        )
        if self.mode == "stop":
            raise NonFiniteLossError(
                f"{message}. The fit stops (nonfinite='stop'); checkpoints written before this step are "
                "untouched. Lower the learning rate, add gradient clipping (trainer.gradient_clip_val), or "
                "use nonfinite='skip' or 'rollback'"
            )
        if not self._warned:
            self._warned = True
            rank_zero_warn(f"{message}; training goes on (nonfinite='warn')")


class NonFiniteHooks:
    """The Lightning hooks of the ``nonfinite`` policy, for a ``LightningModule`` holding a
    :class:`NonFiniteGuard` as ``nonfinite_guard`` (mixed into :class:`~lightning_convnets.tasks.ConvNetTask`;
    its training step calls ``nonfinite_guard.note_loss``). ``"skip"`` and ``"rollback"`` copy the
    BatchNorm statistics before each step (:class:`~lightning_convnets.tasks.rollback.BatchNormBuffers`);
    ``"rollback"`` keeps a :class:`~lightning_convnets.tasks.rollback.TrainingSnapshot` every
    ``snapshot_every_n_steps`` healthy steps. A step that does not update does not step the schedulers of
    interval ``"step"`` (:meth:`lr_scheduler_step`)."""

    nonfinite_guard: NonFiniteGuard
    rollback_lr_factor: float = 0.5
    snapshot_every_n_steps: int = 50

    def configure_nonfinite(
        self,
        mode: str = "stop",
        max_skipped_steps: int = 10,
        spike_threshold: float | None = None,
        max_rollbacks: int = 5,
        rollback_lr_factor: float = 0.5,
        snapshot_every_n_steps: int = 50,
    ) -> None:
        """Set up the policy (the task's ``nonfinite`` arguments, checked: a bad one is a ``ValueError``
        naming it)."""
        self.nonfinite_guard = NonFiniteGuard(
            mode, max_skipped_steps, type(self).__name__, spike_threshold, max_rollbacks
        )
        self.rollback_lr_factor, self.snapshot_every_n_steps = check_rollback_options(
            rollback_lr_factor, snapshot_every_n_steps
        )

    def _nonfinite_report(self) -> str:
        return monitor_report(list(getattr(attached_trainer(self), "callbacks", None) or []))

    def _rank_sum(self) -> Callable[[Tensor], Tensor] | None:
        """A sum over ranks in one collective (``torch.distributed.all_reduce``: the strategy's ``reduce``
        adds a barrier before it), or ``None`` in a single process."""
        trainer: Any = attached_trainer(self)
        if getattr(trainer, "world_size", 1) <= 1 or not (dist.is_available() and dist.is_initialized()):
            return None

        def total(tensor: Tensor) -> Tensor:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            return tensor

        return total

    def check_nonfinite(self) -> None:
        """Read the non-finite flag now (a host sync): raise for ``"stop"``, warn for ``"warn"``."""
        world_size = getattr(attached_trainer(self), "world_size", 1)
        gather = self.all_gather if world_size > 1 else None  # type: ignore[attr-defined]
        self.nonfinite_guard.check(gather, self._nonfinite_report)

    def _saved_state(self) -> tuple[BatchNormBuffers, TrainingSnapshot]:
        saved = self.__dict__.get("_nonfinite_saved")
        if saved is None:
            saved = self.__dict__["_nonfinite_saved"] = (BatchNormBuffers(self), TrainingSnapshot())  # type: ignore[arg-type]
        return saved

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """``"skip"``/``"rollback"``: copy the BatchNorm statistics before the step's first micro-batch."""
        guard = self.nonfinite_guard
        if not guard.deciding:
            return
        step = self.trainer.global_step  # type: ignore[attr-defined]
        if self.__dict__.get("_nonfinite_bn_step") != step:
            self.__dict__["_nonfinite_bn_step"] = step
            self._saved_state()[0].take()
        self.__dict__["_nonfinite_batch"] = batch  # the rollback report's probe runs it

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Check the step's loss and gradients for NaN/Inf (and, with ``"rollback"``, the BatchNorm
        statistics and the spike rule): ``"skip"`` drops the step, ``"rollback"`` rolls back."""
        guard, step = self.nonfinite_guard, self.trainer.global_step  # type: ignore[attr-defined]
        buffers, snapshot = self._saved_state() if guard.deciding else (None, None)
        flag = invalid_buffers(buffers.layers) if buffers is not None and guard.mode == "rollback" else None
        held = guard.before_optimizer_step(optimizer, step, self._nonfinite_report, self._rank_sum(), flag)
        batch = self.__dict__.pop("_nonfinite_batch", None)
        if not held:
            every = max(1, int(self.snapshot_every_n_steps))
            if (
                snapshot is not None
                and guard.mode == "rollback"
                and (not snapshot.taken or step - snapshot.step >= every)
            ):
                snapshot.take(self, optimizer, step)  # type: ignore[arg-type]
            return
        if guard.mode == "rollback":
            self.roll_back(optimizer, step, batch)
        else:
            buffers.restore()
        self.log("train/skipped_steps", float(guard.skipped), on_step=True, on_epoch=False)  # type: ignore[attr-defined]

    def roll_back(self, optimizer: Optimizer | None, step: int, batch: Any = None) -> None:
        """Restore the last good snapshot (else the BatchNorm statistics before this step), lower the
        learning rate by ``rollback_lr_factor``, record it; :class:`RollbackLimitError` past
        ``max_rollbacks``."""
        guard, trainer = self.nonfinite_guard, self.trainer  # type: ignore[attr-defined]
        buffers, snapshot = self._saved_state()
        cause, loss = guard.describe_cause(), guard.last_loss
        module = None
        if guard.cause == "batchnorm":
            module = ", ".join(invalid_batchnorm(self)) or None  # type: ignore[arg-type]
        elif batch is not None:
            module = first_nonfinite_module(self, self.unpack_batch(batch)[0])  # type: ignore[attr-defined, arg-type]
        if len(guard.rollbacks) >= guard.max_rollbacks:
            record = {"step": step, "loss": loss, "cause": cause, "module": module, "action": "gave up"}
            guard.rollbacks = (guard.rollbacks + [record])[-MAX_RECORDED:]
            raise RollbackLimitError(
                f"{guard.owner}: {cause} at optimizer step {step} (loss {loss:.6g}) after "
                f"max_rollbacks={guard.max_rollbacks} rollbacks; the fit stops. Rollbacks: "
                f"{guard.rollback_summary()}{self._nonfinite_report()}. Lower the learning rate, add gradient "
                "clipping (trainer.gradient_clip_val) or raise max_rollbacks"
            )
        if snapshot.taken:
            restored = f"restored the snapshot of step {snapshot.restore(self, optimizer)}"  # type: ignore[arg-type]
        else:
            buffers.restore()
            restored = "no snapshot yet: BatchNorm statistics put back"
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
            scale_learning_rate(optimizer, schedulers, self.rollback_lr_factor)
        action = f"{restored}, learning rate x{self.rollback_lr_factor:g}, batch skipped"
        record = {"step": int(step), "loss": float(loss), "cause": cause, "module": module, "action": action}
        guard.rollbacks = (guard.rollbacks + [record])[-MAX_RECORDED:]
        rank_zero_warn(
            f"{guard.owner}: rollback {len(guard.rollbacks)} of at most {guard.max_rollbacks} at optimizer step "
            f"{step}: {cause} (loss {loss:.6g}); first non-finite module: {module or '-'}; {action}"
        )

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """Step ``scheduler`` (as Lightning does), except a per-step one after a step that did not update."""
        if self.nonfinite_guard.held:
            configs = getattr(attached_trainer(self), "lr_scheduler_configs", None) or []
            if any(c.scheduler is scheduler and c.interval == "step" for c in configs):
                return
        if metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)

    def on_validation_start(self) -> None:
        """``"rollback"``: invalid BatchNorm statistics (NaN/Inf, negative variance) roll back before they
        are used (one flag, summed over ranks, read once per validation)."""
        guard, trainer = self.nonfinite_guard, self.trainer  # type: ignore[attr-defined]
        if guard.mode != "rollback" or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        flag = invalid_buffers(self._saved_state()[0].layers)
        if flag is None:
            return
        flag = flag.float()
        reduce = self._rank_sum()
        if float(reduce(flag) if reduce is not None else flag) > 0:
            guard.cause, guard.last_loss, guard.held = "batchnorm", math.nan, False
            guard._note_skipped(trainer.global_step)
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            self.roll_back(optimizer, trainer.global_step)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Every ``log_every_n_steps`` optimizer steps, read the non-finite flag (``"stop"``/``"warn"``)."""
        trainer: Any = self.trainer  # type: ignore[attr-defined]
        step, guard = trainer.global_step, self.nonfinite_guard
        if step != guard.checked_step and step % max(1, int(trainer.log_every_n_steps or 50)) == 0:
            guard.checked_step = step
            self.check_nonfinite()

    def on_train_end(self) -> None:
        """A last read of the non-finite flag (the tail of the run after the last logging step); the
        rollbacks of the run, listed once."""
        self.check_nonfinite()
        self.__dict__.pop("_nonfinite_saved", None)  # the snapshot's memory
        if self.nonfinite_guard.rollbacks:
            rank_zero_warn(
                f"{self.nonfinite_guard.owner}: {len(self.nonfinite_guard.rollbacks)} rollback(s) in this fit: "
                f"{self.nonfinite_guard.rollback_summary()}"
            )


def check_rollback_options(lr_factor: float, snapshot_every_n_steps: int) -> tuple[float, int]:
    """``(rollback_lr_factor, snapshot_every_n_steps)`` checked: a factor in (0, 1], a period >= 1."""
    if not 0 < lr_factor <= 1:
        raise ValueError(f"rollback_lr_factor must be in (0, 1], got {lr_factor}")
    if snapshot_every_n_steps < 1:
        raise ValueError(f"snapshot_every_n_steps must be >= 1, got {snapshot_every_n_steps}")
    return float(lr_factor), int(snapshot_every_n_steps)
