"""The BatchNorm monitor's ring of recorded batches, and the arithmetic that turns it into discrepancies.

Owns :class:`BatchNormRing`: the layers' channel layout and per-channel constants (momenta, epsilons),
the running statistics just before and after each recorded batch (a ring of up to ``size`` batches,
processed together), the recovery of each batch's statistics from its running-stat update, the
interval's per-layer sums of the discrepancies (:data:`QUANTITIES`), its drift reference (the running
statistics at its start) and its checkpointed state (:meth:`BatchNormRing.state_dict`,
:meth:`BatchNormRing.load_state_dict`). Which batches are recorded, and the forward hooks that write the
old statistics in, are :class:`~lightning_convnets.callbacks.batchnorm.BatchNormDriftMonitor`'s; the method
is in ``docs/monitors.md``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["CACHE_CAP", "QUANTITIES", "RING_SHARE", "BatchNormRing", "interval_metrics"]

QUANTITIES = ("abs_z", "z2", "log_var_ratio", "abs_log_var_ratio", "kl")
"""The per-channel discrepancies summed per layer, in the order of :attr:`BatchNormRing.sums`' columns."""
RING_SHARE = 0.0075
"""The ring holds as many recorded batches as fit in this share of the BN layers' input bytes (:meth:`BatchNormRing.plan`)."""
CACHE_CAP = 16
"""Most cached per-pattern vectors (masks, variance corrections): bounded when shapes vary."""

Slot = tuple[Tensor, list[Tensor], list[Tensor], Tensor]


class BatchNormRing:
    """The running statistics of BN layers before and after each of up to ``size`` recorded batches, and
    the interval's discrepancies of the batches' statistics from the running ones.

    Per recorded batch: the old statistics go into the current slot (:meth:`select` gives the slot; the
    monitor's pre-hooks copy each layer's, or :meth:`capture_old` all of them), the batch runs, and
    :meth:`record` copies the new statistics in. A full ring, or :meth:`flush`, recovers each batch's mean
    and variance from its update (``batch = (new - (1 - m) old) / m``) and adds its z-shift, variance
    ratio and KL per layer to :attr:`sums` (columns :data:`QUANTITIES`), :attr:`zmax` and
    :attr:`forwards`, batch by batch in order: the same numbers whatever the ring's size.

    Args:
        modules: the BN layers (with running statistics), in the order of their channels.
        size: batches held before they are processed (1 to any).
        segment_reduce: sum per layer with ``torch.segment_reduce`` (``True``) or ``index_add_``
            (``False``); ``None``: on the CPU only (on a GPU it checks its lengths with host reads).

    Raises:
        ValueError: for no modules or ``size < 1``.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(2, momentum=0.5).train()
        >>> ring = BatchNormRing([bn])
        >>> ring.capture_old(); _ = bn(torch.tensor([[1.0, 4.0], [3.0, 4.0]])); ring.record((True,), (2,))
        >>> ring.flush()  # batch mean (2, 4) against running mean 0 and variance 1
        >>> float(ring.forwards[0]), round(float(ring.sums[0, 1]), 3)  # mean z^2: (2^2 + 4^2) / 2
        (1.0, 10.0)
    """

    def __init__(
        self, modules: Sequence[_BatchNorm], size: int = 1, *, segment_reduce: bool | None = None
    ) -> None:
        if not modules:
            raise ValueError("BatchNormRing: modules must hold at least one BatchNorm layer")
        if size < 1:
            raise ValueError(f"BatchNormRing: size must be >= 1, got {size}")
        self.modules = list(modules)
        self.widths = [bn.num_features for bn in self.modules]
        self.offsets = [sum(self.widths[:i]) for i in range(len(self.widths))]
        device = self.modules[0].running_mean.device
        count = len(self.modules)
        f64 = dict(dtype=torch.float64, device=device)
        self.total = sum(self.widths)
        self.layer_lengths = torch.tensor(self.widths, device=device)
        self._index: Tensor | None = None  # channel -> layer, built when an index op needs it
        self.channels = torch.tensor([float(w) for w in self.widths], **f64)
        # segment_reduce on the CPU (2x faster than index_add_ there, the same sums); index_add_ elsewhere:
        # segment_reduce checks its lengths with host reads (a sync per call on a GPU), and MPS lacks it
        use_segments = device.type == "cpu" if segment_reduce is None else segment_reduce
        self.lengths = self.layer_lengths if use_segments else None
        self._repeated_lengths: dict[int, Tensor] = {}
        self._masks: dict[tuple[bool, ...], Tensor] = {}  # which layers ran, as a float mask (static shapes)
        self._factors: dict[tuple[int, ...], Tensor] = {}  # (n - 1) / n per layer, per pattern of shapes
        self.sums = torch.zeros(count, len(QUANTITIES), **f64)
        self.zmax = torch.zeros(count, **f64)
        self.forwards = torch.zeros(count, **f64)
        self.chosen: list[int] | None = None  # layers whose old statistics are copied at batch start
        self.start_mean: Tensor | None = None  # the drift reference (start): running statistics at its start
        self.start_var: Tensor | None = None
        self.bind()
        self.resize(size)

    # ------------------------------------------------------------------ constants
    def bind(self) -> None:
        """What the per-batch arithmetic reads from the layers: their running-statistic tensors, momenta
        and epsilons, as flat per-channel constants. Rebound when a layer's tensors are replaced or its
        momentum changed during the fit (``StochasticWeightAveraging`` does both; :meth:`rebind`);
        ``eps`` is read here, at binding."""
        device = self.channels.device
        f64 = dict(dtype=torch.float64, device=device)
        modules = self.modules
        self.means = [bn.running_mean for bn in modules]
        self.variances = [bn.running_var for bn in modules]
        self.momenta = [bn.momentum for bn in modules]
        # copies of running statistics keep their dtype (float32 values convert to float64 exactly where the
        # arithmetic needs it): half the memory of float64 copies, the same numbers
        self.stat_dtype = functools.reduce(torch.promote_types, [m.dtype for m in self.means], torch.float32)
        momenta = self.momenta
        self.any_cumulative = any(m is None for m in momenta)

        # per-channel constants, so the per-batch arithmetic needs no gather (index ops are slow on CPU);
        # a constant shared by every layer (the usual case) is a 1-element vector that broadcasts: the same
        # arithmetic without a vector per channel (1-D, not 0-d: a 0-d float64 tensor would not promote the
        # float32 statistics it meets to float64)
        def per_channel(values: list[float]) -> Tensor:
            if len(set(values)) == 1:
                return torch.tensor(values[:1], **f64)
            return self.expand(torch.tensor(values, **f64))

        self.momentum_channel = per_channel([0.0 if m is None else float(m) for m in momenta])
        cumulative = torch.tensor([m is None for m in momenta], device=device)
        self.cumulative_channel = self.expand(cumulative) if self.any_cumulative else None
        self.eps = per_channel([float(bn.eps) for bn in modules])
        self.keep = 1 - self.momentum_channel  # the old statistics' weight in the update

    def rebind(self) -> None:
        """Some layer's tensors or momentum changed during the current batch (whose old statistics were
        copied from the live tensors): process what the ring holds with the constants it was recorded
        under, then :meth:`bind`, and move this batch's old statistics to the first slot."""
        current = self.old.clone()
        self.flush()
        dtype = self.stat_dtype
        self.bind()
        self.chosen, self.slot_snapshots = None, None  # the batch-start copy lists hold the old tensors
        if self.stat_dtype != dtype:
            self.resize(self.size)
        self.select(0)
        self.old.copy_(current)

    def expand(self, per_layer: Tensor) -> Tensor:
        """A per-layer vector (or ``[n, layers]``) repeated over each layer's channels."""
        return torch.repeat_interleave(per_layer, self.layer_lengths, dim=-1, output_size=self.total)

    @property
    def layer_index(self) -> Tensor:
        """Channel -> layer (int64): kept on accelerators (their per-batch sums use it), made on demand on
        the CPU (used once per logging interval there)."""
        if self._index is not None:
            return self._index
        index = self.expand(torch.arange(len(self.modules), device=self.channels.device))
        if self.lengths is None:
            self._index = index
        return index

    # ------------------------------------------------------------------ the ring
    @property
    def size(self) -> int:
        """Batches the ring holds before it is processed."""
        return len(self.metas)

    def resize(self, size: int) -> None:
        """Make the ring hold ``size`` batches (``[size, 4, channels]``: old means, old variances, new
        means, new variances, in the statistics' dtype; call it while the ring is empty). The per-batch
        work is then one concatenation; the ~30 small ops of the arithmetic run once per ring, on ``size``
        times longer vectors, with the same result per batch (the elementwise ops are the same per
        element, the per-layer sums are the same sums, and the interval's sums add the batches one by one,
        in order)."""
        buffer = torch.zeros(size, 4, self.total, dtype=self.stat_dtype, device=self.channels.device)
        buffer[:, 1].fill_(1.0)  # a layer that has not run yet: unit old variance (masked out anyway)
        self.buffer = buffer
        self.metas: list[tuple[tuple[bool, ...], tuple[int, ...]] | None] = [None] * size
        self.nbt: Tensor | None = None  # [size, layers] num_batches_tracked, for momentum=None layers
        self.filled = 0
        self.slots: list[Slot] = []
        for k in range(size):
            old_mean, old_var = buffer[k, 0], buffer[k, 1]
            self.slots.append(
                (
                    buffer[k, :2],
                    [old_mean[o : o + w] for o, w in zip(self.offsets, self.widths)],
                    [old_var[o : o + w] for o, w in zip(self.offsets, self.widths)],
                    buffer[k, 2:].view(-1),
                )
            )
        self.slot_snapshots = self._snapshot_lists() if self.chosen is not None else None
        self.select(0)

    def plan(self, elements: Sequence[int], cap: int) -> None:
        """Size the ring after the first recorded batch (while it is empty): as many batches as fit in
        :data:`RING_SHARE` of the bytes of the layers' inputs (``elements`` per channel of each layer, 4
        bytes each), 1 to ``cap``."""
        inputs = 4 * sum(n * w for n, w in zip(elements, self.widths))
        per_batch = 4 * self.total * self.buffer.element_size()
        size = max(1, min(cap, int(RING_SHARE * inputs // per_batch)))
        if size != self.size and self.filled == 0:
            self.resize(size)

    def select(self, k: int) -> None:
        """Make slot ``k`` the current one: :attr:`old` (``[2, channels]``), :attr:`old_mean_views` /
        :attr:`old_var_views` (each layer's part), :attr:`new` and :attr:`snapshot`."""
        old, self.old_mean_views, self.old_var_views, self.new = self.slots[k]
        self.old, self.old_mean, self.old_var = old, old[0], old[1]
        self.snapshot = self.slot_snapshots[k] if self.slot_snapshots is not None else None

    def choose(self, chosen: list[int]) -> None:
        """The layers whose old statistics are copied all at once at batch start (``snapshot``: one
        ``_foreach_copy_`` from ``snapshot[2:]`` into ``snapshot[:2]``); the others copy their own."""
        self.chosen = chosen
        self.slot_snapshots = self._snapshot_lists()
        self.snapshot = self.slot_snapshots[self.filled]

    def _snapshot_lists(self) -> list[tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]]:
        chosen = self.chosen or []
        means, variances = [self.means[i] for i in chosen], [self.variances[i] for i in chosen]
        return [
            ([mv[i] for i in chosen], [vv[i] for i in chosen], means, variances)
            for _, mv, vv, _ in self.slots
        ]

    def capture_old(self) -> None:
        """Copy every layer's running statistics into the current slot as the batch's old ones (what the
        monitor's pre-hooks do layer by layer)."""
        torch.cat(self.means + self.variances, out=self.old.view(-1))

    def num_batches_tracked(self) -> Tensor:
        """``num_batches_tracked`` of every layer, float64 ``[layers]``."""
        return torch.stack([bn.num_batches_tracked for bn in self.modules]).double()

    def record(self, called: tuple[bool, ...], elements: tuple[int, ...]) -> None:
        """The current batch ran: copy the layers' new statistics into its slot (one concatenation), with
        which layers ran a training forward (``called``) and on how many elements per channel. A full
        ring is processed at once."""
        k = self.filled
        torch.cat(self.means + self.variances, out=self.new)
        self.metas[k] = (called, elements)
        if self.any_cumulative:  # their momentum is 1 / num_batches_tracked after the update
            if self.nbt is None:
                self.nbt = torch.zeros(
                    self.size, len(self.modules), dtype=torch.float64, device=self.buffer.device
                )
            self.nbt[k].copy_(self.num_batches_tracked())
        self.filled = k + 1
        if self.filled == self.size:
            self.flush()

    def flush(self) -> None:
        """Recover each recorded batch's statistics from its update and add its discrepancies, in order.

        About 30 small ops on ``[batches, channels]`` blocks whatever the depth: the float64 arithmetic
        promotes the stored statistics exactly, the intermediates are written in place into one transient
        block, and the five quantities are summed per layer by one segment reduction over the layers'
        contiguous channel ranges on the CPU (the same sequential float64 sums as ``index_add_``)."""
        n = self.filled
        if n == 0:
            return
        self.filled = 0
        ring, metas = self.buffer[:n], self.metas[:n]
        old, new = ring[:, :2].transpose(0, 1), ring[:, 2:].transpose(0, 1)  # [2, n, channels]
        m, keep = self.momentum_channel, self.keep
        if self.any_cumulative:  # momentum=None: m = 1 / num_batches_tracked after the update
            m = torch.where(self.cumulative_channel, self.expand(1.0 / self.nbt[:n].clamp_min(1)), m)
            keep = 1 - m
        mask = self._per_batch([called for called, _ in metas], self._mask)  # [layers] or [n, layers]
        correction = self.expand(self._per_batch([elements for _, elements in metas], self._factor))
        # One transient float64 block for every intermediate (freed on return, after the step's peak):
        # the same elementwise ops as the formulas in the comments, written in place with out=.
        work = torch.empty(10, n, self.total, dtype=torch.float64, device=ring.device)
        rows = work.unbind(0)
        batch, z, scale, root = work[5:7], rows[7], rows[8], rows[9]
        batch_mean, batch_var = rows[5], rows[6]
        old_mean, old_var, eps = ring[:, 0], ring[:, 1], self.eps
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
        per_layer = (
            self._per_layer(work[:5], "sum").permute(1, 2, 0) / self.channels[:, None]
        )  # [n, layers, 5]
        per_layer = per_layer.nan_to_num_(nan=0.0).mul_(mask[..., None])
        for k in range(n):  # the interval's sums add the batches one by one, in order
            self.sums.add_(per_layer[k])
        zmax = self._per_layer(z_abs[None], "amax")[0].nan_to_num_(nan=0.0).mul_(mask)  # [n, layers]
        torch.maximum(self.zmax, zmax.amax(0), out=self.zmax)
        self.forwards.add_(mask.sum(0) if mask.dim() == 2 else mask * n)

    def reset(self) -> None:
        """Zero the interval's sums (:attr:`sums`, :attr:`zmax`, :attr:`forwards`)."""
        self.sums.zero_()
        self.zmax.zero_()
        self.forwards.zero_()

    def start(self, mean: Tensor, var: Tensor) -> None:
        """Take the running statistics ``mean``/``var`` (flat per channel) as the interval's drift reference,
        :attr:`start_mean`/:attr:`start_var` (in the statistics' dtype; :meth:`drift` measures from them)."""
        if self.start_mean is None or self.start_var is None:
            self.start_mean, self.start_var = mean.to(self.stat_dtype), var.to(self.stat_dtype)
        else:
            self.start_mean.copy_(mean)
            self.start_var.copy_(var)

    def drift(self, start_mean: Tensor, start_var: Tensor, new_mean: Tensor, new_var: Tensor) -> Tensor:
        """How far the running statistics moved between two snapshots (flat per channel, float64), per
        layer (``[layers, 2]``): the mean over channels of the squared mean change in starting standard
        deviations, and of the squared log variance ratio (the squares of ``mean_drift``/``var_drift``)."""
        scale = start_var + self.eps
        drift_mean = ((new_mean - start_mean) ** 2 / scale).nan_to_num(nan=0.0)
        drift_var = (((new_var + self.eps) / scale).log() ** 2).nan_to_num(nan=0.0)
        drift = torch.zeros(len(self.modules), 2, dtype=torch.float64, device=self.sums.device)
        drift.index_add_(0, self.layer_index, torch.stack([drift_mean, drift_var], 1))
        return drift / self.channels[:, None]

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The interval so far, as CPU copies: the batches held, processed (:meth:`flush`: the same numbers
        as processing them later, the ring adds batch by batch) into ``sums``, ``zmax`` and ``forwards``, the
        drift reference ``start_mean``/``start_var`` (:meth:`start`) and the current slot's old statistics
        ``old`` (the cross-rank keys read them); ``channels`` checks the layout at :meth:`load_state_dict`.

        Example:
            >>> import torch
            >>> bn = torch.nn.BatchNorm1d(2, momentum=0.5).train()
            >>> ring = BatchNormRing([bn])
            >>> ring.start(bn.running_mean.double(), bn.running_var.double())
            >>> ring.capture_old(); _ = bn(torch.tensor([[1.0, 4.0], [3.0, 4.0]])); ring.record((True,), (2,))
            >>> again = BatchNormRing([bn])
            >>> again.load_state_dict(ring.state_dict()), round(float(again.sums[0, 1]), 3), again.start_mean.tolist()
            (True, 10.0, [0.0, 0.0])
            >>> again.load_state_dict({**ring.state_dict(), "channels": 3})  # saved for other layers
            False
        """
        self.flush()
        state: dict[str, Any] = {"channels": int(self.total)}
        for name in ("sums", "zmax", "forwards", "start_mean", "start_var", "old"):
            if getattr(self, name) is not None:  # no drift reference before the first start()
                state[name] = getattr(self, name).detach().cpu().clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> bool:
        """Continue the interval of :meth:`state_dict` (onto the ring's device) if it was saved for as many
        channels; returns whether it did (else nothing changes: a fresh interval)."""
        if int(state.get("channels", -1)) != self.total:
            return False
        for name in ("sums", "zmax", "forwards"):
            getattr(self, name).copy_(state[name])
        if "start_mean" in state and "start_var" in state:
            self.start_mean = state["start_mean"].to(self.sums.device, self.stat_dtype)
            self.start_var = state["start_var"].to(self.sums.device, self.stat_dtype)
        self.old.copy_(state["old"])
        return True

    # ------------------------------------------------------------------ helpers of the arithmetic
    def _per_batch(self, keys: list[Any], make: Callable[[Any], Tensor]) -> Tensor:
        """The per-layer vector of each batch's ``key``: one vector when they are all alike (the usual
        case), else ``[n, layers]``."""
        if all(key == keys[0] for key in keys):
            return make(keys[0])
        return torch.stack([make(key) for key in keys])

    def _mask(self, called: tuple[bool, ...]) -> Tensor:
        mask = self._masks.get(called)
        if mask is None:  # the same layers run in nearly every batch: no host-to-device copy per step
            if len(self._masks) >= CACHE_CAP:
                self._masks.clear()
            mask = self._masks[called] = torch.tensor(
                called, dtype=torch.float64, device=self.channels.device
            )
        return mask

    def _factor(self, elements: tuple[int, ...]) -> Tensor:
        factor = self._factors.get(elements)
        if factor is None:  # (n - 1) / n per layer; shapes are static in most runs (bounded cache otherwise)
            if len(self._factors) >= CACHE_CAP:
                self._factors.clear()
            factors = [(n - 1) / n if n > 1 else 1.0 for n in elements]
            factor = self._factors[elements] = torch.tensor(
                factors, dtype=torch.float64, device=self.channels.device
            )
        return factor

    def _per_layer(self, quantities: Tensor, reduce: str) -> Tensor:
        """``[rows, n, layers]``: each ``[rows, n, channels]`` row reduced (``"sum"`` or ``"amax"``) over each
        layer's channels, in channel order (one segment reduction on the CPU, index ops elsewhere)."""
        rows, n, _ = quantities.shape
        layers = len(self.modules)
        if self.lengths is not None:
            lengths = self._repeated_lengths.get(rows * n)
            if lengths is None:
                lengths = self._repeated_lengths[rows * n] = self.lengths.repeat(rows * n)
            kind = "sum" if reduce == "sum" else "max"
            reduced = torch.segment_reduce(quantities.reshape(-1), kind, lengths=lengths, unsafe=True)
            return reduced.view(rows, n, layers)
        index = self.layer_index
        if n > 1:  # one index per (batch, layer)
            index = (index + torch.arange(n, device=index.device)[:, None] * layers).reshape(-1)
        flat = quantities.permute(1, 2, 0).reshape(n * self.total, rows)
        zeros = torch.zeros(n * layers, rows, dtype=quantities.dtype, device=quantities.device)
        if reduce == "sum":
            return zeros.index_add_(0, index, flat).view(n, layers, rows).permute(2, 0, 1)
        return (
            zeros.scatter_reduce_(0, index[:, None].expand_as(flat), flat, "amax", include_self=True)
            .view(n, layers, rows)
            .permute(2, 0, 1)
        )


def interval_metrics(
    layers: Sequence[str],
    forwards: Tensor,
    sums: Tensor,
    zmax: Tensor,
    drift: Tensor,
    cross: Mapping[str, Tensor] | None = None,
) -> dict[str, float]:
    """The BatchNorm monitor's metrics of one interval (without the ``batchnorm/`` prefix) from the merged
    sums of every rank: per layer ``z_shift`` (RMS), ``z_shift_max``, ``log_var_ratio`` and ``kl`` (means
    over the recorded forwards; layers without one are left out), ``mean_drift`` and ``var_drift``, and the
    ``cross`` per-layer keys; summaries ``z_shift`` and ``kl`` (means over layers), ``z_shift_max``,
    ``rank_spread`` and ``rank_noise_ratio`` (maxima).

    Args:
        layers: the layers' names.
        forwards: ``[layers]`` recorded training forwards.
        sums: ``[layers, len(QUANTITIES)]`` summed discrepancies (:attr:`BatchNormRing.sums`).
        zmax: ``[layers]`` largest z-shift of a channel.
        drift: ``[layers, 2]`` squared drifts (:meth:`BatchNormRing.drift`), averaged over ranks.
        cross: per-layer cross-rank metrics
            (:func:`~lightning_convnets.callbacks.bn_ranks.cross_rank_metrics`), or ``None``.

    Example:
        >>> import torch
        >>> sums = torch.tensor([[0.0, 4.0, 0.5, 0.0, 0.1]], dtype=torch.float64)
        >>> m = interval_metrics(["bn"], torch.ones(1), sums, torch.full((1,), 3.0), torch.zeros(1, 2))
        >>> m["bn/z_shift"], m["z_shift_max"], m["kl"]
        (2.0, 3.0, 0.1)
    """
    metrics: dict[str, float] = {}
    z_all, kl_all, zmax_all = [], [], []
    for i, name in enumerate(layers):
        f = float(forwards[i])
        if f > 0:
            z_shift = math.sqrt(max(float(sums[i, 1]) / f, 0.0))
            metrics[f"{name}/z_shift"] = z_shift
            metrics[f"{name}/z_shift_max"] = float(zmax[i])
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
