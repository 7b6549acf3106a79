"""Small reusable network pieces."""

from lightning_convnets.nn.crop import center_crop, crop_offsets
from lightning_convnets.nn.residual import ResidualAdd

__all__ = ["ResidualAdd", "center_crop", "crop_offsets"]
