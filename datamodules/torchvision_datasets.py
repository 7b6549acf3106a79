"""Wrappers over torchvision's CIFAR-10 and Pascal VOC segmentation datasets (albumentations pipelines).

They download only when ``download=True`` (in ``prepare_data``, so once per node); otherwise a missing
dataset raises a :class:`DataValidationError` naming the root folder and what it should contain.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .base import ConvDataModule, stratified_split
from .datasets import _SeededTransformMixin
from .io import DataValidationError, check_mask_values, convert_channels

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip


class _PilPairDataset(_SeededTransformMixin, Dataset):
    """Apply an albumentations pipeline to a torchvision dataset of ``(PIL image, label or PIL mask)``."""

    def __init__(
        self,
        base: Any,
        transform: Any,
        in_channels: int,
        segmentation: bool = False,
        num_classes: int = 0,
        ignore_index: int = 255,
    ) -> None:
        self.base, self.transform, self.in_channels = base, transform, in_channels
        self.segmentation, self.num_classes, self.ignore_index = segmentation, num_classes, ignore_index

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        index = self._take(index)
        image, target = self.base[index]
        image = convert_channels(image, self.in_channels)
        if not self.segmentation:
            return self.transform(image=image)["image"], int(target)
        mask = np.array(target)  # palette indices
        check_mask_values(mask, self.num_classes, self.ignore_index, f"{type(self.base).__name__}[{index}]")
        out = self.transform(image=image, mask=mask)
        return out["image"], torch.as_tensor(np.asarray(out["mask"])).long()


def _open(factory: Any, root: Path, what: str, expected: str, **kwargs: Any) -> Any:
    try:
        return factory(root=str(root), download=False, **kwargs)
    except RuntimeError as err:
        raise DataValidationError(
            f"{root}: {what} not found or incomplete (expected {expected}); pass download=True to fetch it"
        ) from err


class CIFAR10DataModule(ConvDataModule):
    """CIFAR-10 (torchvision) with albumentations; the validation split is carved from the training set.

    Batches: ``(images float32 [N, 3, 32, 32], labels int64 [N])``; test = the official test set.

    Args:
        root: folder holding (or receiving) ``cifar-10-batches-py``.
        download: fetch the data in ``prepare_data`` when missing (needs network access).
        val_fraction: share of the 50 000 training images held out for validation (per class, seeded).
        image_size: output side (32 keeps the native size).
        batch_size: images per batch.
        **kwargs: the loader, transform and normalisation arguments of :class:`ConvDataModule`
            (default mean/std: CIFAR-10's).

    Example (not run by the doctests: it downloads CIFAR-10):
        >>> dm = CIFAR10DataModule("data/cifar10", download=True, batch_size=128)  # doctest: +SKIP
    """

    task = "classification"
    default_mean = CIFAR10_MEAN
    default_std = CIFAR10_STD

    def __init__(
        self,
        root: str = "data/cifar10",
        download: bool = False,
        val_fraction: float = 0.1,
        image_size: int | None = 32,
        batch_size: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_size=image_size, batch_size=batch_size, **kwargs)
        self.root = Path(root).expanduser()
        self.download = download
        self.val_fraction = val_fraction
        self._class_names = list(CIFAR10_CLASSES)

    def prepare_data(self) -> None:
        """Download CIFAR-10 when ``download=True``."""
        if self.download:
            from torchvision.datasets import CIFAR10

            for train in (True, False):
                CIFAR10(root=str(self.root), train=train, download=True)

    def build_datasets(self, splits: Sequence[str]) -> None:
        from torchvision.datasets import CIFAR10

        expected = f"{self.root / 'cifar-10-batches-py'}"
        if {"train", "val"} & set(splits):
            base = _open(CIFAR10, self.root, "CIFAR-10", expected, train=True)
            train_idx, val_idx = stratified_split(base.targets, [self.val_fraction], self.seed)
            for split, idx in (("train", train_idx), ("val", val_idx)):
                wrapped = _PilPairDataset(base, self.pipeline(split == "train"), self.in_channels)
                setattr(self, f"{split}_dataset", Subset(wrapped, idx.tolist()))
        if "test" in splits:
            base = _open(CIFAR10, self.root, "CIFAR-10", expected, train=False)
            self.test_dataset = _PilPairDataset(base, self.pipeline(False), self.in_channels)


class VOCSegmentationDataModule(ConvDataModule):
    """Pascal VOC semantic segmentation (torchvision): 21 classes (0 = background), 255 = ignore.

    VOC's test masks are not public, so ``test`` uses the official ``val`` set (as papers do).
    Batches: ``(images float32 [N, 3, S, S], masks int64 [N, S, S])``.

    Args:
        root: folder holding (or receiving) ``VOCdevkit/VOC<year>``.
        year: VOC release (``"2012"`` by default).
        download: fetch the data in ``prepare_data`` when missing (about 2 GB).
        image_size: output side.
        batch_size: images per batch.
        **kwargs: the loader, transform and normalisation arguments of :class:`ConvDataModule`
            (default mean/std: ImageNet's; ``ignore_index`` must stay 255, VOC's border value).

    Example (not run by the doctests: it downloads Pascal VOC, about 2 GB):
        >>> dm = VOCSegmentationDataModule("data/voc", download=True, image_size=256)  # doctest: +SKIP
    """

    task = "segmentation"

    def __init__(
        self,
        root: str = "data/voc",
        year: Literal["2007", "2008", "2009", "2010", "2011", "2012"] = "2012",
        download: bool = False,
        image_size: int | None = 256,
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("ignore_index", 255) != 255:
            raise ValueError(
                f"VOCSegmentationDataModule: ignore_index must be 255 (VOC masks mark object borders with "
                f"255), got {kwargs['ignore_index']}"
            )
        super().__init__(image_size=image_size, batch_size=batch_size, **kwargs)
        self.root = Path(root).expanduser()
        self.year = year
        self.download = download
        self._class_names = list(VOC_CLASSES)

    def prepare_data(self) -> None:
        """Download the VOC release when ``download=True``."""
        if self.download:
            from torchvision.datasets import VOCSegmentation

            VOCSegmentation(root=str(self.root), year=self.year, image_set="train", download=True)

    def build_datasets(self, splits: Sequence[str]) -> None:
        from torchvision.datasets import VOCSegmentation

        expected = f"{self.root / 'VOCdevkit' / f'VOC{self.year}'} with JPEGImages/ and SegmentationClass/"
        for split in splits:
            image_set = "train" if split == "train" else "val"
            base = _open(
                VOCSegmentation, self.root, f"VOC{self.year}", expected, year=self.year, image_set=image_set
            )
            dataset = _PilPairDataset(
                base,
                self.pipeline(split == "train"),
                self.in_channels,
                True,
                self.num_classes,
                self.ignore_index,
            )
            setattr(self, f"{split}_dataset", dataset)
