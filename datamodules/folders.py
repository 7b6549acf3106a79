"""Data modules over plain folders: class-per-folder images, and image/mask pairs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import ConvDataModule, carve_splits
from .datasets import ClassificationDataset, SegmentationDataset
from .io import (
    IMAGE_EXTENSIONS,
    DataValidationError,
    check_inside_root,
    check_mask_values,
    list_images,
    load_mask,
    verify_image,
)

SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


def _find_split_dir(root: Path, split: str) -> Path | None:
    for name in SPLIT_NAMES[split]:
        if (root / name).is_dir():
            return root / name
    return None


def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise DataValidationError(f"{path}: {what} not found")
    if not path.is_dir():
        raise DataValidationError(f"{path}: {what} is not a directory")


def _dataset_root(module: ImageFolderDataModule | SegmentationFolderDataModule) -> Path:
    """``module.root``, checked: a directory."""
    if module.root is None:
        raise DataValidationError(
            f"{type(module).__name__}: root is not set; the training, validation and test images (and the "
            "class names unless given) are read from the dataset folder: pass root (only predict with "
            "predict_dir and the class names given works without it)"
        )
    _require_dir(module.root, "dataset root")
    return module.root


def class_folders(folder: Path) -> list[str]:
    """Sorted names of the (non-hidden) subfolders of ``folder``: one class each."""
    _require_dir(folder, "image folder")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataValidationError(
            f"{folder}: empty folder, no class subfolders (expected one subfolder of images per class)"
        )
    return names


def scan_class_folders(
    folder: Path, class_names: Sequence[str], require_every_class: bool = True
) -> list[tuple[Path, int]]:
    """``(path, label)`` samples of a class-per-folder tree, labels by position in ``class_names``.

    Raises:
        DataValidationError: for a missing/empty folder, a folder not in ``class_names``, or (when
            ``require_every_class``) a class folder without images.
    """
    found = class_folders(folder)
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise DataValidationError(
            f"{folder}: class folders {unknown} are not among the classes {list(class_names)}"
        )
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(class_names):
        class_dir = folder / name
        images = list_images(class_dir) if class_dir.is_dir() else []
        if not images and require_every_class:
            raise DataValidationError(
                f"{class_dir}: empty class folder, no images (extensions {', '.join(IMAGE_EXTENSIONS)})"
            )
        samples += [(path, label) for path in images]
    if not samples:
        raise DataValidationError(f"{folder}: empty folder, no images in any class folder")
    return samples


def scan_segmentation_folder(
    folder: Path, images_dir: str = "images", masks_dir: str = "masks"
) -> list[tuple[Path, Path]]:
    """``(image, mask)`` pairs of ``folder/images`` and ``folder/masks`` matched by file stem."""
    image_root, mask_root = folder / images_dir, folder / masks_dir
    _require_dir(image_root, "images folder")
    _require_dir(mask_root, "masks folder")
    images = list_images(image_root)
    if not images:
        raise DataValidationError(f"{image_root}: empty folder, no images")
    masks: dict[str, Path] = {}
    for path in list_images(mask_root):
        if path.stem in masks:
            raise DataValidationError(f"{path}: two masks share the stem {path.stem!r} ({masks[path.stem]})")
        masks[path.stem] = path
    pairs, seen = [], set()
    for image in images:
        if image.stem in seen:
            raise DataValidationError(f"{image}: two images share the stem {image.stem!r}")
        seen.add(image.stem)
        if image.stem not in masks:
            raise DataValidationError(f"{image}: missing mask (expected {mask_root / image.stem}.png)")
        pairs.append((image, masks[image.stem]))
    return pairs


class ImageFolderDataModule(ConvDataModule):
    """Classification from a class-per-folder tree.

    Layouts: ``root/train/<class>/*.png`` with optional ``root/val`` (or ``valid``, ``validation``) and
    ``root/test``; or ``root/<class>/*.png``. A split without its own folder is carved out of the
    training images by ``val_fraction`` / ``test_fraction`` (per class, seeded by ``seed``).
    Batches: ``(images float32 [N, C, H, W] normalised, labels int64 [N])``.

    Args:
        root: the dataset folder; ``None`` only to predict ``predict_dir`` images with ``class_names``
            given.
        class_names: fix the classes and their order (default: sorted training folder names).
        val_fraction: share of training images held out for validation when there is no val folder.
        test_fraction: same for the test split (0 means no test split).
        image_size: output side in pixels (mixed sizes are resized).
        **kwargs: the loader, transform and normalisation arguments of :class:`ConvDataModule`
            (default mean/std: ImageNet).

    Example (not run by the doctests: it needs an image folder):
        >>> dm = ImageFolderDataModule("data/pets", image_size=64, batch_size=16)  # doctest: +SKIP
        >>> dm.setup("fit"); images, labels = next(iter(dm.train_dataloader()))  # doctest: +SKIP
    """

    task = "classification"

    def __init__(
        self,
        root: str | None = None,
        class_names: list[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        image_size: int | None = 224,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_size=image_size, **kwargs)
        self.root = Path(root).expanduser() if root is not None else None
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self._fixed_classes = class_names is not None
        if class_names is not None:
            if len(set(class_names)) != len(class_names) or not class_names:
                raise ValueError(f"class_names must be non-empty and unique, got {class_names}")
            self._class_names = list(class_names)

    def _train_dir(self) -> Path:
        root = _dataset_root(self)
        return _find_split_dir(root, "train") or root

    def resolve_class_names(self) -> Sequence[str]:
        return class_folders(self._train_dir())

    def _split_samples(self) -> dict[str, list[tuple[Path, int]]]:
        train_dir = self._train_dir()
        names = self.class_names
        samples = {"train": scan_class_folders(train_dir, names, require_every_class=not self._fixed_classes)}
        for split in ("val", "test"):
            folder = _find_split_dir(self.root, split) if train_dir != self.root else None
            if folder is not None:
                samples[split] = scan_class_folders(folder, names, require_every_class=False)
        fractions = {"val": self.val_fraction, "test": self.test_fraction}
        return carve_splits(samples, fractions, self.seed, label=lambda sample: sample[1])

    def build_datasets(self, splits: Sequence[str]) -> None:
        def make(split: str, samples: Sequence[tuple[Path, int]]) -> ClassificationDataset:
            for path, _ in samples:
                check_inside_root(path, self.root, self.allow_symlinks_outside_root, "image")
            if self.verify_images:
                for path, _ in samples:
                    verify_image(path)
            return ClassificationDataset(samples, self.pipeline(split == "train"), self.in_channels)

        self.assign_datasets(splits, self._split_samples(), make, self.root)


class SegmentationFolderDataModule(ConvDataModule):
    """Semantic segmentation from ``images/`` and ``masks/`` folders with matching file stems.

    Layouts: ``root/{train,val,test}/{images,masks}`` or ``root/{images,masks}``; a split without its
    folder is carved from the training pairs by ``val_fraction`` / ``test_fraction`` (seeded).
    Masks hold one class index per pixel: palette PNGs (their indices, as in VOC) or single-channel
    PNGs; ``ignore_index`` marks unlabelled pixels (VOC's 255 borders).
    Batches: ``(images float32 [N, C, H, W] normalised, masks int64 [N, H, W])``.

    Args:
        root: the dataset folder; ``None`` only to predict ``predict_dir`` images with ``class_names``
            or ``num_classes`` given.
        class_names: names in index order; or give ``num_classes`` (names ``class_0``...); with neither,
            the classes are inferred as ``0..max mask value`` (ignoring ``ignore_index``) in ``setup``.
        num_classes: number of classes when names are not given.
        ignore_index: mask value meaning "no label" (also the fill of padded mask areas).
        images_dir, masks_dir: the subfolder names.
        val_fraction, test_fraction: shares carved from training pairs for splits without a folder.
        image_size: output side in pixels.
        batch_size: pairs per batch.
        **kwargs: the loader, transform and normalisation arguments of :class:`ConvDataModule`.

    Example (not run by the doctests: it needs an image/mask folder):
        >>> dm = SegmentationFolderDataModule("data/roads", class_names=["bg", "road"])  # doctest: +SKIP
    """

    task = "segmentation"

    def __init__(
        self,
        root: str | None = None,
        class_names: list[str] | None = None,
        num_classes: int | None = None,
        ignore_index: int = 255,
        images_dir: str = "images",
        masks_dir: str = "masks",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        image_size: int | None = 256,
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_size=image_size, batch_size=batch_size, ignore_index=ignore_index, **kwargs)
        self.root = Path(root).expanduser() if root is not None else None
        self.images_dir, self.masks_dir = images_dir, masks_dir
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} entries but num_classes={num_classes}")
        if class_names is not None:
            self._class_names = list(class_names)
        elif num_classes is not None:
            self._class_names = [f"class_{i}" for i in range(num_classes)]

    def _split_pairs(self) -> dict[str, list[tuple[Path, Path]]]:
        root = _dataset_root(self)
        train_dir = _find_split_dir(root, "train")
        pairs = {"train": scan_segmentation_folder(train_dir or root, self.images_dir, self.masks_dir)}
        for split in ("val", "test"):
            folder = _find_split_dir(root, split) if train_dir is not None else None
            if folder is not None:
                pairs[split] = scan_segmentation_folder(folder, self.images_dir, self.masks_dir)
        return carve_splits(pairs, {"val": self.val_fraction, "test": self.test_fraction}, self.seed)

    def resolve_class_names(self) -> Sequence[str]:
        # Without names, the classes are what the masks hold: read every training mask once.
        top = -1
        for _, mask_path in self._split_pairs()["train"]:
            mask = load_mask(mask_path)
            valid = mask[mask != self.ignore_index]
            if valid.size:
                top = max(top, int(valid.max()))
        return [f"class_{i}" for i in range(max(top + 1, 1))]

    def build_datasets(self, splits: Sequence[str]) -> None:
        num_classes = self.num_classes

        def make(split: str, pairs: Sequence[tuple[Path, Path]]) -> SegmentationDataset:
            for image, mask in pairs:
                check_inside_root(image, self.root, self.allow_symlinks_outside_root, "image")
                check_inside_root(mask, self.root, self.allow_symlinks_outside_root, "mask")
            if self.verify_images:
                verify_pairs(pairs, num_classes, self.ignore_index)
            pipeline = self.pipeline(split == "train")
            return SegmentationDataset(pairs, num_classes, pipeline, self.in_channels, self.ignore_index)

        self.assign_datasets(splits, self._split_pairs(), make, self.root)


def verify_pairs(pairs: Sequence[tuple[Path, Path]], num_classes: int, ignore_index: int | None) -> None:
    """Check image headers, mask readability, mask/image sizes and mask values of every pair."""
    for image_path, mask_path in pairs:
        width, height = verify_image(image_path)
        mask = load_mask(mask_path)
        if mask.shape != (height, width):
            raise DataValidationError(
                f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image "
                f"{image_path} size {width}x{height} (width x height)"
            )
        check_mask_values(np.asarray(mask), num_classes, ignore_index, mask_path)
