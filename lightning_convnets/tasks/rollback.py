"""The mechanics behind ``nonfinite="skip"`` and ``"rollback"``: what is saved before a step and put back
after a bad one, and the loss-spike rule.

:class:`BatchNormBuffers` copies every BatchNorm running statistic before each optimizer step's first
forward (one ``cat`` per dtype on the device, no host read), so that a skipped step leaves them as they
were. :class:`TrainingSnapshot` is the last good in-memory state (weights, buffers, optimizer state) of
``"rollback"``, taken every ``snapshot_every_n_steps`` steps at a step whose loss was healthy.
:class:`LossSpikeRule` is the acting spike rule (a loss above ``k`` robust standard deviations of its
recent history: median and MAD). :func:`first_nonfinite_module` and :func:`invalid_batchnorm` name the
culprit of a rollback. The policy that uses them is :mod:`lightning_convnets.tasks.nonfinite`; the
reference, with what each costs, is ``docs/reliability.md``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

__all__ = [
    "BatchNormBuffers",
    "LossSpikeRule",
    "TrainingSnapshot",
    "batchnorm_modules",
    "first_nonfinite_module",
    "invalid_batchnorm",
    "invalid_buffers",
]

_MAD_TO_SD = 1.4826  # MAD of a normal distribution times this is its standard deviation


def batchnorm_modules(module: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The BatchNorm layers of ``module`` that keep running statistics, ``(name, layer)`` in order."""
    return [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, _BatchNorm)
        and m.track_running_stats
        and isinstance(m.running_var, Tensor)
        and not isinstance(m.running_var, nn.parameter.UninitializedBuffer)
    ]


def invalid_buffers(layers: Sequence[_BatchNorm]) -> Tensor | None:
    """On the device, no host read: whether any running mean or variance is NaN/Inf or a variance is
    negative (a 0-d bool); ``None`` without layers."""
    if not layers:
        return None
    variances = torch.cat([bn.running_var.reshape(-1) for bn in layers])
    means = torch.cat([bn.running_mean.reshape(-1) for bn in layers])
    return ~torch.isfinite(variances.sum() + means.sum()) | (variances.amin() < 0)


def invalid_batchnorm(module: nn.Module) -> list[str]:
    """Names of the BatchNorm layers of ``module`` whose running statistics are NaN/Inf or whose variance
    is negative (a host read per layer: for reports, not for every step)."""
    return [
        name
        for name, bn in batchnorm_modules(module)
        if not bool(torch.isfinite(bn.running_mean).all() & torch.isfinite(bn.running_var).all())
        or bool((bn.running_var < 0).any())
    ]


class BatchNormBuffers:
    """The running statistics of every BatchNorm layer, copied before an optimizer step's forwards and
    put back when the step is skipped (a NaN batch would otherwise leave NaN statistics behind).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> saved = BatchNormBuffers(net)
        >>> saved.take()
        >>> _ = net(torch.full((4, 2), float("nan")))
        >>> saved.restore()
        >>> net[1].running_mean
        tensor([0., 0.])
    """

    def __init__(self, module: nn.Module) -> None:
        self.layers = [bn for _, bn in batchnorm_modules(module)]
        self._buffers = [
            b for bn in self.layers for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked)
        ]
        self._saved: dict[torch.dtype, Tensor] = {}

    def _groups(self) -> dict[torch.dtype, list[Tensor]]:
        groups: dict[torch.dtype, list[Tensor]] = {}
        for buffer in self._buffers:
            groups.setdefault(buffer.dtype, []).append(buffer)
        return groups

    @torch.no_grad()
    def take(self) -> None:
        """Copy the buffers (one ``cat`` per dtype, on their device)."""
        self._saved = {
            dtype: torch.cat([b.reshape(-1) for b in group]) for dtype, group in self._groups().items()
        }

    @torch.no_grad()
    def restore(self) -> None:
        """Put the copied values back (nothing before the first :meth:`take`)."""
        for dtype, group in self._groups().items():
            saved = self._saved.get(dtype)
            if saved is None:
                continue
            offset = 0
            for buffer in group:
                buffer.copy_(saved[offset : offset + buffer.numel()].reshape(buffer.shape))
                offset += buffer.numel()


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_clone(v) for v in value)
    return value


class TrainingSnapshot:
    """The last good state of a fit in memory: the module's ``state_dict`` (weights and buffers) and the
    optimizer's state (momenta, Adam moments and step counts), cloned on their device.

    :meth:`restore` copies them back in place (parameters keep their identity, so the optimizer and DDP
    still hold them) and keeps the optimizer's current hyperparameters (learning rate, momentum of a
    one-cycle schedule): the schedule goes on, and a rollback lowers the rate on top of it. Costs one
    copy of the weights and optimizer state in device memory.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        >>> snapshot = TrainingSnapshot()
        >>> snapshot.take(net, opt, step=0)
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(float("nan"))
        >>> snapshot.restore(net, opt)
        0
        >>> bool(torch.isfinite(net.weight).all())
        True
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self._model: dict[str, Tensor] = {}
        self._optimizer: dict[str, Any] = {}

    @property
    def taken(self) -> bool:
        return self.step is not None

    @torch.no_grad()
    def take(self, module: nn.Module, optimizer: Optimizer | None, step: int) -> None:
        """Clone the module's state and the optimizer's per-parameter state (taken at optimizer ``step``,
        before its update)."""
        self._model = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self._optimizer = _clone(optimizer.state_dict()["state"]) if optimizer is not None else {}
        self.step = int(step)

    @torch.no_grad()
    def restore(self, module: nn.Module, optimizer: Optimizer | None) -> int:
        """Copy the snapshot back (the optimizer keeps its current ``param_groups``); returns its step."""
        if self.step is None:
            raise RuntimeError("TrainingSnapshot.restore before any take")
        current = module.state_dict()
        for key, value in self._model.items():
            current[key].copy_(value)
        if optimizer is not None:
            state = optimizer.state_dict()
            state["state"] = _clone(self._optimizer)
            optimizer.load_state_dict(state)
        return self.step


class LossSpikeRule:
    """A training loss is a spike when it lies above the median of the recent losses by more than ``k``
    robust standard deviations (1.4826 x the median absolute deviation); spikes stay out of the history.

    Args:
        k: robust standard deviations above the median that make a spike.
        window: recent healthy losses kept.
        min_history: losses needed before the rule judges (the first steps of a run fall fast).

    Example:
        >>> rule = LossSpikeRule(k=6, window=50, min_history=5)
        >>> [rule.check(v) for v in (1.0, 0.9, 1.1, 1.0, 0.95, 1.05, 9.0)]
        [False, False, False, False, False, False, True]
    """

    def __init__(self, k: float = 8.0, window: int = 200, min_history: int = 20) -> None:
        if not k > 0:
            raise ValueError(f"spike_threshold must be > 0 (robust standard deviations), got {k}")
        self.k, self.window, self.min_history = float(k), int(window), int(min_history)
        self.history: deque[float] = deque(maxlen=self.window)
        self.last: tuple[float, float] = (math.nan, math.nan)  # (median, robust sd) of the last judgement

    def band(self) -> tuple[float, float]:
        """``(median, robust standard deviation)`` of the history (a floor of 1e-3 x |median| + 1e-8 keeps a
        flat history from making every wiggle a spike)."""
        values = sorted(self.history)
        n = len(values)
        median = 0.5 * (values[(n - 1) // 2] + values[n // 2])
        deviations = sorted(abs(v - median) for v in values)
        mad = 0.5 * (deviations[(n - 1) // 2] + deviations[n // 2])
        return median, max(_MAD_TO_SD * mad, 1e-3 * abs(median) + 1e-8)

    def check(self, loss: float) -> bool:
        """Whether ``loss`` is a spike; a healthy loss joins the history."""
        if len(self.history) >= self.min_history:
            self.last = median, sd = self.band()
            if loss > median + self.k * sd:
                return True
        self.history.append(float(loss))
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque((float(v) for v in state.get("history", [])), maxlen=self.window)


@torch.no_grad()
def first_nonfinite_module(module: nn.Module, inputs: Any) -> str | None:
    """The first module (in execution order) whose output holds a NaN/Inf when ``module`` runs on
    ``inputs`` in eval mode (BatchNorm then reads its running statistics, so a corrupted one shows); modes
    are restored. One forward with a hook per module and a host read per output: for a rollback's report,
    not for every step. ``None`` when every output is finite or the forward fails."""
    found: list[str] = []
    names = {m: name for name, m in module.named_modules() if name}

    def hook(mod: nn.Module, args: Any, output: Any) -> None:
        if found:
            return
        tensors = (
            [output]
            if isinstance(output, Tensor)
            else [t for t in (output if isinstance(output, list | tuple) else ()) if isinstance(t, Tensor)]
        )
        if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors):
            found.append(names[mod])

    leaves = [m for m in names if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        module(inputs)
    except Exception:  # a report helper: a model that cannot run its inputs alone names nothing
        return None
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.train(mode)
    return found[0] if found else None
