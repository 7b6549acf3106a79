"""Data modules for lightning-convnets (installed as ``lightning_convnets.datamodules``).

Batch conventions (every task relies on them):

- classification: ``(images, labels)``: ``images`` float32 ``[N, C, H, W]`` normalised with the module's
  ``mean``/``std``; ``labels`` int64 ``[N]``, 0-based.
- segmentation: ``(images, masks)``: ``masks`` int64 ``[N, H, W]`` holding class indices, and
  ``ignore_index`` (default 255) for unlabelled pixels (also the fill of padded areas).
- detection: ``(images, targets)`` collated as lists: ``images[i]`` float32 ``[C, H, W]``,
  ``targets[i] = dict(boxes=float32 [K, 4] xyxy pixels, labels=int64 [K] 0-based, image_id=int64 scalar,
  orig_size=int64 [2] (height, width of the file))``; an image without objects has ``boxes`` ``[0, 4]``.

Every module exposes ``num_classes``, ``class_names``, ``in_channels``, ``mean``, ``std`` (from the
constructor arguments, or from a cheap scan of folder names / json categories) and
``num_train_examples`` (after ``setup``; before it for shapes); detection modules also ``category_ids``
(the COCO id of each label). ``check_num_classes(n)`` raises when a model's class count disagrees.
Files are checked in ``setup`` (``verify_images``), so bad data fails before training with a
:class:`DataValidationError` naming the file or annotation.

Transforms: see :mod:`lightning_convnets.datamodules.transforms` (presets, albumentations dicts, lists of
``class_path`` specs).
"""

from .base import ConvDataModule
from .coco import CocoDetectionDataModule
from .folders import ImageFolderDataModule, SegmentationFolderDataModule
from .io import DataValidationError
from .shapes import ShapesDataModule
from .torchvision_datasets import CIFAR10DataModule, VOCSegmentationDataModule
from .transforms import build_pipeline

__all__ = [
    "CIFAR10DataModule",
    "CocoDetectionDataModule",
    "ConvDataModule",
    "DataValidationError",
    "ImageFolderDataModule",
    "SegmentationFolderDataModule",
    "ShapesDataModule",
    "VOCSegmentationDataModule",
    "build_pipeline",
]
