"""Loss spikes against a robust running band, and the layer whose gradient norm jumped first.

Owns :class:`StepRing` (the optimization monitor's on-device ring: one row per optimizer step, holding
the step's training loss and every parameter's gradient norm, written without a host read and reduced
once per logging interval), :class:`SpikeTail` (the host-side window of recent steps that the band is
computed from, checkpointed) and the judging: :func:`robust_band`, :func:`find_spikes`,
:func:`first_jump`, the rules :func:`loss_spike_finding` and :func:`spike_findings` (one finding per
episode) and the report's table (:func:`spike_rows`), small functions of plain numbers with their
thresholds as module constants. The monitor that feeds them is
:class:`~lightning_convnets.callbacks.optimization.OptimizationMonitor`; the method is in
``docs/monitors.md``.

A spike is a step whose loss lies above ``median + SPIKE_SIGMAS * 1.4826 * MAD`` of the previous
``BAND_WINDOW`` steps (the median absolute deviation scaled to a Gaussian's standard deviation: a band
that one outlier cannot widen) and at least ``SPIKE_MIN_RATIO`` times the median; a non-finite loss is
always one. Its cause is sought in the gradients: for every layer, the log of its gradient norm against
its own robust band over the steps before the spike; the layer that left its band first (within
``JUMP_LOOKBACK`` steps before the spike, or at the spike) is named, a non-finite gradient first of all.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from .diagnosis import Finding

__all__ = [
    "BAND_WINDOW",
    "JUMP_BAND",
    "JUMP_LOOKBACK",
    "JUMP_SIGMAS",
    "KIND_LOSS_SPIKE",
    "MAD_SCALE",
    "MIN_BAND",
    "SPIKE_MIN_RATIO",
    "SPIKE_SIGMAS",
    "Jump",
    "Spike",
    "SpikeTail",
    "StepRing",
    "episodes",
    "find_spikes",
    "first_jump",
    "loss_spike_finding",
    "robust_band",
    "spike_findings",
    "spike_rows",
]

KIND_LOSS_SPIKE = "loss_spike"
"""Finding kind: the training loss left its robust band (or became non-finite) at a step."""

MAD_SCALE = 1.4826
"""Median absolute deviation -> standard deviation of a Gaussian (1 / Phi^-1(3/4))."""
SPIKE_SIGMAS = 6.0
"""A loss this many robust standard deviations above the band's median is a spike (a Gaussian's batch
losses pass 6 sigmas about once in 10^9 steps; real batch losses have heavier tails, hence 6, not 3)."""
SPIKE_MIN_RATIO = 1.5
"""...and at least this many times the median (a converged loss with a tiny spread flags no wobble)."""
BAND_WINDOW = 50
"""Previous steps whose losses (and gradient norms) form the band."""
MIN_BAND = 10
"""Steps needed in the band before a step is judged (the first steps of a fit are not)."""
JUMP_SIGMAS = 4.0
"""A layer whose step-to-step change of log gradient norm lies this many robust sigmas above its own band
of changes has jumped..."""
JUMP_MIN_RATIO = 2.0
"""...and its gradient norm at least doubled from the previous step."""
JUMP_LOOKBACK = 5
"""Steps before a spike searched for the first jump of a layer's gradient norm."""
JUMP_BAND = 20
"""Step-to-step changes (before the searched steps) forming each layer's band."""
MAX_SPIKE_FINDINGS = 5
"""Spike episodes reported one by one (the largest); the rest are counted in one more line."""
EPISODE_GAP = 10
"""Spikes within this many steps of the previous one belong to its episode (the steps after a bad batch
often stay above the band while the model recovers): one finding per episode, named by its first spike."""


def episodes(spikes: Sequence[Spike], gap: int = EPISODE_GAP) -> list[list[Spike]]:
    """Spikes grouped into episodes (in step order; a spike within ``gap`` steps of the previous one joins
    its episode).

    Example:
        >>> [[s.step for s in e] for e in episodes([Spike(5, 9, 1, 9, 9), Spike(8, 3, 1, 7, 3), Spike(40, 5, 1, 8, 5)])]
        [[5, 8], [40]]
    """
    out: list[list[Spike]] = []
    for spike in sorted(spikes, key=lambda s: s.step):
        if out and spike.step - out[-1][-1].step <= gap:
            out[-1].append(spike)
        else:
            out.append([spike])
    return out


@dataclass
class Jump:
    """The layer whose gradient norm left its band first before (or at) a spike."""

    layer: str
    step: int
    sigmas: float  # inf for a non-finite gradient
    ratio: float  # gradient norm / the previous step's
    nonfinite: bool = False


@dataclass
class Spike:
    """One loss spike: the step, the loss, its size against the band, and the first jump."""

    step: int
    loss: float
    median: float
    sigmas: float  # (loss - median) / (1.4826 MAD); inf when the loss is non-finite or the MAD is 0
    ratio: float  # loss / median (nan when the median is not positive)
    jump: Jump | None = None
    norms_recorded: bool = True  # False: some step before it has no gradient norms (per-step norms off)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Spike:
        jump = state.get("jump")
        return cls(**{**state, "jump": Jump(**jump) if jump else None})


def robust_band(values: Sequence[float]) -> tuple[float, float]:
    """``(median, 1.4826 * MAD)`` of the finite ``values`` (``(nan, nan)`` when there are none).

    Example:
        >>> [round(v, 4) for v in robust_band([1.0, 1.1, 0.9, 1.0, 50.0])]  # the outlier moves neither
        [1.0, 0.1483]
    """
    finite = sorted(float(v) for v in values if math.isfinite(v))
    if not finite:
        return math.nan, math.nan
    median = _middle(finite)
    mad = _middle(sorted(abs(v - median) for v in finite))
    return median, MAD_SCALE * mad


def _middle(ordered: list[float]) -> float:
    """``torch.quantile(t, 0.5)`` of sorted float64 values, bit for bit, on the host (a flush searches
    every step of its interval: two tensor quantiles per step cost ~2 ms on a CPU): the middle value, or
    torch's linear interpolation between the two middle ones (``lerp`` at weight 0.5:
    ``b - (b - a) * 0.5``)."""
    n = len(ordered)
    if n % 2:
        return ordered[n // 2]
    a, b = ordered[n // 2 - 1], ordered[n // 2]
    return b - (b - a) * 0.5


def _size(value: float, median: float, sigma: float) -> tuple[float, float]:
    """(robust sigmas above the median, ratio to the median) of ``value``."""
    if not math.isfinite(value):
        return math.inf, math.inf
    sigmas = (value - median) / sigma if sigma > 0 else (math.inf if value > median else 0.0)
    ratio = value / median if median > 0 else math.nan
    return sigmas, ratio


def first_jump(
    steps: Sequence[int],
    grads: Tensor,
    layers: Sequence[str],
    at: int,
    lookback: int = JUMP_LOOKBACK,
    window: int = JUMP_BAND,
    sigmas: float = JUMP_SIGMAS,
    min_ratio: float = JUMP_MIN_RATIO,
) -> Jump | None:
    """The first layer whose gradient norm left its band in rows ``at - lookback .. at`` of ``grads``
    (``[rows, layers]``, NaN where not recorded, ``inf`` where non-finite, rows in step order): the first
    non-finite norm, else the largest jump of the earliest row with one; ``None`` if no layer jumped. Each layer's band is the
    robust band of the step-to-step changes of ``log(norm)`` over the ``window`` changes before
    ``at - lookback``; a jump is a change above it (and a norm at least ``min_ratio`` times the previous).

    Example:
        >>> g = torch.ones(30, 2) + 0.01 * torch.rand(30, 2); g[25, 1] = 100.0
        >>> first_jump(list(range(30)), g, ["a", "b"], at=27).layer
        'b'
    """
    start = max(0, at - lookback)
    nonfinite = grads[start : at + 1].isinf()  # NaN marks a norm not recorded, inf a non-finite one
    bad_rows = nonfinite.any(1).nonzero().flatten().tolist()
    if bad_rows:  # a non-finite gradient is named before any finite jump
        row = bad_rows[0]
        j = int(nonfinite[row].nonzero()[0])
        return Jump(layers[j], int(steps[start + row]), math.inf, math.inf, nonfinite=True)
    # the band of each layer's step-to-step change of log(norm): a trend (gradient norms fall 100x in
    # the zoo's first 25 steps) is an offset of the changes, not a widening of the band
    logs = torch.where(grads > 0, grads.log(), torch.full_like(grads, math.nan))
    changes = logs[1:] - logs[:-1]  # changes[r - 1]: from row r - 1 to row r
    base = changes[max(0, start - 1 - window) : max(0, start - 1)]
    if base.shape[0] < 3 or grads.shape[1] == 0:
        return None
    bands = [robust_band(base[:, j].tolist()) for j in range(grads.shape[1])]
    for row in range(max(1, start), at + 1):
        best: Jump | None = None
        for j, (median, sigma) in enumerate(bands):
            change = float(changes[row - 1, j])
            if not (math.isfinite(change) and math.isfinite(median)):
                continue
            z, _ = _size(change, median, sigma)
            ratio = math.exp(change)
            if z > sigmas and ratio >= min_ratio and (best is None or z > best.sigmas):
                best = Jump(layers[j], int(steps[row]), z, ratio)
        if best is not None:
            return best
    return None


def find_spikes(
    steps: Sequence[int],
    losses: Sequence[float | None],
    grads: Tensor,
    layers: Sequence[str],
    first_new: int,
    window: int = BAND_WINDOW,
    sigmas: float = SPIKE_SIGMAS,
    min_ratio: float = SPIKE_MIN_RATIO,
    min_band: int = MIN_BAND,
) -> list[Spike]:
    """The spikes among rows ``first_new..`` of a run of steps (rows before ``first_new`` only form the
    band). ``losses`` holds ``None`` where a step has no loss (skipped); a non-finite loss is a spike.
    ``grads`` is ``[rows, layers]`` (NaN where not recorded), for :func:`first_jump`.

    Example:
        >>> losses = [1.0 + 0.01 * (i % 3) for i in range(30)]; losses[20] = 5.0
        >>> [s.step for s in find_spikes(list(range(30)), losses, torch.ones(30, 1), ["fc"], 0)]
        [20]
    """
    found = []
    for i in range(first_new, len(steps)):
        loss = losses[i]
        if loss is None:
            continue
        previous = [v for v in losses[max(0, i - window) : i] if v is not None and math.isfinite(v)]
        if len(previous) < min_band:
            continue
        median, sigma = robust_band(previous)
        z, ratio = _size(loss, median, sigma)
        over_ratio = not (median > 0) or not math.isfinite(loss) or ratio >= min_ratio
        if z > sigmas and over_ratio:
            jump = first_jump(steps, grads, layers, i)
            spike = Spike(int(steps[i]), float(loss), median, z, ratio, jump)
            if (
                jump is None
                and grads.shape[1]
                and grads[max(0, i - JUMP_LOOKBACK - 1) : i + 1].isnan().all(1).any()
            ):
                spike.norms_recorded = False  # a step of the search has no norms: the cause is unknown
            found.append(spike)
    return found


def loss_spike_finding(spike: Spike, monitor: str, followers: Sequence[Spike] = ()) -> Finding:
    """One spike (with the spikes of its episode after it) as a finding: ``error`` for a non-finite loss,
    else ``warning``."""
    nonfinite = not math.isfinite(spike.loss)
    if nonfinite:
        size = f"the loss became {spike.loss} (band median {spike.median:.4g})"
    else:
        ratio = f", {spike.ratio:.1f}x the median" if math.isfinite(spike.ratio) else ""
        sig = f"{spike.sigmas:.0f} robust sigmas" if math.isfinite(spike.sigmas) else "far"
        size = f"loss {spike.loss:.4g} is {sig} above the band (median {spike.median:.4g}{ratio})"
    jump = spike.jump
    if jump is None and not spike.norms_recorded:
        cause = (
            "the layers' gradient norms of the steps before it were not measured (per-step gradient norms "
            "are off on a CPU; OptimizationMonitor(grad_norms_every_step=True) measures them and names the "
            "layer whose norm jumped first)"
        )
        layers: list[str] = []
    elif jump is None:
        cause = "no layer's gradient norm left its band before it (look at the batch: corrupted or mislabelled data)"
        layers = []
    elif jump.nonfinite:
        cause = f"first non-finite gradient: {jump.layer} at step {jump.step}"
        layers = [jump.layer]
    else:
        when = (
            "at the spike"
            if jump.step == spike.step
            else f"at step {jump.step}, {spike.step - jump.step} step(s) before"
        )
        cause = f"{jump.layer}'s gradient norm jumped first ({jump.ratio:.1f}x the step before, {jump.sigmas:.0f} sigmas) {when}"
        layers = [jump.layer]
    if nonfinite:
        suggestion = "lower the learning rate or add warmup / gradient clipping (gradient_clip_val); check the batch for NaN/Inf"
    elif jump is not None and jump.step < spike.step:
        suggestion = (
            f"the gradients of {jump.layer} grew before the loss did: lower its learning rate, add gradient "
            "clipping (gradient_clip_val) or warmup"
        )
    else:
        suggestion = (
            "inspect the batch of that step (corrupted or mislabelled data); if spikes recur, lower the "
            "learning rate or clip gradients (gradient_clip_val)"
        )
    if followers:
        cause += f"; the loss stayed above the band on {len(followers)} more step(s) until step {followers[-1].step}"
    values = {"loss": spike.loss, "median": spike.median, "sigmas": spike.sigmas, "ratio": spike.ratio}
    values["episode_spikes"] = float(1 + len(followers))
    if jump is not None:
        values.update({"jump_step": float(jump.step), "jump_sigmas": jump.sigmas, "jump_ratio": jump.ratio})
    return Finding(
        monitor,
        "error" if nonfinite else "warning",
        layers,
        f"loss spike at step {spike.step}: {size}; {cause}",
        suggestion,
        step=spike.step,
        values=values,
        kind=KIND_LOSS_SPIKE,
    )


def spike_findings(spikes: Sequence[Spike], monitor: str) -> list[Finding]:
    """The run's spikes as findings: one per episode (a spike and the spikes right after it), the largest
    first, at most ``MAX_SPIKE_FINDINGS``; the other episodes counted in one more line.

    Example:
        >>> [f.step for f in spike_findings([Spike(5, 9, 1, 9, 9), Spike(8, 3, 1, 7, 3), Spike(40, 5, 1, 12, 5)], "m")]
        [40, 5]
    """
    ranked = sorted(episodes(spikes), key=lambda e: (-e[0].sigmas, e[0].step))
    findings = [loss_spike_finding(e[0], monitor, e[1:]) for e in ranked[:MAX_SPIKE_FINDINGS]]
    rest = ranked[MAX_SPIKE_FINDINGS:]
    if rest:
        steps = ", ".join(str(e[0].step) for e in sorted(rest, key=lambda e: e[0].step)[:10])
        findings.append(
            Finding(
                monitor,
                "warning",
                [],
                f"{len(rest)} more loss spike episode(s), starting at steps {steps}{' ...' if len(rest) > 10 else ''}",
                "recurring spikes: lower the learning rate, add warmup or gradient clipping",
                kind=KIND_LOSS_SPIKE,
            )
        )
    return findings


def spike_rows(spikes: Sequence[Spike]) -> list[dict[str, Any]]:
    """The report's table of spikes: one row each, with its size and the layer whose gradient jumped first.

    Example:
        >>> spike_rows([Spike(30, 14.0, 0.02, 500.0, 700.0, Jump("fc", 29, 18.0, 1000.0))])[0]["first jump"]
        'fc'
    """
    return [
        {
            "step": s.step,
            "loss": s.loss,
            "median": s.median,
            "robust sigmas": s.sigmas,
            "x median": s.ratio,
            "first jump": s.jump.layer if s.jump else "",
            "jump step": s.jump.step if s.jump else None,
        }
        for s in spikes
    ]


class StepRing:
    """One row per optimizer step since the last flush: the step's loss (the sum of its micro-batches'
    ``outputs["loss"]``, which Lightning divides by the accumulation factor; or their mean under manual
    optimization) and every parameter's gradient norm, on the device. Writes are one tensor op each and
    read nothing back; the host keeps which rows hold what.

    Example:
        >>> ring = StepRing(capacity=4, params=3, device=torch.device("cpu"))
        >>> ring.begin(7); ring.add_loss(torch.tensor(2.0)); ring.rows()[0][:2]
        (7, 0)
    """

    def __init__(
        self, capacity: int, params: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> None:
        self.capacity = capacity
        self._loss = torch.zeros(capacity, device=device, dtype=torch.float64)
        self._loss_slots = self._loss.unbind(0)  # views of its elements: a write is one op, no indexing
        # the losses of the steps since the last read, detached, written into ``loss`` when it is read
        # (the same ops in the same order, bit for bit; a quiet step then pays one detach)
        self._held: list[tuple[int, bool, Tensor]] = []
        self.grads = torch.zeros(capacity, params, device=device, dtype=dtype)
        # per row, in order: [slot, step, micro-batches with a loss, optimizers whose norms it holds,
        # optimizers that stepped without their norms measured (per-step norms off: a quiet step)]
        self._rows: deque[list[Any]] = deque()
        self._next = 0

    @property
    def loss(self) -> Tensor:
        """The loss of each slot (float64; micro-batches summed), the held losses written in first."""
        if self._held:
            self.settle()
        return self._loss

    def settle(self) -> None:
        """Write the held losses into their slots, in the order they came."""
        held, self._held = self._held, []
        for slot, first, value in held:
            if value.dim():
                value = value.reshape(())
            if first:
                self._loss_slots[slot].copy_(value)
            else:
                self._loss_slots[slot].add_(value)

    def begin(self, step: int) -> None:
        """Open the row of optimizer step ``step`` (a later micro-batch of the same step reuses it)."""
        if self._rows and self._rows[-1][1] == step:
            return
        if len(self._rows) == self.capacity:
            self._rows.popleft()  # more steps than an interval: the oldest row is given up
        self._rows.append([self._next, step, 0, set(), set()])
        self._next = (self._next + 1) % self.capacity

    def add_loss(self, loss: Tensor) -> None:
        if not self._rows:
            return
        row = self._rows[-1]
        self._held.append((row[0], row[2] == 0, loss.detach()))
        if len(self._held) >= self.capacity:  # no read for a whole ring (no flush): write them now
            self.settle()
        row[2] += 1

    def put_grads(self, optimizer: int, start: int, stop: int, norms: list[Tensor]) -> None:
        """The gradient norms of parameters ``start:stop`` (one optimizer's) into the current row."""
        if not self._rows or stop <= start:
            return
        row = self._rows[-1]
        torch.stack(norms, out=self.grads[row[0], start:stop])
        row[3].add(optimizer)

    def stepped_unmeasured(self, optimizer: int) -> None:
        """Optimizer ``optimizer`` stepped in the current row without its gradient norms measured (no
        tensor op: the row's loss still counts, its norms read as not recorded)."""
        if self._rows:
            self._rows[-1][4].add(optimizer)

    def rows(self) -> list[tuple[int, int, int, frozenset[int]]]:
        """``(step, slot, micro-batches with a loss, optimizers written)`` of each row, oldest first."""
        return [(step, slot, parts, frozenset(opts)) for slot, step, parts, opts, _ in self._rows]

    def unmeasured(self) -> list[frozenset[int]]:
        """Per row of :meth:`rows`: the optimizers that stepped without their norms measured."""
        return [frozenset(bare) for *_, bare in self._rows]

    def clear(self) -> None:
        if self._held:
            self.settle()  # the slots keep their last values, as a checkpoint of the whole ring shows
        self._rows.clear()

    def state(self) -> dict[str, Any]:
        """The ring as it stands, for a checkpoint (CPU copies): both tensors whole (a ring put back by
        :meth:`load` is this one bit for bit, columns that a step did not write included), its rows (``[slot,
        step, micro-batches with a loss, optimizers written, optimizers stepped unmeasured]``) and the next
        slot."""
        rows = [
            [int(at), int(step), int(parts), sorted(map(int, o)), sorted(map(int, bare))]
            for at, step, parts, o, bare in self._rows
        ]
        return {
            "loss": self.loss.detach().cpu().clone(),
            "grads": self.grads.detach().cpu().clone(),
            "rows": rows,
            "next": int(self._next),
        }

    def load(self, state: dict[str, Any]) -> bool:
        """Put back what :meth:`state` returned, onto this ring's device and dtype; ``False`` (nothing
        changed) when it holds another number of parameters. A ring of another capacity (another logging
        interval) takes the newest rows that fit, from slot 0.

        Example:
            >>> ring = StepRing(capacity=4, params=3, device=torch.device("cpu"))
            >>> ring.begin(7); ring.add_loss(torch.tensor(2.0)); saved = ring.state()
            >>> again = StepRing(capacity=4, params=3, device=torch.device("cpu"))
            >>> again.load(saved), again.rows(), float(again.loss[0])
            (True, [(7, 0, 1, frozenset())], 2.0)
        """
        loss, grads = state["loss"], state["grads"]
        if grads.dim() != 2 or grads.shape[1] != self.grads.shape[1] or loss.shape[0] != grads.shape[0]:
            return False
        # rows of checkpoints written before per-step norms could be off have four fields
        rows = [
            [int(r[0]), int(r[1]), int(r[2]), set(map(int, r[3])), set(map(int, r[4]) if len(r) > 4 else ())]
            for r in state["rows"]
        ]
        if grads.shape[0] == self.capacity:
            self.loss.copy_(loss)
            self.grads.copy_(grads)
            self._next = int(state["next"]) % self.capacity
        else:
            rows = rows[len(rows) - min(len(rows), self.capacity) :]
            slots = torch.tensor([row[0] for row in rows], dtype=torch.long)
            self.loss[: len(rows)].copy_(loss[slots])
            self.grads[: len(rows)].copy_(grads[slots])
            for i, row in enumerate(rows):
                row[0] = i
            self._next = len(rows) % self.capacity
        self._rows = deque(rows)
        return True


class SpikeTail:
    """The last steps seen (host side, after the interval's collective): their steps, losses and
    per-layer gradient norms, the band of the next interval's first steps. Checkpointed.

    Example:
        >>> tail = SpikeTail(keep=3)
        >>> tail.extend([1, 2, 3, 4], [1.0, 2.0, None, 4.0], torch.ones(4, 2)); tail.steps
        [2, 3, 4]
    """

    def __init__(self, keep: int = BAND_WINDOW + JUMP_LOOKBACK) -> None:
        self.keep = keep
        self.steps: list[int] = []
        self.losses: list[float | None] = []
        self.grads = torch.zeros(0, 0, dtype=torch.float64)

    def extend(self, steps: list[int], losses: list[float | None], grads: Tensor) -> None:
        if self.grads.shape[1] != grads.shape[1]:  # a new layout: the old band says nothing of it
            self.steps, self.losses, self.grads = [], [], grads[:0].to(torch.float64)
        self.steps = (self.steps + list(steps))[-self.keep :]
        self.losses = (self.losses + list(losses))[-self.keep :]
        self.grads = torch.cat([self.grads, grads.to(torch.float64)])[-self.keep :]

    def state(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "losses": list(self.losses), "grads": self.grads.tolist()}

    def load(self, state: dict[str, Any]) -> None:
        self.steps = [int(s) for s in state.get("steps", [])]
        self.losses = list(state.get("losses", []))
        grads = state.get("grads", [])
        self.grads = (
            torch.tensor(grads, dtype=torch.float64) if grads else torch.zeros(0, 0, dtype=torch.float64)
        )
        if self.grads.dim() != 2:
            self.grads = self.grads.reshape(len(self.steps), -1)
