"""Which modules the activation monitor measures: the targets protocol.

Owns :func:`find_targets` (the residual blocks, the stem and the extra modules chosen by type or name, as
:class:`Target` records), the three ways a block shows its residual branch (a
:class:`~lightning_convnets.nn.ResidualAdd` child; a ``residual_branch`` class attribute; the known
torchvision and timm blocks of :data:`KNOWN_BLOCKS`) and :func:`identity_aliases` (identity shortcuts whose
input is already measured as the previous target's output). The monitor is
:class:`~lightning_convnets.callbacks.activation_variance.ActivationVarianceMonitor`; the protocol is
described in ``docs/monitors.md``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lightning_convnets.nn import ResidualAdd

from .core import MonitorConfigError

__all__ = ["KNOWN_BLOCKS", "TYPE_ALIASES", "Target", "find_targets", "identity_aliases"]

TYPE_ALIASES: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
    "bn": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm),
    "norm": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm),
    "linear": (nn.Linear,),
    "relu": (nn.ReLU,),
}

# protocol 3: (module, class name) -> (branch-end candidates, shortcut submodule)
KNOWN_BLOCKS: dict[tuple[str, str], tuple[tuple[str, ...], str | None]] = {
    ("torchvision.models.resnet", "BasicBlock"): (("bn2",), "downsample"),
    ("torchvision.models.resnet", "Bottleneck"): (("bn3",), "downsample"),
    ("timm.models.resnet", "BasicBlock"): (("drop_path", "se", "bn2"), "downsample"),
    ("timm.models.resnet", "Bottleneck"): (("drop_path", "se", "bn3"), "downsample"),
}


@dataclass
class Target:
    """A module the monitor measures, and where its residual branch and shortcut are.

    Args:
        name: qualified name in the model.
        module: the module whose output is measured.
        kind: ``"stem"``, ``"block"`` (residual), ``"plain"`` (a block built without its shortcut) or
            ``"layer"`` (chosen by type or name).
        add: the block's :class:`~lightning_convnets.nn.ResidualAdd` (protocol 1): its inputs are the
            shortcut and the branch.
        sum_is_output: the block returns its add's sum (a pre-activation block).
        branch: the module that ends the residual branch (protocols 2 and 3).
        shortcut: the shortcut module; ``None`` for an identity shortcut.
        projection: the shortcut is learned (a module with parameters, e.g. a 1x1 conv where the stage
            changes): the branch ratio then compares two learned paths and says nothing about how close
            the block is to the identity.

    Example:
        >>> Target("layer1.0", nn.Identity(), "plain").residual
        False
    """

    name: str
    module: nn.Module
    kind: str  # "stem", "block", "plain", "layer"
    add: nn.Module | None = None  # protocol 1
    sum_is_output: bool = False
    branch: nn.Module | None = None  # protocol 2/3
    shortcut: nn.Module | None = None
    projection: bool = False

    @property
    def residual(self) -> bool:
        return self.add is not None or self.branch is not None


# where blocks written with a ResidualAdd usually keep a projection shortcut
SHORTCUT_NAMES = ("downsample", "shortcut", "projection", "proj")


def _learned(module: object) -> bool:
    return isinstance(module, nn.Module) and any(True for _ in module.parameters())


def _branch_spec(module: nn.Module) -> tuple[tuple[str, ...], str | None] | None:
    cls = type(module)
    declared = getattr(cls, "residual_branch", None)
    if declared is not None:
        names = (declared,) if isinstance(declared, str) else tuple(declared)
        return names, getattr(cls, "residual_shortcut", None)
    return KNOWN_BLOCKS.get((cls.__module__, cls.__name__))


def find_targets(
    model: nn.Module,
    blocks: bool = True,
    stem: bool = True,
    types: Sequence[str | type[nn.Module]] = (),
    names: str | None = None,
) -> list[Target]:
    """The modules :class:`~lightning_convnets.callbacks.activation_variance.ActivationVarianceMonitor`
    measures, in definition order: every residual block (the three protocols of the module docstring), the
    stem, and the modules of ``types`` (aliases of :data:`TYPE_ALIASES` or classes) or whose qualified name
    matches ``names`` (``re.search``).

    Raises:
        MonitorConfigError: for an unknown ``types`` alias, or a block naming a branch end it lacks.
        TypeError: for a ``types`` entry that is neither a string nor an ``nn.Module`` class.

    Example:
        >>> from lightning_convnets.backbones import create_backbone
        >>> net = create_backbone("preact_resnet18", stem="cifar", width=8)
        >>> [(t.name, t.kind) for t in find_targets(net)][:2]
        [('maxpool', 'stem'), ('layer1.0', 'block')]
    """
    classes: list[type[nn.Module]] = []
    for entry in types:
        if isinstance(entry, str):
            if entry not in TYPE_ALIASES:
                raise MonitorConfigError(
                    f"ActivationVarianceMonitor: types entry {entry!r} is unknown; use one of "
                    f"{sorted(TYPE_ALIASES)} or an nn.Module subclass"
                )
            classes.extend(TYPE_ALIASES[entry])
        elif isinstance(entry, type) and issubclass(entry, nn.Module):
            classes.append(entry)
        else:
            raise TypeError(
                f"ActivationVarianceMonitor: types entries must be str or nn.Module classes, got {entry!r}"
            )
    pattern = re.compile(names) if names else None

    stem_name = None
    if stem:
        named = [n for n, _ in model.named_modules()]
        stem_name = next((n for n in named if n.rsplit(".", 1)[-1] == "stem"), None)
        if stem_name is None:
            stem_name = next((n for n in named if n.rsplit(".", 1)[-1] == "maxpool"), None)

    targets: list[Target] = []
    for name, module in model.named_modules():
        if not name:
            continue
        if blocks:
            add = next((c for c in module.children() if isinstance(c, ResidualAdd)), None)
            spec = _branch_spec(module)
            if add is not None:
                targets.append(
                    Target(
                        name, module, "block", add=add, sum_is_output=bool(getattr(module, "preact", False)),
                        projection=any(_learned(getattr(module, n, None)) for n in SHORTCUT_NAMES),
                    )
                )
                continue
            if spec is not None:
                branch = next(
                    (getattr(module, n) for n in spec[0] if getattr(module, n, None) is not None), None
                )
                if branch is None:
                    raise MonitorConfigError(
                        f"ActivationVarianceMonitor: block {name!r} ({type(module).__name__}) names its branch "
                        f"end {spec[0]} but has no such submodule"
                    )
                shortcut = getattr(module, spec[1], None) if spec[1] else None
                targets.append(
                    Target(name, module, "block", branch=branch, shortcut=shortcut, projection=_learned(shortcut))
                )
                continue
            if hasattr(module, "add") and module.add is None and not isinstance(module, ResidualAdd):
                targets.append(Target(name, module, "plain"))
                continue
        if name == stem_name:
            targets.append(Target(name, module, "stem"))
            continue
        if (classes and isinstance(module, tuple(classes))) or (pattern is not None and pattern.search(name)):
            targets.append(Target(name, module, "layer"))
    return targets


def identity_aliases(model: nn.Module, targets: list[Target]) -> dict[str, str]:
    """Identity shortcuts whose input is, by construction, the previous target's output: the block follows
    that target directly in an ``nn.Sequential``. Their Var(x) is that output's: measured once."""
    index_of = {id(t.module): i for i, t in enumerate(targets)}
    aliases = {}
    for index, target in enumerate(targets):
        identity = (target.add is not None and getattr(target.module, "downsample", False) is None) or (
            target.branch is not None and target.shortcut is None
        )
        if not identity:
            continue
        parent_name, _, child = target.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent._modules.values())
        position = list(parent._modules).index(child)
        previous = index_of.get(id(children[position - 1])) if position > 0 else None
        if previous is not None:
            aliases[f"{index}/shortcut"] = f"{previous}/out"
    return aliases
