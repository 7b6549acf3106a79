"""COCO-format object detection: parsing and checking the json, and the data module.

Rules (also in :class:`CocoDetectionDataModule`):

- labels: COCO category ids need not be contiguous; they are sorted and mapped to 0-based labels
  (label ``i`` is category ``category_ids[i]``, named ``class_names[i]``);
- boxes: COCO ``[x, y, width, height]`` pixels become ``[x0, y0, x1, y1]``; a box with width or height
  <= 0 is an error; a box is clipped to its image when loaded;
- ``iscrowd: 1`` annotations are checked like the others but excluded from the targets (they mark
  groups, not objects, and COCO's own evaluation ignores matches to them);
- images without annotations are kept, with empty targets (``boxes`` of shape ``[0, 4]``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import ConvDataModule, carve_splits
from .datasets import DetectionDataset, DetectionRecord
from .io import DataValidationError, check_inside_root, verify_image


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataValidationError(f"{path}: annotation file not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataValidationError(f"{path}: not a readable COCO json ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataValidationError(f"{path}: not a COCO json (expected an object with an 'images' list)")
    if not isinstance(data.get("categories"), list) or not data["categories"]:
        raise DataValidationError(f"{path}: COCO json has no 'categories' list")
    return data


def coco_categories(annotation_file: str | Path) -> tuple[list[int], list[str]]:
    """Sorted category ids and their names from a COCO json."""
    path = Path(annotation_file)
    categories: dict[int, str] = {}
    for cat in _read_json(path)["categories"]:
        try:
            cat_id, name = int(cat["id"]), str(cat.get("name", cat["id"]))
        except (KeyError, TypeError, ValueError) as err:
            raise DataValidationError(f"{path}: category {cat!r} needs an integer 'id'") from err
        if cat_id in categories:
            raise DataValidationError(f"{path}: category id {cat_id} appears twice")
        categories[cat_id] = name
    ids = sorted(categories)
    return ids, [categories[i] for i in ids]


def _inside(root: Path, file_name: str) -> Path | None:
    # normpath, not resolve: a dataset whose root is a symlink farm must still work.
    root_norm = Path(os.path.normpath(os.path.abspath(root)))
    path = Path(os.path.normpath(os.path.abspath(root / file_name)))
    return path if path.is_relative_to(root_norm) and path != root_norm else None


def load_coco_records(
    annotation_file: str | Path,
    images_root: str | Path,
    verify_images: bool = True,
    category_ids: Sequence[int] | None = None,
    allow_symlinks_outside_root: bool = False,
) -> tuple[list[DetectionRecord], list[int], list[str]]:
    """Parse and check a COCO json; return one record per image plus the label mapping.

    Args:
        annotation_file: the COCO json.
        images_root: the folder ``file_name`` entries are relative to.
        verify_images: also open every image header (PIL ``verify``) and compare its size with the json.
        category_ids: use this label order (e.g. restored from a checkpoint) instead of the json's.
        allow_symlinks_outside_root: follow image symlinks that lead outside ``images_root``.

    Raises:
        DataValidationError: naming the file, image id or annotation id for: a missing/unreadable json,
            a ``file_name`` outside ``images_root``, a missing image, an annotation whose image or
            category does not exist, a box with non-positive width/height or outside its image.
    """
    path, root = Path(annotation_file), Path(images_root)
    data = _read_json(path)
    json_ids, json_names = coco_categories(path)
    if category_ids is None:
        ids, names = json_ids, json_names
    else:
        ids = [int(i) for i in category_ids]
        unknown = sorted(set(json_ids) - set(ids))
        if unknown:
            raise DataValidationError(f"{path}: category ids {unknown} are not in category_ids {ids}")
        by_id = dict(zip(json_ids, json_names))
        names = [by_id.get(i, str(i)) for i in ids]
    label_of = {cat_id: label for label, cat_id in enumerate(ids)}
    if not root.is_dir():
        raise DataValidationError(f"{root}: image folder not found (annotations {path})")

    records: dict[int, DetectionRecord] = {}
    for image in data["images"]:
        try:
            image_id, file_name = int(image["id"]), image["file_name"]
        except (KeyError, TypeError, ValueError) as err:
            raise DataValidationError(
                f"{path}: image entry {image!r} needs an integer 'id' and a 'file_name'"
            ) from err
        if not isinstance(file_name, str) or not file_name:
            raise DataValidationError(
                f"{path}: image id {image_id} file_name {file_name!r} is not a file name"
            )
        if image_id in records:
            raise DataValidationError(f"{path}: image id {image_id} appears twice")
        file_path = _inside(root, file_name)
        if file_path is None:
            raise DataValidationError(
                f"{path}: image id {image_id} file_name {file_name!r} points outside the image root {root}"
            )
        if not file_path.is_file():
            raise DataValidationError(f"{file_path}: missing image file (image id {image_id} in {path})")
        check_inside_root(file_path, root, allow_symlinks_outside_root, f"image id {image_id} in {path}")
        width, height = image.get("width"), image.get("height")
        for key, value in (("width", width), ("height", height)):
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise DataValidationError(
                    f"{path}: image id {image_id} {key} {value!r} is not a positive number of pixels"
                )
        if verify_images:
            size = verify_image(file_path)
            if width is not None and height is not None and size != (int(width), int(height)):
                raise DataValidationError(
                    f"{file_path}: image is {size[0]}x{size[1]} but image id {image_id} in {path} says "
                    f"{width}x{height}"
                )
        records[image_id] = DetectionRecord(
            file_path,
            image_id,
            width=None if width is None else int(width),
            height=None if height is None else int(height),
        )

    boxes: dict[int, list[list[float]]] = {i: [] for i in records}
    labels: dict[int, list[int]] = {i: [] for i in records}
    for ann in data.get("annotations") or []:
        if not isinstance(ann, dict):
            raise DataValidationError(f"{path}: annotation {ann!r} is not an object")
        ann_id = ann.get("id", "?")
        where = f"{path}: annotation id {ann_id}"
        image_id = ann.get("image_id")
        if image_id not in records:
            raise DataValidationError(f"{where}: image_id {image_id} is not in 'images'")
        category = ann.get("category_id")
        if category not in label_of:
            raise DataValidationError(f"{where}: category_id {category} is not in 'categories' {ids}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list | tuple) and len(bbox) == 4):
            raise DataValidationError(f"{where}: bbox {bbox!r} is not [x, y, width, height]")
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError) as err:
            raise DataValidationError(
                f"{where}: bbox {list(bbox)} holds a non-number; expected 4 numbers [x, y, width, height]"
            ) from err
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            raise DataValidationError(f"{where}: bbox {list(bbox)} holds NaN or infinity")
        if not (w > 0 and h > 0):
            raise DataValidationError(f"{where}: bbox {list(bbox)} has non-positive width or height")
        record = records[image_id]
        if record.width is not None and (x >= record.width or y >= record.height or x + w <= 0 or y + h <= 0):
            raise DataValidationError(
                f"{where}: bbox {list(bbox)} lies outside its {record.width}x{record.height} image"
            )
        if ann.get("iscrowd", 0):
            continue  # checked, but crowd regions are not objects to detect
        boxes[image_id].append([x, y, x + w, y + h])
        labels[image_id].append(label_of[category])
    for image_id, record in records.items():
        record.boxes = np.asarray(boxes[image_id], np.float32).reshape(-1, 4)
        record.labels = np.asarray(labels[image_id], np.int64)
    return list(records.values()), ids, names


class CocoDetectionDataModule(ConvDataModule):
    """Object detection from COCO json files (``images`` folder + ``annotations`` json per split).

    ``images``/``annotations`` give the training split; ``val_*``/``test_*`` give the others (their
    images folder defaults to ``images``). A split without annotations is carved from the training
    images by ``val_fraction`` / ``test_fraction`` (seeded). See the ``coco`` module for the rules
    on category ids, crowd annotations, clipping and empty images; after the transforms, a box is
    dropped when less than ``min_visibility`` of its area stays in the image or its area falls below
    ``min_area`` square pixels.

    Batches: ``(list of float32 [C, H, W] images, list of dict(boxes=float32 [K, 4] xyxy pixels,
    labels=int64 [K] 0-based, image_id=int64 scalar, orig_size=int64 [2] file height/width))``.

    Args:
        images: folder of training images (``file_name`` entries are relative to it).
        annotations: training COCO json.
        val_images, val_annotations, test_images, test_annotations: the other splits.
        val_fraction, test_fraction: shares carved from training images for splits without a json.
        category_ids: fix the label order (label i = category_ids[i]); default: sorted json ids.
        image_size: output side (``resize="letterbox"`` keeps the aspect ratio); ``None`` keeps sizes.
        batch_size: images per batch.
        **kwargs: the loader, transform and normalisation arguments of :class:`ConvDataModule`, and
            ``min_visibility``, ``min_area`` (the box dropping rule above).

    Example (not run by the doctests: it needs COCO on disk):
        >>> dm = CocoDetectionDataModule(  # doctest: +SKIP
        ...     images="coco/train2017",
        ...     annotations="coco/annotations/instances_train2017.json",
        ...     val_images="coco/val2017",
        ...     val_annotations="coco/annotations/instances_val2017.json",
        ... )
        >>> dm.num_classes, dm.category_ids[:3]  # doctest: +SKIP
        (80, [1, 2, 3])
    """

    task = "detection"

    def __init__(
        self,
        images: str,
        annotations: str,
        val_images: str | None = None,
        val_annotations: str | None = None,
        test_images: str | None = None,
        test_annotations: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        category_ids: list[int] | None = None,
        image_size: int | None = 512,
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_size=image_size, batch_size=batch_size, **kwargs)
        self.sources = {
            "train": (Path(images), Path(annotations)),
            "val": (Path(val_images or images), Path(val_annotations)) if val_annotations else None,
            "test": (Path(test_images or images), Path(test_annotations)) if test_annotations else None,
        }
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self._category_ids = None if category_ids is None else [int(i) for i in category_ids]

    @property
    def category_ids(self) -> list[int]:
        """COCO category id of each label (label ``i`` is ``category_ids[i]``)."""
        if self._category_ids is None:
            self._category_ids, self._class_names = coco_categories(self.sources["train"][1])
        return list(self._category_ids)

    def resolve_class_names(self) -> Sequence[str]:
        ids = self.category_ids
        if self._class_names is not None:
            return self._class_names
        json_ids, json_names = coco_categories(self.sources["train"][1])
        by_id = dict(zip(json_ids, json_names))
        return [by_id.get(i, str(i)) for i in ids]

    def build_datasets(self, splits: Sequence[str]) -> None:
        images, annotations = self.sources["train"]
        outside = self.allow_symlinks_outside_root
        records = {
            "train": load_coco_records(annotations, images, self.verify_images, self.category_ids, outside)[0]
        }
        for split in ("val", "test"):
            source = self.sources[split]
            if source is not None:
                records[split] = load_coco_records(
                    source[1], source[0], self.verify_images, self.category_ids, outside
                )[0]
        carve_splits(records, self.fractions, self.seed)

        def make(split: str, split_records: Sequence[DetectionRecord]) -> DetectionDataset:
            return DetectionDataset(split_records, self.pipeline(split == "train"), self.in_channels)

        self.assign_datasets(splits, records, make, annotations)
