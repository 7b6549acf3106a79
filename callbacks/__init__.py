"""Diagnostic callbacks that work on any LightningModule (installed as ``lightning_convnets.callbacks``).

* :class:`ActivationVarianceMonitor`: activation mean/variance per layer along the depth, residual
  branch ratios, dead ReLUs and saturated sigmoid/tanh units, explosion/vanishing, the first non-finite
  module.
* :class:`GradientShatteringMonitor` and :func:`shattering_profile`: how shattered the input gradient is
  (autocorrelation of d/dt f(x(t)) along a line of inputs; Balduzzi et al. 2017).
* :class:`BatchNormDriftMonitor` and :func:`recalibrate_batchnorm`: BatchNorm running-stat drift,
  train/test discrepancy, cross-rank disagreement and PreciseBN recalibration.
* :class:`OptimizationMonitor`: the update/weight ratio per layer and parameter group, per-layer gradient
  norms, loss spikes and the layer whose gradient jumped first.
* :class:`ThroughputMonitor`: where the step's time goes (loader wait, compute, callbacks), host syncs
  named by module and line, images/s, FLOPs and MFU.
* :mod:`lightning_convnets.callbacks.core`: the shared monitor core (one collective per logging interval,
  any-logger output, bounded checkpointed history, the end-of-fit diagnosis) to build more monitors on.
"""

from .activation_variance import ActivationVarianceMonitor
from .batchnorm import BatchNormDriftMonitor
from .core import MonitorCallback, observers_paused
from .diagnosis import Diagnosis, Finding
from .optimization import OptimizationMonitor
from .precise_bn import pool_running_stats, recalibrate_batchnorm
from .shattering import GradientShatteringMonitor, shattering_profile
from .throughput import ThroughputMonitor

__all__ = [
    "ActivationVarianceMonitor",
    "BatchNormDriftMonitor",
    "Diagnosis",
    "Finding",
    "GradientShatteringMonitor",
    "MonitorCallback",
    "OptimizationMonitor",
    "ThroughputMonitor",
    "observers_paused",
    "pool_running_stats",
    "recalibrate_batchnorm",
    "shattering_profile",
]
