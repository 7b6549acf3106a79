"""Which parameters the optimization monitor follows, and their update/weight ratios on the device.

Owns :class:`ParamLayout` (every parameter of the trainer's optimizers, in their groups' order, with its
layer, the module holding it, and its parameter group; rebuilt when a group is added) and
:class:`UpdateMeter` (the copy of an optimizer's parameters just before its step, then
``||W_after - W_before|| / ||W_before||`` per layer and per group from ``torch._foreach_norm`` into
on-device accumulators, read into :class:`~lightning_convnets.callbacks.update_ratio.LayerTally` once
reduced). The judging is :mod:`~lightning_convnets.callbacks.update_ratio`'; the monitor that drives them
is :class:`~lightning_convnets.callbacks.optimization.OptimizationMonitor`; the method and its costs are in
``docs/monitors.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .update_ratio import LayerTally

__all__ = ["ACC_ROWS", "RATIO_FLOOR", "ParamLayout", "UpdateMeter"]

RATIO_FLOOR = 1e-12
"""Ratios are floored here before their logarithm (an update rounded away entirely reads 1e-12)."""
ACC_ROWS = 6
"""Rows of the accumulators: count, sum log10 ratio, judged count, judged below, judged above, judged sum
log10 (one column per layer, then per group)."""


@dataclass
class ParamLayout:
    """Which parameters the monitor follows and where their numbers go: per optimizer its parameters (each
    once, in its groups' order), and for each parameter its layer and group (built by :meth:`build`).

    Args:
        optimizers: the trainer's optimizers.
        params: per optimizer, its parameters in its groups' order.
        starts: each optimizer's first column.
        groups_per_optimizer: how many parameter groups each optimizer had.
        layer_names, group_names: the layers (modules holding the parameters) and groups
            (``"name"`` key, else ``group<i>``; ``opt<k>.`` before it with several optimizers).
        group_refs: ``(optimizer, group)`` of each group.
        judged: layers holding a weight of 2+ dimensions (conv, linear): judged by the rules.
        layer_optimizer, group_of_layer: each layer's optimizer and group (its first parameter's).
        layer_index: ``[P]`` long, each parameter's layer.
        group_index: ``[P]`` long, each parameter's group, offset by the number of layers.
        zero: a scalar zero on the device (the norm of a missing gradient).
        dtype: the norms' dtype (float64 when a parameter is).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        >>> layout = ParamLayout.build([torch.optim.SGD(net.parameters(), lr=0.1)], net, torch.device("cpu"))
        >>> layout.layer_names, layout.judged, layout.total
        (['0', '1'], [True, False], 4)
    """

    optimizers: list[Any]
    params: list[list[Tensor]]
    starts: list[int]
    groups_per_optimizer: list[int]
    layer_names: list[str]
    group_names: list[str]
    group_refs: list[tuple[int, int]]
    judged: list[bool]
    layer_optimizer: list[int]
    group_of_layer: list[int]
    layer_index: Tensor
    group_index: Tensor
    zero: Tensor
    dtype: torch.dtype
    masks: dict[Any, Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, optimizers: Sequence[Any], module: nn.Module, device: torch.device) -> ParamLayout:
        """The layout of ``optimizers``' parameters, named after the modules of ``module`` holding them."""
        optimizers = list(optimizers)
        owner: dict[int, str] = {}
        for module_name, child in module.named_modules():
            for param_name, p in child.named_parameters(recurse=False):
                owner.setdefault(id(p), module_name or param_name)
        seen: set[int] = set()
        params: list[list[Tensor]] = []
        starts, per_opt, layer_names, group_names, group_refs = [], [], [], [], []
        layer_idx: list[int] = []
        group_idx: list[int] = []
        layer_of_name: dict[str, int] = {}
        layer_optimizer: list[int] = []
        group_of_layer: list[int] = []
        judged: list[bool] = []
        total = 0
        for o, opt in enumerate(optimizers):
            starts.append(total)
            per_opt.append(len(opt.param_groups))
            mine: list[Tensor] = []
            for g, group in enumerate(opt.param_groups):
                label = group.get("name") if isinstance(group.get("name"), str) else None
                prefix = f"opt{o}." if len(optimizers) > 1 else ""
                group_names.append(f"{prefix}{label or f'group{g}'}")
                group_refs.append((o, g))
                for p in group["params"]:
                    if id(p) in seen:
                        continue
                    seen.add(id(p))
                    layer = owner.get(id(p), f"param{total}")
                    if layer not in layer_of_name:
                        layer_of_name[layer] = len(layer_names)
                        layer_names.append(layer)
                        layer_optimizer.append(o)
                        group_of_layer.append(len(group_names) - 1)
                        judged.append(False)
                    index = layer_of_name[layer]
                    judged[index] = judged[index] or p.dim() >= 2
                    layer_idx.append(index)
                    group_idx.append(len(group_names) - 1)
                    mine.append(p)
                    total += 1
            params.append(mine)
        flat = [p for ps in params for p in ps]
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in flat) else torch.float32
        return cls(
            optimizers, params, starts, per_opt, layer_names, group_names, group_refs, judged, layer_optimizer,
            group_of_layer,
            torch.tensor(layer_idx, dtype=torch.long, device=device),
            torch.tensor(group_idx, dtype=torch.long, device=device) + len(layer_names),
            torch.zeros((), device=device, dtype=dtype), dtype,
        )  # fmt: skip

    @property
    def total(self) -> int:
        """How many parameters the layout holds."""
        return self.starts[-1] + len(self.params[-1]) if self.params else 0

    def stray(self, module: nn.Module) -> list[str]:
        """The names of ``module``'s trainable parameters that no optimizer holds (they never change)."""
        held = {id(p) for ps in self.params for p in ps}
        return [name for name, p in module.named_parameters() if p.requires_grad and id(p) not in held]

    def layer_params(self) -> dict[str, list[Tensor]]:
        """Each layer's parameters."""
        out: dict[str, list[Tensor]] = {}
        flat = [p for ps in self.params for p in ps]
        for p, k in zip(flat, self.layer_index.tolist()):
            out.setdefault(self.layer_names[k], []).append(p)
        return out

    def judged_layers(self) -> dict[str, list[str]]:
        """Each group's judged layers (by group name, every group present)."""
        groups: dict[str, list[str]] = {g: [] for g in self.group_names}
        for name, judged, g in zip(self.layer_names, self.judged, self.group_of_layer):
            if judged:
                groups[self.group_names[g]].append(name)
        return groups

    def group_lrs(self) -> dict[str, float | None]:
        """Each group's current learning rate (``None`` where its ``"lr"`` is not a number)."""
        out: dict[str, float | None] = {}
        for g, (o, index) in zip(self.group_names, self.group_refs):
            lr = self.optimizers[o].param_groups[index].get("lr")
            out[g] = float(lr) if isinstance(lr, (float, int, Tensor)) else None
        return out

    def param_mask(self, stepped: frozenset[int]) -> Tensor:
        """1 for a parameter that is trainable and whose optimizer stepped (cached per pattern)."""
        trainable = tuple(p.requires_grad for ps in self.params for p in ps)
        key = (trainable, stepped)
        mask = self.masks.get(key)
        if mask is None:
            owners = [o for o, ps in enumerate(self.params) for _ in ps]
            values = [float(t and o in stepped) for t, o in zip(trainable, owners)]
            mask = torch.tensor(values, dtype=self.dtype).to(self.zero.device, non_blocking=True)
            if len(self.masks) > 16:
                self.masks.clear()
            self.masks[key] = mask
        return mask

    def per_layer_norms(self, norms: Tensor) -> Tensor:
        """``[rows, parameters]`` norms -> ``[rows, layers]`` (float64: the root of the summed squares)."""
        squares = norms.to(torch.float64).square()
        per_layer = torch.zeros(
            squares.shape[0], len(self.layer_names), dtype=torch.float64, device=squares.device
        )
        return per_layer.index_add_(1, self.layer_index, squares).sqrt()


class UpdateMeter:
    """The update/weight ratios of one layout on the device: :meth:`snapshot` copies an optimizer's
    parameters before its step, :meth:`measure` (once the batch is over) adds each layer's and group's
    ratio to the interval's accumulators (``acc``: :data:`ACC_ROWS` rows), :meth:`read` turns the reduced
    accumulators into metrics and tallies. No host read until :meth:`read`.

    Args:
        layout: the parameters measured.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 2))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> meter = UpdateMeter(ParamLayout.build([opt], net, torch.device("cpu")))
        >>> net(torch.ones(1, 4)).sum().backward(); meter.snapshot(0, step=0); opt.step()
        >>> meter.measure(judged=True, low=1e-5, high=1e-1); tallies = {}
        >>> sorted(meter.read(meter.acc.flatten(), tallies)), tallies["0"].steps
        (['0/update_ratio', 'param_group/group0/update_ratio'], 1.0)
    """

    def __init__(self, layout: ParamLayout) -> None:
        self.layout = layout
        device = layout.zero.device
        columns = len(layout.layer_names) + len(layout.group_names)
        self.acc = torch.zeros(ACC_ROWS, columns, dtype=torch.float64, device=device)
        self._scratch = torch.zeros(2, layout.total, dtype=layout.dtype, device=device)
        self.pending: dict[int, list[Tensor]] = {}
        self.step = 0

    def snapshot(self, optimizer: int, step: int) -> None:
        """Copy optimizer ``optimizer``'s parameters before it takes step ``step`` (held until :meth:`measure`)."""
        self.step = step
        self.pending[optimizer] = list(torch._foreach_mul(self.layout.params[optimizer], 1.0))

    def measure(self, judged: bool, low: float, high: float) -> None:
        """||W_after - W_before|| and ||W_before|| of the optimizers that stepped, per layer and group, into
        the accumulators (the judged rows too when ``judged``; ``low``/``high``: the band). Frees the copies."""
        layout, scratch, acc = self.layout, self._scratch, self.acc
        stepped = frozenset(self.pending)
        with torch.no_grad():
            scratch.zero_()
            for o, before in self.pending.items():
                params = layout.params[o]
                start, stop = layout.starts[o], layout.starts[o] + len(params)
                torch.stack(torch._foreach_norm(before, 2, dtype=layout.dtype), out=scratch[1, start:stop])
                torch._foreach_sub_(before, params)
                torch.stack(torch._foreach_norm(before, 2, dtype=layout.dtype), out=scratch[0, start:stop])
            self.pending.clear()  # the copies are freed here
            mask = layout.param_mask(stepped)
            squares = scratch.square().mul_(mask).to(torch.float64)
            sums = torch.zeros(2, acc.shape[1], dtype=torch.float64, device=acc.device)
            sums.index_add_(1, layout.layer_index, squares).index_add_(1, layout.group_index, squares)
            # a layer counts when it has a trainable parameter of a stepping optimizer and a non-zero
            # weight; a non-finite update (or weight) counts as an infinite ratio: far above the band
            held = torch.zeros_like(sums[0]).index_add_(0, layout.layer_index, mask.to(torch.float64))
            held.index_add_(0, layout.group_index, mask.to(torch.float64))
            valid = (held > 0) & (sums[1] != 0)
            ratio = (sums[0] / sums[1].clamp_min(1e-300)).sqrt()
            ratio = torch.where(ratio.isnan(), math.inf, ratio)
            log_ratio = torch.where(valid, ratio.clamp_min(RATIO_FLOOR).log10(), 0.0)
            count = valid.to(torch.float64)
            if judged:
                below = (ratio < low) & valid
                above = (ratio > high) & valid
                acc.add_(
                    torch.stack(
                        [count, log_ratio, count, below.to(count.dtype), above.to(count.dtype), log_ratio]
                    )
                )
            else:
                acc[:2].add_(torch.stack([count, log_ratio]))

    def read(self, reduced: Tensor, tallies: dict[str, LayerTally]) -> dict[str, float]:
        """The interval's ``<layer>/update_ratio`` and ``param_group/<group>/update_ratio`` (geometric means)
        from the reduced accumulators; their judged rows are added to ``tallies`` (by the same names)."""
        layout = self.layout
        names = [*layout.layer_names, *(f"param_group/{g}" for g in layout.group_names)]
        acc = reduced.reshape(ACC_ROWS, len(names))
        metrics: dict[str, float] = {}
        for k, name in enumerate(names):
            count = float(acc[0, k])
            if count > 0:
                metrics[f"{name}/update_ratio"] = 10 ** (float(acc[1, k]) / count)
            if float(acc[2, k]) > 0:
                tally = tallies.setdefault(name, LayerTally())
                tally.steps += float(acc[2, k])
                tally.below += float(acc[3, k])
                tally.above += float(acc[4, k])
                tally.sum_log += float(acc[5, k])
        return metrics

    def reset(self) -> None:
        """Zero the accumulators (a new interval)."""
        self.acc.zero_()

    def state(self) -> dict[str, Any]:
        """The interval's accumulators, for a checkpoint (a CPU copy), with the layer and group names they
        belong to. Not the parameter copies of :meth:`snapshot`: they live only from an optimizer step to
        the end of its batch, and Lightning saves between batches."""
        layout = self.layout
        return {
            "layers": list(layout.layer_names),
            "groups": list(layout.group_names),
            "acc": self.acc.detach().cpu().clone(),
        }

    def load(self, state: dict[str, Any]) -> bool:
        """Put back what :meth:`state` returned; ``False`` (nothing changed) when it was measured on other
        layers or groups.

        Example:
            >>> net = nn.Sequential(nn.Linear(4, 2))
            >>> layout = ParamLayout.build([torch.optim.SGD(net.parameters(), 0.1)], net, torch.device("cpu"))
            >>> meter = UpdateMeter(layout); meter.acc += 1; again = UpdateMeter(layout)
            >>> again.load(meter.state()), float(again.acc.sum())
            (True, 12.0)
        """
        layout, acc = self.layout, state.get("acc")
        same = list(state.get("layers", ())) == layout.layer_names and list(state.get("groups", ())) == (
            layout.group_names
        )
        if not same or not isinstance(acc, Tensor) or tuple(acc.shape) != tuple(self.acc.shape):
            return False
        self.acc.copy_(acc)
        return True
