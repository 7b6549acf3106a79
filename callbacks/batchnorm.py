"""BatchNorm running statistics: drift, train/test discrepancy, cross-rank disagreement, and the fixes.

:class:`BatchNormDriftMonitor` recovers each BN layer's batch statistics from its running-stat update
(no pass over the input) and compares them with the running statistics used at test time; it can
synchronise ranks (``sync=``) and recalibrate (``recalibrate_batches=``) before validation.
:func:`recalibrate_batchnorm` is PreciseBN; :func:`pool_running_stats` merges ranks. The method, every
logged key, what DDP's buffer broadcast does and the costs are in ``docs/monitors.md``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_convnets.batch import batch_inputs

from . import core as _core
from . import diagnosis, plots
from .core import (
    Finding,
    Moments,
    MonitorCallback,
    MonitorConfigError,
    PackedStats,
    RunningMoments,
    StatsPacker,
    observers_paused,
)

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl
    from matplotlib.figure import Figure

__all__ = ["BatchNormDriftMonitor", "batchnorm_layers", "pool_running_stats", "recalibrate_batchnorm"]

SyncMode = Literal["broadcast", "pooled"]
_QUANTITIES = ("abs_z", "z2", "log_var_ratio", "abs_log_var_ratio", "kl")
# the ring of recorded batches holds as many as fit in this share of the BN layers' input bytes (1 to 8)
_RING_SHARE = 0.0075
_CACHE_CAP = 16  # cached per-pattern vectors (masks, variance corrections): bounded when shapes vary


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The BN layers of ``model`` that keep running statistics, ``(qualified name, module)`` in order.

    Lazy BNs not yet materialised and layers with ``track_running_stats=False`` are left out (they have
    no running statistics to monitor, synchronise or recalibrate).
    """
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, _BatchNorm) or not module.track_running_stats:
            continue
        if module.running_mean is None or isinstance(module.running_mean, nn.parameter.UninitializedBuffer):
            continue
        layers.append((name, module))
    return layers


# --------------------------------------------------------------------------------------------------
# Pooling across ranks
# --------------------------------------------------------------------------------------------------


def pool_running_stats(
    means: Tensor, variances: Tensor, counts: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Pool per-rank running statistics into the statistics of the union of the ranks' data.

    With ``n_k`` elements per channel on rank ``k`` and unbiased variances ``v_k`` (what BN keeps), the union
    has mean ``mu = sum n_k mu_k / N`` and unbiased variance
    ``(sum (n_k - 1) v_k + sum n_k (mu_k - mu)^2) / (N - 1)``, ``N = sum n_k``. For equal ``n`` this is
    ``mean(v_k) + var(mu_k)`` up to the n-1 correction: ``[(n-1) K mean(v) + n K var_pop(mu)] / (Kn - 1)``,
    which tends to ``mean(v_k) + var_pop(mu_k)`` (between-rank variance with ``1/K``) as ``n`` grows; that
    limit is used when ``counts`` is ``None``. Exact when each rank's running statistics are the statistics
    of one batch (momentum 1); for EMAs it is the natural approximation.

    Args:
        means: ``[K, C]`` per-rank means.
        variances: ``[K, C]`` per-rank unbiased variances.
        counts: ``[K]`` elements per channel behind each rank's statistics, or ``None``.

    Returns:
        ``(mean, variance)``, each ``[C]`` in float64.

    Example:
        >>> import torch
        >>> a, b = torch.tensor([1.0, 3.0]), torch.tensor([5.0, 7.0, 9.0])
        >>> means = torch.stack([a.mean(), b.mean()])[:, None]
        >>> variances = torch.stack([a.var(), b.var()])[:, None]
        >>> pool_running_stats(means, variances, torch.tensor([2.0, 3.0]))
        (tensor([5.], dtype=torch.float64), tensor([10.], dtype=torch.float64))
    """
    if means.shape != variances.shape or means.dim() != 2:
        raise ValueError(
            f"pool_running_stats: means and variances must both be [ranks, channels], got "
            f"{tuple(means.shape)} and {tuple(variances.shape)}"
        )
    means, variances = means.double(), variances.double()
    if counts is None or bool((counts <= 1).any()):
        mean = means.mean(0)
        return mean, variances.mean(0) + ((means - mean) ** 2).mean(0)
    n = counts.double().reshape(-1, 1)
    total = n.sum()
    mean = (n * means).sum(0) / total
    variance = ((n - 1) * variances).sum(0) + (n * (means - mean) ** 2).sum(0)
    return mean, variance / (total - 1)


# --------------------------------------------------------------------------------------------------
# PreciseBN
# --------------------------------------------------------------------------------------------------


def _default_forward(model: nn.Module, batch: Any) -> Any:
    try:
        inputs = batch_inputs(batch)
    except TypeError as err:
        raise TypeError(f"recalibrate_batchnorm: {err}; pass forward_fn=") from err
    return model(inputs)


def _default_all_gather() -> Callable[[Tensor], Tensor] | None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None

    def gather(tensor: Tensor) -> Tensor:
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor)
        return torch.stack(out)

    return gather


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    dataloader: Iterable[Any],
    num_batches: int | None = None,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    all_gather: Callable[[Tensor], Tensor] | Literal["auto"] | None = "auto",
    device: torch.device | str | None = None,
) -> nn.Module:
    """PreciseBN (Wu & Johnson 2021): replace every BN's running statistics with population statistics.

    The EMA kept during training weights recent batches (computed with older weights) and is noisy; after
    training (or before an evaluation) this pass computes, for every BN layer, the exact mean and unbiased
    variance of its input over ``num_batches`` batches. The model runs with its BN layers in training mode
    (each layer normalises with batch statistics, as in training; dropout and other layers in eval mode),
    and a pre-hook merges each batch's per-channel (count, mean, M2) into float64 accumulators with Chan's
    formula, so batches of different sizes weigh by their number of elements and the between-batch spread of
    the means counts (averaging batch variances, as some implementations do, leaves it out). Across ranks
    the per-rank moments are merged the same way (one ``all_gather`` of all layers together): the result is
    the statistics of the union of every rank's batches, identical on every rank. Then
    ``running_mean = mean`` and ``running_var = M2 / (N - 1)``.

    Model modes, ``num_batches_tracked`` and the global RNG state are restored; no gradient is computed;
    every monitor's hooks are paused.

    Args:
        model: the model (any mode). Layers with ``track_running_stats=False`` are left alone.
        dataloader: an iterable of batches (each rank its own shard under DDP).
        num_batches: batches to use (default: the whole loader). Every rank must run the same number.
        forward_fn: ``forward_fn(model, batch)`` runs the model on a batch (default: ``model(batch)`` for a
            tensor, ``model(batch[0])`` for a tuple/list, ``model(batch["image"])`` etc. for a dict).
        all_gather: ``tensor -> [world, *tensor.shape]`` to pool across ranks; ``"auto"`` uses
            ``torch.distributed`` when initialised with several ranks; ``None`` pools nothing.
        device: where batches go (default: the device of the model's first parameter or buffer).

    Returns:
        ``model``, recalibrated in place.

    Raises:
        ValueError: for ``num_batches < 1`` or a loader that yields no batch.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> loader = [torch.randn(8, 3, 16, 16) + 2 for _ in range(4)]
        >>> _ = recalibrate_batchnorm(net, loader)
        >>> exact = torch.cat([net[0](x) for x in loader]).transpose(0, 1).flatten(1)
        >>> torch.allclose(net[1].running_var, exact.var(1), rtol=1e-4)
        True
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"recalibrate_batchnorm: num_batches must be >= 1 or None, got {num_batches}")
    layers = batchnorm_layers(model)
    if not layers:
        return model
    forward_fn = forward_fn or _default_forward
    gather = _default_all_gather() if all_gather == "auto" else all_gather
    if device is None:
        tensor = next(iter(model.parameters()), None)
        tensor = tensor if tensor is not None else layers[0][1].running_mean
        device = tensor.device
    device = torch.device(device)

    moments = {name: RunningMoments() for name, _ in layers}
    modes = {module: module.training for module in model.modules()}
    counters = {name: bn.num_batches_tracked.clone() for name, bn in layers}

    def recorder(key: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            moments[key].update(args[0])

        return hook

    handles = [bn.register_forward_pre_hook(recorder(name)) for name, bn in layers]
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    batches = 0
    try:
        model.eval()
        for _, bn in layers:
            bn.train()
        with torch.random.fork_rng(devices=rng_devices), observers_paused():
            for batch in dataloader:
                if num_batches is not None and batches >= num_batches:
                    break
                forward_fn(model, move_data_to_device(batch, device))
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.train(mode)
        for name, bn in layers:
            bn.num_batches_tracked.copy_(counters[name])
    if batches == 0:
        raise ValueError("recalibrate_batchnorm: the dataloader yielded no batch")

    packer = StatsPacker()
    for name, bn in layers:
        if moments[name].state is None:  # a layer this model's forward never reached
            moments[name].state = torch.zeros(3, bn.num_features, dtype=torch.float64, device=device)
        packer.running(name, moments[name])
    flat = packer.flat()
    gathered = flat.unsqueeze(0) if gather is None else gather(flat)
    stats = packer.unpack(gathered.reshape(gathered.shape[0], -1).to("cpu", torch.float64))
    for name, bn in layers:
        merged: Moments = stats[name]
        count = merged.count
        seen = count > 1
        if not bool(seen.any()):
            continue
        mean = merged.mean.to(bn.running_mean)
        var = (merged.m2 / (count - 1).clamp_min(1)).to(bn.running_var)
        mask = seen.to(bn.running_mean.device)
        bn.running_mean.copy_(torch.where(mask, mean.to(mask.device), bn.running_mean))
        bn.running_var.copy_(torch.where(mask, var.to(mask.device), bn.running_var))
    return model


# --------------------------------------------------------------------------------------------------
# The monitor
# --------------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    name: str
    module: _BatchNorm
    offset: int
    channels: int


class BatchNormDriftMonitor(MonitorCallback):
    """Drift of BN running statistics, their train/test discrepancy, cross-rank disagreement; optional
    synchronisation and PreciseBN recalibration before evaluation.

    See the module docstring for the method, the logged keys (under ``batchnorm/``) and what DDP's buffer
    broadcast does. Findings (large z-shift or variance lag at the end, spikes, ranks disagreeing, drift
    still running at the end) go into the shared end-of-fit diagnosis with advice.

    Args:
        log_every_n_steps: optimizer steps between reductions and logs (default: the trainer's).
        sync: ``"broadcast"`` (rank 0's statistics), ``"pooled"`` (:func:`pool_running_stats` of every rank's)
            or ``None``: applied before each validation and each checkpoint save during fit (DDP only).
        recalibrate_batches: if set, run :func:`recalibrate_batchnorm` on that many training batches before
            each validation during fit (a fresh iterator of the trainer's train dataloader; RNG restored).
            A DataLoader with ``persistent_workers=True`` resets its one iterator when iterated again, which
            would cut short an epoch validated mid-way (``val_check_interval < 1``): there, call
            :func:`recalibrate_batchnorm` with a separate loader from your own callback instead.
        recalibrate_forward: ``fn(pl_module, batch)`` running the model on a batch (already on the device)
            for the recalibration; default: ``pl_module(inputs)`` with the inputs found as in
            :func:`recalibrate_batchnorm` (a tensor, ``batch[0]`` or ``batch["image"]``...).
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
    _ring_cap = 8  # most recorded batches processed together (tests lower it to exercise partial rings)

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
        found = [(n, m) for n, m in batchnorm_layers(pl_module) if m.momentum is None or m.momentum > 0]
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
        device = self.layers[0].module.running_mean.device
        count = len(self.layers)
        f64 = dict(dtype=torch.float64, device=device)
        self._total = self.layers[-1].offset + self.layers[-1].channels
        self._layer_lengths = torch.tensor([lay.channels for lay in self.layers], device=device)
        self._index: Tensor | None = None  # channel -> layer, built when an index op needs it
        self._channels = torch.tensor([float(lay.channels) for lay in self.layers], **f64)
        # segment_reduce on the CPU (2x faster than index_add_ there, the same sums); index_add_ elsewhere:
        # segment_reduce checks its lengths with host reads (a sync per call on a GPU), and MPS lacks it
        self._lengths = self._layer_lengths if device.type == "cpu" else None
        self._repeated_lengths: dict[int, Tensor] = {}
        self._masks: dict[tuple[bool, ...], Tensor] = {}  # which layers ran, as a float mask (static shapes)
        self._factors: dict[tuple[int, ...], Tensor] = {}  # (n - 1) / n per layer, per pattern of shapes
        self._sums = torch.zeros(count, len(_QUANTITIES), **f64)
        self._zmax = torch.zeros(count, **f64)
        self._forwards = torch.zeros(count, **f64)
        self._bind()
        mean, var = self._current()
        self._start_mean, self._start_var = mean.to(self._stat_dtype), var.to(self._stat_dtype)
        # Layers whose running statistics are copied by the batch's first BN forward, all in one
        # _foreach_copy_, instead of two copies in each layer's pre-hook: decided after the first recorded
        # batch, for the layers that ran exactly one training forward in it (a layer called twice per
        # forward keeps its hook copy).
        self._copy_in_hook = [True] * count
        self._chosen: list[int] | None = None
        self._snapshot_pending = False
        self._rebind_pending = False
        self._ring_planned = False
        self._make_ring(1)
        self._buffers_ready = True

    def _bind(self) -> None:
        """What the per-batch arithmetic reads from the layers: their running-statistic tensors, momenta
        and epsilons, as flat per-channel constants. Rebound when a layer's hook sees its tensors replaced
        or its momentum changed during the fit (``StochasticWeightAveraging`` does both); ``eps`` is read
        here, at binding."""
        device = self._channels.device
        f64 = dict(dtype=torch.float64, device=device)
        modules = [lay.module for lay in self.layers]
        self._means = [bn.running_mean for bn in modules]
        self._vars = [bn.running_var for bn in modules]
        self._momenta = [bn.momentum for bn in modules]
        # copies of running statistics keep their dtype (float32 values convert to float64 exactly where the
        # arithmetic needs it): half the memory of float64 copies, the same numbers
        self._stat_dtype = functools.reduce(torch.promote_types, [m.dtype for m in self._means], torch.float32)
        momenta = self._momenta
        self._any_cumulative = any(m is None for m in momenta)

        # per-channel constants, so the per-batch arithmetic needs no gather (index ops are slow on CPU);
        # a constant shared by every layer (the usual case) is a 1-element vector that broadcasts: the same
        # arithmetic without a vector per channel (1-D, not 0-d: a 0-d float64 tensor would not promote the
        # float32 statistics it meets to float64)
        def per_channel(values: list[float]) -> Tensor:
            if len(set(values)) == 1:
                return torch.tensor(values[:1], **f64)
            return self._expand(torch.tensor(values, **f64))

        self._momentum_channel = per_channel([0.0 if m is None else float(m) for m in momenta])
        cumulative = torch.tensor([m is None for m in momenta], device=device)
        self._cumulative_channel = self._expand(cumulative) if self._any_cumulative else None
        self._eps = per_channel([float(bn.eps) for bn in modules])
        self._keep = 1 - self._momentum_channel  # the old statistics' weight in the update

    def _rebind(self) -> None:
        """A layer's hook saw replaced tensors or a new momentum in this batch (whose old statistics it
        copied from the live tensors): process what the ring holds with the constants it was recorded
        under, then rebind, and move this batch's old statistics to the first slot."""
        self._rebind_pending = False
        current = self._old.clone()
        self._flush_ring()
        dtype = self._stat_dtype
        self._bind()
        self._copy_in_hook = [True] * len(self.layers)  # the batch-start copy lists hold the old tensors
        self._chosen, self._slot_snapshots = None, None
        if self._stat_dtype != dtype:
            self._make_ring(len(self._ring_meta))
        self._use_slot(0)
        self._old.copy_(current)

    def _expand(self, per_layer: Tensor) -> Tensor:
        """A per-layer vector (or ``[n, layers]``) repeated over each layer's channels."""
        return torch.repeat_interleave(per_layer, self._layer_lengths, dim=-1, output_size=self._total)

    @property
    def _layer_index(self) -> Tensor:
        """Channel -> layer (int64): kept on accelerators (their per-batch sums use it), made on demand on
        the CPU (used once per logging interval there)."""
        if self._index is not None:
            return self._index
        index = self._expand(torch.arange(len(self.layers), device=self._channels.device))
        if self._lengths is None:
            self._index = index
        return index

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
        forward_fn = forward_fn or _default_forward
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
            self._use_slot(self._filled)  # this batch's old statistics go into the ring's next slot
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
            if self._chosen is None:
                self._plan_snapshot()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # ------------------------------------------------------------------ the ring of recorded batches
    def _make_ring(self, size: int) -> None:
        """The statistics of up to ``size`` recorded batches (old means, old variances, new means, new
        variances: ``[size, 4, channels]`` in the statistics' dtype), processed together when it is full
        or when the interval is packed. The per-batch work is then one concatenation; the ~30 small ops of
        the arithmetic run once per ring, on ``size`` times longer vectors, with the same result per
        batch (the elementwise ops are the same per element, the per-layer sums are the same sums, and the
        interval's sums add the batches one by one, in order)."""
        ring = torch.zeros(size, 4, self._total, dtype=self._stat_dtype, device=self._channels.device)
        ring[:, 1].fill_(1.0)  # a layer that has not run yet: unit old variance (masked out anyway)
        self._ring = ring
        self._ring_meta: list[tuple[tuple[bool, ...], tuple[int, ...]] | None] = [None] * size
        self._ring_nbt: Tensor | None = None  # [size, layers] num_batches_tracked, for momentum=None layers
        self._filled = 0
        self._slots = []
        for k in range(size):
            old_mean, old_var = ring[k, 0], ring[k, 1]
            self._slots.append(
                (
                    ring[k, :2],
                    [old_mean[lay.offset : lay.offset + lay.channels] for lay in self.layers],
                    [old_var[lay.offset : lay.offset + lay.channels] for lay in self.layers],
                    ring[k, 2:].view(-1),
                )
            )
        self._slot_snapshots = self._snapshot_lists() if self._chosen is not None else None
        self._use_slot(0)

    def _use_slot(self, k: int) -> None:
        old, self._old_mean_views, self._old_var_views, self._new = self._slots[k]
        self._old, self._old_mean, self._old_var = old, old[0], old[1]
        self._snapshot = self._slot_snapshots[k] if self._slot_snapshots is not None else None

    def _snapshot_lists(self) -> list[tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]]:
        chosen = self._chosen or []
        means, variances = [self._means[i] for i in chosen], [self._vars[i] for i in chosen]
        return [([mv[i] for i in chosen], [vv[i] for i in chosen], means, variances) for _, mv, vv, _ in self._slots]

    def _plan_ring(self) -> None:
        """After the first recorded batch (the ring is empty then): as many batches as fit in
        ``_RING_SHARE`` of the bytes of the BN layers' inputs (4 bytes per element), 1 to ``_ring_cap``."""
        self._ring_planned = True
        inputs = 4 * sum(n * lay.channels for n, lay in zip(self._elements, self.layers))
        per_batch = 4 * self._total * self._ring.element_size()
        size = max(1, min(self._ring_cap, int(_RING_SHARE * inputs // per_batch)))
        if size != len(self._ring_meta) and self._filled == 0:
            self._make_ring(size)

    def _plan_snapshot(self) -> None:
        """After the first recorded batch (one host read, once per run): the layers that ran exactly one
        training forward get their old statistics copied at batch start; the others keep the hook copy."""
        once = [calls == 1 for calls in self._calls]
        self._copy_in_hook = [not single for single in once]
        self._chosen = [i for i, single in enumerate(once) if single]
        self._slot_snapshots = self._snapshot_lists()
        self._snapshot = self._slot_snapshots[self._filled]

    def _accumulate(self) -> None:
        """Record this batch: its running statistics after the update (one concatenation into the ring),
        which layers ran and on how many elements. A full ring is processed at once."""
        if self._rebind_pending:
            self._rebind()
        k = self._filled
        torch.cat(self._means + self._vars, out=self._new)
        self._ring_meta[k] = (tuple(calls >= 1 for calls in self._calls), tuple(self._elements))
        if self._any_cumulative:  # their momentum is 1 / num_batches_tracked after the update
            if self._ring_nbt is None:
                self._ring_nbt = torch.zeros(len(self._ring_meta), len(self.layers), dtype=torch.float64,
                                             device=self._ring.device)  # fmt: skip
            self._ring_nbt[k].copy_(self._nbt())
        self._filled = k + 1
        if self._filled == len(self._ring_meta):
            self._flush_ring()

    def _flush_ring(self) -> None:
        """Recover each recorded batch's statistics from its update and add its discrepancies, in order.

        About 30 small ops on ``[batches, channels]`` blocks whatever the depth: the float64 arithmetic
        promotes the stored statistics exactly, the intermediates are written in place into one transient
        block, and the five quantities are summed per layer by one segment reduction over the layers'
        contiguous channel ranges on the CPU (the same sequential float64 sums as ``index_add_``)."""
        n = self._filled
        if n == 0:
            return
        self._filled = 0
        ring, metas = self._ring[:n], self._ring_meta[:n]
        old, new = ring[:, :2].transpose(0, 1), ring[:, 2:].transpose(0, 1)  # [2, n, channels]
        m, keep = self._momentum_channel, self._keep
        if self._any_cumulative:  # momentum=None: m = 1 / num_batches_tracked after the update
            m = torch.where(self._cumulative_channel, self._expand(1.0 / self._ring_nbt[:n].clamp_min(1)), m)
            keep = 1 - m
        mask = self._per_batch([called for called, _ in metas], self._mask)  # [layers] or [n, layers]
        correction = self._expand(self._per_batch([elements for _, elements in metas], self._factor))
        # One transient float64 block for every intermediate (freed on return, after the step's peak):
        # the same elementwise ops as the formulas in the comments, written in place with out=.
        work = torch.empty(10, n, self._total, dtype=torch.float64, device=ring.device)
        rows = work.unbind(0)
        batch, z, scale, root = work[5:7], rows[7], rows[8], rows[9]
        batch_mean, batch_var = rows[5], rows[6]
        old_mean, old_var, eps = ring[:, 0], ring[:, 1], self._eps
        # batch_mean = (new_mean - keep * old_mean) / m; batch_var = (new_var - keep * old_var) / m
        torch.div(torch.sub(new, torch.mul(keep, old, out=batch), out=batch), m, out=batch)
        batch_var.clamp_min_(0).mul_(correction)  # then biased: (n - 1) / n
        torch.add(old_var, eps, out=scale)  # scale = old_var + eps
        torch.div(torch.sub(batch_mean, old_mean, out=z), torch.sqrt(scale, out=root), out=z)  # z-shift
        ratio = batch_var.add_(eps).div_(scale)  # (batch_var + eps) / scale
        # per channel: |z|, z^2, log ratio, |log ratio|, kl = 0.5 * (ratio - 1 - log ratio + z^2)
        z_abs, z_sq = torch.abs(z, out=rows[0]), torch.mul(z, z, out=rows[1])
        log_ratio = torch.log(ratio, out=rows[2])
        torch.abs(log_ratio, out=rows[3])
        torch.sub(ratio, 1, out=rows[4]).sub_(log_ratio).add_(z_sq).mul_(0.5)
        per_layer = self._per_layer(work[:5], "sum").permute(1, 2, 0) / self._channels[:, None]  # [n, layers, 5]
        per_layer = per_layer.nan_to_num_(nan=0.0).mul_(mask[..., None])
        for k in range(n):  # the interval's sums add the batches one by one, in order
            self._sums.add_(per_layer[k])
        zmax = self._per_layer(z_abs[None], "amax")[0].nan_to_num_(nan=0.0).mul_(mask)  # [n, layers]
        torch.maximum(self._zmax, zmax.amax(0), out=self._zmax)
        self._forwards.add_(mask.sum(0) if mask.dim() == 2 else mask * n)

    def _per_batch(self, keys: list[Any], make: Callable[[Any], Tensor]) -> Tensor:
        """The per-layer vector of each batch's ``key``: one vector when they are all alike (the usual
        case), else ``[n, layers]``."""
        if all(key == keys[0] for key in keys):
            return make(keys[0])
        return torch.stack([make(key) for key in keys])

    def _mask(self, called: tuple[bool, ...]) -> Tensor:
        mask = self._masks.get(called)
        if mask is None:  # the same layers run in nearly every batch: no host-to-device copy per step
            if len(self._masks) >= _CACHE_CAP:
                self._masks.clear()
            mask = self._masks[called] = torch.tensor(called, dtype=torch.float64, device=self._channels.device)
        return mask

    def _factor(self, elements: tuple[int, ...]) -> Tensor:
        factor = self._factors.get(elements)
        if factor is None:  # (n - 1) / n per layer; shapes are static in most runs (bounded cache otherwise)
            if len(self._factors) >= _CACHE_CAP:
                self._factors.clear()
            factors = [(n - 1) / n if n > 1 else 1.0 for n in elements]
            factor = self._factors[elements] = torch.tensor(factors, dtype=torch.float64, device=self._channels.device)
        return factor

    def _per_layer(self, quantities: Tensor, reduce: str) -> Tensor:
        """``[rows, n, layers]``: each ``[rows, n, channels]`` row reduced (``"sum"`` or ``"amax"``) over each
        layer's channels, in channel order (one segment reduction on the CPU, index ops elsewhere)."""
        rows, n, _ = quantities.shape
        layers = len(self.layers)
        if self._lengths is not None:
            lengths = self._repeated_lengths.get(rows * n)
            if lengths is None:
                lengths = self._repeated_lengths[rows * n] = self._lengths.repeat(rows * n)
            kind = "sum" if reduce == "sum" else "max"
            reduced = torch.segment_reduce(quantities.reshape(-1), kind, lengths=lengths, unsafe=True)
            return reduced.view(rows, n, layers)
        index = self._layer_index
        if n > 1:  # one index per (batch, layer)
            index = (index + torch.arange(n, device=index.device)[:, None] * layers).reshape(-1)
        flat = quantities.permute(1, 2, 0).reshape(n * self._total, rows)
        zeros = torch.zeros(n * layers, rows, dtype=quantities.dtype, device=quantities.device)
        if reduce == "sum":
            return zeros.index_add_(0, index, flat).view(n, layers, rows).permute(2, 0, 1)
        return zeros.scatter_reduce_(0, index[:, None].expand_as(flat), flat, "amax", include_self=True).view(
            n, layers, rows
        ).permute(2, 0, 1)

    # ------------------------------------------------------------------ reduction
    def _use_cross_rank(self, trainer: pl.Trainer | None) -> bool:
        if self.cross_rank is not None:
            return self.cross_rank
        return trainer is not None and trainer.world_size > 1

    def pack(self, trainer: pl.Trainer | None, pl_module: nn.Module, packer: StatsPacker) -> None:
        if not self._buffers_ready:
            return
        self._flush_ring()
        device = self._sums.device
        new_mean, new_var = self._current()
        scale = self._start_var + self._eps
        idx = self._layer_index
        drift_mean = ((new_mean - self._start_mean) ** 2 / scale).nan_to_num(nan=0.0)
        drift_var = (((new_var + self._eps) / scale).log() ** 2).nan_to_num(nan=0.0)
        drift = torch.zeros(len(self.layers), 2, dtype=torch.float64, device=device)
        drift.index_add_(0, idx, torch.stack([drift_mean, drift_var], 1))
        packer.sum("ranks", torch.ones(1, dtype=torch.float64, device=device))
        packer.sum("forwards", self._forwards)
        packer.sum("sums", self._sums)
        packer.max("zmax", self._zmax)
        packer.sum("drift", drift / self._channels[:, None])
        packer.sum("elements", torch.tensor(self._elements, dtype=torch.float64, device=device))
        packer.sum("nbt", self._nbt())
        if self._use_cross_rank(trainer):
            one = torch.ones((), dtype=torch.float64, device=device)
            zeros = torch.zeros_like(new_mean)
            packer.moments("post_mean", one, new_mean, zeros)
            packer.moments("post_var", one, new_var, zeros)
            packer.moments("pre_mean", one, self._old_mean, zeros)
            packer.moments("pre_var", one, self._old_var, zeros)

    def reset_interval(self) -> None:
        if not self._buffers_ready:
            return
        self._sums.zero_()
        self._zmax.zero_()
        self._forwards.zero_()
        mean, var = self._current()
        self._start_mean.copy_(mean)
        self._start_var.copy_(var)

    def compute_metrics(
        self, trainer: pl.Trainer | None, pl_module: nn.Module, stats: PackedStats
    ) -> dict[str, float]:
        if "sums" not in stats:
            return {}
        world = float(stats["ranks"][0])
        forwards = stats["forwards"]
        sums = stats["sums"].reshape(len(self.layers), len(_QUANTITIES))
        drift = stats["drift"].reshape(len(self.layers), 2) / world
        elements = stats["elements"] / world
        nbt = stats["nbt"] / world
        cross = self._cross_rank_metrics(stats, elements, nbt) if "post_mean" in stats else None
        metrics: dict[str, float] = {}
        z_all, kl_all, zmax_all = [], [], []
        for i, layer in enumerate(self.layers):
            name = layer.name
            f = float(forwards[i])
            if f > 0:
                z_shift = math.sqrt(max(float(sums[i, 1]) / f, 0.0))
                metrics[f"{name}/z_shift"] = z_shift
                metrics[f"{name}/z_shift_max"] = float(stats["zmax"][i])
                metrics[f"{name}/log_var_ratio"] = float(sums[i, 2]) / f
                metrics[f"{name}/kl"] = float(sums[i, 4]) / f
                z_all.append(z_shift)
                kl_all.append(metrics[f"{name}/kl"])
                zmax_all.append(metrics[f"{name}/z_shift_max"])
            metrics[f"{name}/mean_drift"] = math.sqrt(max(float(drift[i, 0]), 0.0))
            metrics[f"{name}/var_drift"] = math.sqrt(max(float(drift[i, 1]), 0.0))
            if cross is not None:
                for key, values in cross.items():
                    metrics[f"{name}/{key}"] = float(values[i])
        if z_all:
            metrics["z_shift"] = sum(z_all) / len(z_all)
            metrics["z_shift_max"] = max(zmax_all)
            metrics["kl"] = sum(kl_all) / len(kl_all)
        if cross is not None:
            metrics["rank_spread"] = float(cross["rank_spread"].max())
            metrics["rank_noise_ratio"] = float(cross["rank_noise_ratio"].max())
        return metrics

    def _cross_rank_metrics(self, stats: PackedStats, elements: Tensor, nbt: Tensor) -> dict[str, Tensor]:
        idx = self._layer_index.cpu()
        eps = self._eps.cpu()
        channels = self._channels.cpu()
        count = len(self.layers)

        def spread(mean_key: str, var_key: str) -> tuple[Tensor, Tensor, Tensor]:
            means: Moments = stats[mean_key]
            ranks = means.count
            across = means.m2 / (ranks - 1).clamp_min(1)  # unbiased variance of the rank means
            var_r = stats[var_key].mean + eps
            per_layer = torch.zeros(count, dtype=torch.float64).index_add_(0, idx, across / var_r)
            return (per_layer / channels).sqrt(), across, var_r

        post, across, var_r = spread("post_mean", "post_var")
        pre, _, _ = spread("pre_mean", "pre_var")
        momenta = torch.tensor(
            [float(lay.module.momentum) if lay.module.momentum is not None else 0.0 for lay in self.layers],
            dtype=torch.float64,
        )
        cumulative = torch.tensor([lay.module.momentum is None for lay in self.layers])
        # variance of one rank's running mean from its own batch noise: EMA m/(2-m) var/n, cumulative var/(nT)
        gain = torch.where(cumulative, 1.0 / nbt.clamp_min(1), momenta / (2 - momenta))
        floor = var_r * (gain / elements.clamp_min(1))[idx]
        ratio = torch.zeros(count, dtype=torch.float64).index_add_(0, idx, across / floor) / channels
        return {"rank_spread": post, "rank_spread_pre": pre, "rank_noise_ratio": ratio}

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
        if not self._dirty or self.sync is None or trainer.world_size == 1:
            return
        self.sync_running_stats(trainer, pl_module)
        # Lightning collected the model state dict before this hook: write the synced values into it
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            for layer in self.layers:
                for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                    key = f"{layer.name}.{buffer}"
                    if key in state:
                        state[key] = getattr(layer.module, buffer).detach().clone()

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
        device = self.layers[0].module.running_mean.device
        mean, var = self._current()
        elements = torch.tensor(self._elements or [0] * len(self.layers), dtype=torch.float64, device=device)
        return torch.cat([mean, var, self._nbt(), elements])

    @torch.no_grad()
    def apply_sync(self, gathered: Tensor, step: int = 0) -> float:
        """Set the running statistics from every rank's :meth:`sync_payload` (``gathered``: ``[world, size]``)
        per ``sync``: rank 0's (``"broadcast"``) or :func:`pool_running_stats` weighted by each rank's batch
        elements per channel (``"pooled"``; equal weights and the large-n limit when unknown).
        ``num_batches_tracked`` is rank 0's. Returns the largest spread before the sync (``rank_spread`` of
        the worst channel, in running standard deviations)."""
        gathered = gathered.to(torch.float64)
        self._dirty = False
        total, count = sum(lay.channels for lay in self.layers), len(self.layers)
        means, variances = gathered[:, :total], gathered[:, total : 2 * total]
        nbt = gathered[:, 2 * total : 2 * total + count]
        elements = gathered[:, 2 * total + count :]
        eps = torch.cat([torch.full((lay.channels,), float(lay.module.eps)) for lay in self.layers])
        spread = means.var(0, correction=1) if len(means) > 1 else torch.zeros(total, dtype=torch.float64)
        before = float((spread.cpu() / (variances.mean(0).cpu() + eps)).nan_to_num(nan=0.0).max().sqrt())
        self.syncs.append({"step": float(step), "rank_spread_before": before})
        self.syncs = self.syncs[-self.max_history :]
        for i, layer in enumerate(self.layers):
            part = slice(layer.offset, layer.offset + layer.channels)
            if self.sync == "broadcast":
                new_mean, new_var = means[0, part], variances[0, part]
            else:
                new_mean, new_var = pool_running_stats(means[:, part], variances[:, part], elements[:, i])
            bn = layer.module
            bn.running_mean.copy_(new_mean.to(bn.running_mean))
            bn.running_var.copy_(new_var.to(bn.running_var))
            bn.num_batches_tracked.copy_(nbt[0, i].to(bn.num_batches_tracked))
        return before

    def recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """PreciseBN on ``recalibrate_batches`` batches of the trainer's train dataloader, pooled across
        ranks through the strategy's ``all_gather``."""
        loader = trainer.train_dataloader
        if loader is None:
            rank_zero_warn("BatchNormDriftMonitor: no train dataloader to recalibrate BN with; skipped")
            return

        run = self.recalibrate_forward or _default_forward

        def forward(model: nn.Module, batch: Any) -> Any:
            return run(model, trainer.strategy.batch_to_device(batch))

        gather = trainer.strategy.all_gather if trainer.world_size > 1 else None
        recalibrate_batchnorm(
            pl_module, loader, self.recalibrate_batches, forward_fn=forward, all_gather=gather
        )

    # ------------------------------------------------------------------ report
    def _series(self, layer: str, key: str) -> list[tuple[int, float]]:
        full = f"{self.monitor_name}/{layer}/{key}"
        return [(int(e["step"]), e[full]) for e in self.history if full in e]

    def diagnose(self, trainer: pl.Trainer | None, pl_module: nn.Module | None) -> list[Finding]:
        """Findings from the latest history entry and the z-shift series (rules of
        :mod:`lightning_convnets.callbacks.diagnosis`): noisy batch statistics (few elements per channel
        and large z-shifts: it explains a z-shift, which is then not reported again as a train/test shift),
        running variance off the batch variance, batch means off the running means, z-shift spikes, ranks
        that disagree, running statistics still drifting."""
        if not self.history:
            return []
        last = self.history[-1]
        step = int(last["step"])
        prefix = self.monitor_name
        names = [lay.name for lay in self.layers]
        elements = {lay.name: float(e) for lay, e in zip(self.layers, self._elements)}
        noisy = diagnosis.bn_noisy_batch_stats(last, elements, step, prefix=prefix)
        findings = [
            noisy,
            diagnosis.bn_variance_mismatch(last, names, step, self.var_ratio_threshold, prefix),
            None if noisy else diagnosis.bn_train_test_shift(last, names, step, self.z_threshold, prefix),
            diagnosis.bn_zshift_spike(
                {name: self._series(name, "z_shift") for name in names}, self.z_threshold, prefix=prefix
            ),
            diagnosis.bn_rank_disagreement(last, names, step, self.rank_threshold, prefix=prefix),
            diagnosis.bn_still_drifting(last, names, step, len(self.history), self.drift_threshold, prefix),
        ]
        return [f for f in findings if f is not None]

    def figures(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Figure]:
        if not self.history or not trainer.is_global_zero:
            return {}
        return {"discrepancy": self.plot()}

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
        return {"syncs": list(self.syncs)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.syncs = list(state.get("syncs", []))
