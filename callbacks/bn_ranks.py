"""BatchNorm running statistics across ranks: how far the ranks disagree, and making them agree.

Owns the BatchNorm monitor's cross-rank arithmetic: :func:`pack_cross_rank` (each rank's running
statistics before and after the recorded step, into the interval's one collective),
:func:`cross_rank_metrics` (``rank_spread``, ``rank_spread_pre`` and ``rank_noise_ratio``: the spread of
the running means across ranks, and that spread over the floor each rank's own batch noise gives) and
:func:`apply_sync` (every rank's statistics set to rank 0's or to the pooled ones, from one
``all_gather`` of each rank's running means, variances, batches tracked and batch elements). The monitor
that calls them is :class:`~lightning_convnets.callbacks.batchnorm.BatchNormDriftMonitor`; the pooling
formula is :func:`~lightning_convnets.callbacks.precise_bn.pool_running_stats`; what DDP's buffer
broadcast does is in ``docs/monitors.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .precise_bn import pool_running_stats

if TYPE_CHECKING:  # pragma: no cover
    from .bn_ring import BatchNormRing
    from .moments import Moments
    from .packing import PackedStats, StatsPacker

__all__ = ["apply_sync", "cross_rank_metrics", "pack_cross_rank", "sync_payload", "write_running_stats"]


def pack_cross_rank(
    packer: StatsPacker, new_mean: Tensor, new_var: Tensor, old_mean: Tensor, old_var: Tensor
) -> None:
    """Add this rank's running means and variances after (``post_``) and before (``pre_``) the recorded
    step to the collective as one-sample moments: merged across ranks, their M2 is the spread across
    ranks (read by :func:`cross_rank_metrics`)."""
    one = torch.ones((), dtype=torch.float64, device=new_mean.device)
    zeros = torch.zeros_like(new_mean)
    packer.moments("post_mean", one, new_mean, zeros)
    packer.moments("post_var", one, new_var, zeros)
    packer.moments("pre_mean", one, old_mean, zeros)
    packer.moments("pre_var", one, old_var, zeros)


def cross_rank_metrics(
    stats: PackedStats, ring: BatchNormRing, modules: Sequence[_BatchNorm], elements: Tensor, nbt: Tensor
) -> dict[str, Tensor]:
    """Per layer (``[layers]`` float64): ``rank_spread`` (RMS over channels of the standard deviation of the
    running means across ranks, in running standard deviations), ``rank_spread_pre`` (the same before the
    step) and ``rank_noise_ratio`` (mean over channels of the across-rank variance over the floor expected
    from each rank's own batch noise: ``m/(2-m) var/n`` for an EMA of momentum ``m``, ``var/(n T)`` for a
    cumulative average over ``T`` batches).

    Args:
        stats: the merged collective, with :func:`pack_cross_rank`'s entries.
        ring: the monitor's ring (its ``layer_index``, ``eps`` and ``channels`` per channel / layer).
        modules: the BN layers, in the ring's order.
        elements: batch elements per channel of each layer, averaged over ranks.
        nbt: ``num_batches_tracked`` of each layer, averaged over ranks.
    """
    idx = ring.layer_index.cpu()
    eps = ring.eps.cpu()
    channels = ring.channels.cpu()
    count = len(modules)

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
        [float(bn.momentum) if bn.momentum is not None else 0.0 for bn in modules], dtype=torch.float64
    )
    cumulative = torch.tensor([bn.momentum is None for bn in modules])
    # variance of one rank's running mean from its own batch noise: EMA m/(2-m) var/n, cumulative var/(nT)
    gain = torch.where(cumulative, 1.0 / nbt.clamp_min(1), momenta / (2 - momenta))
    floor = var_r * (gain / elements.clamp_min(1))[idx]
    ratio = torch.zeros(count, dtype=torch.float64).index_add_(0, idx, across / floor) / channels
    return {"rank_spread": post, "rank_spread_pre": pre, "rank_noise_ratio": ratio}


def sync_payload(modules: Sequence[_BatchNorm], elements: Sequence[int]) -> Tensor:
    """This rank's part of a sync: running means and variances of every channel, then
    ``num_batches_tracked`` and batch elements per channel (``elements``, zeros when empty) of every layer,
    as one float64 vector on the layers' device (what :func:`apply_sync` reads from each rank)."""
    device = modules[0].running_mean.device
    mean = torch.cat([bn.running_mean for bn in modules]).double()
    var = torch.cat([bn.running_var for bn in modules]).double()
    nbt = torch.stack([bn.num_batches_tracked for bn in modules]).double()
    elements = torch.tensor(elements or [0] * len(modules), dtype=torch.float64, device=device)
    return torch.cat([mean, var, nbt, elements])


def write_running_stats(state: dict[str, Tensor], layers: Sequence[tuple[str, _BatchNorm]]) -> None:
    """Copy each ``(name, layer)``'s running statistics and ``num_batches_tracked`` into a model
    ``state_dict`` collected before a sync (Lightning collects a checkpoint's state dict before
    ``on_save_checkpoint``), under the keys it already has."""
    for name, bn in layers:
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            key = f"{name}.{buffer}"
            if key in state:
                state[key] = getattr(bn, buffer).detach().clone()


@torch.no_grad()
def apply_sync(modules: Sequence[_BatchNorm], gathered: Tensor, mode: str | None) -> float:
    """Set the running statistics of ``modules`` from every rank's sync payload.

    ``gathered`` is ``[world, size]``, each row one rank's running means and variances of every channel,
    then ``num_batches_tracked`` and batch elements per channel of every layer (:func:`sync_payload`).
    ``mode`` ``"broadcast"`` takes rank 0's statistics; otherwise they are pooled
    (:func:`~lightning_convnets.callbacks.precise_bn.pool_running_stats`, weighted by each rank's batch
    elements per channel; equal weights and the large-n limit when unknown). ``num_batches_tracked`` is
    rank 0's. Returns the largest spread before the sync (``rank_spread`` of the worst channel, in running
    standard deviations).

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> rank = lambda mean: torch.tensor([mean, mean, 1.0, 1.0, 0.0, 10.0], dtype=torch.float64)
        >>> round(apply_sync([bn], torch.stack([rank(0.0), rank(2.0)]), "pooled"), 3)
        1.414
        >>> bn.running_mean
        tensor([1., 1.])
    """
    gathered = gathered.to(torch.float64)
    total, count = sum(bn.num_features for bn in modules), len(modules)
    means, variances = gathered[:, :total], gathered[:, total : 2 * total]
    nbt = gathered[:, 2 * total : 2 * total + count]
    elements = gathered[:, 2 * total + count :]
    eps = torch.cat([torch.full((bn.num_features,), float(bn.eps)) for bn in modules])
    spread = means.var(0, correction=1) if len(means) > 1 else torch.zeros(total, dtype=torch.float64)
    before = float((spread.cpu() / (variances.mean(0).cpu() + eps)).nan_to_num(nan=0.0).max().sqrt())
    offset = 0
    for i, bn in enumerate(modules):
        part = slice(offset, offset + bn.num_features)
        offset += bn.num_features
        if mode == "broadcast":
            new_mean, new_var = means[0, part], variances[0, part]
        else:
            new_mean, new_var = pool_running_stats(means[:, part], variances[:, part], elements[:, i])
        bn.running_mean.copy_(new_mean.to(bn.running_mean))
        bn.running_var.copy_(new_var.to(bn.running_var))
        bn.num_batches_tracked.copy_(nbt[0, i].to(bn.num_batches_tracked))
    return before
