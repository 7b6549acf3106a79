"""Optimizer and learning-rate schedule of the tasks: parameter groups, the default schedule
(:class:`WarmupCosineLR`) and :func:`configure_optimization` (what ``configure_optimizers`` returns).

A scheduler with an unset ``total_steps`` (``WarmupCosineLR``, ``OneCycleLR``) is given the run length;
``lr_mult`` of a parameter group scales the optimizer's learning rate for that group.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

__all__ = ["WarmupCosineLR", "configure_optimization", "scale_learning_rate", "scheduler_accepts_total_steps"]

_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")  # what schedulers compute a group's rate from


class WarmupCosineLR(LambdaLR):
    """Linear warmup to the base learning rate, then cosine decay to ``min_lr_ratio`` times it.

    Meant to be stepped every optimizer step. Leave ``total_steps`` unset inside a task: the task fills
    it with ``trainer.estimated_stepping_batches``.

    Args:
        optimizer: the wrapped optimizer.
        total_steps: length of the schedule in optimizer steps.
        warmup: warmup length, as a fraction of ``total_steps`` when < 1, else as a step count.
        min_lr_ratio: final learning rate as a fraction of the base one.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched = WarmupCosineLR(opt, total_steps=10, warmup=0.2)
        >>> [round(sched.lr_lambda(s), 2) for s in (0, 1, 2, 6, 10)]
        [0.33, 0.67, 1.0, 0.5, 0.0]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int | None = None,
        warmup: float = 0.05,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if total_steps is None or total_steps < 1:
            raise ValueError(
                f"WarmupCosineLR needs total_steps >= 1 (got {total_steps}); inside a task it is filled from "
                "trainer.estimated_stepping_batches, so set trainer.max_epochs or trainer.max_steps"
            )
        if warmup < 0 or not 0 <= min_lr_ratio <= 1:
            raise ValueError(
                f"WarmupCosineLR: warmup must be >= 0 and min_lr_ratio in [0, 1], got {warmup}, {min_lr_ratio}"
            )
        self.total_steps = int(total_steps)
        self.warmup_steps = round(warmup * total_steps) if warmup < 1 else int(warmup)
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self.lr_lambda, last_epoch=last_epoch)

    def lr_lambda(self, step: int) -> float:
        """Learning-rate factor at optimizer step ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def scheduler_accepts_total_steps(factory: Any) -> bool:
    """True when ``factory`` (a class, or the ``functools.partial`` LightningCLI builds) has an unset
    ``total_steps`` argument that the task should fill.

    Example:
        >>> scheduler_accepts_total_steps(WarmupCosineLR), scheduler_accepts_total_steps(LambdaLR)
        (True, False)
    """
    if isinstance(factory, functools.partial):
        keywords = factory.keywords
        if "total_steps" in keywords:
            # OneCycleLR may instead be configured by epochs * steps_per_epoch.
            return keywords["total_steps"] is None and not (
                keywords.get("epochs") and keywords.get("steps_per_epoch")
            )
        target = next((a for a in reversed(factory.args) if inspect.isclass(a)), factory.func)
    else:
        target = factory
    try:
        param = inspect.signature(target).parameters.get("total_steps")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is None


def configure_optimization(
    optimizer_factory: Callable[[Any], Optimizer],
    groups: list[dict[str, Any]],
    scheduler_factory: Any,
    total_steps: Callable[[], float],
    interval: str = "auto",
    monitor: str = "val/loss",
) -> Any:
    """The optimizer over ``groups`` (each group's ``lr_mult`` applied) and its scheduler, as Lightning's
    ``configure_optimizers`` returns them.

    Args:
        optimizer_factory: builds the optimizer from the parameter groups.
        groups: parameter groups, each with an optional ``lr_mult``.
        scheduler_factory: builds the scheduler from the optimizer (``None``: a constant rate).
        total_steps: the run length in optimizer steps (called only for a schedule that needs it).
        interval: ``"step"``, ``"epoch"`` or ``"auto"`` (per step exactly when ``total_steps`` was filled).
        monitor: the metric a ``ReduceLROnPlateau`` scheduler watches.
    """
    optimizer = optimizer_factory(groups)
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_mult", 1.0)
        if "initial_lr" in group:
            group["initial_lr"] = group["lr"]
    if scheduler_factory is None:
        return optimizer
    filled = scheduler_accepts_total_steps(scheduler_factory)
    if filled:
        total = total_steps()
        if not math.isfinite(total):
            raise ValueError(
                "lr_scheduler needs the run length (total_steps) but the trainer has no max_epochs or "
                "max_steps; set one of them or pass total_steps to the scheduler"
            )
        try:
            scheduler = scheduler_factory(optimizer, total_steps=int(total))
        except ZeroDivisionError as err:
            # OneCycleLR divides by each phase's length: a run too short for pct_start makes one zero.
            raise ValueError(
                f"lr_scheduler: total_steps={int(total)} is too short for the schedule (a phase such as "
                "OneCycleLR's pct_start warm-up would last zero steps); train longer (max_epochs / "
                "max_steps) or change pct_start"
            ) from err
    else:
        scheduler = scheduler_factory(optimizer)
    if interval == "auto":
        interval = "step" if filled else "epoch"
    config: dict[str, Any] = {"scheduler": scheduler, "interval": interval}
    if isinstance(scheduler, ReduceLROnPlateau):
        config["monitor"] = monitor
    return {"optimizer": optimizer, "lr_scheduler": config}


def scale_learning_rate(optimizer: Optimizer, schedulers: list[Any], factor: float) -> None:
    """Multiply the learning rate by ``factor`` from now on, under any scheduler: every parameter group's
    rate and the values schedulers compute it from (``initial_lr``, ``max_lr``, ``min_lr`` of
    ``OneCycleLR``; each scheduler's ``base_lrs``, as ``LambdaLR`` and ``WarmupCosineLR`` read them).

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched = WarmupCosineLR(opt, total_steps=10, warmup=0)
        >>> scale_learning_rate(opt, [sched], 0.5)
        >>> opt.step(); sched.step(); round(opt.param_groups[0]["lr"] / sched.lr_lambda(1), 6)
        0.5
    """
    if not factor > 0:
        raise ValueError(f"rollback_lr_factor must be > 0, got {factor}")
    for group in optimizer.param_groups:
        for key in _LR_KEYS:
            if isinstance(group.get(key), int | float) and not isinstance(group.get(key), bool):
                group[key] = group[key] * factor
    for scheduler in schedulers:
        if scheduler is None or getattr(scheduler, "optimizer", None) is not optimizer:
            continue
        for name in ("base_lrs", "_last_lr"):
            values = getattr(scheduler, name, None)
            if isinstance(values, list):
                setattr(scheduler, name, [v * factor for v in values])
