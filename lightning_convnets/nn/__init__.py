"""Small reusable network pieces."""

from lightning_convnets.nn.crop import center_crop, crop_offsets
from lightning_convnets.nn.heads import ClassificationHead
from lightning_convnets.nn.losses import CrossEntropyDiceLoss, DiceLoss
from lightning_convnets.nn.residual import ResidualAdd

__all__ = [
    "ClassificationHead",
    "CrossEntropyDiceLoss",
    "DiceLoss",
    "ResidualAdd",
    "center_crop",
    "crop_offsets",
]
