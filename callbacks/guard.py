"""The guard every monitor's Lightning hooks run under, and the monitors' configuration errors.

Owns :func:`guard_hook` (the wrapper put around each Lightning hook a monitor class defines: an
unexpected exception switches that monitor off instead of ending the run; ``strict`` re-raises),
:data:`GUARDED_HOOKS` / :data:`ALWAYS_RUN` (which hooks it wraps, which still run once the monitor is off),
:class:`MonitorConfigError` (always raised) and the default of ``strict`` (:func:`strict_default`,
:data:`STRICT_ENV`). What switching off does (hooks removed, one warning, an ``error`` row), a switched-off
rank's part in the interval's collective and the per-rank gather at each save are
:class:`~lightning_convnets.callbacks.core.MonitorCallback`'s (``fail``, ``_failed_rank_flush``,
``_share_rank_states``): the wrapper calls them, and keeps the monitor's ``_guard_depth``. It imports
nothing else of the package.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

from lightning.pytorch.callbacks import Callback

__all__ = ["ALWAYS_RUN", "GUARDED_HOOKS", "STRICT_ENV", "MonitorConfigError", "guard_hook", "strict_default"]

STRICT_ENV = "LIGHTNING_CONVNETS_STRICT_MONITORS"
"""Environment variable: ``1`` makes every monitor built with ``strict=None`` strict (CI, tests)."""


def strict_default() -> bool:
    """Whether monitors built with ``strict=None`` re-raise (``LIGHTNING_CONVNETS_STRICT_MONITORS=1``)."""
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes")


class MonitorConfigError(ValueError):
    """A mistake in a monitor's configuration that is visible before training (a bad argument, an option
    naming a module the model does not have). The guard always lets it through: it is raised in
    ``setup``, before any training step, so nothing of the run is lost."""


GUARDED_HOOKS = frozenset(
    {name for name in vars(Callback) if name.startswith("on_")} | {"setup", "teardown", "load_state_dict"}
)
"""Lightning hooks (and checkpoint hooks) whose body runs under the guard in every monitor class."""
ALWAYS_RUN = frozenset({"teardown", "on_fit_end"})
"""Hooks that still run once the monitor is off: hook removal, and the end-of-fit report (which then
carries the monitor's ``error`` row)."""


def _trainer_of(args: tuple[Any, ...]) -> Any:
    return args[0] if args and hasattr(args[0], "global_step") else None


def guard_hook(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` (a monitor's Lightning hook ``name``) so that an unexpected exception switches the monitor
    off instead of ending the run (the monitor's ``fail``). Nested calls (``super().hook(...)``) run bare:
    the outermost guard handles the exception. A monitor that is off skips every hook but
    :data:`ALWAYS_RUN`, except that it still sends its failure flag at the interval's collective (DDP);
    ``on_save_checkpoint`` then gathers every rank's state whatever the hook did. ``fn`` already guarded
    is returned as it is.

    Example:
        >>> class Off:
        ...     active, strict, _guard_depth = True, False, 0
        ...     def fail(self, hook, error, trainer):
        ...         print(f"{hook}: {error}")
        >>> hook = guard_hook("on_train_start", lambda self, trainer, module: 1 / 0)
        >>> hook(Off(), None, None)
        on_train_start: division by zero
    """
    if getattr(fn, "_monitor_guarded", False):
        return fn

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        # one Python frame around the hook: Lightning calls these on every step
        if not self.active and name not in ALWAYS_RUN:
            if name == "on_train_batch_end":
                self._failed_rank_flush(args[0])
            elif name == "on_train_end":
                self._failed_rank_flush(args[0], at_end=True)
            return None
        if self._guard_depth:
            return fn(self, *args, **kwargs)
        self._guard_depth += 1
        try:
            return fn(self, *args, **kwargs)
        except MonitorConfigError:
            raise
        except Exception as err:
            if self.strict:
                raise
            self.fail(name, err, _trainer_of(args))
            return None
        finally:
            self._guard_depth -= 1

    if name != "on_save_checkpoint":
        guarded = functools.wraps(fn)(call)
    else:

        @functools.wraps(fn)
        def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
            if self._guard_depth:  # super().on_save_checkpoint(...): the outermost call gathers
                return call(self, *args, **kwargs)
            # every rank gathers the monitors' extra states at each save whatever the hook did (the monitor
            # may be off, the hook may have raised): a rank that skipped the gather would hang the others
            try:
                return call(self, *args, **kwargs)
            finally:
                self._share_rank_states(*args, **kwargs)

    guarded._monitor_guarded = True  # type: ignore[attr-defined]
    return guarded
