"""Adapters over Lightning where its public API has a gap: the only places the tasks touch it.

Each adapter has a test in ``tests/test_tasks_adapters.py`` that fails loudly when a Lightning upgrade
changes what it relies on.
"""

from __future__ import annotations

from typing import Any

__all__ = ["attached_trainer", "logger_writes_this_step"]


def attached_trainer(module: Any) -> Any:
    """``module``'s trainer, or ``None`` when it is not attached to one (Lightning's ``trainer`` property
    raises a ``RuntimeError`` then).

    Example:
        >>> from lightning.pytorch import LightningModule
        >>> attached_trainer(LightningModule()) is None
        True
    """
    try:
        return module.trainer
    except RuntimeError:
        return None


def logger_writes_this_step(trainer: Any) -> bool:
    """Whether the loggers write this training step (``Trainer(log_every_n_steps=...)``); ``True``
    outside a trainer. Lightning decides it in its logger connector (``should_update_logs``) and has no
    public name for it: this is the one reader. Without the attribute (an upgrade renamed it) every step
    logs, as Lightning would log them, and the adapter's test fails.

    Example:
        >>> logger_writes_this_step(None)
        True
    """
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None or not hasattr(type(connector), "should_update_logs"):
        return True
    return bool(connector.should_update_logs)
