"""Dead and saturated units: per channel, how many outputs of each ``nn.ReLU``, ``nn.Sigmoid`` and
``nn.Tanh`` module are alive over a logging interval, and the rule that judges the saturated ones.

Owns :class:`UnitCounts` (the activation monitor's counts, on the device: fed from a forward hook, summed in
the monitor's one collective, zeroed per interval, checkpointed), which modules are counted
(:func:`unit_kind`), what "alive" means (:func:`alive_per_channel`, :data:`SATURATION_MARGIN`), and the
``saturated_units`` rule (:func:`saturated_units`, :data:`KIND_SATURATED`, :data:`SATURATED_FRACTION`).
Dead ReLUs are judged by :func:`lightning_convnets.callbacks.diagnosis.dead_relus`, with the monitor's
targets. :class:`~lightning_convnets.callbacks.activation_variance.ActivationVarianceMonitor` installs the
hooks (``units=True``); ``docs/monitors.md`` ("Dead and saturated units") has the details.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .diagnosis import Finding
from .packing import PackedStats, StatsPacker

__all__ = [
    "KIND_SATURATED",
    "SATURATED_FRACTION",
    "SATURATION_MARGIN",
    "UnitCounts",
    "alive_per_channel",
    "saturated_units",
    "unit_kind",
]

KIND_SATURATED = "saturated_units"
SATURATED_FRACTION = 0.25
"""Share of a sigmoid/tanh layer's channels saturated for a whole interval that makes a warning."""
SATURATION_MARGIN = 0.01
"""How close to a bound (sigmoid: 0 or 1; tanh: -1 or 1) an output counts as saturated (tanh: |x| > 2.6;
sigmoid: |x| > 4.6 before it)."""


class UnitCounts:
    """Per activation layer (a name and its :func:`unit_kind`), the alive elements of each channel and the
    elements seen per channel over an interval, on the output's device (float64, no host read).

    A channel with no alive element over the interval is dead (ReLU: ``<layer>/dead_fraction``) or
    saturated (sigmoid/tanh: ``<layer>/saturated_fraction``). A layer's counts are allocated at its first
    floating output of at least two dimensions; a later output of another width (a module reused at
    another width) is left out (shapes are static: no host sync).

    Example:
        >>> counts = UnitCounts()
        >>> counts.add("act", "relu")
        >>> counts.update("act", torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 3.0]]))
        >>> counts.update("act", torch.zeros(4, 5))  # another width: left out
        >>> counts.alive("act").tolist(), counts.seen("act").item()
        ([0.0, 2.0, 1.0], 2.0)
        >>> packer = StatsPacker()
        >>> counts.pack(packer)
        >>> counts.metrics(packer.unpack(packer.flat().unsqueeze(0)))
        {'act/dead_fraction': 0.3333333333333333}
    """

    def __init__(self) -> None:
        self._layers: dict[str, list[Any]] = {}  # name -> [kind, alive per channel, elements seen]

    def add(self, name: str, kind: str) -> None:
        """Count the layer ``name`` of kind ``"relu"``, ``"sigmoid"`` or ``"tanh"`` from now on."""
        if kind not in ("relu", "sigmoid", "tanh"):
            raise ValueError(f"UnitCounts.add: kind must be 'relu', 'sigmoid' or 'tanh', got {kind!r}")
        self._layers[name] = [kind, None, None]

    def add_modules(self, model: nn.Module, skip: Collection[int] = ()) -> list[tuple[str, nn.Module]]:
        """Add every activation module of ``model`` (in ``named_modules`` order) whose ``id`` is not in
        ``skip``; returns their ``(name, module)``, for the caller's hooks."""
        added = []
        for name, module in model.named_modules():
            kind = unit_kind(module)
            if kind is not None and id(module) not in skip:
                self.add(name, kind)
                added.append((name, module))
        return added

    def names(self, *kinds: str) -> list[str]:
        """The layers of the given kinds (all without one), in the order they were added."""
        return [n for n, state in self._layers.items() if not kinds or state[0] in kinds]

    def alive(self, name: str) -> Tensor | None:
        """The alive elements per channel of ``name`` this interval (``None`` before its first output)."""
        return self._layers[name][1]

    def seen(self, name: str) -> Tensor | None:
        """The elements seen per channel of ``name`` this interval (a float64 scalar, ``None`` before)."""
        return self._layers[name][2]

    def update(self, name: str, output: Any) -> None:
        """Add one output of the layer ``name`` (a forward hook's ``output``; other values are ignored)."""
        state = self._layers[name]
        if not isinstance(output, Tensor) or not output.is_floating_point() or output.dim() < 2:
            return
        if state[1] is not None and output.shape[1] != state[1].numel():
            return  # a module reused at another width: the first width only (static shapes)
        alive = alive_per_channel(output.detach(), state[0])
        if state[1] is None:
            state[1] = torch.zeros_like(alive)
            state[2] = torch.zeros((), dtype=torch.float64, device=alive.device)
        state[1] += alive
        state[2] += output.numel() // output.shape[1]

    def pack(self, packer: StatsPacker) -> None:
        """The counted layers' ``unit/<name>/alive`` and ``unit/<name>/seen``, summed across ranks."""
        for name, (_, alive, seen) in self._layers.items():
            if alive is not None:
                packer.sum(f"unit/{name}/alive", alive)
                packer.sum(f"unit/{name}/seen", seen)

    def reset(self) -> None:
        """Zero the counts in place (a new interval; the buffers are kept)."""
        for state in self._layers.values():
            if state[1] is not None:
                state[1].zero_()
                state[2].zero_()

    def metrics(self, stats: PackedStats) -> dict[str, float]:
        """``<layer>/dead_fraction`` (ReLU) or ``<layer>/saturated_fraction`` (sigmoid/tanh): the share of
        the layer's channels with no alive element in the interval's merged counts ``stats``."""
        metrics: dict[str, float] = {}
        for name, (kind, _, _) in self._layers.items():
            alive, seen = stats.get(f"unit/{name}/alive"), stats.get(f"unit/{name}/seen")
            if alive is not None and seen is not None and float(seen.sum()) > 0:
                key = "dead_fraction" if kind == "relu" else "saturated_fraction"
                metrics[f"{name}/{key}"] = float((alive == 0).double().mean())
        return metrics

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """This interval's counts so far, on the CPU (the layers that were counted)."""
        return {
            name: {"alive": alive.detach().cpu().clone(), "seen": seen.detach().cpu().clone()}
            for name, (_, alive, seen) in self._layers.items()
            if alive is not None
        }

    def load_state_dict(self, state: Mapping[str, Mapping[str, Tensor]], device: torch.device | str) -> None:
        """Put saved counts back on ``device``, for the known layers not counted yet (a resumed run)."""
        for name, saved in state.items():
            layer = self._layers.get(name)
            if layer is not None and layer[1] is None:
                layer[1] = saved["alive"].to(device)
                layer[2] = saved["seen"].to(device)


def unit_kind(module: nn.Module) -> str | None:
    """``"relu"``, ``"sigmoid"`` or ``"tanh"`` for the activation modules whose units are counted, else
    ``None``.

    Example:
        >>> unit_kind(nn.Tanh()), unit_kind(nn.Conv2d(1, 1, 1))
        ('tanh', None)
    """
    for types, kind in ((nn.ReLU, "relu"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh")):
        if isinstance(module, types):
            return kind
    return None


def alive_per_channel(output: Tensor, kind: str, margin: float = SATURATION_MARGIN) -> Tensor:
    """Per channel (dimension 1), how many elements of ``output`` are alive: positive after a ReLU, further
    than ``margin`` from 0 and 1 after a sigmoid, from -1 and 1 after a tanh (float64, on the device).

    Example:
        >>> alive_per_channel(torch.tensor([[0.0, 0.5], [0.0, 2.0]]), "relu").tolist()
        [0.0, 2.0]
    """
    if kind == "relu":
        alive = output > 0
    elif kind == "sigmoid":
        alive = (output > margin) & (output < 1 - margin)
    else:
        alive = output.abs() < 1 - margin
    dims = [d for d in range(output.dim()) if d != 1]
    # counted in integers (exact in any order, so the float64 result is the same bit for bit): a bool
    # reduction into int32 runs about twice as fast on a CPU as one into float64
    per_channel = output.numel() // max(1, output.shape[1]) if output.dim() > 1 else output.numel()
    counts = alive.sum(dim=dims, dtype=torch.int32 if per_channel < 2**31 else torch.int64)
    return counts.to(torch.float64)


def saturated_units(
    fractions: Mapping[str, float],
    step: int,
    threshold: float = SATURATED_FRACTION,
    monitor: str = "activation_variance",
) -> Finding | None:
    """Sigmoid/tanh layers with at least ``threshold`` of their channels saturated for a whole interval
    (``layer -> fraction``, depth order), as one warning naming them all, the worst first in the message.

    Example:
        >>> saturated_units({"net.3": 0.5, "net.5": 0.0}, 10).layers
        ['net.3']
    """
    hits = [(n, f) for n, f in fractions.items() if math.isfinite(f) and f >= threshold]
    if not hits:
        return None
    name, worst = max(hits, key=lambda h: h[1])
    more = f" ({len(hits) - 1} more layer(s) at {threshold:.0%} or above)" if len(hits) > 1 else ""
    return Finding(
        monitor,
        "warning",
        [n for n, _ in hits],
        f"{worst:.0%} of the channels of {name} are saturated (within {SATURATION_MARGIN} of a bound of the "
        f"sigmoid/tanh on every recorded example) for a whole interval at step {step}{more}: their gradient "
        "is near zero",
        "scale the inputs of the activation down (normalise them: BatchNorm/LayerNorm before it), check the "
        "weight and bias initialisation of the layer before (Xavier/Glorot for tanh), lower the learning rate",
        step=step,
        values={"saturated_fraction": worst},
        kind=KIND_SATURATED,
    )
