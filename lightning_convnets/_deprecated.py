"""Deprecated module aliases: an old module path that keeps working for one release, with a warning.

An alias module (``lightning_convnets/tiling.py`` for :mod:`lightning_convnets.predict.tiling`...) is two
lines: ``__getattr__, __dir__ = alias_module(__name__, "<new module>")``. Every attribute is read from the
new module on access, so ``from lightning_convnets.writers import MaskPNGWriter`` and config ``class_path``
values such as ``lightning_convnets.writers.MaskPNGWriter`` still give the very same objects. Imports
nothing else of the package.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["alias_module"]


def alias_module(old: str, new: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Warn that module ``old`` moved to ``new`` (a ``DeprecationWarning``, once per import of ``old``) and
    return the ``__getattr__`` and ``__dir__`` of the alias module, both reading ``new``.

    Example:
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     getattr_, _ = alias_module("old.path", "lightning_convnets.drawing")
        >>> getattr_("palette").__module__, caught[0].category.__name__
        ('lightning_convnets.drawing', 'DeprecationWarning')
    """
    target = importlib.import_module(new)
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; import {new} instead",
        DeprecationWarning,
        stacklevel=3,
    )

    def __getattr__(name: str) -> Any:
        return getattr(target, name)

    def __dir__() -> list[str]:
        return sorted(dir(target))

    return __getattr__, __dir__
