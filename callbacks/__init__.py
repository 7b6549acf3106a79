"""Diagnostic callbacks that work on any LightningModule (installed as ``lightning_convnets.callbacks``).

* :class:`ActivationVarianceMonitor`: activation mean/variance per layer along the depth, residual
  branch ratios, dead ReLUs, explosion/vanishing, the first non-finite module.
* :mod:`lightning_convnets.callbacks.core`: the shared monitor core (one collective per logging interval,
  any-logger output, bounded checkpointed history, the end-of-fit diagnosis) to build more monitors on.
"""

from lightning_convnets.callbacks.activation_variance import ActivationVarianceMonitor
from lightning_convnets.callbacks.core import Diagnosis, Finding, MonitorCallback, observers_paused

__all__ = ["ActivationVarianceMonitor", "Diagnosis", "Finding", "MonitorCallback", "observers_paused"]
