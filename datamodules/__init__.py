"""Data modules for lightning-convnets (installed as ``lightning_convnets.datamodules``).

Start with :class:`ConvDataModule` (``base.py``): the arguments every module shares, the loaders and
the metadata the tasks read (``num_classes``, ``class_names``, ``in_channels``, ``mean``, ``std``,
``num_train_examples``). Then one module per source: ``folders.py``, ``coco.py``, ``shapes.py`` (generated,
no download), ``torchvision_datasets.py``; ``transforms.py`` builds the albumentations pipelines.
The batch each task expects, the checks run in ``setup`` and the transform specs: ``docs/data.md``.
"""

from .base import ConvDataModule, auto_num_workers, carve_splits
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
    "auto_num_workers",
    "build_pipeline",
    "carve_splits",
]
