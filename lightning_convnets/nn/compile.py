"""``compile`` of the tasks: the option's check, whether a module was compiled in place
(``nn.Module.compile``), and an eager view of it.

torch keeps the compiled call of ``module.compile()`` in the private attribute ``_compiled_call_impl``
and has no public accessor; these two adapters are the only readers (``tests/test_tasks_adapters.py``
fails loudly if torch renames it).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["check_compile_option", "clear_compiled", "is_compiled"]

_ATTRIBUTE = "_compiled_call_impl"


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module.compile()`` was called on ``module`` (itself, not its children).

    Example:
        >>> net = nn.Linear(2, 2)
        >>> is_compiled(net), (net.compile(), is_compiled(net))[1]
        (False, True)
    """
    return getattr(module, _ATTRIBUTE, None) is not None


def clear_compiled(module: nn.Module) -> nn.Module:
    """Forget the in-place compilation of ``module`` and its children (an export traces the eager
    call); returns ``module``."""
    for m in module.modules():
        if is_compiled(m):
            setattr(m, _ATTRIBUTE, None)
    return module


def check_compile_option(option: Any) -> None:
    """Raise unless ``option`` is a bool or a dict of :func:`torch.compile` keyword arguments (naming the
    unknown ones).

    Example:
        >>> check_compile_option({"mode": "max-autotune"})
        >>> check_compile_option({"mod": "max-autotune"})
        Traceback (most recent call last):
        ...
        ValueError: compile: unknown torch.compile arguments ['mod']; allowed: [...]
    """
    if isinstance(option, bool):
        return
    if not isinstance(option, Mapping):
        raise TypeError(f"compile must be a bool or a dict of torch.compile arguments, got {option!r}")
    allowed = set(inspect.signature(torch.compile).parameters) - {"model"}
    unknown = sorted(set(option) - allowed)
    if unknown:
        raise ValueError(f"compile: unknown torch.compile arguments {unknown}; allowed: {sorted(allowed)}")
