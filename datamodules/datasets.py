"""torch Datasets over files on disk: labelled images, image/mask pairs, COCO detection records, and the
unlabelled images of a predict folder (loaded, or :class:`StreamedImage` items the tasks read window by
window).

They hold lists of paths (built and checked by the data modules) and decode one example per
``__getitem__``, so the same code serves the generated shapes and real datasets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .io import DataValidationError, check_mask_values, load_image, load_mask
from .sampling import SeededIndex


class _SeededTransformMixin:
    """Reseed an albumentations pipeline from torch's per-process seed.

    albumentations 2 keeps its own RNG, seeded once at construction: forked DataLoader workers would all
    replay the same augmentations, and ``seed_everything`` would not make runs repeatable. Reseeding from
    ``torch.initial_seed()`` (distinct per worker, derived from the global seed) fixes both.
    """

    transform: Callable[..., dict[str, Any]] | None
    _seed_key: tuple[int, int] | None = None
    # The training sampler (sampling.ResumableSampler) may hand out (index, augmentation seed) pairs.
    accepts_seeded_index = True

    def _take(self, index: int | SeededIndex) -> int:
        """The plain index; seed the augmentations from a :class:`SeededIndex`, else per process."""
        if isinstance(index, tuple):
            index, seed = index
            if self.transform is not None and hasattr(self.transform, "set_random_seed"):
                self.transform.set_random_seed(int(seed))
            return int(index)
        self._reseed()
        return index

    def _reseed(self) -> None:
        if self.transform is None or not hasattr(self.transform, "set_random_seed"):
            return
        info = get_worker_info()
        key = (info.id if info is not None else -1, torch.initial_seed())
        if key != self._seed_key:
            self._seed_key = key
            self.transform.set_random_seed(torch.initial_seed() % 2**32)


class ClassificationDataset(_SeededTransformMixin, Dataset):
    """``(image, label)`` pairs from ``(path, class index)`` samples.

    Args:
        samples: image paths and their 0-based class index.
        transform: an albumentations pipeline ending in ``ToTensorV2`` (called with ``image=``).
        in_channels: 1 or 3; images are converted on load.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        transform: Callable[..., dict[str, Any]] | None = None,
        in_channels: int = 3,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.in_channels = in_channels

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        """Label of every sample, in order."""
        return [label for _, label in self.samples]

    def __getitem__(self, index: int | SeededIndex) -> tuple[torch.Tensor, int]:
        index = self._take(index)
        path, label = self.samples[index]
        image = load_image(path, self.in_channels)
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return image, label


class SegmentationDataset(_SeededTransformMixin, Dataset):
    """``(image, mask)`` pairs; masks come back as int64 ``H x W`` tensors.

    Args:
        pairs: ``(image path, mask path)`` tuples.
        num_classes: mask values must be ``< num_classes`` or equal ``ignore_index``.
        transform: albumentations pipeline (called with ``image=`` and ``mask=``).
        in_channels: 1 or 3.
        ignore_index: the value meaning "no label" (kept through the transforms).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        num_classes: int,
        transform: Callable[..., dict[str, Any]] | None = None,
        in_channels: int = 3,
        ignore_index: int | None = 255,
    ) -> None:
        self.pairs = list(pairs)
        self.num_classes = num_classes
        self.transform = transform
        self.in_channels = in_channels
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int | SeededIndex) -> tuple[torch.Tensor, torch.Tensor]:
        index = self._take(index)
        image_path, mask_path = self.pairs[index]
        image = load_image(image_path, self.in_channels)
        mask = load_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise DataValidationError(
                f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image "
                f"{image_path} size {image.shape[1]}x{image.shape[0]} (width x height)"
            )
        check_mask_values(mask, self.num_classes, self.ignore_index, mask_path)
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return image, torch.as_tensor(np.asarray(mask)).long()


class ImageListDataset(Dataset):
    """Unlabelled images for ``predict``: the files of a folder, in order, without targets.

    An item is the transformed image (``float32 [C, H, W]``); with ``detection=True`` it is
    ``(image, target)`` where ``target`` holds no boxes (``boxes`` ``[0, 4]``, ``labels`` ``[0]``) but the
    ``image_id`` (the file's position in ``paths``) and ``orig_size`` (``[height, width]`` of the file),
    so that detections can be mapped back to the file's pixels and file. ``paths`` names the files (the
    prediction writers name their rows and masks after them).

    Args:
        paths: the image files.
        transform: an albumentations pipeline ending in ``ToTensorV2`` (called with ``image=``, plus empty
            ``bboxes``/``labels`` for detection).
        in_channels: 1 or 3; images are converted on load.
        detection: return ``(image, target)`` pairs (the detection batch convention) instead of images.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from PIL import Image
        >>> folder = Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (5, 4)).save(folder / "a.png")
        >>> dataset = ImageListDataset([folder / "a.png"])
        >>> dataset[0].shape, dataset.paths[0].name
        (torch.Size([3, 4, 5]), 'a.png')
    """

    def __init__(
        self,
        paths: Sequence[Path],
        transform: Callable[..., dict[str, Any]] | None = None,
        in_channels: int = 3,
        detection: bool = False,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        self.in_channels = in_channels
        self.detection = detection

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Any:
        path = self.paths[index]
        image = load_image(path, self.in_channels)
        height, width = image.shape[:2]
        if self.transform is not None:
            if self.detection:
                no_boxes = np.zeros((0, 4), np.float32)
                image = self.transform(image=image, bboxes=no_boxes, labels=np.zeros((0,), np.int64))["image"]
            else:
                image = self.transform(image=image)["image"]
        if not isinstance(image, torch.Tensor):
            image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
        if not self.detection:
            return image
        target = {
            "boxes": torch.zeros((0, 4), dtype=torch.float32),
            "labels": torch.zeros((0,), dtype=torch.int64),
            "image_id": torch.tensor(index, dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }
        return image, target


@dataclass
class DetectionRecord:
    """One image of a detection dataset: boxes in xyxy pixels, 0-based labels."""

    path: Path
    image_id: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    width: int | None = None
    height: int | None = None


class DetectionDataset(_SeededTransformMixin, Dataset):
    """``(image, target)`` pairs for detection.

    ``target`` is ``dict(boxes=float32 [K, 4] xyxy pixels of the transformed image, labels=int64 [K],
    image_id=int64 scalar (the COCO id), orig_size=int64 [2] (height, width of the file))``.

    Args:
        records: the images and their boxes (see :class:`DetectionRecord`).
        transform: albumentations pipeline with ``BboxParams(format="pascal_voc", label_fields=["labels"])``.
        in_channels: 1 or 3.
    """

    def __init__(
        self,
        records: Sequence[DetectionRecord],
        transform: Callable[..., dict[str, Any]] | None = None,
        in_channels: int = 3,
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.in_channels = in_channels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int | SeededIndex) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index = self._take(index)
        record = self.records[index]
        image = load_image(record.path, self.in_channels)
        height, width = image.shape[:2]
        if record.width is not None and (record.width, record.height) != (width, height):
            raise DataValidationError(
                f"{record.path}: image is {width}x{height} but its annotation (image id "
                f"{record.image_id}) says {record.width}x{record.height}"
            )
        # Clip to the frame first: COCO boxes often overshoot the border by a fraction of a pixel.
        boxes = record.boxes.astype(np.float32).reshape(-1, 4).copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        labels = record.labels.astype(np.int64).reshape(-1)
        if self.transform is not None:
            out = self.transform(image=image, bboxes=boxes, labels=labels)
            image, boxes, labels = out["image"], out["bboxes"], out["labels"]
        target = {
            "boxes": torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4),
            "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64)).reshape(-1),
            "image_id": torch.tensor(record.image_id, dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }
        return image, target


def detection_collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]],
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Collate detection examples as lists (images may differ in size, targets in box count)."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


class StreamedImage:
    """A ``predict_dir`` image the data module does not load: the task reads it window by window (what the
    segmentation and detection tasks do for a TIFF or Zarr file: they never hold the whole image, mask
    or detections).

    Attributes:
        path: the file (or ``.zarr`` folder).
        index: its position in the folder.
        in_channels, mean, std: what the loaded images get: channels and normalisation (0..1 scale).

    Example:
        >>> StreamedImage("slide.tif", 0, 3, (0.5,) * 3, (0.25,) * 3).path.name
        'slide.tif'
    """

    def __init__(
        self, path: str | Path, index: int, in_channels: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.path = Path(path)
        self.index = int(index)
        self.in_channels = int(in_channels)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __repr__(self) -> str:
        return f"StreamedImage({str(self.path)!r}, index={self.index})"


class PredictImages:
    """The ``predict_dir`` dataset when it holds streamed images: item ``i`` is a :class:`StreamedImage`
    for a TIFF or Zarr file, else the loaded item of ``dataset`` (an ``ImageListDataset``).
    :func:`collate_predict` makes one-item batches of them.

    Args:
        dataset: the dataset of every file (its ``paths``).
        streamed: per file, whether it is streamed.
        mean, std: the normalisation the streamed images get.
        collate: how the loaded items are batched (``None``: ``default_collate``; detection:
            :func:`detection_collate`).
    """

    streams_images = True

    def __init__(
        self,
        dataset: Any,
        streamed: Sequence[bool],
        mean: Sequence[float],
        std: Sequence[float],
        collate: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self.dataset = dataset
        self.streamed = list(streamed)
        self.mean, self.std = tuple(mean), tuple(std)
        self.collate = collate

    def collate_fn(self, items: list[Any]) -> Any:
        """:func:`collate_predict` with this dataset's collation of loaded items."""
        return collate_predict(items, self.collate)

    @property
    def paths(self) -> list[Path]:
        """The files, in order (the writers name their outputs after them)."""
        return list(self.dataset.paths)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        if self.streamed[index]:
            return StreamedImage(
                self.dataset.paths[index], index, self.dataset.in_channels, self.mean, self.std
            )
        return self.dataset[index]


def collate_predict(items: list[Any], collate: Callable[[list[Any]], Any] | None = None) -> Any:
    """A batch of :class:`PredictImages` items: a streamed image alone as itself, else ``collate``
    (default: ``default_collate``)."""
    if any(isinstance(item, StreamedImage) for item in items):
        if len(items) != 1:
            raise ValueError("streamed images are predicted one per batch (batch_size=1)")
        return items[0]
    if collate is not None:
        return collate(items)
    from torch.utils.data import default_collate

    return default_collate(items)
