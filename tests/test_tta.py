"""Test-time augmentation: exact inverse mappings, averaging, and the tasks' ``tta`` option."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_tiling import components_detector, make_scene
from torch import nn

from lightning_convnets.nn.boxes import flip_boxes
from lightning_convnets.predict.tta import (
    TTAConfig,
    classify_tta,
    detect_tta,
    parse_tta,
    segment_tta,
    tta_logits,
)
from lightning_convnets.tasks import ImageClassifier, ObjectDetector, SemanticSegmenter


def symmetric_conv(in_channels: int, out_channels: int, seed: int = 0) -> nn.Conv2d:
    """A 3x3 conv whose kernels are mirror-symmetric both ways: it commutes with h and v flips."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    with torch.no_grad():
        w = conv.weight
        w.copy_((w + w.flip(-1) + w.flip(-2) + w.flip(-1, -2)) / 4)
    return conv


def test_parse_tta_views_and_errors() -> None:
    assert parse_tta("none").views() == [(1.0, False, False)] and parse_tta("none").is_identity
    assert parse_tta("flip").views() == [(1.0, False, False), (1.0, True, False)]
    assert len(parse_tta("flip+scales").views()) == 6
    assert parse_tta("hflip+vflip+scales=0.5,2").scales == (0.5, 2.0)
    assert parse_tta(TTAConfig(vflip=True)).views() == [(1.0, False, False), (1.0, False, True)]
    for bad in ("rotate", "flip+scales=a", "scales=-1", 3):
        with pytest.raises(ValueError, match="tta"):
            parse_tta(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tta"):
        ImageClassifier("resnet18", num_classes=2, tta="mirror")


# ------------------------------------------------------------------------------------ segmentation
def test_segmentation_tta_undoes_every_flip_exactly() -> None:
    x = torch.rand(2, 3, 16, 24)
    # The identity "model" is equivariant to everything: each view flipped back must be x again.
    assert torch.equal(segment_tta(lambda t: t, x, "flip+vflip"), x)
    # A flip-equivariant convolution: the TTA mean equals the plain prediction (to float rounding).
    conv = symmetric_conv(3, 5)
    with torch.no_grad():
        plain = conv(x)
        assert torch.allclose(segment_tta(conv, x, "flip+vflip"), plain, atol=1e-6)
        # A generic convolution: the mean of f(x) and flip(f(flip(x))), nothing else.
        generic = nn.Conv2d(3, 5, 3, padding=1)
        expected = (generic(x) + generic(x.flip(-1)).flip(-1)) / 2
        assert torch.allclose(segment_tta(generic, x, "flip"), expected, atol=1e-6)
        assert not torch.allclose(expected, generic(x), atol=1e-3)


def test_segmentation_tta_scales_return_to_the_image_size() -> None:
    smooth = F.interpolate(torch.rand(1, 2, 6, 8), size=(48, 64), mode="bilinear", align_corners=False)
    out = segment_tta(lambda t: t, smooth, "flip+scales=0.5,1,2", multiple=8)
    assert out.shape == smooth.shape
    assert (out - smooth).abs().max() < 0.05  # only the resampling error of a smooth image
    seen: list[tuple[int, int]] = []
    segment_tta(
        lambda t: seen.append(tuple(t.shape[-2:])) or t, torch.rand(1, 1, 40, 56), "scales", multiple=8
    )
    assert seen == [(40, 56), (32, 40), (48, 72)]  # scaled sides rounded to the network's multiple


def test_segmenter_tta_predict_step_averages_flipped_logits() -> None:
    torch.manual_seed(0)
    model = SemanticSegmenter(
        "unet", num_classes=3, backbone_kwargs={"width": 4, "depth": 2}, tta="flip"
    ).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        mean = (model(images)[-1] + model(images.flip(-1))[-1].flip(-1)) / 2
    assert torch.equal(model.predict_step(images, 0), mean.argmax(1))


# ---------------------------------------------------------------------------------- classification
def test_classification_tta_averages_probabilities_exactly() -> None:
    conv = symmetric_conv(3, 4)

    def invariant(x: torch.Tensor) -> torch.Tensor:
        return conv(x).mean(dim=(2, 3))

    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(
            classify_tta(invariant, x, "flip+vflip"), torch.softmax(invariant(x), 1), atol=1e-6
        )

    def antisymmetric(t: torch.Tensor) -> torch.Tensor:  # left-half minus right-half brightness
        d = t[..., : t.shape[-1] // 2].mean(dim=(1, 2, 3)) - t[..., t.shape[-1] // 2 :].mean(dim=(1, 2, 3))
        return torch.stack([10 * d, torch.zeros_like(d)], 1)

    # Each flip reverses the evidence: averaged over both views the classes are exactly even.
    probs = classify_tta(antisymmetric, x, "flip")
    assert torch.allclose(probs, torch.full_like(probs, 0.5), atol=1e-6)
    assert not torch.allclose(torch.softmax(antisymmetric(x), 1), probs, atol=1e-2)
    multi = classify_tta(antisymmetric, x, "flip", multilabel=True)
    expected = (torch.sigmoid(antisymmetric(x)) + torch.sigmoid(antisymmetric(x.flip(-1)))) / 2
    assert torch.allclose(multi, expected)


def test_classifier_tta_option_in_predict_and_test() -> None:
    torch.manual_seed(0)
    model = ImageClassifier("resnet18", num_classes=3, backbone_kwargs={"width": 4}, tta="flip").eval()
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        expected = (torch.softmax(model(images), 1) + torch.softmax(model(images.flip(-1)), 1)) / 2
        assert torch.allclose(model.predict_step(images, 0), expected, atol=1e-6)
        # The test stage scores log(mean probabilities): softmax of it gives the TTA probabilities back.
        assert torch.allclose(torch.softmax(tta_logits(model, images, model.hparams.tta), 1), expected, atol=1e-6)
        model.test_step((images, labels), 0)
    acc = model.metrics["test_"].compute()["acc"]
    assert float(acc) == pytest.approx(float((expected.argmax(1) == labels).float().mean()))


# --------------------------------------------------------------------------------------- detection
def test_detection_tta_maps_boxes_back_exactly() -> None:
    image, _, _ = make_scene(size=120, seed=1, count=12)
    plain = components_detector([image])[0]
    for spec in ("flip", "flip+vflip"):
        for merge in ("nms", "wbf"):
            (merged,) = detect_tta(components_detector, [image], spec, merge=merge)
            order_a = plain["boxes"][:, 0] * 1000 + plain["boxes"][:, 1]
            order_b = merged["boxes"][:, 0] * 1000 + merged["boxes"][:, 1]
            a, b = plain["boxes"][order_a.argsort()], merged["boxes"][order_b.argsort()]
            # NMS keeps one view's box: exact. WBF averages identical boxes: exact up to float rounding.
            assert torch.equal(a, b) if merge == "nms" else torch.allclose(a, b, atol=1e-4)
            assert torch.equal(plain["labels"][order_a.argsort()], merged["labels"][order_b.argsort()])
    # Box inversion itself: a box at the left edge of a flipped 30-px-wide view is at the right edge.
    box = torch.tensor([[0.0, 2.0, 5.0, 9.0]])
    assert flip_boxes(box, (20, 30), True, False).tolist() == [[25.0, 2.0, 30.0, 9.0]]
    assert flip_boxes(box, (20, 30), True, True).tolist() == [[25.0, 11.0, 30.0, 18.0]]


def test_detection_tta_scales_divide_boxes_by_the_scale() -> None:
    from torchvision.ops import box_iou

    image, boxes, _ = make_scene(size=120, seed=2, count=12)
    (merged,) = detect_tta(components_detector, [image], "flip+scales=1,2", merge="nms")
    iou = box_iou(boxes, merged["boxes"]).max(1).values
    assert (iou > 0.85).all() and len(merged["boxes"]) == len(boxes)
    # WBF down-weights boxes seen by few views: a box only one of 4 views finds scores 1/4 of it.
    calls = {"n": 0}

    def once(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        calls["n"] += 1
        found = calls["n"] == 1
        return [
            {
                "boxes": torch.tensor([[1.0, 1, 5, 5]]) if found else torch.zeros(0, 4),
                "scores": torch.ones(int(found)),
                "labels": torch.zeros(int(found), dtype=torch.long),
            }
            for _ in images
        ]

    (fused,) = detect_tta(once, [torch.zeros(3, 16, 16)], "flip+vflip", merge="wbf")
    assert fused["scores"].tolist() == [0.25]


def test_object_detector_tta_predict_step() -> None:
    torch.manual_seed(0)
    model = ObjectDetector(
        "resnet18",
        num_classes=2,
        backbone_kwargs={"width": 4},
        neck_channels=8,
        head_channels=8,
        tta="flip",
        score_threshold=0.0,
        top_k=20,
    ).eval()
    image = torch.rand(3, 64, 48)
    (det,) = model.predict_step([image], 0)
    (expected,) = detect_tta(model, [image], "flip", max_detections=20)
    assert torch.equal(det["boxes"], expected["boxes"]) and len(det["boxes"]) <= 20
    assert (det["boxes"][:, 2] <= 48 + 1e-4).all()
