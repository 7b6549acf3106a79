"""The non-finite policy of training: what a NaN/Inf loss or gradient does (``nonfinite`` of the tasks).

:class:`NonFiniteGuard` keeps the state: the task notes each training loss (:meth:`~NonFiniteGuard.note_loss`),
hands it every optimizer step (:meth:`~NonFiniteGuard.before_optimizer_step`) and asks it to
:meth:`~NonFiniteGuard.check` at logging steps, at the end of training and before each checkpoint.
``"stop"`` and ``"warn"`` keep a flag on the device (no host sync per step); ``"skip"`` must decide
before each optimizer step, so it reads one flag a step. :func:`any_nonfinite` is the one fused check.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_convnets.tasks.adapters import attached_trainer

__all__ = [
    "NONFINITE_MODES",
    "NonFiniteGuard",
    "NonFiniteHooks",
    "NonFiniteLossError",
    "any_nonfinite",
    "monitor_report",
]

NONFINITE_MODES = ("stop", "skip", "warn")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss or gradient (``nonfinite="stop"``, or too many skipped steps).

    The message names the optimizer step, the loss value and, when an ``ActivationVarianceMonitor`` is
    attached, the first module whose output was non-finite.
    """


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
            optimizer step; ``max_skipped_steps`` in a row raise) or ``"warn"`` (one warning).
        max_skipped_steps: consecutive skipped steps that stop the fit (``"skip"``).
        owner: the name the messages give (the task's class).

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

    def __init__(self, mode: str = "stop", max_skipped_steps: int = 10, owner: str = "task") -> None:
        if mode not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {mode!r}")
        if max_skipped_steps < 1:
            raise ValueError(f"max_skipped_steps must be >= 1, got {max_skipped_steps}")
        self.mode, self.max_skipped_steps, self.owner = mode, int(max_skipped_steps), owner
        self.skipped = 0  # skipped steps in all (saved in checkpoints)
        self.reset()

    def reset(self) -> None:
        """Forget the run's flags (the skipped-step count stays)."""
        self._pending: Tensor | None = None  # this optimizer step's micro-batches had a bad loss
        self._pending_loss: Tensor | None = None
        self._step: Tensor | None = None  # first bad optimizer step (-1: none), on the device
        self._loss: Tensor | None = None  # the loss at that step
        self._consecutive = 0
        self._warned = False
        self.checked_step = -1

    def note_loss(self, loss: Tensor) -> None:
        """Remember a training loss (on the device); under gradient accumulation a non-finite micro-batch
        loss is kept over later finite ones."""
        value = loss.detach().float()
        bad = ~torch.isfinite(value)
        if self._pending is None:
            self._pending, self._pending_loss = bad, value
        else:
            self._pending_loss = torch.where(bad | ~self._pending, value, self._pending_loss)
            self._pending = self._pending | bad

    def before_optimizer_step(self, optimizer: Optimizer, step: int, report: Callable[[], str] = str) -> bool:
        """Check the step's loss and gradients; returns whether the step was skipped (``"skip"``: its
        gradients are dropped here, so the optimizer leaves parameters and state as they are)."""
        if self._pending is None:
            return False
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = self._pending if not grads else self._pending | any_nonfinite(grads)
        loss = self._pending_loss
        self._pending = self._pending_loss = None
        if self.mode == "skip":
            return self._skip(optimizer, bool(bad), step, loss, report)
        if self._step is None:
            self._step = torch.full((), -1, dtype=torch.int64, device=bad.device)
            self._loss = torch.zeros((), dtype=torch.float32, device=bad.device)
        first = bad & (self._step < 0)
        self._step = torch.where(first, torch.full_like(self._step, step), self._step)
        self._loss = torch.where(first, loss, self._loss)
        return False

    def _skip(self, optimizer: Optimizer, bad: bool, step: int, loss: Any, report: Callable[[], str]) -> bool:
        if not bad:
            self._consecutive = 0
            return False
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self._consecutive += 1
        rank_zero_warn(
            f"{self.owner}: optimizer step {step} skipped: non-finite loss or gradient (loss "
            f"{float(loss):.6g}); {self._consecutive} in a row, {self.skipped} in all"
        )
        if self._consecutive >= self.max_skipped_steps:
            raise NonFiniteLossError(
                f"{self._consecutive} optimizer steps in a row had a non-finite loss or gradient (last: "
                f"step {step}, loss {float(loss):.6g}){report()}; nonfinite='skip' stops after "
                f"max_skipped_steps={self.max_skipped_steps}. Lower the learning rate or add gradient "
                "clipping (trainer.gradient_clip_val)"
            )
        return True

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
                "use nonfinite='skip'"
            )
        if not self._warned:
            self._warned = True
            rank_zero_warn(f"{message}; training goes on (nonfinite='warn')")


class NonFiniteHooks:
    """The Lightning hooks of the ``nonfinite`` policy, for a ``LightningModule`` holding a
    :class:`NonFiniteGuard` as ``nonfinite_guard`` (mixed into :class:`~lightning_convnets.tasks.ConvNetTask`;
    its training step calls ``nonfinite_guard.note_loss``)."""

    nonfinite_guard: NonFiniteGuard

    def _nonfinite_report(self) -> str:
        return monitor_report(list(getattr(attached_trainer(self), "callbacks", None) or []))

    def check_nonfinite(self) -> None:
        """Read the non-finite flag now (a host sync): raise for ``"stop"``, warn for ``"warn"``."""
        world_size = getattr(attached_trainer(self), "world_size", 1)
        gather = self.all_gather if world_size > 1 else None  # type: ignore[attr-defined]
        self.nonfinite_guard.check(gather, self._nonfinite_report)

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Check the step's loss and gradients for NaN/Inf; ``"skip"`` drops the step here."""
        step = self.trainer.global_step  # type: ignore[attr-defined]
        if self.nonfinite_guard.before_optimizer_step(optimizer, step, self._nonfinite_report):
            skipped = float(self.nonfinite_guard.skipped)
            self.log("train/skipped_steps", skipped, on_step=True, on_epoch=False)  # type: ignore[attr-defined]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Every ``log_every_n_steps`` optimizer steps, read the non-finite flag (``"stop"``/``"warn"``)."""
        trainer: Any = self.trainer  # type: ignore[attr-defined]
        step, guard = trainer.global_step, self.nonfinite_guard
        if step != guard.checked_step and step % max(1, int(trainer.log_every_n_steps or 50)) == 0:
            guard.checked_step = step
            self.check_nonfinite()

    def on_train_end(self) -> None:
        """A last read of the non-finite flag (the tail of the run after the last logging step)."""
        self.check_nonfinite()
