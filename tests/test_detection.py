"""ObjectDetector families, the detection networks and the COCO results writer (no training loop)."""

import json

import pytest
import torch

from lightning_convnets.backbones import create_backbone
from lightning_convnets.nn.centernet import centernet_loss, encode_targets
from lightning_convnets.nn.detectors import (
    CenterNet,
    UpsamplingNeck,
    batch_images,
    build_torchvision_detector,
)
from lightning_convnets.predict.writers import detections_to_coco
from lightning_convnets.tasks.detection import ObjectDetector

TINY_HOURGLASS = {"num_stacks": 2, "order": 2, "width": 8}
TINY_RESNET = {"width": 8}
TV_TINY = {"min_size": 64, "max_size": 64, "anchor_size": 8, "fpn_channels": 32}


def _targets():
    return [
        {
            "boxes": torch.tensor([[4.0, 6.0, 30.0, 28.0], [34.0, 30.0, 60.0, 62.0]]),
            "labels": torch.tensor([0, 2]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},  # an empty image
    ]


def test_hourglass_gets_a_head_per_stack_and_the_loss_sums_over_stacks():
    torch.manual_seed(0)
    model = ObjectDetector("hourglass", num_classes=3, backbone_kwargs=TINY_HOURGLASS, head_channels=4)
    net = model.detector
    assert isinstance(net, CenterNet) and len(net.heads) == 2 and net.stride == 4
    images = [torch.randn(3, 64, 64), torch.randn(3, 64, 64)]
    loss, parts = model.detector_family.losses(model.detector, images, _targets())
    outputs = net(batch_images(images, model.size_divisor))
    assert [o["heatmap"].shape for o in outputs] == [(2, 3, 16, 16)] * 2
    encoded = encode_targets([t["boxes"] for t in _targets()], [t["labels"] for t in _targets()], 3, (16, 16))
    per_stack = [centernet_loss(o, encoded)["loss"] for o in outputs]
    assert loss.item() == pytest.approx(sum(per_stack).item(), rel=1e-5)
    assert set(parts) == {"heatmap", "size", "offset"}
    assert model.size_divisor == 16  # the hourglass needs multiples of 4 * 2**order


def test_pyramid_backbone_gets_an_upsampling_neck_to_stride_4():
    net = CenterNet(
        create_backbone("resnet18", **TINY_RESNET), num_classes=2, head_channels=4, neck_channels=6
    )
    assert isinstance(net.neck, UpsamplingNeck)
    out = net(torch.zeros(1, 3, 64, 96))
    assert len(out) == 1 and out[0]["heatmap"].shape == (1, 2, 16, 24)
    # A pyramid whose coarsest map is finer than the output stride cannot feed the neck.
    with pytest.raises(ValueError, match="coarsest map has stride 2"):
        UpsamplingNeck([4, 8], [1, 2], channels=4)


def test_unet_same_padding_is_pooled_and_valid_padding_refused():
    same = CenterNet(create_backbone("unet", width=4, depth=2), num_classes=2, head_channels=4)
    assert same(torch.zeros(1, 3, 32, 32))[0]["heatmap"].shape == (1, 2, 8, 8)
    valid = create_backbone("unet", width=4, depth=2, padding="valid")
    with pytest.raises(ValueError, match=r"valid padding \(border=\d+ px\).*padding='same'"):
        CenterNet(valid, num_classes=2)


@pytest.mark.parametrize("family", ["fasterrcnn", "retinanet", "fcos"])
def test_torchvision_families_train_with_empty_images_and_predict_0_based_labels(family):
    torch.manual_seed(0)
    model = ObjectDetector(
        "resnet18",
        family=family,
        num_classes=3,
        backbone_kwargs=TINY_RESNET,
        score_threshold=0.0,
        top_k=20,
        **TV_TINY,
        detector_kwargs={"rpn_post_nms_top_n_test": 50} if family == "fasterrcnn" else None,
    )
    images = [torch.randn(3, 64, 64), torch.randn(3, 48, 64)]
    loss, parts = model.detector_family.losses(model.train().detector, images, _targets())
    assert torch.isfinite(loss) and len(parts) >= 2
    loss.backward()
    assert model.backbone.conv1.weight.grad is not None
    detections = model.eval()(images)
    assert len(detections) == 2
    for det, image in zip(detections, images):
        assert set(det) == {"boxes", "scores", "labels"}
        assert det["boxes"].shape[1] == 4 and len(det["boxes"]) <= 20
        if len(det["labels"]):
            assert det["labels"].min() >= 0 and det["labels"].max() < 3  # background id removed
            assert det["boxes"][:, 2].max() <= image.shape[-1] + 1e-3


def test_fasterrcnn_shifts_labels_for_its_background_class():
    model = ObjectDetector(
        "resnet18", family="fasterrcnn", num_classes=3, backbone_kwargs=TINY_RESNET, **TV_TINY
    )
    assert model.detector.roi_heads.box_predictor.cls_score.out_features == 4
    fake = [{"boxes": torch.zeros(2, 4), "scores": torch.ones(2), "labels": torch.tensor([1, 3])}]
    assert model.detector_family.from_torchvision(fake)[0]["labels"].tolist() == [0, 2]


def test_centernet_predict_step_clips_to_each_image_and_passes_ids_through():
    torch.manual_seed(0)
    model = ObjectDetector(
        "resnet18",
        num_classes=2,
        backbone_kwargs=TINY_RESNET,
        head_channels=4,
        neck_channels=4,
        score_threshold=0.0,
        top_k=10,
    ).eval()
    images = [torch.randn(3, 40, 64), torch.randn(3, 64, 50)]  # padded together to 64x64
    targets = [
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.long),
            "image_id": torch.tensor(i + 7),
            "orig_size": torch.tensor([80, 100]),
        }
        for i in range(2)
    ]
    with torch.no_grad():
        out = model.predict_step((images, targets), 0)
    assert [len(d["boxes"]) for d in out] == [10, 10]
    for det, image in zip(out, images):
        assert (
            det["boxes"][:, [0, 2]].max() <= image.shape[-1]
            and det["boxes"][:, [1, 3]].max() <= image.shape[-2]
        )
        assert det["labels"].dtype == torch.int64 and det["scores"].shape == (10,)
        assert det["image_size"].tolist() == list(image.shape[-2:])
    assert [int(d["image_id"]) for d in out] == [7, 8]


def test_bad_arguments_are_refused_with_clear_errors():
    with pytest.raises(ValueError, match="family must be one of"):
        ObjectDetector("resnet18", family="yolo", num_classes=2)
    with pytest.raises(ValueError, match="label_category_ids has 3 entries but num_classes is 2"):
        ObjectDetector("resnet18", num_classes=2, label_category_ids=[1, 2, 3], backbone_kwargs=TINY_RESNET)
    with pytest.raises(ValueError, match="multiple of 32"):
        build_torchvision_detector("fcos", create_backbone("resnet18", **TINY_RESNET), 2, fpn_channels=16)
    with pytest.raises(ValueError, match="dense network: use family='centernet'"):
        build_torchvision_detector("retinanet", create_backbone("hourglass", **TINY_HOURGLASS), 2)
    model = ObjectDetector("resnet18", num_classes=2, backbone_kwargs=TINY_RESNET)
    with pytest.raises(ValueError, match="must be a dict with 'boxes'"):
        model._split_batch(([torch.zeros(3, 32, 32)], [torch.zeros(1, 4)]))


def test_coco_results_map_labels_to_category_ids_and_pycocotools_accepts_them(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {
        "images": [
            {"id": 11, "file_name": "a.png", "width": 100, "height": 80},
            {"id": 12, "file_name": "b.png", "width": 100, "height": 80},
        ],
        "categories": [{"id": 5, "name": "cat"}, {"id": 9, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 9, "bbox": [10, 20, 30, 40], "area": 1200, "iscrowd": 0},
            {"id": 2, "image_id": 12, "category_id": 5, "bbox": [50, 10, 20, 20], "area": 400, "iscrowd": 0},
        ],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    # The network saw the images resized to 40x50 (half size): boxes go back to file pixels.
    detections = [
        {
            "boxes": torch.tensor([[5.0, 10.0, 20.0, 30.0]]),
            "scores": torch.tensor([0.9]),
            "labels": torch.tensor([1]),
            "image_id": torch.tensor(11),
            "image_size": torch.tensor([40, 50]),
            "orig_size": torch.tensor([80, 100]),
        },
        {
            "boxes": torch.tensor([[25.0, 5.0, 35.0, 15.0]]),
            "scores": torch.tensor([0.8]),
            "labels": torch.tensor([0]),
            "image_id": torch.tensor(12),
            "image_size": torch.tensor([40, 50]),
            "orig_size": torch.tensor([80, 100]),
        },
    ]
    results = detections_to_coco(detections, category_ids=[5, 9])
    assert results[0] == {"image_id": 11, "category_id": 9, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.9}
    (tmp_path / "res.json").write_text(json.dumps(results))
    coco = COCO(str(tmp_path / "gt.json"))
    evaluator = COCOeval(coco, coco.loadRes(str(tmp_path / "res.json")), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)  # perfect boxes: AP 1 over IoU 0.5:0.95
    with pytest.raises(ValueError, match="label 2 has no category id"):
        detections_to_coco([{**detections[0], "labels": torch.tensor([2])}], category_ids=[5, 9])


@pytest.mark.timeout(60)
def test_loss_parts_are_logged_on_the_steps_the_loggers_write(tmp_path):
    import csv

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    images = [torch.rand(3, 64, 64) for _ in range(2)]
    batches = DataLoader([(images, _targets())] * 5, batch_size=None)
    model = ObjectDetector("hourglass", num_classes=3, backbone_kwargs=TINY_HOURGLASS)
    trainer = pl.Trainer(
        max_steps=5, log_every_n_steps=2, logger=CSVLogger(tmp_path), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=batches)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_heatmap")]
    # written on the logging steps (global steps 1 and 3 with log_every_n_steps=2), with finite values
    assert [int(r["step"]) for r in rows] == [1, 3]
    assert all(float(r["train/loss_heatmap"]) > 0 for r in rows)


def test_zero_area_boxes_are_dropped_from_the_targets_and_valid_ones_kept_as_given():

    boxes = torch.tensor([[1.0, 1.0, 5.0, 6.0], [3.0, 3.0, 3.0, 8.0], [2.0, 2.0, 9.0, 2.0]])
    target = {"boxes": boxes, "labels": torch.tensor([0, 1, 2]), "iscrowd": torch.tensor([0, 1, 0])}
    cleaned = ObjectDetector.clean_target(target)
    assert cleaned["boxes"].tolist() == [[1.0, 1.0, 5.0, 6.0]]
    assert cleaned["labels"].tolist() == [0] and cleaned["iscrowd"].tolist() == [0]
    valid = {"boxes": boxes[:1], "labels": torch.tensor([4])}
    kept = ObjectDetector.clean_target(valid)
    assert torch.equal(kept["boxes"], boxes[:1]) and kept["labels"].tolist() == [4]
    assert kept["boxes"].dtype == torch.float32 and kept["labels"].dtype == torch.long


# ------------------------------------------------------------------------------- one detector interface
def test_the_detection_task_has_no_per_family_branch():
    import inspect

    from lightning_convnets.tasks import detection

    source = inspect.getsource(detection.ObjectDetector)
    assert "family ==" not in source and "family !=" not in source


def test_every_family_speaks_the_detector_protocol():
    from lightning_convnets.nn.detectors import DETECTOR_FAMILIES, CenterNetFamily, detector_family
    from lightning_convnets.tasks.detection import FAMILIES

    assert tuple(DETECTOR_FAMILIES) == FAMILIES == ("centernet", "fasterrcnn", "retinanet", "fcos")
    with pytest.raises(ValueError, match="detector family must be one of"):
        detector_family("yolo")
    torch.manual_seed(0)
    family = CenterNetFamily(head_channels=4, top_k=10, score_threshold=0.0)
    network = family.build(create_backbone("hourglass", **TINY_HOURGLASS), num_classes=3)
    assert family.size_divisor == 16 and family.computes_eval_loss and family.default_monitor == "val/loss"
    images = [torch.randn(3, 64, 64), torch.randn(3, 48, 64)]
    loss, parts = family.losses(network.train(), images, _targets())  # training: the loss and its parts
    assert loss.requires_grad and set(parts) == {"heatmap", "size", "offset"}
    network.eval()
    with torch.no_grad():
        detected = family.detect(network, images)  # eval: detections with 0-based labels
        eval_loss, evaluated = family.evaluate(network, images, _targets())
    assert [set(d) for d in detected] == [{"boxes", "scores", "labels"}] * 2 and eval_loss is not None
    for a, b in zip(detected, evaluated):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    graph = family.export_graph(network)
    assert graph.output_names == ("boxes", "scores", "labels")


def test_torchvision_families_compute_no_validation_loss_and_monitor_map():
    from lightning_convnets.nn.detectors import TorchvisionFamily

    for name in ("fasterrcnn", "retinanet", "fcos"):
        family = TorchvisionFamily(name)
        assert not family.computes_eval_loss and family.default_monitor == "val/map"
        assert family.label_shift == (1 if name == "fasterrcnn" else 0)
    model = ObjectDetector("resnet18", family="retinanet", num_classes=2, backbone_kwargs=TINY_RESNET, **TV_TINY)
    assert model.default_monitor == "val/map" and not model.export_graph().onnx_exportable
