"""LightningModules: :class:`ImageClassifier`, :class:`SemanticSegmenter` and their shared base.

Importing this package also imports the prediction writers, so the CLI knows them by their short names
(``--trainer.callbacks+=MaskPNGWriter``).
"""

from lightning_convnets.detection_writers import CocoResultsWriter
from lightning_convnets.tasks.base import ConvNetTask, NonFiniteLossError, WarmupCosineLR, resolve_backbone
from lightning_convnets.tasks.classification import ImageClassifier
from lightning_convnets.tasks.detection import ObjectDetector
from lightning_convnets.tasks.segmentation import SemanticSegmenter
from lightning_convnets.writers import ClassProbabilitiesWriter, MaskPNGWriter

__all__ = [
    "ClassProbabilitiesWriter",
    "CocoResultsWriter",
    "ConvNetTask",
    "ImageClassifier",
    "MaskPNGWriter",
    "NonFiniteLossError",
    "ObjectDetector",
    "SemanticSegmenter",
    "WarmupCosineLR",
    "resolve_backbone",
]
