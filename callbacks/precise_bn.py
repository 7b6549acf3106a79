"""Fixes of BatchNorm running statistics: PreciseBN recalibration and cross-rank pooling.

Owns :func:`recalibrate_batchnorm` (PreciseBN: population statistics over some batches, pooled across
ranks), :func:`pool_running_stats` (the statistics of the union of every rank's data),
:func:`recalibrate_in_fit` (PreciseBN on the trainer's train loader during a fit),
:func:`batchnorm_layers` (which layers have running statistics) and :func:`default_forward` (running a
model on a batch's inputs). The monitor that measures the drift these fix, and calls them during fit, is
:class:`~lightning_convnets.callbacks.batchnorm.BatchNormDriftMonitor`; details in ``docs/monitors.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_convnets.batch import batch_inputs

from .core import observers_paused
from .moments import Moments, RunningMoments
from .packing import StatsPacker

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

__all__ = [
    "batchnorm_layers",
    "default_all_gather",
    "default_forward",
    "pool_running_stats",
    "recalibrate_batchnorm",
    "recalibrate_in_fit",
]


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


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(inputs)`` with the inputs found in ``batch`` (a tensor, ``batch[0]``, ``batch["image"]``...)."""
    try:
        inputs = batch_inputs(batch)
    except TypeError as err:
        raise TypeError(f"recalibrate_batchnorm: {err}; pass forward_fn=") from err
    return model(inputs)


def default_all_gather() -> Callable[[Tensor], Tensor] | None:
    """``torch.distributed``'s all_gather as ``tensor -> [world, *shape]`` when several ranks run, else ``None``."""
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
    forward_fn = forward_fn or default_forward
    gather = default_all_gather() if all_gather == "auto" else all_gather
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


def recalibrate_in_fit(
    trainer: pl.Trainer,
    pl_module: nn.Module,
    num_batches: int | None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> bool:
    """:func:`recalibrate_batchnorm` inside a Lightning fit: on ``num_batches`` batches of a fresh iterator
    of the trainer's train dataloader, each moved to the device by the trainer's strategy, pooled across
    ranks through the strategy's ``all_gather``. ``False`` (nothing done) when the trainer has no train
    dataloader.

    Args:
        trainer: the running trainer.
        pl_module: the model to recalibrate.
        num_batches: batches to use (``None``: the whole loader).
        forward_fn: ``forward_fn(pl_module, batch)`` on a batch already on the device (default:
            :func:`default_forward`).
    """
    loader = trainer.train_dataloader
    if loader is None:
        return False
    run = forward_fn or default_forward

    def forward(model: nn.Module, batch: Any) -> Any:
        return run(model, trainer.strategy.batch_to_device(batch))

    gather = trainer.strategy.all_gather if trainer.world_size > 1 else None
    recalibrate_batchnorm(pl_module, loader, num_batches, forward_fn=forward, all_gather=gather)
    return True
