"""Build backbones from a string: ``create_backbone("resnet50")``, ``create_backbone("timm:convnext_tiny")``.

Two kinds of entries:

* names, registered with :func:`register_backbone` by each family module (``resnet18``, ``unet``...);
* prefixes (``timm:``, ``smp:``, ``torchvision:``), registered with :func:`register_prefix`, whose builder
  receives the rest of the string as its first argument.

:func:`resolve_backbone` turns any backbone specification a task takes (a name, a ``class_path`` dict, a
``{"name": ...}`` dict or a module) into a checked backbone; :func:`import_object` is the one
``"package.module.Name"`` import of the package (the CLI uses it too).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

from lightning_convnets.backbones.base import check_contract

BackboneSpec = str | dict[str, Any] | nn.Module

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


def import_object(path: str) -> Any:
    """The module or module attribute named by a dotted ``path`` (``"torch.nn.Conv2d"``,
    ``"lightning_convnets.tasks"``): the import a YAML ``class_path`` means.

    Raises:
        ValueError: ``path`` is not a dotted name.
        ImportError: no module of that name.
        AttributeError: the module has no such attribute (the message names both).

    Example:
        >>> import_object("torch.nn.Conv2d").__name__
        'Conv2d'
    """
    path = str(path).strip()
    if not path or any(not part.isidentifier() for part in path.split(".")):
        raise ValueError(f"expected a dotted name such as 'package.module.Class', got {path!r}")
    try:
        return importlib.import_module(path)
    except ImportError:
        module_name, _, name = path.rpartition(".")
        if not module_name:
            raise
    module = importlib.import_module(module_name)
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"{path!r}: module {module_name} has no attribute {name!r}") from None


def resolve_backbone(spec: BackboneSpec, **kwargs: Any) -> nn.Module:
    """Turn a backbone specification into a module honouring the backbone contract.

    Args:
        spec: a registry name (see :func:`list_backbones`), a dict with ``class_path`` (and optional
            ``init_args``) as written in YAML, a dict with ``name`` (and builder keyword arguments) for the
            registry, or an ``nn.Module`` (used as is).
        **kwargs: extra keyword arguments for the builder (ignored for a module instance).

    Raises:
        TypeError: for another type, a ``class_path`` that cannot be imported, or a module that lacks
            ``out_channels`` / ``reductions``.

    Example:
        >>> net = resolve_backbone("preact_resnet18", stem="cifar", width=8)
        >>> net.out_channels, net.reductions
        ([8, 16, 32, 64], [1, 2, 4, 8])
    """
    if isinstance(spec, nn.Module):
        backbone = spec
    elif isinstance(spec, str):
        backbone = create_backbone(spec, **kwargs)
    elif isinstance(spec, Mapping) and "class_path" in spec:
        class_path = spec["class_path"]
        if "." not in str(class_path):
            raise TypeError(f"backbone class_path must be 'package.module.Class', got {class_path!r}")
        try:
            cls = import_object(class_path)
        except (ImportError, AttributeError, ValueError) as err:
            raise TypeError(f"backbone class_path {class_path!r}: {err}") from None
        backbone = cls(**{**dict(spec.get("init_args") or {}), **kwargs})
    elif isinstance(spec, Mapping) and "name" in spec:
        options = {k: v for k, v in spec.items() if k != "name"}
        backbone = create_backbone(spec["name"], **{**options, **kwargs})
    else:
        raise TypeError(
            "backbone must be a registry name (str), a {'class_path': ..., 'init_args': ...} dict, a "
            f"{{'name': ...}} dict or an nn.Module; got {type(spec).__name__}: {spec!r}"
        )
    check_contract(backbone)
    return backbone


def none_strings_to_none(value: Any) -> Any:
    """``value`` with every string ``"None"`` inside dicts and lists turned into ``None``.

    jsonargparse (4.53) turns a ``null`` given on the command line for a key inside a dict argument of a
    subclass (``--model.init_args.backbone_kwargs.encoder_kwargs.weights null``) into the string
    ``"None"``; no backbone option takes that string, and ``null`` (from scratch) is what was meant. The
    tasks apply it to ``backbone_kwargs``; ``tests/test_tasks_units.py`` fails once jsonargparse keeps the
    ``None``.

    Example:
        >>> none_strings_to_none({"a": "None", "b": ["None", 1]})
        {'a': None, 'b': [None, 1]}
    """
    if isinstance(value, Mapping):
        return {k: none_strings_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [none_strings_to_none(v) for v in value]
    return None if isinstance(value, str) and value == "None" else value
