"""Small reusable network pieces."""

from lightning_convnets.nn.crop import center_crop, crop_offsets
from lightning_convnets.nn.fusion import find_conv_bn_pairs, fuse_conv_bn
from lightning_convnets.nn.heads import ClassificationHead
from lightning_convnets.nn.losses import CrossEntropyDiceLoss, DiceLoss
from lightning_convnets.nn.residual import ResidualAdd
from lightning_convnets.nn.stem import adapt_stem_weight

__all__ = [
    "ClassificationHead",
    "CrossEntropyDiceLoss",
    "DiceLoss",
    "ResidualAdd",
    "adapt_stem_weight",
    "center_crop",
    "crop_offsets",
    "find_conv_bn_pairs",
    "fuse_conv_bn",
]
