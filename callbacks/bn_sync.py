"""What the BatchNorm monitor does to the running statistics during fit: syncs across ranks, PreciseBN.

Owns :class:`RunningStatsSync`, a base of
:class:`~lightning_convnets.callbacks.batchnorm.BatchNormDriftMonitor`: the sync of every rank's running
statistics (``sync="broadcast"`` or ``"pooled"``: :meth:`~RunningStatsSync.sync_running_stats`, its payload
and its application, the record of the spread before each sync), the synced values written into a
checkpoint being saved, and the PreciseBN recalibration before validation
(:meth:`~RunningStatsSync.recalibrate`). When they run (before each validation and each checkpoint save
during fit) is the monitor's hooks' to decide; the arithmetic is
:mod:`~lightning_convnets.callbacks.bn_ranks`' and :mod:`~lightning_convnets.callbacks.precise_bn`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import bn_ranks, precise_bn

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

__all__ = ["RunningStatsSync", "SyncMode"]

SyncMode = Literal["broadcast", "pooled"]


class _Layer(Protocol):
    name: str
    module: _BatchNorm


class RunningStatsSync:
    """The syncs and recalibrations of a BatchNorm monitor's layers (a base of
    :class:`~lightning_convnets.callbacks.batchnorm.BatchNormDriftMonitor`, which sets the attributes below).

    Example:
        >>> from lightning_convnets.callbacks import BatchNormDriftMonitor
        >>> issubclass(BatchNormDriftMonitor, RunningStatsSync)
        True
    """

    monitor_name: str
    sync: SyncMode | None
    recalibrate_batches: int | None
    recalibrate_forward: Callable[[nn.Module, Any], Any] | None
    max_history: int
    layers: Sequence[_Layer]
    syncs: list[dict[str, float]]  # {"step", "rank_spread_before"} per sync, newest last
    _elements: list[int]  # batch elements per channel of each layer's last recorded call
    _dirty: bool  # a training batch ran since the last sync
    state_key: str
    log_metrics: Callable[..., None]

    @torch.no_grad()
    def sync_running_stats(self, trainer: pl.Trainer, pl_module: nn.Module | None = None) -> None:
        """Make every rank's running statistics identical (``sync`` mode) with one ``all_gather``; records
        the spread before the sync in :attr:`syncs` and logs it as ``batchnorm/rank_spread_before_sync``.
        A no-op without ``sync`` or with a single process."""
        if self.sync is None or trainer.world_size == 1 or not self.layers:
            return
        payload = self.sync_payload()
        gathered = trainer.strategy.all_gather(payload).reshape(-1, payload.numel())
        before = self.apply_sync(gathered, step=trainer.global_step)
        self.log_metrics(trainer, {f"{self.monitor_name}/rank_spread_before_sync": before})

    def sync_payload(self) -> Tensor:
        """This rank's part of a sync: running means, variances, batches tracked and batch elements per
        channel of every layer, as one float64 vector (what :meth:`sync_running_stats` gathers)."""
        return bn_ranks.sync_payload([lay.module for lay in self.layers], self._elements)

    def apply_sync(self, gathered: Tensor, step: int = 0) -> float:
        """Set the running statistics from every rank's :meth:`sync_payload` (``gathered``: ``[world, size]``)
        per ``sync`` (:func:`~lightning_convnets.callbacks.bn_ranks.apply_sync`: rank 0's or pooled) and
        record the largest spread before the sync, which it returns, in :attr:`syncs`."""
        self._dirty = False
        before = bn_ranks.apply_sync([lay.module for lay in self.layers], gathered, self.sync)
        self.syncs.append({"step": float(step), "rank_spread_before": before})
        self.syncs = self.syncs[-self.max_history :]
        return before

    def sync_into_checkpoint(
        self, trainer: pl.Trainer, pl_module: nn.Module | None, checkpoint: dict[str, Any]
    ) -> None:
        """Before a save under DDP with ``sync``, if a batch ran since the last sync: sync, and write the
        synced values into ``checkpoint`` (Lightning collected the model's and the monitor's states before
        ``on_save_checkpoint``): the layers' running statistics, and the open interval's ``dirty`` flag."""
        if not self._dirty or self.sync is None or trainer.world_size == 1:
            return
        self.sync_running_stats(trainer, pl_module)
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            bn_ranks.write_running_stats(state, [(lay.name, lay.module) for lay in self.layers])
        # the monitor's state: no batch has run since this sync
        interval = (
            ((checkpoint.get("callbacks") or {}).get(self.state_key) or {}).get("extra", {}).get("interval")
        )
        if isinstance(interval, dict):
            interval["dirty"] = False

    def recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """PreciseBN on ``recalibrate_batches`` batches of the trainer's train dataloader, pooled across
        ranks through the strategy's ``all_gather``
        (:func:`~lightning_convnets.callbacks.precise_bn.recalibrate_in_fit`)."""
        done = precise_bn.recalibrate_in_fit(
            trainer, pl_module, self.recalibrate_batches, self.recalibrate_forward
        )
        if not done:
            rank_zero_warn("BatchNormDriftMonitor: no train dataloader to recalibrate BN with; skipped")
