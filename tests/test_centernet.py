"""CenterNet targets, losses, head and decoding (lightning_convnets.nn.centernet)."""

import itertools
import math

import pytest
import torch

from lightning_convnets.nn.centernet import (
    HEATMAP_PRIOR_BIAS,
    CenterNetHead,
    centernet_loss,
    decode_detections,
    dense_targets,
    encode_targets,
    focal_loss,
    gaussian_radius,
)


def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


def _perfect_logits(heatmap: torch.Tensor) -> torch.Tensor:
    return torch.logit(heatmap.clamp(1e-6, 1 - 1e-6))


def test_box_encodes_to_unit_peak_at_its_centre():
    boxes = [torch.tensor([[10.0, 20.0, 58.0, 52.0]])]  # centre (34, 36) px -> (8.5, 9.0) cells
    t = encode_targets(boxes, [torch.tensor([2])], num_classes=3, output_size=(16, 16), stride=4)
    assert t.heatmap.shape == (1, 3, 16, 16)
    peak = t.heatmap[0, 2]
    assert peak[9, 8] == 1.0
    assert (peak == 1.0).sum() == 1 and peak.max() == 1.0
    assert 0 < peak[9, 9] < 1 and 0 < peak[10, 8] < 1  # a splat, not a single spike
    assert t.heatmap[0, :2].abs().sum() == 0  # other classes untouched
    assert torch.allclose(t.size[0, 0], torch.tensor([12.0, 8.0]))
    assert torch.allclose(t.offset[0, 0], torch.tensor([0.5, 0.0]))
    assert t.index[0, 0] == 9 * 16 + 8 and t.mask.tolist() == [[True]]


def test_decode_inverts_encode_within_a_pixel():
    boxes = torch.tensor([[3.0, 5.0, 29.0, 21.0], [40.0, 8.0, 60.0, 50.0], [10.0, 34.0, 23.5, 61.0]])
    labels = torch.tensor([0, 1, 0])
    other = torch.tensor([[17.0, 17.0, 47.0, 47.0]])
    t = encode_targets(
        [boxes, other], [labels, torch.tensor([1])], num_classes=2, output_size=(16, 16), stride=4
    )
    dense = dense_targets(t)
    out = decode_detections(
        _perfect_logits(t.heatmap), dense["size"], dense["offset"], stride=4, score_threshold=0.5
    )
    assert len(out) == 2
    for got, want_boxes, want_labels in zip(out, [boxes, other], [labels, torch.tensor([1])]):
        assert len(got["boxes"]) == len(want_boxes)
        order = torch.argsort(got["boxes"][:, 0])
        want_order = torch.argsort(want_boxes[:, 0])
        assert torch.allclose(got["boxes"][order], want_boxes[want_order], atol=1.0)
        assert torch.equal(got["labels"][order], want_labels[want_order])
        assert torch.all(got["scores"] > 0.99)
        assert got["labels"].dtype == torch.int64


def test_focal_loss_matches_a_hand_computed_case():
    # Three pixels: a centre (y=1) predicted at p=0.5, a splat pixel (y=0.5) at p=0.5, background at p=0.75.
    target = torch.tensor([1.0, 0.5, 0.0]).view(1, 1, 1, 3)
    logits = torch.tensor([0.0, 0.0, math.log(3.0)]).view(1, 1, 1, 3)
    pos = (1 - 0.5) ** 2 * math.log(0.5)
    splat = (1 - 0.5) ** 4 * 0.5**2 * math.log(0.5)
    background = 0.75**2 * math.log(0.25)
    expected = -(pos + splat + background) / 1  # one centre
    assert focal_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)
    # Two objects halve the loss per object: normalisation by the number of centres.
    target2 = torch.tensor([1.0, 1.0, 0.0]).view(1, 1, 1, 3)
    expected2 = -(2 * pos + background) / 2
    assert focal_loss(logits, target2).item() == pytest.approx(expected2, rel=1e-5)


def test_gaussian_radius_keeps_iou_above_min_overlap_for_every_corner_move():
    for (h, w), overlap in itertools.product(
        [(10.0, 10.0), (4.0, 30.0), (50.0, 7.0), (1.0, 1.0)], [0.3, 0.7]
    ):
        r = float(gaussian_radius(torch.tensor(h), torch.tensor(w), overlap))
        box = [0.0, 0.0, w, h]
        moves = {
            "one in one out": [r, r, w + r, h + r],
            "both in": [r, r, w - r, h - r],
            "both out": [-r, -r, w + r, h + r],
        }
        ious = {k: _iou(box, m) for k, m in moves.items()}
        assert min(ious.values()) >= overlap - 1e-4, (h, w, r, ious)
        assert min(ious.values()) <= overlap + 1e-3, "the radius is the largest such move"


def test_empty_images_give_background_targets_and_finite_losses():
    empty = torch.zeros(0, 4)
    t = encode_targets(
        [empty, torch.tensor([[0.0, 0.0, 16.0, 16.0]])],
        [torch.zeros(0, dtype=torch.long), torch.tensor([0])],
        num_classes=2,
        output_size=(8, 8),
        stride=4,
    )
    assert t.heatmap[0].sum() == 0 and not t.mask[0].any() and t.mask[1, 0]
    all_empty = encode_targets(
        [empty, empty], [torch.zeros(0, dtype=torch.long)] * 2, num_classes=2, output_size=(8, 8)
    )
    assert all_empty.heatmap.sum() == 0 and all_empty.num_objects == 0
    outputs = {
        "heatmap": torch.full((2, 2, 8, 8), HEATMAP_PRIOR_BIAS, requires_grad=True),
        "size": torch.randn(2, 2, 8, 8, requires_grad=True),
        "offset": torch.randn(2, 2, 8, 8, requires_grad=True),
    }
    losses = centernet_loss(outputs, all_empty)
    assert torch.isfinite(losses["loss"]) and losses["heatmap"] > 0
    assert losses["size"] == 0 and losses["offset"] == 0
    losses["loss"].backward()
    assert outputs["heatmap"].grad.abs().sum() > 0
    decoded = decode_detections(torch.full((2, 2, 8, 8), -8.0), outputs["size"], outputs["offset"])
    assert all(len(d["boxes"]) == 0 and d["boxes"].shape == (0, 4) for d in decoded)


def test_degenerate_and_outside_boxes_are_dropped_or_clipped():
    boxes = torch.tensor([[5.0, 5.0, 5.0, 20.0], [-10.0, -10.0, 12.0, 12.0], [40.0, 40.0, 50.0, 50.0]])
    t = encode_targets([boxes], [torch.tensor([0, 0, 0])], num_classes=1, output_size=(8, 8), stride=4)
    assert t.mask.tolist() == [[False, True, False]]  # zero width; kept after clipping; fully outside
    assert torch.allclose(t.size[0, 1], torch.tensor([3.0, 3.0]))  # clipped to [0, 12] px


def test_loss_is_lowest_for_the_target_outputs():
    boxes = [torch.tensor([[4.0, 4.0, 20.0, 28.0]])]
    t = encode_targets(boxes, [torch.tensor([0])], num_classes=1, output_size=(8, 8))
    dense = dense_targets(t)
    perfect = centernet_loss({"heatmap": _perfect_logits(t.heatmap), **dense}, t)
    noisy = centernet_loss(
        {"heatmap": torch.zeros_like(t.heatmap), "size": dense["size"] + 1, "offset": dense["offset"]}, t
    )
    assert perfect["size"] == 0 and perfect["offset"] == 0
    assert noisy["size"] == pytest.approx(2.0)  # |1| on width and on height, one object
    assert perfect["loss"] < 0.05 and perfect["loss"] < noisy["loss"] / 10
    assert noisy["loss"] == pytest.approx(noisy["heatmap"] + 0.1 * noisy["size"] + noisy["offset"])


def test_head_shapes_and_prior_bias():
    head = CenterNetHead(6, num_classes=4, head_channels=5)
    out = head(torch.randn(2, 6, 8, 12))
    assert out["heatmap"].shape == (2, 4, 8, 12)
    assert out["size"].shape == out["offset"].shape == (2, 2, 8, 12)
    assert torch.all(head.heatmap[-1].bias == HEATMAP_PRIOR_BIAS)
    assert [type(m).__name__ for m in head.size] == ["Conv2d", "ReLU", "Conv2d"]
    assert head.size[0].kernel_size == (3, 3) and head.size[-1].kernel_size == (1, 1)


def test_decode_peaks_top_k_threshold_and_clipping():
    heat = torch.full((1, 2, 8, 8), -10.0)
    heat[0, 0, 2, 2] = 3.0
    heat[0, 0, 2, 3] = 2.0  # a neighbour of a higher peak: suppressed by the 3x3 max-pool
    heat[0, 1, 6, 6] = 1.0
    heat[0, 1, 0, 7] = -1.0  # sigmoid 0.27
    size = torch.full((1, 2, 8, 8), 4.0)
    offset = torch.zeros(1, 2, 8, 8)
    out = decode_detections(heat, size, offset, stride=4, top_k=100, score_threshold=0.3)[0]
    assert out["labels"].tolist() == [0, 1]
    assert torch.allclose(out["boxes"][0], torch.tensor([0.0, 0.0, 16.0, 16.0]))
    assert torch.all(out["scores"][:-1] >= out["scores"][1:])
    top1 = decode_detections(heat, size, offset, top_k=1, score_threshold=0.0)[0]
    assert len(top1["boxes"]) == 1 and top1["labels"].tolist() == [0]
    clipped = decode_detections(heat, size, offset, score_threshold=0.2, image_sizes=[(30, 20)])[0]
    assert clipped["boxes"][:, 2].max() <= 20 and clipped["boxes"][:, 3].max() <= 30
    assert clipped["boxes"].min() >= 0


def test_bad_labels_are_refused():
    with pytest.raises(ValueError, match=r"0-based class indices in \[0, 2\)"):
        encode_targets([torch.tensor([[0.0, 0.0, 8.0, 8.0]])], [torch.tensor([2])], 2, (4, 4))
    with pytest.raises(ValueError, match="shape"):
        encode_targets([torch.zeros(3)], [torch.zeros(0, dtype=torch.long)], 2, (4, 4))


def test_decode_takes_channels_last_maps():
    # a detector with channels_last=True (or predict's folded copy) hands the decoder NHWC-strided maps
    torch.manual_seed(0)
    heatmap, size, offset = torch.randn(2, 3, 8, 8), torch.rand(2, 2, 8, 8) * 4, torch.rand(2, 2, 8, 8)
    expected = decode_detections(heatmap, size, offset, stride=4, top_k=10, score_threshold=0.0)
    nhwc = [t.contiguous(memory_format=torch.channels_last) for t in (heatmap, size, offset)]
    got = decode_detections(*nhwc, stride=4, top_k=10, score_threshold=0.0)
    for a, b in zip(expected, got):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))


def test_a_label_out_of_range_fails_loudly_with_or_without_the_host_check():
    from lightning_convnets.nn.centernet import encode_targets

    boxes, labels = [torch.tensor([[0.0, 0.0, 8.0, 8.0]])], [torch.tensor([5])]
    with pytest.raises(ValueError, match=r"labels must be 0-based class indices in \[0, 2\)"):
        encode_targets(boxes, labels, 2, (16, 16))
    with pytest.raises(RuntimeError, match="out of bounds"):  # the training step's path: no host read
        encode_targets(boxes, labels, 2, (16, 16), check_labels=False)
