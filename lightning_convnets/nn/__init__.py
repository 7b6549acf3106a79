"""Network pieces below the backbones: layers (``heads``, ``residual``, ``stem``, ``crop``, ``norm``), losses,
CenterNet's targets and decoding (``centernet``), the detection networks and the one detector interface
(``detectors``), box merging (``boxes``), BatchNorm folding (``fusion``) and the in-place compile state
(``compile``). Imports nothing else of the package."""

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
