"""LightningModules: :class:`ImageClassifier`, :class:`SemanticSegmenter`, :class:`ObjectDetector` and their
shared base :class:`ConvNetTask` (``base``: the contract and the steps; ``nonfinite``, ``fused_predict``,
``finetuning``, ``optim``, ``samples``, ``state``: one concept each, see ``docs/architecture.md``).

Importing this package also imports the prediction writers, so the CLI knows them by their short names
(``--trainer.callbacks+=MaskPNGWriter``).
"""

from lightning_convnets.backbones.registry import resolve_backbone
from lightning_convnets.predict.writers import ClassProbabilitiesWriter, CocoResultsWriter, MaskPNGWriter
from lightning_convnets.tasks.base import ConvNetTask
from lightning_convnets.tasks.classification import ImageClassifier
from lightning_convnets.tasks.detection import ObjectDetector
from lightning_convnets.tasks.nonfinite import NonFiniteLossError
from lightning_convnets.tasks.optim import WarmupCosineLR
from lightning_convnets.tasks.segmentation import SemanticSegmenter

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
