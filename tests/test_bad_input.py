"""The bad-input table of the README ("Reliability"): one test per row.

Each row builds one kind of bad input in a temporary folder and checks the error a user gets: its type
and a message naming the item (file, image id, annotation id, argument, key) and what was expected.
None of them may surface as a shape error deep inside torch. Rows whose input is accepted by a
documented rule (RGBA, 16-bit, pyramid detection backbones) check that rule instead.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning_convnets.datamodules import (
    CocoDetectionDataModule,
    ImageFolderDataModule,
    SegmentationFolderDataModule,
)
from lightning_convnets.datamodules.io import DataValidationError, load_image
from PIL import Image

from lightning_convnets.cli import ConvNetsCLI
from lightning_convnets.tasks import ImageClassifier, ObjectDetector, SemanticSegmenter


def _png(path: Path, size=(16, 16), value=100, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (size[1], size[0], channels) if channels else (size[1], size[0])
    Image.fromarray(np.full(shape, value, np.uint8), mode=mode).save(path)
    return path


def _classes(root: Path) -> Path:
    for name in ("cat", "dog"):
        for i in range(3):
            _png(root / name / f"{i}.png", value=40 * i)
    return root


def _seg(root: Path, mask_size=(16, 16), mask_value=1) -> Path:
    for i in range(3):
        _png(root / "images" / f"{i}.png")
        mask = np.full((mask_size[1], mask_size[0]), mask_value, np.uint8)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{i}.png")
    return root


def _coco(root: Path, images=None, annotations=None, categories=None) -> CocoDetectionDataModule:
    _png(root / "images" / "a.png", size=(32, 24))
    data = {
        "images": images
        if images is not None
        else [{"id": 1, "file_name": "a.png", "width": 32, "height": 24}],
        "annotations": annotations
        if annotations is not None
        else [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]}],
        "categories": categories if categories is not None else [{"id": 1, "name": "thing"}],
    }
    (root / "train.json").write_text(json.dumps(data))
    return CocoDetectionDataModule(
        images=str(root / "images"), annotations=str(root / "train.json"), image_size=32, val_fraction=0.0
    )


def _setup(dm) -> None:
    dm.setup("fit")


# ------------------------------------------------------------------------------------------- image files
def test_truncated_image(tmp_path):
    root = _classes(tmp_path / "d")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "cat" / "0.png")  # its header survives the cut, its pixels do not
    data = (root / "cat" / "0.png").read_bytes()
    (root / "cat" / "0.png").write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(DataValidationError, match=r"cat/0\.png: unreadable or truncated image"):
        _setup(ImageFolderDataModule(str(root), image_size=16, val_fraction=0.34, test_fraction=0.0))


def test_zero_byte_file(tmp_path):
    root = _classes(tmp_path / "d")
    (root / "dog" / "9.png").write_bytes(b"")
    with pytest.raises(DataValidationError, match=r"dog/9\.png: empty file \(0 bytes\); expected an image"):
        _setup(ImageFolderDataModule(str(root), image_size=16, val_fraction=0.34, test_fraction=0.0))


def test_directory_named_like_an_image(tmp_path):
    root = _classes(tmp_path / "d")
    (root / "cat" / "photo.jpg").mkdir()
    with pytest.raises(DataValidationError, match=r"cat/photo\.jpg: a directory named like an image file"):
        _setup(ImageFolderDataModule(str(root), image_size=16, val_fraction=0.34, test_fraction=0.0))


def test_rgba_image_is_composited_onto_black(tmp_path):
    path = tmp_path / "a.png"
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128  # half-transparent red
    Image.fromarray(rgba, mode="RGBA").save(path)
    image = load_image(path, in_channels=3)
    assert (
        image.shape == (4, 4, 3)
        and int(image[0, 0, 0]) == round(200 * 128 / 255)
        and image[..., 1:].max() == 0
    )


def test_16_bit_image_is_rescaled_to_8_bits(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(path)
    image = load_image(path, in_channels=3)
    assert image.dtype == np.uint8 and image.shape == (4, 4, 3) and int(image.min()) == 255


# ------------------------------------------------------------------------------------------------ masks
def test_mask_size_differs_from_its_image(tmp_path):
    root = _seg(tmp_path / "s", mask_size=(8, 16))
    with pytest.raises(
        DataValidationError, match=r"masks/0\.png: mask size 8x16 differs from image .* 16x16"
    ):
        _setup(SegmentationFolderDataModule(str(root), num_classes=2, image_size=16))


def test_mask_values_outside_the_classes_and_not_ignore(tmp_path):
    root = _seg(tmp_path / "s", mask_value=7)
    with pytest.raises(
        DataValidationError, match=r"mask values \[7\] are outside the classes 0\.\.1 and not the ignore"
    ):
        _setup(SegmentationFolderDataModule(str(root), num_classes=2, image_size=16))


# ------------------------------------------------------------------------------------------------- COCO
def test_coco_json_with_missing_keys(tmp_path):
    root = tmp_path / "c"
    _png(root / "images" / "a.png")
    (root / "train.json").write_text(json.dumps({"annotations": []}))
    dm = CocoDetectionDataModule(images=str(root / "images"), annotations=str(root / "train.json"))
    with pytest.raises(
        DataValidationError,
        match=r"train\.json: not a COCO json \(expected an object with an 'images' list\)",
    ):
        _setup(dm)


def test_coco_wrong_types(tmp_path):
    bad = [{"id": 7, "image_id": 1, "category_id": 1, "bbox": ["2", "two", 10, 10]}]
    with pytest.raises(
        DataValidationError, match=r"annotation id 7: bbox .* holds a non-number; expected 4 numbers"
    ):
        _setup(_coco(tmp_path / "c", annotations=bad))
    images = [{"id": 1, "file_name": "a.png", "width": "wide", "height": 24}]
    with pytest.raises(DataValidationError, match=r"image id 1 width 'wide' is not a positive number"):
        _setup(_coco(tmp_path / "d", images=images))


@pytest.mark.parametrize("bbox", [[2, 2, 0, 10], [2, 2, 10, -3]], ids=["zero-width", "negative-height"])
def test_coco_negative_or_zero_area_box(tmp_path, bbox):
    bad = [{"id": 7, "image_id": 1, "category_id": 1, "bbox": bbox}]
    with pytest.raises(
        DataValidationError, match=r"annotation id 7: bbox .* has non-positive width or height"
    ):
        _setup(_coco(tmp_path / "c", annotations=bad))


def test_coco_box_outside_the_image(tmp_path):
    bad = [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [40, 2, 5, 5]}]
    with pytest.raises(DataValidationError, match=r"annotation id 7: bbox .* lies outside its 32x24 image"):
        _setup(_coco(tmp_path / "c", annotations=bad))


def test_coco_unknown_category_id(tmp_path):
    bad = [{"id": 7, "image_id": 1, "category_id": 99, "bbox": [2, 2, 5, 5]}]
    with pytest.raises(
        DataValidationError, match=r"annotation id 7: category_id 99 is not in 'categories' \[1\]"
    ):
        _setup(_coco(tmp_path / "c", annotations=bad))


def test_coco_duplicate_image_ids(tmp_path):
    images = [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "a.png"}]
    with pytest.raises(DataValidationError, match=r"image id 1 appears twice"):
        _setup(_coco(tmp_path / "c", images=images))


@pytest.mark.parametrize("name", ["../escape.png", "/etc/passwd"], ids=["dotdot", "absolute"])
def test_coco_file_name_escaping_the_root(tmp_path, name):
    _png(tmp_path / "c" / "escape.png")
    images = [{"id": 1, "file_name": name}]
    with pytest.raises(DataValidationError, match=r"image id 1 file_name .* points outside the image root"):
        _setup(_coco(tmp_path / "c", images=images, annotations=[]))


def test_symlink_leaving_the_root_is_refused_unless_allowed(tmp_path):
    outside = _png(tmp_path / "elsewhere" / "real.png", size=(32, 24))
    dm = _coco(tmp_path / "c", annotations=[])
    os.symlink(outside, tmp_path / "c" / "images" / "link.png")
    data = json.loads((tmp_path / "c" / "train.json").read_text())
    data["images"].append({"id": 2, "file_name": "link.png"})
    (tmp_path / "c" / "train.json").write_text(json.dumps(data))
    with pytest.raises(
        DataValidationError, match=r"link\.png: image id 2 .* is a symlink to .*outside the data root"
    ):
        _setup(dm)
    allowed = CocoDetectionDataModule(
        images=str(tmp_path / "c" / "images"),
        annotations=str(tmp_path / "c" / "train.json"),
        val_fraction=0.0,
        allow_symlinks_outside_root=True,
    )
    _setup(allowed)
    assert len(allowed.train_dataset) == 2


def test_symlink_leaving_the_root_of_an_image_folder_is_refused_unless_allowed(tmp_path):
    root = _classes(tmp_path / "d")
    outside = _png(tmp_path / "elsewhere" / "real.png", size=(32, 24))
    class_dir = next(p for p in sorted(root.rglob("*")) if p.is_dir() and any(p.glob("*.png")))
    os.symlink(outside, class_dir / "link.png")
    refused = ImageFolderDataModule(str(root), image_size=16, val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(DataValidationError, match=r"link\.png: image is a symlink to .*outside the data root"):
        refused.setup("fit")
    allowed = ImageFolderDataModule(
        str(root), image_size=16, val_fraction=0.0, test_fraction=0.0, allow_symlinks_outside_root=True
    )
    allowed.setup("fit")
    assert outside in [p.resolve() for p, _ in allowed.train_dataset.samples]


def test_empty_split_after_filtering(tmp_path):
    root = _classes(tmp_path / "d")
    # 6 images: a 1% validation share rounds to none.
    dm = ImageFolderDataModule(str(root), image_size=16, val_fraction=0.01, test_fraction=0.0)
    with pytest.raises(DataValidationError, match=r"the val split is empty"):
        _setup(dm)


# ------------------------------------------------------------------------------------- model constructors
def test_unknown_backbone_name_with_close_matches():
    with pytest.raises(KeyError, match=r"unknown backbone 'resnt18'; closest: resnet18"):
        ImageClassifier("resnt18", num_classes=3)


def test_valid_padding_unet_given_a_too_small_input():
    model = SemanticSegmenter(
        "unet", backbone_kwargs={"padding": "valid", "depth": 4, "width": 4}, num_classes=3
    )
    with pytest.raises(
        ValueError, match=r"input height 32 px is too small .* the smallest valid size is 188"
    ):
        model(torch.zeros(1, 3, 32, 32))


def test_detection_backbone_without_a_dense_map_gets_a_neck():
    # A pyramid backbone (no dense map) is never handed to the head as is: CenterNet adds its
    # upsampling neck, so the heatmap comes out at stride 4 rather than failing on shapes.
    model = ObjectDetector("preact_resnet18", num_classes=3, backbone_kwargs={"width": 4}).eval()
    assert not getattr(model.backbone, "dense", False)
    with torch.no_grad():
        outputs = model.detector(torch.zeros(1, 3, 64, 64))
    assert model.detector.neck is not None
    heatmap = outputs[-1]["heatmap"]  # one dict of head outputs per stack
    assert heatmap.shape == (1, 3, 16, 16)


def test_num_classes_disagreeing_with_the_data(tmp_path):
    from lightning.pytorch import Trainer

    root = _classes(tmp_path / "d")
    dm = ImageFolderDataModule(str(root), image_size=16, val_fraction=0.34, test_fraction=0.0)
    model = ImageClassifier("resnet18", backbone_kwargs={"width": 4}, num_classes=5)
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(
        ValueError, match=r"num_classes is 2 but the model was built for 5 classes.*\(cat, dog\)"
    ):
        trainer.fit(model, dm)


def test_yaml_config_with_a_misspelled_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "model:\n  class_path: lightning_convnets.tasks.ImageClassifier\n  init_args:\n    num_clases: 3\n"
    )
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        ConvNetsCLI(args=["fit", "--config", str(config), "--data", "ShapesDataModule"])
    assert "num_clases" in err.getvalue(), err.getvalue()[-2000:]
