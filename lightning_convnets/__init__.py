"""lightning-convnets: a PyTorch Lightning 2 plugin for convolutional networks.

``import lightning_convnets`` stays light: the tasks (and with them Lightning and torchmetrics) load on
first access, e.g. ``lightning_convnets.ImageClassifier``. Importing it installs two narrow filters for
third-party noise on every documented run (:func:`install_warning_filters`).
"""

import logging
import warnings
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ImageClassifier": "lightning_convnets.tasks.classification",
    "ObjectDetector": "lightning_convnets.tasks.detection",
    "SemanticSegmenter": "lightning_convnets.tasks.segmentation",
}

__all__ = ["ImageClassifier", "ObjectDetector", "SemanticSegmenter", "__version__", "install_warning_filters"]

# torch's deprecation notice for `isinstance(x, LeafSpec)`, raised from inside Lightning's own
# lightning/pytorch/utilities/_pytree.py on every command (Lightning's code: nothing a user can change).
_PYTREE_LEAFSPEC = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
_PYTREE_MODULE = r"lightning\.pytorch\.utilities\._pytree"
# Lightning's advertisement for litlogger, logged by its logger connector whenever a trainer starts.
_LITLOGGER_TIP = "try installing [litlogger]"
# The loggers Lightning's rank_zero_info writes through (lightning.fabric and lightning.pytorch rebind it).
_RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)


class _DropLitloggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _LITLOGGER_TIP not in str(record.msg)


_TIP_FILTER = _DropLitloggerTip()


def install_warning_filters() -> None:
    """Filter two third-party messages, each by its text and the module that emits it (never a whole
    category or package): torch's ``LeafSpec`` deprecation notice raised inside Lightning's
    ``lightning.pytorch.utilities._pytree``, and Lightning's litlogger tip. Idempotent; runs on import
    (and again in :class:`~lightning_convnets.cli.ConvNetsCLI`, in case a ``warnings.catch_warnings``
    block reset the filters). Imports neither torch nor Lightning.

    Example:
        >>> install_warning_filters()
        >>> logging.getLogger("lightning.pytorch.utilities.rank_zero").filter(
        ...     logging.makeLogRecord({"msg": "Tip: try installing [litlogger] ..."}))
        False
    """
    warnings.filterwarnings("ignore", message=_PYTREE_LEAFSPEC, category=FutureWarning, module=_PYTREE_MODULE)
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _TIP_FILTER not in logger.filters:
            logger.addFilter(_TIP_FILTER)


install_warning_filters()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_convnets' has no attribute {name!r}")
