"""Task heads that sit on a backbone's feature maps.

:class:`ClassificationHead` is the classic ResNet head. Segmentation needs no class of its own: a 1x1
convolution on a dense map (a U-Net decoder over a pyramid encoder is
:class:`lightning_convnets.backbones.unet.UNet` with ``encoder=``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ClassificationHead(nn.Module):
    """Global average pooling -> dropout -> linear layer.

    Pooling makes the head independent of the input size: every spatial position votes equally.

    Args:
        in_channels: channels of the feature map it reads.
        num_classes: number of outputs (logits).
        dropout: dropout probability before the linear layer (0 disables it).

    Example:
        >>> head = ClassificationHead(64, 10, dropout=0.1)
        >>> head(torch.zeros(2, 64, 7, 7)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(features), 1)))
