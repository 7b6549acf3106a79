"""Aliases of the monitors' names that moved when the package was split (kept for one release).

Owns :func:`moved_names`, the module ``__getattr__`` that :mod:`~lightning_convnets.callbacks.core` and
:mod:`~lightning_convnets.callbacks.batchnorm` use to keep an old import path working with a
``DeprecationWarning`` naming the new home.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["moved_names"]


def moved_names(old: str, homes: dict[ModuleType, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old``: each name listed (space-separated) under its new home module is
    returned from there, with a ``DeprecationWarning``; any other name is an ``AttributeError``.

    Example:
        >>> import math, warnings
        >>> getattr_ = moved_names("old.module", {math: "pi"})
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     value = getattr_("pi")
        >>> round(value, 2), caught[0].category.__name__
        (3.14, 'DeprecationWarning')
    """
    table = {name: home for home, names in homes.items() for name in names.split()}

    def __getattr__(name: str) -> Any:
        home = table.get(name)
        if home is None:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(
            f"{old}.{name} moved to {home.__name__}.{name}; the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(home, name)

    return __getattr__
