"""lightning-convnets: a PyTorch Lightning 2 plugin for convolutional networks.

``import lightning_convnets`` stays light: the tasks (and with them Lightning and torchmetrics) load on
first access, e.g. ``lightning_convnets.ImageClassifier``.
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ImageClassifier": "lightning_convnets.tasks.classification",
    "ObjectDetector": "lightning_convnets.tasks.detection",
    "SemanticSegmenter": "lightning_convnets.tasks.segmentation",
}

__all__ = ["ImageClassifier", "ObjectDetector", "SemanticSegmenter", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_convnets' has no attribute {name!r}")
