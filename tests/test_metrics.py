"""SegmentationMetrics: one confusion matrix gives torchmetrics' four segmentation metrics exactly."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex

from lightning_convnets.metrics import SegmentationMetrics


def _reference(num_classes: int, ignore_index: int | None) -> dict:
    kw = {"ignore_index": ignore_index}
    return {
        "miou": MulticlassJaccardIndex(num_classes, average="macro", **kw),
        "iou": MulticlassJaccardIndex(num_classes, average="none", **kw),
        "dice": MulticlassF1Score(num_classes, average="macro", **kw),
        "pixel_acc": MulticlassAccuracy(num_classes, average="micro", **kw),
    }


@pytest.mark.parametrize("ignore_index", [None, 255, 0, 3])
@pytest.mark.parametrize("absent_class", [False, True])
def test_equals_torchmetrics_over_batches(ignore_index, absent_class):
    k = 5
    generator = torch.Generator().manual_seed(ignore_index or 1)
    ours, reference = SegmentationMetrics(k, ignore_index=ignore_index), _reference(k, ignore_index)
    for _ in range(3):
        target = torch.randint(0, k, (2, 16, 16), generator=generator)
        preds = torch.where(
            torch.rand(target.shape, generator=generator) < 0.6,
            target,
            torch.randint(0, k, target.shape, generator=generator),
        )
        if absent_class:  # class 2 neither predicted nor true: left out of the macro means
            target[target == 2] = 1
            preds[preds == 2] = 1
        if ignore_index is not None:
            target[torch.rand(target.shape, generator=generator) < 0.2] = ignore_index
        ours.update(preds, target)
        for metric in reference.values():
            metric.update(preds, target)
    got = ours.compute()
    assert set(got) == set(reference)
    for name, metric in reference.items():
        torch.testing.assert_close(got[name], metric.compute(), rtol=1e-6, atol=1e-7, msg=name)
        assert got[name].dtype == torch.float32


def test_reset_and_everything_ignored():
    metric = SegmentationMetrics(3, ignore_index=255)
    metric.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.full((1, 4, 4), 255))
    values = metric.compute()
    assert float(values["miou"]) == 0.0 and float(values["pixel_acc"]) == 0.0  # 0/0 -> 0, as torchmetrics
    metric.update(torch.tensor([[1, 1]]), torch.tensor([[1, 1]]))
    assert float(metric.compute()["pixel_acc"]) == 1.0
    metric.reset()
    assert int(metric.confmat.sum()) == 0


def test_bad_input_is_named():
    metric = SegmentationMetrics(3, ignore_index=255)
    with pytest.raises(ValueError, match="same shape"):
        metric.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"targets must be class indices in \[0, 3\) or ignore_index=255, got values \[7\]"
    ):
        metric.update(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[7, 1]]))
    with pytest.raises(ValueError, match=r"predictions must be class indices in \[0, 3\), got values \[-1\]"):
        metric.update(torch.tensor([[-1, 1]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        SegmentationMetrics(1)
    unchecked = SegmentationMetrics(3, ignore_index=255, validate_args=False)
    unchecked.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))  # the training path: no check, no sync
    assert int(unchecked.confmat.sum()) == 2
