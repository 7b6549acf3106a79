"""Adapting a pretrained stem to a different number of input channels (grayscale, multispectral)."""

from __future__ import annotations

import math

from torch import Tensor


def adapt_stem_weight(weight: Tensor, in_channels: int) -> Tensor:
    """Adapt a stem kernel ``(out, c, k, k)`` trained on ``c`` channels (RGB: 3) to ``in_channels``.

    One channel sums the kernels over ``c``: a gray image repeated on ``c`` channels gives exactly the
    original network's response. More channels repeat the kernels cyclically and rescale by
    ``c / in_channels`` so the response to an image repeated along channels keeps its magnitude.

    Example:
        >>> import torch
        >>> adapt_stem_weight(torch.ones(8, 3, 7, 7), 1).shape
        torch.Size([8, 1, 7, 7])
    """
    if weight.dim() != 4:
        raise ValueError(f"adapt_stem_weight expects a conv kernel (out, c, k, k), got {tuple(weight.shape)}")
    if in_channels < 1:
        raise ValueError(f"adapt_stem_weight: in_channels must be positive, got {in_channels}")
    source = weight.shape[1]
    if in_channels == source:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(in_channels / source)
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (source / in_channels)
