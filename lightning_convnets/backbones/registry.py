"""Build backbones from a string: ``create_backbone("resnet50")``, ``create_backbone("timm:convnext_tiny")``.

Two kinds of entries:

* names, registered with :func:`register_backbone` by each family module (``resnet18``, ``unet``...);
* prefixes (``timm:``, ``smp:``, ``torchvision:``), registered with :func:`register_prefix`, whose builder
  receives the rest of the string as its first argument.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TypeVar

from torch import nn

_BACKBONES: dict[str, Callable[..., nn.Module]] = {}
_PREFIXES: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_backbone(name: str | None = None) -> Callable[[F], F]:
    """Decorator registering a backbone builder under ``name`` (default: the function's name).

    Example (not run by the doctests: it would register ``tiny_net`` for the whole test process):
        >>> @register_backbone("tiny_net")  # doctest: +SKIP
        ... def tiny_net(in_channels: int = 3) -> nn.Module: ...
    """

    def decorator(fn: F) -> F:
        key = (name or fn.__name__).lower()
        if key in _BACKBONES and _BACKBONES[key] is not fn:
            raise ValueError(f"backbone name {key!r} is already registered by {_BACKBONES[key]!r}")
        _BACKBONES[key] = fn
        return fn

    return decorator


def register_prefix(prefix: str) -> Callable[[F], F]:
    """Decorator registering a builder for every name of the form ``"<prefix>:<rest>"``."""

    def decorator(fn: F) -> F:
        _PREFIXES[prefix.lower()] = fn
        return fn

    return decorator


def list_backbones(pattern: str | None = None) -> list[str]:
    """Sorted registered names (plus the adapter prefixes as ``"timm:<model>"`` etc.).

    Args:
        pattern: optional ``fnmatch`` pattern, e.g. ``"*resnet*"``.
    """
    import fnmatch

    names = sorted(_BACKBONES) + [f"{p}:<name>" for p in sorted(_PREFIXES)]
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Build the backbone registered as ``name`` with ``kwargs``.

    Args:
        name: a registered name (see :func:`list_backbones`) or ``"<prefix>:<rest>"`` for an adapter
            (``timm:resnet18``, ``smp:resnet34``, ``smp:Unet/resnet34``, ``torchvision:resnet50``).
        **kwargs: forwarded to the builder (``in_channels``, ``width``...).

    Raises:
        KeyError: for an unknown name; the message lists the closest registered names.
    """
    if not isinstance(name, str):
        raise TypeError(f"backbone name must be a string, got {type(name).__name__}")
    key = name.strip()
    if ":" in key:
        prefix, rest = key.split(":", 1)
        builder = _PREFIXES.get(prefix.lower())
        if builder is None:
            close = difflib.get_close_matches(prefix.lower(), list(_PREFIXES), n=3, cutoff=0.4)
            raise KeyError(
                f"unknown backbone prefix {prefix!r} in {name!r}; known prefixes: {sorted(_PREFIXES)}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
            )
        return builder(rest, **kwargs)
    builder = _BACKBONES.get(key.lower())
    if builder is None:
        close = difflib.get_close_matches(key.lower(), list(_BACKBONES), n=5, cutoff=0.5)
        hint = f"closest: {', '.join(close)}" if close else f"registered: {', '.join(sorted(_BACKBONES))}"
        raise KeyError(
            f"unknown backbone {name!r}; {hint}. See lightning_convnets.backbones.list_backbones()."
        )
    return builder(**kwargs)
