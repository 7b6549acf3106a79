"""Crop-and-concatenate alignment for valid convolutions (U-Net, Ronneberger et al. 2015)."""

from __future__ import annotations

from torch import Tensor


def crop_offsets(size: int, target: int) -> tuple[int, int]:
    """Pixels to cut before and after along one axis so that ``size`` becomes ``target``.

    The rule (the seed's ``determine_crop``): half the difference on each side; when the difference is
    odd, the extra pixel is cut from the end (bottom / right).

    Raises:
        ValueError: when ``target`` is larger than ``size``.
    """
    if target > size:
        raise ValueError(f"cannot crop a side of {size} px to {target} px: the target is larger")
    diff = size - target
    return diff // 2, diff - diff // 2


def center_crop(x: Tensor, height: int, width: int) -> Tensor:
    """Crop the last two dims of ``x`` to ``(height, width)`` with the rule of :func:`crop_offsets`.

    Works for feature maps ``(N, C, H, W)`` and masks ``(N, H, W)`` alike.

    Example:
        >>> import torch
        >>> center_crop(torch.zeros(1, 3, 9, 8), 6, 6).shape
        torch.Size([1, 3, 6, 6])
    """
    top, bottom = crop_offsets(x.shape[-2], height)
    left, right = crop_offsets(x.shape[-1], width)
    return x[..., top : x.shape[-2] - bottom, left : x.shape[-1] - right]
