"""The BatchNorm monitor: running-statistics drift, train/test discrepancy, cross-rank disagreement.

Owns :class:`BatchNormDriftMonitor`: its pre-hooks on the BN layers, which batches it records, the
reduction and metrics of an interval, when it syncs or recalibrates during fit, its findings and figure,
and its checkpointed state (the syncs, the open interval). The ring of recorded batches, the discrepancy
arithmetic and the interval's saved state are
:class:`~lightning_convnets.callbacks.bn_ring.BatchNormRing`'s; the syncs and recalibrations themselves
:class:`~lightning_convnets.callbacks.bn_sync.RunningStatsSync`'s (a base of the monitor); its report table
:func:`~lightning_convnets.callbacks.report.batchnorm_tables`; PreciseBN
(:func:`~lightning_convnets.callbacks.precise_bn.recalibrate_batchnorm`) and cross-rank pooling
(:func:`~lightning_convnets.callbacks.precise_bn.pool_running_stats`) live in
:mod:`~lightning_convnets.callbacks.precise_bn`. The method, every logged key, what DDP's buffer
broadcast does and the costs are in ``docs/monitors.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import bn_ranks, diagnosis, plots, precise_bn, report
from . import core as _core
from .bn_ring import QUANTITIES, BatchNormRing, interval_metrics
from .bn_sync import RunningStatsSync, SyncMode
from .core import MonitorCallback, MonitorConfigError
from .deprecated import moved_names
from .packing import PackedStats, StatsPacker

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl
    from matplotlib.figure import Figure

    from .diagnosis import Finding

__all__ = ["BatchNormDriftMonitor"]


def _check_options(
    sync: str | None,
    recalibrate_batches: int | None,
    z_threshold: float,
    var_ratio_threshold: float,
    rank_threshold: float,
    drift_threshold: float,
) -> None:
    """Raise :class:`MonitorConfigError` naming the first bad argument of :class:`BatchNormDriftMonitor`."""
    if sync not in (None, "broadcast", "pooled"):
        raise MonitorConfigError(
            f"BatchNormDriftMonitor: sync must be 'broadcast', 'pooled' or None, got {sync!r}"
        )
    if recalibrate_batches is not None and recalibrate_batches < 1:
        raise MonitorConfigError(
            f"BatchNormDriftMonitor: recalibrate_batches must be >= 1 or None, got {recalibrate_batches}"
        )
    for label, value in (
        ("z_threshold", z_threshold),
        ("rank_threshold", rank_threshold),
        ("drift_threshold", drift_threshold),
    ):
        if not value > 0:
            raise MonitorConfigError(f"BatchNormDriftMonitor: {label} must be > 0, got {value}")
    if not var_ratio_threshold > 1:
        raise MonitorConfigError(
            f"BatchNormDriftMonitor: var_ratio_threshold must be > 1, got {var_ratio_threshold}"
        )


@dataclass
class _Layer:
    name: str
    module: _BatchNorm
    offset: int
    channels: int


class BatchNormDriftMonitor(RunningStatsSync, MonitorCallback):
    """Drift of BN running statistics, their train/test discrepancy, cross-rank disagreement; optional
    synchronisation and PreciseBN recalibration before evaluation.

    See the module docstring for the method, the logged keys (under ``batchnorm/``) and what DDP's buffer
    broadcast does. Findings (large z-shift or variance lag at the end, spikes, ranks disagreeing, drift
    still running at the end) go into the shared end-of-fit diagnosis with advice.

    Args:
        log_every_n_steps: optimizer steps between reductions and logs (default: the trainer's).
        sync: ``"broadcast"`` (rank 0's statistics), ``"pooled"`` (:func:`~lightning_convnets.callbacks.precise_bn.pool_running_stats` of every rank's)
            or ``None``: applied before each validation and each checkpoint save during fit (DDP only).
        recalibrate_batches: if set, run :func:`~lightning_convnets.callbacks.precise_bn.recalibrate_batchnorm` on that many training batches before
            each validation during fit (a fresh iterator of the trainer's train dataloader; RNG restored).
            A DataLoader with ``persistent_workers=True`` resets its one iterator when iterated again, which
            would cut short an epoch validated mid-way (``val_check_interval < 1``): there, call
            :func:`~lightning_convnets.callbacks.precise_bn.recalibrate_batchnorm` with a separate loader from your own callback instead.
        recalibrate_forward: ``fn(pl_module, batch)`` running the model on a batch (already on the device)
            for the recalibration; default: ``pl_module(inputs)`` with the inputs found as in
            :func:`~lightning_convnets.callbacks.precise_bn.recalibrate_batchnorm` (a tensor, ``batch[0]`` or ``batch["image"]``...).
        cross_rank: pack per-channel running statistics for the cross-rank keys; ``None``: when the world
            size is above 1.
        z_threshold: RMS z-shift above which a layer is reported.
        var_ratio_threshold: batch/running variance ratio (or its inverse) above which a layer is reported.
        rank_threshold: ``rank_spread`` (in running standard deviations) above which ranks are reported to
            disagree, when the spread is also well above the batch-noise floor (``rank_noise_ratio`` > 10).
        drift_threshold: ``mean_drift`` per interval at the end of training above which statistics are
            reported as still drifting.
        sample_every_n_steps: record one optimizer step in every ``k`` (it only needs the running
            statistics just before and after a recorded step). ``None`` (default): the cost-derived schedule
            of :class:`~lightning_convnets.callbacks.core.MonitorCallback`, every step for the first
            ``dense_steps`` (50), then one in 50 (or one per logging interval if shorter). ``mean_drift`` /
            ``var_drift`` still span the whole interval (they compare the running statistics at its ends).
        dense_steps: steps recorded every step at the start (default 50 with the default schedule, 0 with
            an explicit ``sample_every_n_steps``).
        max_history: history cap (entries).
        strict: re-raise unexpected exceptions instead of switching off (see
            :class:`~lightning_convnets.callbacks.core.MonitorCallback`).

    A model without a BatchNorm layer that tracks running statistics gets one ``info`` line and no work
    per step.

    Raises:
        ValueError: for an unknown ``sync``, non-positive thresholds or ``recalibrate_batches``.

    Example:
        >>> monitor = BatchNormDriftMonitor(log_every_n_steps=50, sync="pooled")
        >>> monitor.sync, monitor.active
        ('pooled', True)
        >>> # pl.Trainer(strategy="ddp", devices=2, callbacks=[monitor]).fit(model, datamodule) then
        >>> # logs batchnorm/<layer>/z_shift ..., syncs BN before validation and checkpoints, adds findings
    """

    monitor_name = "batchnorm"
    ring_cap: ClassVar[int] = 8
    """Most recorded batches processed together (the ring's largest size)."""
    ring_class: ClassVar[type[BatchNormRing]] = BatchNormRing
    """The ring the monitor records into (a subclass may measure differently)."""

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        sync: SyncMode | None = None,
        recalibrate_batches: int | None = None,
        recalibrate_forward: Callable[[nn.Module, Any], Any] | None = None,
        cross_rank: bool | None = None,
        z_threshold: float = 0.5,
        var_ratio_threshold: float = 2.0,
        rank_threshold: float = diagnosis.RANK_THRESHOLD,
        drift_threshold: float = 0.1,
        sample_every_n_steps: int | None = None,
        max_history: int = 1000,
        strict: bool | None = None,
        dense_steps: int | None = None,
    ) -> None:
        super().__init__(
            log_every_n_steps=log_every_n_steps,
            max_history=max_history,
            sample_every_n_steps=sample_every_n_steps,
            train_only=True,  # an eval-mode BN does not update: nothing to recover
            strict=strict,
            dense_steps=dense_steps,
        )
        _check_options(
            sync, recalibrate_batches, z_threshold, var_ratio_threshold, rank_threshold, drift_threshold
        )
        self.sync = sync
        self.recalibrate_batches = recalibrate_batches
        self.recalibrate_forward = recalibrate_forward
        self.cross_rank = cross_rank
        self.z_threshold = z_threshold
        self.var_ratio_threshold = var_ratio_threshold
        self.rank_threshold = rank_threshold
        self.drift_threshold = drift_threshold
        self.layers: list[_Layer] = []
        self.syncs: list[dict[str, float]] = []  # {"step", "rank_spread_before"} per sync, newest last
        self._elements: list[int] = []  # batch elements per channel of each layer's last recorded call
        # training forwards of each layer in the recorded batch (what num_batches_tracked counts: a
        # training-mode BN with running statistics updates them once per forward), counted by the hooks
        self._calls: list[int] = []
        self._dirty = False  # a training batch ran since the last sync
        self._buffers_ready = False

    # ------------------------------------------------------------------ hooks
    def attach(self, trainer: pl.Trainer | None, pl_module: nn.Module) -> None:
        found = [
            (n, m) for n, m in precise_bn.batchnorm_layers(pl_module) if m.momentum is None or m.momentum > 0
        ]
        if not found:
            self.layers = []
            self.step_aside(
                f"{type(pl_module).__name__} has no BatchNorm layer that tracks running statistics with a "
                "non-zero momentum: nothing to monitor (no work per step)",
                "nothing to do: GroupNorm/LayerNorm/FrozenBatchNorm have no running statistics to drift",
            )
            return
        self.layers, offset = [], 0
        for name, module in found:
            self.layers.append(_Layer(name, module, offset, module.num_features))
            offset += module.num_features
        self._elements = [0] * len(self.layers)
        self._calls = [0] * len(self.layers)
        self._buffers_ready = False
        for index, layer in enumerate(self.layers):
            self.add_hook(layer.module, self._snapshot_hook(index), pre=True, guard=False)

    def failure_hint(self, hook: str, error: BaseException) -> str:
        if "recalibrat" in str(error) or hook == "on_validation_start":
            return "pass recalibrate_forward=fn(pl_module, batch) that runs your network on a batch"
        return "restrict the monitor to plain BatchNorm layers, or leave it out for this model"

    def _snapshot_hook(self, index: int) -> Callable[..., None]:
        # registered unwrapped (guard=False: it runs on every BN forward), so it guards its own body
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            try:
                # is_recording() inlined: train_only, so a training-mode call
                if not (self._recording and module.training and self._buffers_ready) or _core._PAUSED:
                    return
                if self._snapshot_pending:  # the batch's first BN forward: no layer has updated yet (and DDP
                    # has broadcast rank 0's buffers, which it does inside its forward, after batch start)
                    self._snapshot_pending = False
                    old_means, old_vars, means, variances = self._snapshot
                    torch._foreach_copy_(old_means, means)
                    torch._foreach_copy_(old_vars, variances)
                buffers = module._buffers
                if (
                    buffers["running_mean"] is not self._means[index]
                    or buffers["running_var"] is not self._vars[index]
                    or module.momentum is not self._momenta[index]
                ):  # replaced tensors or a new momentum (StochasticWeightAveraging): rebind at batch end
                    self._rebind_pending = True
                    self._old_mean_views[index].copy_(buffers["running_mean"])
                    self._old_var_views[index].copy_(buffers["running_var"])
                elif self._copy_in_hook[index]:  # else the batch's first BN forward copied it with the others
                    self._old_mean_views[index].copy_(buffers["running_mean"])
                    self._old_var_views[index].copy_(buffers["running_var"])
                x = args[0]
                shape = x.shape
                self._elements[index] = x.numel() // shape[1] if len(shape) > 1 and shape[1] else x.numel()
                self._calls[index] += 1  # a training-mode forward updates the running statistics once
            except Exception as err:
                self.hook_error(module, err, pre=True)

        return hook

    def _allocate(self) -> None:
        """On-device buffers, once the model sits on its device (``on_train_start``)."""
        self.ring = self.ring_class([lay.module for lay in self.layers])
        self._bind()
        self.ring.start(*self._current())  # the drift reference
        # Layers whose running statistics are copied by the batch's first BN forward, all in one
        # _foreach_copy_, instead of two copies in each layer's pre-hook: decided after the first recorded
        # batch, for the layers that ran exactly one training forward in it (a layer called twice per
        # forward keeps its hook copy).
        self._copy_in_hook = [True] * len(self.layers)
        self._snapshot_pending = False
        self._rebind_pending = False
        self._ring_planned = False
        self._use_slot(0)
        self._restore_interval()
        self._buffers_ready = True

    def _bind(self) -> None:
        """The tensors the pre-hooks compare a layer's buffers and momentum with (the ring's, as bound)."""
        self._means, self._vars, self._momenta = self.ring.means, self.ring.variances, self.ring.momenta

    def _rebind(self) -> None:
        """A layer's hook saw replaced tensors or a new momentum in this batch: the ring processes what it
        holds and rebinds (:meth:`BatchNormRing.rebind`); every layer copies in its hook again."""
        self._rebind_pending = False
        self.ring.rebind()
        self._bind()
        self._copy_in_hook = [True] * len(self.layers)  # the batch-start copy lists hold the old tensors
        self._use_slot(0)

    @torch.no_grad()
    def measure(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    ) -> dict[str, float]:
        """One logging interval outside Lightning: forwards of ``model`` on ``batches`` in the modes it is
        in (call ``model.train()`` first; eval-mode BNs are skipped as in training), no gradient, no
        optimizer. The forwards update the running statistics, as training would. Returns the metrics
        without the ``batchnorm/`` prefix; :attr:`last_stats` keeps the packed statistics.

        Example:
            >>> import torch
            >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
            >>> metrics = BatchNormDriftMonitor().measure(net, [torch.randn(8, 3, 8, 8) + 3])
            >>> metrics["1/z_shift"] > 0
            True
        """
        self.remove_hooks()
        self.attach(None, model)
        if not self.layers:
            raise MonitorConfigError(
                f"BatchNormDriftMonitor.measure: {type(model).__name__} has no BatchNorm layer that tracks "
                "running statistics with a non-zero momentum"
            )
        self._allocate()
        forward_fn = forward_fn or precise_bn.default_forward
        try:
            for batch in batches:
                self._recording = True
                self._start_batch()
                forward_fn(model, batch)
                self._accumulate()
            self._recording = False
            packer = StatsPacker()
            self.pack(None, model, packer)
            self.last_stats = packer.unpack(packer.flat().unsqueeze(0).to("cpu"))
            return self.compute_metrics(None, model, self.last_stats)
        finally:
            self._recording = False
            self.remove_hooks()

    def _current(self) -> tuple[Tensor, Tensor]:
        # buffers need no detach (no autograd); one cat then one cast (cat promotes mixed dtypes)
        mean = torch.cat([lay.module.running_mean for lay in self.layers]).double()
        var = torch.cat([lay.module.running_var for lay in self.layers]).double()
        return mean, var

    def _nbt(self) -> Tensor:
        return torch.stack([lay.module.num_batches_tracked for lay in self.layers]).double()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.layers:
            self._allocate()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self._recording and self._buffers_ready:
            self._start_batch()
            self._use_slot(self.ring.filled)  # this batch's old statistics go into the ring's next slot
            self._snapshot_pending = self._snapshot is not None and bool(self._snapshot[0])

    def _start_batch(self) -> None:
        self._calls = [0] * len(self.layers)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._dirty = True
        if self._recording and self._buffers_ready:
            self._accumulate()
            if not self._ring_planned:
                self._plan_ring()
            if self.ring.chosen is None:
                self._plan_snapshot()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # ------------------------------------------------------------------ the ring of recorded batches
    def _use_slot(self, k: int) -> None:
        """Ring slot ``k`` takes the next recorded batch's old statistics (the views the hooks write to)."""
        self.ring.select(k)
        self._old_mean_views, self._old_var_views = self.ring.old_mean_views, self.ring.old_var_views
        self._snapshot = self.ring.snapshot

    def _plan_ring(self) -> None:
        """After the first recorded batch (the ring is empty then): the ring's size
        (:meth:`BatchNormRing.plan`, at most :attr:`ring_cap`)."""
        self._ring_planned = True
        self.ring.plan(self._elements, self.ring_cap)
        self._use_slot(self.ring.filled)

    def _plan_snapshot(self) -> None:
        """After the first recorded batch (one host read, once per run): the layers that ran exactly one
        training forward get their old statistics copied at batch start; the others keep the hook copy."""
        once = [calls == 1 for calls in self._calls]
        self._copy_in_hook = [not single for single in once]
        self.ring.choose([i for i, single in enumerate(once) if single])
        self._snapshot = self.ring.snapshot

    def _accumulate(self) -> None:
        """Record this batch into the ring: its new running statistics, which layers ran and on how many
        elements (a full ring is processed at once)."""
        if self._rebind_pending:
            self._rebind()
        self.ring.record(tuple(calls >= 1 for calls in self._calls), tuple(self._elements))

    # ------------------------------------------------------------------ reduction
    def _use_cross_rank(self, trainer: pl.Trainer | None) -> bool:
        if self.cross_rank is not None:
            return self.cross_rank
        return trainer is not None and trainer.world_size > 1

    def pack(self, trainer: pl.Trainer | None, pl_module: nn.Module, packer: StatsPacker) -> None:
        if not self._buffers_ready:
            return
        ring = self.ring
        ring.flush()
        device = ring.sums.device
        new_mean, new_var = self._current()
        packer.sum("ranks", torch.ones(1, dtype=torch.float64, device=device))
        packer.sum("forwards", ring.forwards)
        packer.sum("sums", ring.sums)
        packer.max("zmax", ring.zmax)
        packer.sum("drift", ring.drift(ring.start_mean, ring.start_var, new_mean, new_var))
        packer.sum("elements", torch.tensor(self._elements, dtype=torch.float64, device=device))
        packer.sum("nbt", self._nbt())
        if self._use_cross_rank(trainer):
            bn_ranks.pack_cross_rank(packer, new_mean, new_var, ring.old_mean, ring.old_var)

    def reset_interval(self) -> None:
        if not self._buffers_ready:
            return
        self.ring.reset()
        self.ring.start(*self._current())

    def compute_metrics(
        self, trainer: pl.Trainer | None, pl_module: nn.Module, stats: PackedStats
    ) -> dict[str, float]:
        if "sums" not in stats:
            return {}
        world = float(stats["ranks"][0])
        sums = stats["sums"].reshape(len(self.layers), len(QUANTITIES))
        drift = stats["drift"].reshape(len(self.layers), 2) / world
        elements, nbt = stats["elements"] / world, stats["nbt"] / world
        modules, names = [lay.module for lay in self.layers], [lay.name for lay in self.layers]
        cross = None
        if "post_mean" in stats:  # cross_rank: every rank's running statistics before and after the step
            cross = bn_ranks.cross_rank_metrics(stats, self.ring, modules, elements, nbt)
        return interval_metrics(names, stats["forwards"], sums, stats["zmax"], drift, cross)

    # ------------------------------------------------------------------ acting
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fitting = getattr(trainer.state, "fn", None) == "fit" and not trainer.sanity_checking
        if fitting and self.recalibrate_batches is not None and self._dirty:
            self.recalibrate(trainer, pl_module)
            self._dirty = False  # pooled across ranks: identical everywhere
        if self._dirty:
            self.sync_running_stats(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.sync_into_checkpoint(trainer, pl_module, checkpoint)

    # ------------------------------------------------------------------ report
    def _series(self, layer: str, key: str) -> list[tuple[int, float]]:
        return diagnosis.series(self.history, f"{self.monitor_name}/{layer}/{key}")

    def diagnose(self, trainer: pl.Trainer | None, pl_module: nn.Module | None) -> list[Finding]:
        """Findings from the latest history entry and the z-shift series
        (:func:`lightning_convnets.callbacks.diagnosis.batchnorm_findings`)."""
        names = [lay.name for lay in self.layers]
        elements = {lay.name: float(e) for lay, e in zip(self.layers, self._elements)}
        limits = (self.z_threshold, self.var_ratio_threshold, self.rank_threshold, self.drift_threshold)
        return diagnosis.batchnorm_findings(self.history, names, elements, *limits, self.monitor_name)

    def figures(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Figure]:
        if not self.history or not trainer.is_global_zero:
            return {}
        return {"discrepancy": self.plot()}

    def tables(
        self, trainer: pl.Trainer | None, pl_module: nn.Module | None
    ) -> dict[str, list[dict[str, Any]]]:
        """Per BN layer at the end (:func:`~lightning_convnets.callbacks.report.batchnorm_tables`): channels,
        batch elements per channel, z-shift, batch/running variance ratio, KL, drift (and the cross-rank keys
        under DDP)."""
        sizes = {
            lay.name: {"channels": lay.channels, "elements": e} for lay, e in zip(self.layers, self._elements)
        }
        return report.batchnorm_tables(self.history, self.monitor_name, sizes)

    def plot(self) -> Figure:
        """z-shift and batch/running variance ratio of every layer over training (one line per layer;
        :func:`lightning_convnets.callbacks.plots.batchnorm_discrepancy`)."""
        return plots.batchnorm_discrepancy(
            {
                lay.name: (self._series(lay.name, "z_shift"), self._series(lay.name, "log_var_ratio"))
                for lay in self.layers
            }
        )

    def extra_state(self) -> dict[str, Any]:
        """The syncs, and the logging interval so far (this rank's): the ring's sums, drift reference and last
        old statistics (:meth:`BatchNormRing.state_dict`), the last recorded batch's sizes (the cross-rank
        keys and ``elements`` read them), and whether a batch ran since the last sync. A checkpoint inside an
        interval then resumes it exactly."""
        state: dict[str, Any] = {"syncs": list(self.syncs)}
        if self._buffers_ready:
            elements = [int(e) for e in self._elements]
            state["interval"] = {**self.ring.state_dict(), "elements": elements, "dirty": bool(self._dirty)}
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.syncs = list(state.get("syncs", []))
        self._restored_interval = state.get("interval")  # put back by _allocate, on the model's device
        if self._restored_interval is not None:
            self._dirty = bool(self._restored_interval.get("dirty", self._dirty))

    def _restore_interval(self) -> None:
        """Continue the checkpoint's logging interval (:meth:`extra_state`), if it was saved for these
        layers (as many layers and channels); else start a fresh one."""
        saved = self.__dict__.pop("_restored_interval", None)
        if saved and len(saved["elements"]) == len(self.layers) and self.ring.load_state_dict(saved):
            self._elements = list(saved["elements"])


# names that lived here before PreciseBN and pooling moved (one release, with a DeprecationWarning)
__getattr__ = moved_names(
    __name__, {precise_bn: "batchnorm_layers default_all_gather pool_running_stats recalibrate_batchnorm"}
)
