"""CocoDetectionDataModule: id mapping, crowd rule, empty images, box clipping/dropping, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning_convnets.datamodules import CocoDetectionDataModule, DataValidationError
from lightning_convnets.datamodules.coco import load_coco_records
from PIL import Image


def _write(root: Path, images: list[dict], annotations: list[dict], categories=None) -> tuple[str, str]:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for image in images:
        array = np.full((image["height"], image["width"], 3), 90, np.uint8)
        Image.fromarray(array).save(root / "img" / image["file_name"])
    categories = categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 42, "name": "emu"}]
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / "ann.json").write_text(json.dumps(data))
    return str(root / "img"), str(root / "ann.json")


def _image(i: int, w: int = 40, h: int = 30) -> dict:
    return {"id": i, "file_name": f"{i}.png", "width": w, "height": h}


def _ann(i: int, image_id: int, cat: int, bbox, crowd: int = 0) -> dict:
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": crowd, "area": 1.0}


def _module(images, annotations, **kw):
    kw.setdefault("val_fraction", 0)
    kw.setdefault("train_transforms", "none")
    return CocoDetectionDataModule(images, annotations, image_size=None, batch_size=8, **kw)


def test_noncontiguous_ids_crowd_and_empty_images(tmp_path):
    images, annotations = _write(
        tmp_path,
        [_image(1), _image(2), _image(5)],
        [
            _ann(10, 1, 42, [1, 2, 10, 5]),
            _ann(11, 1, 3, [20, 10, 5, 5]),
            _ann(12, 2, 7, [0, 0, 40, 30], crowd=1),  # crowd: checked, kept out of the targets
        ],
    )
    dm = _module(images, annotations)
    assert dm.category_ids == [3, 7, 42] and dm.class_names == ["cat", "dog", "emu"] and dm.num_classes == 3
    dm.setup("fit")
    batch_images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(batch_images, list) and batch_images[0].shape == (3, 30, 40)
    by_id = {int(t["image_id"]): t for t in targets}
    first = by_id[1]
    assert first["boxes"].dtype == torch.float32 and first["labels"].dtype == torch.int64
    # xywh -> xyxy, category 42 -> label 2, category 3 -> label 0.
    assert first["boxes"].tolist() == [[1, 2, 11, 7], [20, 10, 25, 15]]
    assert first["labels"].tolist() == [2, 0]
    for image_id in (2, 5):  # only a crowd box / no annotation: empty targets of the right shapes
        assert by_id[image_id]["boxes"].shape == (0, 4) and by_id[image_id]["labels"].shape == (0,)
    assert by_id[5]["orig_size"].tolist() == [30, 40]


def test_fixed_category_order_from_checkpoint(tmp_path):
    images, annotations = _write(tmp_path, [_image(1)], [_ann(1, 1, 7, [1, 1, 5, 5])])
    dm = _module(images, annotations, category_ids=[42, 7, 3])
    assert dm.category_ids == [42, 7, 3] and dm.class_names == ["emu", "dog", "cat"]
    dm.setup("fit")
    assert dm.train_dataset[0][1]["labels"].tolist() == [1]
    with pytest.raises(DataValidationError, match=r"category ids \[3, 42\] are not in category_ids"):
        _module(images, annotations, category_ids=[7]).setup("fit")


def test_boxes_clipped_then_dropped_by_visibility(tmp_path):
    images, annotations = _write(
        tmp_path,
        [_image(1, w=40, h=40)],
        [
            _ann(1, 1, 3, [30, 5, 20, 10]),  # overshoots the right border: clipped to x1 = 40
            _ann(2, 1, 7, [2, 2, 10, 10]),  # fully inside the left part
            _ann(3, 1, 42, [24, 24, 10, 10]),  # inside the right part
        ],
    )
    records, _, _ = load_coco_records(annotations, images)
    dm = _module(images, annotations)
    dm.setup("fit")
    _, target = dm.train_dataset[0]
    assert target["boxes"].tolist()[0] == [30, 5, 40, 15]
    assert records[0].boxes.tolist()[0] == [30, 5, 50, 15]  # the record keeps the json box

    # A crop keeping the left 20 px: box 2 survives whole, box 3 leaves (0% visible), box 1 too.
    crop = [{"class_path": "Crop", "init_args": {"x_min": 0, "y_min": 0, "x_max": 20, "y_max": 40}}]
    dm = _module(images, annotations, train_transforms=crop)
    dm.setup("fit")
    _, target = dm.train_dataset[0]
    assert target["boxes"].tolist() == [[2, 2, 12, 12]] and target["labels"].tolist() == [1]

    # Keeping x < 28: box 3 keeps 4/10 of its area (>= min_visibility 0.3): clipped, kept.
    crop[0]["init_args"]["x_max"] = 28
    dm = _module(images, annotations, train_transforms=crop)
    dm.setup("fit")
    _, target = dm.train_dataset[0]
    assert target["boxes"].tolist() == [[2, 2, 12, 12], [24, 24, 28, 34]]
    # Same crop with min_visibility 0.5: box 3 is dropped.
    dm = _module(images, annotations, train_transforms=crop, min_visibility=0.5)
    dm.setup("fit")
    assert dm.train_dataset[0][1]["labels"].tolist() == [1]


def test_resize_scales_boxes_and_flip_mirrors_them(tmp_path):
    images, annotations = _write(tmp_path, [_image(1, w=40, h=20)], [_ann(1, 1, 3, [4, 2, 8, 6])])
    flip = [{"class_path": "HorizontalFlip", "init_args": {"p": 1.0}}]
    dm = CocoDetectionDataModule(images, annotations, val_fraction=0, image_size=20, train_transforms=flip)
    dm.setup("fit")
    image, target = dm.train_dataset[0]
    assert image.shape == (3, 20, 20)
    # Flipped in 40 px (x 28..36), then x scaled by 0.5 and y by 1.
    assert torch.allclose(target["boxes"], torch.tensor([[14.0, 2.0, 18.0, 8.0]]))


def test_fraction_split_and_separate_val_json(tmp_path):
    images, annotations = _write(tmp_path, [_image(i) for i in range(1, 11)], [])
    dm = CocoDetectionDataModule(images, annotations, val_fraction=0.2, test_fraction=0.1, image_size=16)
    dm.setup()
    assert len(dm.train_dataset) == 7 and len(dm.val_dataset) == 2 and len(dm.test_dataset) == 1
    ids = [{r.image_id for r in d.records} for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and set.union(*ids) == set(range(1, 11))
    images_, targets = next(iter(dm.val_dataloader()))
    assert len(images_) == 2 and images_[0].shape == (3, 16, 16)
    assert all(t["boxes"].shape == (0, 4) for t in targets)
    val = CocoDetectionDataModule(images, annotations, val_annotations=annotations, image_size=16)
    val.setup("fit")
    assert len(val.train_dataset) == 10 and len(val.val_dataset) == 10
    with pytest.raises(RuntimeError, match="no test split"):
        val.test_dataloader()


@pytest.mark.parametrize(
    ("image", "annotation", "pattern"),
    [
        (_image(1), _ann(5, 1, 3, [1, 1, 0, 4]), r"annotation id 5: bbox \[1, 1, 0, 4\] has non-positive"),
        (_image(1), _ann(6, 1, 3, [1, 1, 4, -2]), r"annotation id 6: bbox .* non-positive width or height"),
        (_image(1), _ann(7, 1, 99, [1, 1, 4, 4]), r"annotation id 7: category_id 99 is not in 'categories'"),
        (_image(1), _ann(8, 3, 3, [1, 1, 4, 4]), r"annotation id 8: image_id 3 is not in 'images'"),
        (_image(1), _ann(9, 1, 3, [50, 1, 4, 4]), r"annotation id 9: bbox .* lies outside its 40x30 image"),
        (
            _image(1),
            _ann(10, 1, 3, [1, 1]),
            r"annotation id 10: bbox \[1, 1\] is not \[x, y, width, height\]",
        ),
    ],
)
def test_bad_annotations_name_the_annotation(tmp_path, image, annotation, pattern):
    images, annotations = _write(tmp_path, [image], [annotation])
    with pytest.raises(DataValidationError, match=pattern):
        _module(images, annotations).setup("fit")


def test_bad_files_name_the_file(tmp_path):
    images, annotations = _write(tmp_path, [_image(1)], [])
    data = json.loads(Path(annotations).read_text())

    data["images"] = [{"id": 4, "file_name": "../ann.json", "width": 40, "height": 30}]
    Path(annotations).write_text(json.dumps(data))
    with pytest.raises(DataValidationError, match=r"image id 4 file_name '\.\./ann\.json' points outside"):
        _module(images, annotations).setup("fit")

    data["images"] = [{"id": 4, "file_name": "sub/../../ann.json", "width": 40, "height": 30}]
    Path(annotations).write_text(json.dumps(data))
    with pytest.raises(DataValidationError, match="points outside the image root"):
        _module(images, annotations).setup("fit")

    data["images"] = [{"id": 4, "file_name": "gone.png", "width": 40, "height": 30}]
    Path(annotations).write_text(json.dumps(data))
    with pytest.raises(DataValidationError, match=r"img/gone\.png: missing image file \(image id 4"):
        _module(images, annotations).setup("fit")

    data["images"] = [{"id": 1, "file_name": "1.png", "width": 41, "height": 30}]
    Path(annotations).write_text(json.dumps(data))
    with pytest.raises(DataValidationError, match=r"1\.png: image is 40x30 but image id 1 .* says 41x30"):
        _module(images, annotations).setup("fit")

    data["images"] = [_image(1)]
    Path(annotations).write_text(json.dumps(data))
    png = Path(images) / "1.png"
    png.write_bytes(png.read_bytes()[:60])
    with pytest.raises(DataValidationError, match=r"1\.png: unreadable or truncated image"):
        _module(images, annotations).setup("fit")

    Path(annotations).write_text("{not json")
    with pytest.raises(DataValidationError, match=r"ann\.json: not a readable COCO json"):
        _module(images, annotations).setup("fit")
    with pytest.raises(DataValidationError, match=r"missing\.json: annotation file not found"):
        _module(images, str(tmp_path / "missing.json")).setup("fit")
