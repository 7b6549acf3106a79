"""Segmentation losses that honour an ignore value: soft Dice, and cross-entropy + Dice.

Pixels whose target equals ``ignore_index`` (VOC's 255 "void" border, unlabelled regions) contribute
nothing to either term. A batch where every pixel is ignored gives a loss of exactly 0 (not NaN).

Binary mode takes one logit channel and targets in {0, 1} (plus the ignore value); multi-class mode takes
``C`` logit channels and targets in ``[0, C)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _as_weight(class_weights: Sequence[float] | Tensor | None) -> Tensor | None:
    if class_weights is None:
        return None
    weight = torch.as_tensor(class_weights, dtype=torch.float32)
    if weight.ndim != 1 or (weight < 0).any():
        raise ValueError(f"class_weights must be a 1-D list of non-negative floats, got {class_weights!r}")
    return weight


def _check_target(logits: Tensor, target: Tensor) -> None:
    if logits.ndim != 4 or target.ndim != 3:
        raise ValueError(
            f"expected logits (N, C, H, W) and target (N, H, W), got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    if logits.shape[0] != target.shape[0] or logits.shape[-2:] != target.shape[-2:]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree in batch or spatial size"
        )


class DiceLoss(nn.Module):
    """Soft Dice loss, ``1 - mean_c (2 |P_c ∩ T_c| + s) / (|P_c| + |T_c| + s)``, summed over the batch.

    Sums run over every valid pixel of the batch (not per image), which keeps rare classes stable.

    Args:
        binary: one logit channel with a sigmoid (True) or ``C`` channels with a softmax (False).
        ignore_index: target value to leave out (``None``: no pixel is ignored).
        smooth: additive smoothing; a class absent from both prediction and target scores 1.
        class_weights: optional per-class weights of the mean over classes (multi-class mode).

    Example:
        >>> loss = DiceLoss(ignore_index=255)
        >>> target = torch.tensor([[[0, 1], [1, 255]]])
        >>> logits = torch.nn.functional.one_hot(target.clamp(max=1), 2).permute(0, 3, 1, 2).float() * 20
        >>> float(loss(logits, target)) < 1e-3
        True
    """

    def __init__(
        self,
        binary: bool = False,
        ignore_index: int | None = 255,
        smooth: float = 1.0,
        class_weights: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__()
        self.binary = binary
        self.ignore_index = ignore_index
        self.smooth = smooth
        weight = _as_weight(class_weights)
        self.register_buffer("class_weights", weight, persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_target(logits, target)
        valid = (
            torch.ones_like(target, dtype=torch.bool)
            if self.ignore_index is None
            else target != self.ignore_index
        )
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        if self.binary:
            if logits.shape[1] != 1:
                raise ValueError(f"binary Dice expects one logit channel, got {logits.shape[1]}")
            probs = torch.sigmoid(logits[:, 0].float())[:, None]
            onehot = safe_target[:, None].float()
        else:
            probs = torch.softmax(logits.float(), dim=1)
            onehot = F.one_hot(safe_target.long(), logits.shape[1]).permute(0, 3, 1, 2).float()
        mask = valid[:, None].float()
        probs, onehot = probs * mask, onehot * mask
        dims = (0, 2, 3)
        intersection = (probs * onehot).sum(dims)
        cardinality = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * intersection + self.smooth) / (cardinality + self.smooth)
        if self.class_weights is not None and not self.binary:
            weight = self.class_weights.to(dice)
            return 1 - (dice * weight).sum() / weight.sum().clamp_min(1e-12)
        return 1 - dice.mean()


class CrossEntropyDiceLoss(nn.Module):
    """``ce_weight * CE + dice_weight * Dice`` with a shared ignore value and class weights.

    In binary mode the cross-entropy term is the binary one (``BCEWithLogits`` on the single channel) and
    ``class_weights`` (two values, background then foreground) weight the pixels of each class.

    Args:
        binary: one sigmoid channel (True) or a softmax over ``C`` channels (False).
        ignore_index: target value to leave out of both terms (``None``: none).
        ce_weight: weight of the cross-entropy term.
        dice_weight: weight of the Dice term (0 gives plain cross-entropy).
        class_weights: optional per-class weights for both terms.
        smooth: Dice smoothing.

    Example:
        >>> loss = CrossEntropyDiceLoss(ignore_index=255)
        >>> loss(torch.zeros(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))).shape
        torch.Size([])
    """

    def __init__(
        self,
        binary: bool = False,
        ignore_index: int | None = 255,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        class_weights: Sequence[float] | Tensor | None = None,
        smooth: float = 1.0,
    ) -> None:
        super().__init__()
        if ce_weight < 0 or dice_weight < 0 or ce_weight + dice_weight == 0:
            raise ValueError(
                f"ce_weight and dice_weight must be >= 0 and not both 0, got {ce_weight} and {dice_weight}"
            )
        self.binary = binary
        self.ignore_index = ignore_index
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        weight = _as_weight(class_weights)
        if binary and weight is not None and weight.numel() != 2:
            raise ValueError(f"binary mode takes two class_weights (background, foreground), got {weight}")
        self.register_buffer("class_weights", weight, persistent=False)
        self.dice = DiceLoss(binary=binary, ignore_index=ignore_index, smooth=smooth, class_weights=weight)

    def cross_entropy(self, logits: Tensor, target: Tensor) -> Tensor:
        valid = (
            torch.ones_like(target, dtype=torch.bool)
            if self.ignore_index is None
            else target != self.ignore_index
        )
        safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
        if self.binary:
            per_pixel = F.binary_cross_entropy_with_logits(
                logits[:, 0].float(), safe_target.float(), reduction="none"
            )
        else:
            per_pixel = F.cross_entropy(logits.float(), safe_target, reduction="none")
        pixel_weight = valid.float()
        if self.class_weights is not None:
            pixel_weight = pixel_weight * self.class_weights.to(per_pixel)[safe_target]
        # Weighted mean over valid pixels; clamp so an all-ignored batch gives 0 instead of NaN.
        return (per_pixel * pixel_weight).sum() / pixel_weight.sum().clamp_min(1e-12)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_target(logits, target)
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.ce_weight:
            loss = loss + self.ce_weight * self.cross_entropy(logits, target)
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits, target)
        return loss
