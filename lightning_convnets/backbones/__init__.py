"""Pluggable backbones: ``create_backbone(name, **kwargs)`` and ``list_backbones()``.

Importing this package registers every family (ResNet, U-Net, stacked hourglass, and the
``timm:`` / ``smp:`` / ``torchvision:`` adapters).
"""

# Family modules register themselves on import.
from lightning_convnets.backbones import external, hourglass, resnet, unet  # noqa: F401
from lightning_convnets.backbones.base import Backbone, check_contract
from lightning_convnets.backbones.registry import (
    BackboneSpec,
    create_backbone,
    import_object,
    list_backbones,
    register_backbone,
    register_prefix,
    resolve_backbone,
)

__all__ = [
    "Backbone",
    "BackboneSpec",
    "check_contract",
    "create_backbone",
    "import_object",
    "list_backbones",
    "register_backbone",
    "register_prefix",
    "resolve_backbone",
]
