"""Overhead of the diagnostic monitors: step time (wall and process CPU) and peak memory, on CPU.

Configurations, each in a fresh forked process (so peak memory is its own): no monitor, each monitor at
its defaults, all monitors together, and (only if ``fastai`` is importable; it is never installed by us)
fastai's ``ActivationStats`` in a fastai ``Learner`` on the same timm model and data. Models: a CIFAR-stem
ResNet-18 of width 16 (ours) and a timm ResNet-18, 32x32 inputs, batch 64, SGD.

A step's time is the interval between consecutive ``on_train_batch_start`` calls, so it includes every
callback, the monitors' logging steps and the optimizer; we report the median (robust to the other
processes sharing the CPU) and the mean (which includes the rare logging / probing steps). The
no-monitor baseline runs first and last; overheads are against the mean of its two medians.

Usage::

    .venv/bin/python benchmarks/bench_monitors.py                 # full run (a few minutes)
    .venv/bin/python benchmarks/bench_monitors.py --steps 30 --models ours   # quick look
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_monitors.py --sweep --model preact_resnet18 \
        --batch 16 --threads 1 --apart --null --out <folder>     # each monitor alone (~4 minutes)

Writes ``benchmarks/results/monitors.json`` and ``benchmarks/results/monitors.md``; ``--sweep`` writes
``monitors_depth.{json,md}`` and puts its table into ``monitors.md`` as the last section; ``--apart``
writes ``monitors_apart.{json,md}`` instead.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

RESULTS = Path(__file__).resolve().parent / "results"
_THREADS: int | None = None
BATCH, SIZE, CLASSES = 64, 32, 10


# ------------------------------------------------------------------------------------------ models
def build_model(name: str) -> nn.Module:
    """An image classifier: ``ours`` (CIFAR-stem ResNet-18, width 16) or ``timm`` (timm resnet18)."""
    if name == "ours":
        from lightning_convnets.backbones import create_backbone

        backbone = create_backbone("resnet18", stem="cifar", width=16)
        return nn.Sequential(
            _LastMap(backbone),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(backbone.out_channels[-1], CLASSES),
        )
    if name == "timm":
        import timm

        return timm.create_model("resnet18", pretrained=False, num_classes=CLASSES)
    raise ValueError(f"bench_monitors: unknown model {name!r}; use 'ours' or 'timm'")


class _LastMap(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)[-1]


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return nn.functional.cross_entropy(self(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def make_data(steps: int) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH * 4, 3, SIZE, SIZE, generator=gen)
    labels = torch.randint(0, CLASSES, (BATCH * 4,), generator=gen)
    return DataLoader(TensorDataset(images, labels), batch_size=BATCH, shuffle=False)


# ------------------------------------------------------------------------------------------ monitors
def available_monitors() -> dict[str, Callable[[], pl.Callback]]:
    """Each monitor of lightning_convnets.callbacks at its defaults (those that exist in this checkout)."""
    import lightning_convnets.callbacks as callbacks

    found: dict[str, Callable[[], pl.Callback]] = {}
    for key, cls_name in (
        ("activation_variance", "ActivationVarianceMonitor"),
        ("gradient_shattering", "GradientShatteringMonitor"),
        ("batchnorm_drift", "BatchNormDriftMonitor"),
        ("optimization", "OptimizationMonitor"),
        ("throughput", "ThroughputMonitor"),
    ):
        cls = getattr(callbacks, cls_name, None)
        if cls is not None:
            found[key] = cls
    return found


class StepTimer(pl.Callback):
    """Wall and process-CPU timestamps at every training batch start (the step includes all callbacks)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int
    ) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())


class Alternate(pl.Callback):
    """Switches a monitor on for even optimizer steps and off for odd ones, and times each step: a
    paired comparison inside one run, immune to the load drifting between runs."""

    def __init__(self, monitor: Any) -> None:
        self.monitors = monitor if isinstance(monitor, list) else [monitor]
        self.times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        self._start: tuple[float, float, bool] | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int
    ) -> None:
        now = (time.perf_counter(), time.process_time())
        if self._start is not None:
            wall, cpu, was_on = self._start
            self.times[was_on].append((now[0] - wall, now[1] - cpu))
        on = trainer.global_step % 2 == 0
        for monitor in self.monitors:
            monitor.enabled = on
        self._start = (now[0], now[1], on)


def run_paired(model_name: str, key: str, steps: int, warmup: int, root: str) -> dict[str, Any]:
    torch.manual_seed(0)
    # a recorded step's cost: the dense phase covers the first steps; past it, the default period applies
    if key == "all":  # the three together, switched on and off as one
        monitor = [cls() for name, cls in available_monitors().items() if name != "gradient_shattering"]
    else:
        monitor = available_monitors()[key]()
    # the switch must run before the monitor's own on_train_batch_start reads `enabled`
    switch = Alternate(monitor)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps + warmup,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[switch, *switch.monitors],
    )
    trainer.fit(Classifier(build_model(model_name)), make_data(steps))
    skip = warmup // 2
    on, off = switch.times[True][skip:], switch.times[False][skip:]
    # on-steps are recorded steps; a monitor sampling one step in k costs 1/k of that at its defaults
    from lightning_convnets.callbacks.schedule import DEFAULT_SAMPLE_PERIOD

    every = (getattr(switch.monitors[0], "sample_every_n_steps", 1) or DEFAULT_SAMPLE_PERIOD) if key != "all" else 1
    result = {"steps_on": len(on), "steps_off": len(off), "sample_every_n_steps": every}
    for index, name in ((0, "wall"), (1, "cpu")):
        a = statistics.median(t[index] for t in on)
        b = statistics.median(t[index] for t in off)
        result[f"{name}_median_on_s"], result[f"{name}_median_off_s"] = a, b
        result[f"{name}_recorded_step_overhead"] = a / b - 1
        result[f"{name}_overhead"] = (a / b - 1) / every
    return result


def run_cycles_defaults(model_name: str, steps: int, warmup: int, root: str) -> dict[str, Any]:
    """Activation variance and BatchNorm drift together at their defaults, on/off in 4-step cycles
    (:class:`CycleToggle`): each on pair holds one step the activation monitor records and one it skips,
    as a default run does; the cost is the median over cycles of on pair / off pair - 1."""
    monitors = [cls() for name, cls in available_monitors().items() if name != "gradient_shattering"]
    toggle = CycleToggle(monitors, warmup)
    cycles = max(1, steps // 4)
    _fit_steps(lambda: build_model(model_name), make_data(steps), [toggle, *monitors], warmup + 4 * cycles + 1, root)
    ratios = [on / off - 1 for on, off in toggle.cycles()]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"cpu_overhead": statistics.median(ratios), "quartiles": [quartiles[0], quartiles[2]], "cycles": len(ratios)}


def run_probe_cost(model_name: str, repeats: int = 3) -> dict[str, Any]:
    """Time of one default shattering probe on the model (CPU), to amortise over its every_n_steps."""
    from lightning_convnets.callbacks.shattering import default_probe_interval, shattering_profile

    torch.manual_seed(0)
    model = build_model(model_name)
    images = make_data(1).dataset.tensors[0][:2]
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        shattering_profile(model, images[0], images[1])
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {
        "probe_wall_median_s": statistics.median(walls),
        "probe_cpu_median_s": statistics.median(cpus),
        "every_n_steps": default_probe_interval(256, BATCH),  # the default interval at this batch size
    }


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def run_lightning(
    model_name: str, monitor_keys: list[str], steps: int, warmup: int, root: str
) -> dict[str, Any]:
    torch.manual_seed(0)
    monitors = available_monitors()
    timer = StepTimer()
    callbacks = [timer] + [monitors[key]() for key in monitor_keys]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps + warmup,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
    )
    start_rss = _rss_kib()
    trainer.fit(Classifier(build_model(model_name)), make_data(steps))
    return _summarise(timer.wall, timer.cpu, warmup, start_rss)


def run_fastai(model_name: str, steps: int, warmup: int) -> dict[str, Any]:
    """fastai's ActivationStats in a fastai Learner (benchmark-only reference)."""
    from fastai.callback.hook import ActivationStats
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.optimizer import SGD

    torch.manual_seed(0)
    model = build_model(model_name)
    loader = make_data(steps)
    from fastai.callback.core import Callback as FastaiCallback

    wall: list[float] = []
    cpu: list[float] = []

    class FastaiTimer(FastaiCallback):
        order = -100

        def before_batch(self) -> None:
            wall.append(time.perf_counter())
            cpu.append(time.process_time())

    dls = DataLoaders(loader, loader)
    learner = Learner(
        dls,
        model,
        loss_func=nn.CrossEntropyLoss(),
        opt_func=SGD,
        cbs=[ActivationStats(every=None), FastaiTimer()],
    )
    start_rss = _rss_kib()
    epochs = max(1, (steps + warmup + len(loader) - 1) // len(loader))
    with learner.no_bar(), learner.no_logging():
        learner.fit(epochs, lr=0.01)
    return _summarise(wall[: steps + warmup + 1], cpu[: steps + warmup + 1], warmup, start_rss)


def _summarise(wall: list[float], cpu: list[float], warmup: int, start_rss: int) -> dict[str, Any]:
    wall_steps = [b - a for a, b in itertools.pairwise(wall)][warmup:]
    cpu_steps = [b - a for a, b in itertools.pairwise(cpu)][warmup:]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "steps": len(wall_steps),
        "wall_median_s": statistics.median(wall_steps),
        "wall_mean_s": statistics.fmean(wall_steps),
        "cpu_median_s": statistics.median(cpu_steps),
        "cpu_mean_s": statistics.fmean(cpu_steps),
        "peak_rss_mib": peak / 1024,
        "rss_at_start_mib": start_rss / 1024,
    }


def _child(
    queue: Any, kind: str, model_name: str, keys: list[str], steps: int, warmup: int, root: str
) -> None:
    if _THREADS:
        torch.set_num_threads(_THREADS)
    try:
        if kind == "fastai":
            result = run_fastai(model_name, steps, warmup)
        elif kind == "paired":
            result = run_paired(model_name, keys[0], steps, warmup, root)
        elif kind == "probe":
            result = run_probe_cost(model_name)
        elif kind == "cycles":
            result = run_cycles_defaults(model_name, steps, warmup, root)
        else:
            result = run_lightning(model_name, keys, steps, warmup, root)
        queue.put(("ok", result))
    except Exception as err:  # report, don't hang the parent
        queue.put(("error", f"{type(err).__name__}: {err}"))


def run_isolated(
    kind: str, model_name: str, keys: list[str], steps: int, warmup: int, root: str
) -> dict[str, Any]:
    """One configuration in a forked child: its own peak RSS, nothing cached from other configurations."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(queue, kind, model_name, keys, steps, warmup, root))
    process.start()
    status, payload = queue.get()
    process.join()
    if status != "ok":
        raise RuntimeError(f"bench_monitors: {model_name}/{kind}/{keys} failed: {payload}")
    return payload


# ------------------------------------------------------------------------------------------ depth sweep
SWEEP = (
    # (backbone, image size, batch, width): the table. The depth sweep (width 8, batch 16, 32 px),
    # the two 64 px checks, then the width-16 ResNet-18 across batch sizes (the probe's interval scales
    # with the batch, the per-step cost does not)
    ("preact_resnet18", 32, 16, 8),
    ("preact_resnet50", 32, 16, 8),
    ("preact_resnet101", 32, 16, 8),
    ("preact_resnet152", 32, 16, 8),
    ("preact_resnet200", 32, 16, 8),
    ("preact_resnet101", 64, 16, 8),
    ("resnet152", 64, 16, 8),
    ("resnet18", 32, 8, 16),
    ("resnet18", 32, 16, 16),
    ("resnet18", 32, 64, 16),
    ("resnet18", 32, 128, 16),
)
TARGET = 0.02  # every monitor of lightning_convnets.callbacks at their defaults, amortised with the probe, per step


def build_backbone_classifier(name: str, width: int) -> nn.Module:
    """``name`` from the backbone registry (CIFAR stem), global pooling and a linear head."""
    from lightning_convnets.backbones import create_backbone

    backbone = create_backbone(name, stem="cifar", width=width)
    return nn.Sequential(
        _LastMap(backbone),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(backbone.out_channels[-1], CLASSES),
    )


class _Pool(torch.utils.data.Dataset):
    """``length`` samples drawn from a fixed pool of ``pool`` random images (index modulo the pool): as
    many batches as a long fit needs, in one epoch, without holding them all."""

    def __init__(self, length: int, pool: int, size: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(pool, 3, size, size, generator=gen)
        self.labels = torch.randint(0, CLASSES, (pool,), generator=gen)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index %= len(self.images)
        return self.images[index], self.labels[index]


def _sized_data(batch: int, size: int, batches: int) -> DataLoader:
    if batches > 64:  # one epoch of many batches from a pool of 64 batches' images
        return DataLoader(_Pool(batch * batches, batch * 64, size), batch_size=batch, shuffle=False)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch * batches, 3, size, size, generator=gen)
    labels = torch.randint(0, CLASSES, (batch * batches,), generator=gen)
    return DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=False)


_DEVICE = "cpu"  # --device cuda: bf16-mixed, channels_last, wall time synchronised at block boundaries


def _fit_steps(
    net_fn: Callable[[], nn.Module], data: DataLoader, callbacks: list, steps: int, root: str,
    log_every_n_steps: int = 50,
):
    timer = StepTimer()
    cuda = _DEVICE == "cuda"
    if cuda:
        make = net_fn

        def net_fn() -> nn.Module:
            return make().to(memory_format=torch.channels_last)

    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[timer, *callbacks],
        log_every_n_steps=log_every_n_steps,
    )
    torch.manual_seed(0)
    trainer.fit(Classifier(net_fn()), data)
    return timer


def _clock() -> float:
    """Process CPU time on the CPU (robust to other processes); wall time on a GPU."""
    return time.perf_counter() if _DEVICE == "cuda" else time.process_time()


class CycleToggle(pl.Callback):
    """Switches the monitors wholly on for ``block`` optimizer steps, off for the next ``block``, and times
    each step (process CPU).

    Off means what a run without the monitors does: at the end of the step before, the monitors leave
    ``trainer.callbacks`` (Lightning calls no hook of theirs) and any forward hook still in a module is
    taken out; both are put back, in order, for the next on block. Put this callback first. With ``block``
    = the logging interval (50), aligned on it after the warm-up, an on block holds exactly what a default
    run pays per interval: the recorded step (one in 50), the flush at its last step, Lightning calling
    the monitors' hooks on every step. The ratio of a cycle's on block to its off block, neighbours in
    one fit, is immune to the drift between fits that dominates whole-run comparisons here. The fit stops
    (``trainer.should_stop``) after ``min_cycles`` cycles once the timed cycles used ``seconds`` of CPU,
    or after ``max_cycles``."""

    def __init__(
        self, monitors: list[Any], warmup: int, block: int = 2, min_cycles: int = 1, max_cycles: int = 10**9,
        seconds: float = 0.0,
    ) -> None:
        self.monitors = monitors
        self.warmup = warmup
        self.block = block
        self.min_cycles, self.max_cycles, self.seconds = min_cycles, max_cycles, seconds
        self.cpu: list[float] = []
        self._last: float | None = None
        self._parked: list[Any] | None = None  # forward hooks taken out while off
        self._callbacks: list[pl.Callback] | None = None  # the full list while off

    def _on(self, step: int) -> bool:
        return step < self.warmup or ((step - self.warmup) // self.block) % 2 == 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int
    ) -> None:
        step = trainer.global_step
        if _DEVICE == "cuda" and step >= self.warmup and (step - self.warmup) % self.block == 0:
            torch.cuda.synchronize()  # block boundaries only: the blocks' sums are wall times of the GPU work
        now = _clock()
        if self._last is not None:
            self.cpu.append(now - self._last)
        self._last = now

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        step = trainer.global_step  # the next step's (the optimizer has stepped)
        done = step - self.warmup
        if done > 0 and done % (2 * self.block) == 0:
            cycles = done // (2 * self.block)
            timed = sum(self.cpu[self.warmup :])
            if cycles >= self.max_cycles or (cycles >= self.min_cycles and timed >= self.seconds):
                trainer.should_stop = True
        on = self._on(step)
        if on and self._callbacks is not None:
            for spec in self._parked or []:
                spec.install()
            trainer.callbacks = self._callbacks  # a new list object: the loop now running keeps the old one
            self._parked = self._callbacks = None
        elif not on and self._callbacks is None:
            self._parked = [spec for monitor in self.monitors for spec in _park_hooks(monitor)]
            self._callbacks = trainer.callbacks
            # a monitor's helper callbacks (the throughput monitor's clocks: ``.monitor``) leave with it
            owned = [c for c in trainer.callbacks if any(getattr(c, "monitor", None) is m for m in self.monitors)]
            gone = [*self.monitors, *owned]
            trainer.callbacks = [c for c in trainer.callbacks if all(c is not m for m in gone)]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last is not None:
            if _DEVICE == "cuda":
                torch.cuda.synchronize()
            self.cpu.append(_clock() - self._last)
            self._last = None

    def cycles(self) -> list[tuple[float, float]]:
        """(on block, off block) CPU seconds of every full cycle after the warm-up."""
        times, b = self.cpu[self.warmup :], self.block
        return [
            (sum(times[i : i + b]), sum(times[i + b : i + 2 * b]))
            for i in range(0, len(times) - 2 * b + 1, 2 * b)
        ]


class HookTimer:
    """Process CPU time spent inside a monitor's own Lightning hooks, per optimizer step: what the monitor
    itself does on a step, measured directly (the on/off difference of a monitor that does almost nothing
    between its probes is noise of a few tenths of a percent)."""

    def __init__(self) -> None:
        self.per_step: dict[int, float] = {}

    def watch(self, monitor: Any) -> Any:
        for name in dir(type(monitor)):
            if name.startswith("on_") and callable(getattr(monitor, name)):
                setattr(monitor, name, self._timed(getattr(monitor, name)))
        return monitor

    def _timed(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        def timed(trainer: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return hook(trainer, *args, **kwargs)
            finally:
                step = int(getattr(trainer, "global_step", -1))
                self.per_step[step] = self.per_step.get(step, 0.0) + time.process_time() - start

        return timed

    def median_step_ms(self) -> float:
        """Median over the steps the monitor ran on (a probe step is one outlier among them)."""
        return statistics.median(self.per_step.values()) * 1e3 if self.per_step else math.nan


def _timed_probe(
    probe: Callable[[nn.Module], Any], toggle: CycleToggle, start: int, end: int, out: list[float]
) -> Callable[[nn.Module], Any]:
    """``probe``, its CPU time appended to ``out`` when it runs inside the timed steps ``[start, end)``
    (the step in progress is the number of steps the toggle has timed)."""

    def timed(pl_module: nn.Module) -> Any:
        begin = time.process_time()
        try:
            return probe(pl_module)
        finally:
            if start <= len(toggle.cpu) < end:
                out.append(time.process_time() - begin)

    return timed


def _park_hooks(monitor: Any) -> list[Any]:
    """Take a monitor's installed forward hooks out of their modules; returns them (``HookSpec``s) to put
    back with ``install()``. With the sampled schedules they are out already on the steps before an off
    block (the last step of an interval is not recorded), so this is a safeguard."""
    parked = []
    for spec in list(getattr(monitor, "_hook_specs", [])):
        if spec.handle is not None:
            spec.uninstall()
            parked.append(spec)
    if parked:
        monitor._hooks_installed = False
    return parked


def run_cycles(
    name: str,
    size: int,
    batch: int,
    width: int,
    make: Callable[[], list],
    min_cycles: int,
    max_cycles: int,
    seconds: float,
    root: str,
    block: int = 50,
    probes: int = 3,
) -> dict[str, Any]:
    """One fit with the monitors toggled by :class:`CycleToggle` in blocks of ``block`` steps after a
    warm-up past the monitors' dense phase (aligned on the logging interval); then ``probes`` shattering
    probes of the fitted model, timed directly and spread over the monitor's default interval."""
    from lightning_convnets.callbacks.schedule import DEFAULT_DENSE_STEPS

    monitors = make()
    warmup = block * max(1, math.ceil(DEFAULT_DENSE_STEPS / block))  # the first timed block starts sparse
    toggle = CycleToggle(monitors, warmup, block, min_cycles, max_cycles, seconds)
    in_cycles: list[float] = []  # CPU of probes that ran inside the timed cycles (taken out of them)
    shattering = [m for m in monitors if type(m).__name__ == "GradientShatteringMonitor"]
    for monitor in shattering:
        monitor.probe = _timed_probe(monitor.probe, toggle, warmup, 10**9, in_cycles)
    steps = warmup + 2 * block * max_cycles
    nets: list[nn.Module] = []

    def build() -> nn.Module:
        nets.append(build_backbone_classifier(name, width))
        return nets[-1]

    _fit_steps(build, _sized_data(batch, size, steps + 1), [toggle, *monitors], steps, root, block)
    pairs = toggle.cycles()
    # Each cycle runs its on block first, so a drift of the step time through the fit would bias on / off
    # of one cycle. Each on block is compared with the mean of the off blocks on either side of it instead
    # (on_i against off_{i-1} and off_i), which cancels a linear drift; the uncorrected figure is kept too
    # (the two differed by up to 1.9 points in the sweep, same sign).
    ons, offs = [on for on, _ in pairs], [off for _, off in pairs]
    around = [(offs[i - 1] + offs[i]) / 2 for i in range(1, len(pairs))]
    ratios = [ons[i] / around[i - 1] - 1 for i in range(1, len(pairs))] or [ons[0] / offs[0] - 1]
    step_off = sum(offs) / (block * len(pairs))
    corrected_on = sum(ons[1:]) if len(pairs) > 1 else ons[0]
    corrected_off = sum(around) if len(pairs) > 1 else offs[0]
    result: dict[str, Any] = {
        "warmup": warmup,
        "block": block,
        # the CPU of the on blocks over that of the off blocks around them (recorded steps, flushes,
        # Lightning's calls of the monitors' hooks), the probes that fell inside the cycles taken out (their
        # own column)
        "amortised": (corrected_on - sum(in_cycles)) / corrected_off - 1,
        "amortised_uncorrected": (sum(ons) - sum(in_cycles)) / sum(offs) - 1,
        "block_cpu_s": [x for pair in pairs for x in pair],
        "median": statistics.median(ratios),
        "ratios": ratios,
        "step_off_ms": step_off * 1e3,
        "probe_interval": None,
        "probe_amortised": 0.0,
        "probes_cpu_s": [],
    }
    if shattering and nets:
        monitor = shattering[0]
        model = Classifier(nets[0])  # the fitted network
        if _DEVICE == "cuda":
            model = model.cuda()
        cpus = []
        for _ in range(probes):
            if _DEVICE == "cuda":
                torch.cuda.synchronize()
            begin = _clock()
            _untimed(monitor)(model)
            if _DEVICE == "cuda":
                torch.cuda.synchronize()
            cpus.append(_clock() - begin)
        result["probes_cpu_s"] = cpus
        result["probe_interval"] = monitor.probe_interval
        result["probe_amortised"] = statistics.median(cpus) / (monitor.probe_interval * step_off)
    result["total"] = result["amortised"] + result["probe_amortised"]
    if len(ratios) > 1:
        # the spread of the per-cycle costs, and twice the standard error of their mean
        result["stdev"] = statistics.stdev(ratios)
        result["two_se"] = 2 * statistics.stdev(ratios) / math.sqrt(len(ratios))
    else:
        result["stdev"] = result["two_se"] = math.nan
    return result


def _untimed(monitor: Any) -> Callable[[nn.Module], Any]:
    return type(monitor).probe.__get__(monitor)


def monitor_state_bytes(monitors: list[Any], model: nn.Module | None = None) -> int:
    """Bytes of every tensor the monitors hold (statistics, scratch, snapshots, probe line), each storage
    counted once; the model's own parameters and buffers (which a monitor may reference, e.g. the BN
    running statistics it copies from) are the step's memory, not the monitors'."""
    seen: set[int] = set()
    if model is not None:
        seen.update(t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()])
    total = 0

    def visit(obj: Any, depth: int) -> None:
        nonlocal total
        if depth > 4 or obj is None:
            return
        if isinstance(obj, torch.Tensor):
            ptr = obj.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += obj.untyped_storage().nbytes()
            return
        if isinstance(obj, nn.Module):
            return  # the model's own tensors
        if isinstance(obj, dict):
            for value in obj.values():
                visit(value, depth + 1)
        elif isinstance(obj, list | tuple):
            for value in obj:
                visit(value, depth + 1)
        elif hasattr(obj, "__dict__") or hasattr(obj, "__slots__"):
            names = list(getattr(obj, "__dict__", {})) + list(getattr(obj, "__slots__", ()))
            for name in names:
                visit(getattr(obj, name, None), depth + 1)

    for monitor in monitors:
        visit(monitor, 0)
    return total


def step_memory_bytes(net: nn.Module, batch: int, size: int) -> int:
    """What one training step of ``net`` must hold at its peak, counted exactly: the tensors autograd
    saves for the backward (the activations), plus parameters, gradients and SGD momentum. (Process RSS
    growth is no measure of it on CPU: the allocator reuses freed memory.)"""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(batch, 3, size, size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x).sum()
    return sum(seen.values()) + 3 * sum(p.numel() * p.element_size() for p in net.parameters())


def _memory(name: str, size: int, batch: int, width: int, with_monitors: bool = True) -> dict[str, Any]:
    """The monitors' own tensors after a 6-step fit, and the training step's memory (in this process)."""
    torch.manual_seed(0)
    monitors = [cls() for cls in available_monitors().values()]
    nets: list[nn.Module] = []

    def build() -> nn.Module:
        nets.append(build_backbone_classifier(name, width))
        return nets[-1]

    _fit_steps(build, _sized_data(batch, size, 6), monitors, 6, "/tmp")
    step = step_memory_bytes(build_backbone_classifier(name, width), batch, size)
    return {"monitor_bytes": monitor_state_bytes(monitors, nets[0]), "step_bytes": step}


class NoOpMonitor(pl.Callback):
    """A callback that does nothing, toggled like a monitor: the null run of the on/off method."""


def _sweep_child(
    queue: Any, spec: tuple[str, int, int, int], kwargs: dict[str, Any], null: bool, only: str | None = None
) -> None:
    global _DEVICE
    torch.set_num_threads(kwargs.pop("threads"))
    _DEVICE = kwargs.pop("device")
    try:
        name, size, batch, width = spec
        monitors = available_monitors()
        if only is not None:
            monitors = {only: monitors[only]}
        make = (lambda: [NoOpMonitor() for _ in range(3)]) if null else (lambda: [cls() for cls in monitors.values()])
        result = run_cycles(name, size, batch, width, make, **kwargs)
        if not null and only is None and _DEVICE == "cpu":
            result["memory"] = _memory(name, size, batch, width)
        queue.put(("ok", result))
    except Exception as err:  # report, don't hang the parent
        import traceback

        queue.put(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


def _isolated_row(
    spec: tuple[str, int, int, int], kwargs: dict[str, Any], null: bool = False, only: str | None = None
) -> dict[str, Any]:
    """One row in a forked child (a fresh allocator and nothing cached from the rows before); ``only``: that
    monitor alone."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    process = ctx.Process(target=_sweep_child, args=(queue, spec, dict(kwargs), null, only))
    process.start()
    status, payload = queue.get()
    process.join()
    if status != "ok":
        raise RuntimeError(f"bench_monitors --sweep: {spec} failed: {payload}")
    return payload


def run_sweep(
    specs: list[tuple[str, int, int, int]], min_cycles: int, max_cycles: int, seconds: float, root: str,
    null: bool = False, threads: int = 1, device: str = "cpu", apart: bool = False,
) -> dict:
    """Per row: one fit with every monitor at their defaults toggled on and off in blocks of one
    logging interval (:func:`run_cycles`), the shattering probe timed directly and amortised over its
    default interval at that batch size. ``--null``: one more row, three no-op callbacks toggled the same
    way on the first network (the method's own bias). ``apart``: after each row, one row per monitor alone
    (which monitor costs what)."""
    kwargs = dict(
        min_cycles=min_cycles, max_cycles=max_cycles, seconds=seconds, root=root, threads=threads, device=device
    )
    rows = []
    singles = list(available_monitors()) if apart else []
    jobs = [(spec, False, only) for spec in specs for only in [None, *singles]]
    jobs += [(specs[0], True, None)] if null and specs else []
    for (name, size, batch, width), is_null, only in jobs:
        res = _isolated_row((name, size, batch, width), kwargs, null=is_null, only=only)
        label = " (null: three no-op callbacks)" if is_null else f" [{only} alone]" if only else ""
        row = {
            "model": name + label,
            "null": is_null,
            "only": only,
            "image_size": size,
            "batch": batch,
            "width": width,
            "cycles": len(res["block_cpu_s"]) // 2,
            "block": res["block"],
            "warmup": res["warmup"],
            "step_cpu_ms": res["step_off_ms"],
            "per_step_amortised": res["amortised"],
            "per_step_uncorrected": res["amortised_uncorrected"],
            "block_cpu_s": res["block_cpu_s"],
            "median_cycle": res["median"],
            "cycle_ratios": res["ratios"],
            "stdev": res["stdev"],
            "two_se": res["two_se"],
            "probe_interval": res["probe_interval"],
            "probe_cpu_s": res["probes_cpu_s"],
            "probe_amortised": res["probe_amortised"],
            "total": res["total"],
            "load_average": os.getloadavg()[0],
        }
        memory = res.get("memory")
        if memory:
            row["step_memory_mib"] = memory["step_bytes"] / 2**20
            row["monitor_state_mib"] = memory["monitor_bytes"] / 2**20
        rows.append(row)
        probe = statistics.median(row["probe_cpu_s"]) if row["probe_cpu_s"] else math.nan
        print(
            f"{row['model']:18s} {size:3d}px b{batch:<3d} w{width:<2d} step {row['step_cpu_ms']:7.1f} ms  "
            f"per step {row['per_step_amortised']:+.2%} (+-{row['two_se']:.2%}, {row['cycles']} cycles; "
            f"on/off in cycle order {row['per_step_uncorrected']:+.2%})  probe "
            f"{probe:.2f} s / {row['probe_interval']} steps = {row['probe_amortised']:+.2%}  total "
            f"{row['total']:+.2%}  load {row['load_average']:.1f}",
            flush=True,
        )
    return {"rows": rows}


def sweep_markdown(sweep: dict[str, Any], setup: dict[str, Any]) -> str:
    lines = [
        _SWEEP_TITLE,
        "",
        f"`{setup.get('command', 'python benchmarks/bench_monitors.py --sweep')}` ({setup['threads']} thread(s), "
        f"torch {setup['torch']}, lightning {setup['lightning']}, {setup['cpus']} CPUs; load average "
        f"{setup['load_average_at_start'][0]:.1f} at start, {setup['load_average_at_end'][0]:.1f} at end; "
        f"{setup['minutes']:.1f} minutes; device: {setup.get('device', 'cpu')}, timed by process CPU on the CPU, by wall clock on a GPU). Per row one fit (CPU-stem network, SGD, 32 or 64 px), each in a "
        "fresh process: a warm-up past the monitors' dense phase (every step recorded below step 50), then "
        "cycles of one logging interval (50 steps) with every monitor at their defaults and 50 steps "
        "without them (out of the trainer's callbacks, no hook in any module), neighbours in one fit. "
        "**per step** = CPU of the on blocks / CPU of the off blocks around them - 1 (each on block against "
        "the mean of the off blocks before and after it, which cancels a linear drift of the step time "
        "through the fit; on / off within each cycle, on first, is the last column): the recorded "
        "step (one in 50), "
        "the flush at each interval's end and Lightning calling the monitors' hooks on every step, "
        "amortised; +- = twice the standard error of the mean over cycles (the row's spread), with the "
        "standard deviation of one cycle's cost. **probe** = one shattering probe's CPU (median of three, "
        "timed directly on the fitted network) over its default interval at that batch size (derived: "
        "1.35 x 256 / batch / 1%) times the step. **total** = per step + probe: what a long run pays. "
        f"Target: total <= {TARGET:.0%} on every row. The null row: three no-op callbacks toggled the same "
        "way (the method's own bias).",
        "",
        "| network | input | batch | width | step (ms CPU) | per step (%) | +- 2 SE | cycle sd | cycles | "
        "probe (s CPU) | probe every | probe (%) | **total (%)** | monitor tensors (MiB) | step memory (MiB) "
        "| on/off in cycle order (%) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sweep["rows"]:
        probe = statistics.median(r["probe_cpu_s"]) if r["probe_cpu_s"] else math.nan
        lines.append(
            f"| {r['model']} | {r['image_size']}x{r['image_size']} | {r['batch']} | {r['width']} "
            f"| {r['step_cpu_ms']:.1f} | {r['per_step_amortised']:+.2%} | {r['two_se']:.2%} | {r['stdev']:.2%} "
            f"| {r['cycles']} | {probe:.2f} | {r['probe_interval'] or '-'} | {r['probe_amortised']:+.2%} "
            f"| **{r['total']:+.2%}** | {r.get('monitor_state_mib', math.nan):.2f} "
            f"| {r.get('step_memory_mib', math.nan):.0f} | {r.get('per_step_uncorrected', math.nan):+.2%} |"
        )
    monitored = [r for r in sweep["rows"] if not r["null"] and not r.get("only")]  # the target: all together
    if monitored:
        worst = max(monitored, key=lambda r: r["total"] + (r["two_se"] if math.isfinite(r["two_se"]) else 0))
        ok = all(r["total"] + (r["two_se"] if math.isfinite(r["two_se"]) else 0) <= TARGET for r in monitored)
        lines += [
            "",
            f"Worst row (total + 2 SE): {worst['model']} {worst['image_size']} px batch {worst['batch']}: "
            f"{worst['total']:+.2%} +- {worst['two_se']:.2%}. Every row within {TARGET:.0%} including its "
            f"spread: {'yes' if ok else 'NO'}.",
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="timed optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--models", nargs="+", default=["ours", "timm"], choices=["ours", "timm"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--batch", type=int, nargs="+", default=None, help="with --sweep: only the rows of these batch sizes"
    )
    parser.add_argument("--root", default="/tmp/bench_monitors_logs", help="trainer default_root_dir")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="depth sweep of every monitor (ResNet-18..200, two 64x64 nets)",
    )
    parser.add_argument(
        "--model", nargs="+", default=None, help="with --sweep: backbone names to run (default: the sweep's)"
    )
    parser.add_argument("--width", type=int, default=None, help="with --sweep and --model: backbone width (8)")
    parser.add_argument("--cycles", type=int, default=4, help="with --sweep: at least this many cycles per row")
    parser.add_argument("--max-cycles", type=int, default=16, help="with --sweep: at most this many cycles per row")
    parser.add_argument(
        "--row-seconds",
        type=float,
        default=60.0,
        help="with --sweep: after --cycles, go on until the timed cycles of a row used this much CPU",
    )
    parser.add_argument(
        "--null",
        action="store_true",
        help="with --sweep: also a null row (three no-op callbacks toggled like the monitors, first network)",
    )
    parser.add_argument(
        "--apart",
        action="store_true",
        help="with --sweep: after each row, one row per monitor alone; writes monitors_apart.{json,md}",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="with --sweep: cuda times wall clock on the GPU (bf16-mixed, channels_last); writes *_cuda files",
    )
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    global _THREADS
    _THREADS = args.threads  # applied in each forked child (setting it here could start OpenMP pre-fork)
    if args.sweep:
        return _main_sweep(args)

    monitors = list(available_monitors())
    configs: list[tuple[str, str, list[str]]] = [("none", "lightning", [])]
    configs += [(key, "lightning", [key]) for key in monitors]
    if len(monitors) > 1:
        configs.append(("all", "lightning", monitors))
    try:
        import fastai  # noqa: F401

        configs.append(("fastai ActivationStats", "fastai", []))
        fastai_note = "fastai importable: reference included"
    except ImportError:
        fastai_note = (
            "fastai not importable: its ActivationStats reference was skipped (never installed here)"
        )
    configs.append(("none (again)", "lightning", []))

    results: dict[str, Any] = {
        "setup": {
            "batch": BATCH,
            "image_size": SIZE,
            "steps": args.steps,
            "warmup": args.warmup,
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "threads": _THREADS or torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "load_average_at_start": os.getloadavg(),
            "note": fastai_note,
        },
        "models": {},
    }
    for model_name in args.models:
        rows: dict[str, Any] = {}
        for label, kind, keys in configs:
            rows[label] = run_isolated(kind, model_name, keys, args.steps, args.warmup, args.root)
            print(f"{model_name:5s} {label:24s} " + _fmt(rows[label]), flush=True)
        base = {
            metric: statistics.fmean([rows["none"][metric], rows["none (again)"][metric]])
            for metric in ("wall_median_s", "cpu_median_s", "wall_mean_s", "cpu_mean_s", "peak_rss_mib")
        }
        for row in rows.values():
            for metric, value in base.items():
                row[f"{metric}_vs_none"] = row[metric] / value - 1
        rows["baseline"] = base
        results["models"][model_name] = rows
        paired = {}
        for key in [*monitors, "all"]:
            if key == "gradient_shattering":
                continue  # no per-step work: its cost is the probe, amortised below
            paired[key] = run_isolated("paired", model_name, [key], 2 * args.steps, args.warmup, args.root)
            print(
                f"{model_name:5s} paired {key}: cpu {paired[key]['cpu_overhead']:+.1%} wall {paired[key]['wall_overhead']:+.1%}"
            )
        cycles = run_isolated("cycles", model_name, [], 2 * args.steps, args.warmup, args.root)
        print(f"{model_name:5s} activation variance + BatchNorm drift at defaults (cycles): {cycles['cpu_overhead']:+.1%}")
        if "gradient_shattering" in monitors:
            probe = run_isolated("probe", model_name, [], args.steps, args.warmup, args.root)
            for name in ("wall", "cpu"):
                probe[f"{name}_amortised_overhead"] = probe[f"probe_{name}_median_s"] / (
                    probe["every_n_steps"] * base[f"{name}_median_s"]
                )
            paired["gradient_shattering (probe amortised)"] = probe
            cycles["with_probe"] = cycles["cpu_overhead"] + probe["cpu_amortised_overhead"]
            print(
                f"{model_name:5s} shattering probe {probe['probe_cpu_median_s']:.2f} s cpu, amortised {probe['cpu_amortised_overhead']:+.2%}"
            )
        paired["all three at defaults (cycles)"] = cycles
        results["paired"] = results.get("paired", {})
        results["paired"][model_name] = paired
    results["setup"]["load_average_at_end"] = os.getloadavg()

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "monitors.json").write_text(json.dumps(results, indent=2))
    _write_keeping_sweep(args.out / "monitors.md", to_markdown(results))
    print(to_markdown(results))
    return results


_SWEEP_TITLE = "## Depth and batch sweep: every monitor at its defaults"
_OLD_SWEEP_TITLES = (
    "## Depth sweep: all three monitors at their defaults",
    "## Depth and batch sweep: all three monitors at their defaults",
)


def _write_keeping_sweep(path: Path, text: str, sweep_table: str | None = None) -> None:
    """Write ``text`` to ``path`` with the depth-sweep section last: ``sweep_table`` if given, else the
    section already in the file (so the summary run and the sweep each refresh their own part)."""
    old = path.read_text() if path.exists() else ""
    for title in _OLD_SWEEP_TITLES:  # a table of the former sweep is replaced by the new one's
        if sweep_table is not None and title in old:
            old = old[: old.index(title)]
        if title in text:
            text = text[: text.index(title)]
    if sweep_table is None and _SWEEP_TITLE in old:
        sweep_table = old[old.index(_SWEEP_TITLE) :]
    if _SWEEP_TITLE in text:
        text = text[: text.index(_SWEEP_TITLE)]
    body = text.rstrip("\n") + "\n"
    if sweep_table:
        body += "\n" + sweep_table.rstrip("\n") + "\n"
    path.write_text(body)


def _main_sweep(args: argparse.Namespace) -> dict[str, Any]:
    begin = time.perf_counter()
    specs = [spec for spec in SWEEP if args.model is None or spec[0] in args.model]
    specs += [(name, 32, 16, args.width or 8) for name in args.model or () if name not in {s[0] for s in SWEEP}]
    if args.width:
        specs = [(name, size, batch, args.width) for name, size, batch, _ in specs]
    if args.batch:
        specs = [spec for spec in specs if spec[2] in args.batch]
    setup = {
        "min_cycles": args.cycles,
        "max_cycles": args.max_cycles,
        "row_seconds": args.row_seconds,
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "threads": args.threads or 1,
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "command": " ".join(["python benchmarks/bench_monitors.py", *(args.argv or ["--sweep"])]),
    }
    setup["device"] = args.device if args.device == "cpu" else f"cuda ({torch.cuda.get_device_name(0)})"
    sweep = run_sweep(
        specs, args.cycles, max(args.cycles, args.max_cycles), args.row_seconds, args.root, null=args.null,
        threads=args.threads or 1, device=args.device, apart=args.apart,
    )
    setup["load_average_at_end"] = os.getloadavg()
    setup["minutes"] = (time.perf_counter() - begin) / 60
    results = {"setup": setup, **sweep}
    args.out.mkdir(parents=True, exist_ok=True)
    table = sweep_markdown(sweep, setup)
    if args.apart:  # its own files: the table of all monitors together stays where it is
        (args.out / "monitors_apart.json").write_text(json.dumps(results, indent=2))
        (args.out / "monitors_apart.md").write_text(
            "# Each monitor alone (CPU)\n\nThe first row of each network: all five monitors; then each monitor "
            "alone, toggled the same way.\n\n" + table
        )
        print(table)
        return results
    if args.device == "cuda":  # its own files: the CPU table stays where it is
        (args.out / "monitors_cuda.json").write_text(json.dumps(results, indent=2))
        (args.out / "monitors_cuda.md").write_text(
            f"# Monitor overhead on {setup['device']} (bf16-mixed, channels_last, wall time)\n\n" + table
        )
        print(table)
        return results
    (args.out / "monitors_depth.json").write_text(json.dumps(results, indent=2))
    (args.out / "monitors_depth.md").write_text("# Monitor overhead along the depth and the batch size (CPU)\n\n" + table)
    summary = args.out / "monitors.md"  # the sweep also goes into the summary, as its last section
    _write_keeping_sweep(summary, summary.read_text() if summary.exists() else "# Monitor overhead (CPU)\n", table)
    print(table)
    return results


def _fmt(row: dict[str, Any]) -> str:
    return (
        f"wall median {row['wall_median_s'] * 1e3:7.1f} ms  cpu median {row['cpu_median_s'] * 1e3:7.1f} ms  "
        f"wall mean {row['wall_mean_s'] * 1e3:7.1f} ms  peak {row['peak_rss_mib']:7.1f} MiB"
    )


def to_markdown(results: dict[str, Any]) -> str:
    setup = results["setup"]
    lines = [
        "# Monitor overhead (CPU)",
        "",
        f"batch {setup['batch']}, {setup['image_size']}x{setup['image_size']}, {setup['steps']} timed steps after "
        f"{setup['warmup']} warm-up, torch {setup['torch']}, lightning {setup['lightning']}, "
        f"{setup['threads']} threads on {setup['cpus']} CPUs; load average {setup['load_average_at_start'][0]:.1f} "
        f"at start, {setup.get('load_average_at_end', [0])[0]:.1f} at end (other processes share this CPU: "
        "wall time is noisy). " + setup["note"] + ".",
        "",
        "| model | configuration | wall median (ms) | vs none | CPU median (ms) | vs none | wall mean (ms) "
        "| vs none | peak RSS (MiB) | vs none |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model_name, rows in results["models"].items():
        for label, row in rows.items():
            if label == "baseline":
                continue
            lines.append(
                f"| {model_name} | {label} | {row['wall_median_s'] * 1e3:.1f} | {row['wall_median_s_vs_none']:+.1%} "
                f"| {row['cpu_median_s'] * 1e3:.1f} | {row['cpu_median_s_vs_none']:+.1%} "
                f"| {row['wall_mean_s'] * 1e3:.1f} | {row['wall_mean_s_vs_none']:+.1%} "
                f"| {row['peak_rss_mib']:.0f} | {row['peak_rss_mib_vs_none']:+.1%} |"
            )
    if results.get("paired"):
        lines += [
            "",
            "Paired, inside one run (the monitor switched on for even steps, off for odd ones: immune to load "
            "drifting between runs; overhead at defaults = a recorded step's extra cost / sample_every_n_steps; "
            "for the shattering monitor, one default probe's time over its every_n_steps and the no-monitor "
            "median step):",
            "",
            "| model | monitor | CPU overhead | wall overhead | detail |",
            "|---|---|---|---|---|",
        ]
        for model_name, rows in results["paired"].items():
            for key, row in rows.items():
                if key == "all":
                    key = (
                        "all three together (activation variance and BatchNorm switched as one; the shattering "
                        "monitor's per-step hooks are nothing, its probe is the row below; an upper bound: the "
                        "activation monitor's recorded step counted at every step)"
                    )
                if "quartiles" in row:
                    probe = row.get("with_probe")
                    lines.append(
                        f"| {model_name} | activation variance + BatchNorm drift at their defaults, switched on for "
                        f"two steps and off for two (one recorded step of the activation monitor per on pair) | "
                        f"{row['cpu_overhead']:+.1%} | - | median of {row['cycles']} cycles, quartiles "
                        f"{row['quartiles'][0]:+.1%} .. {row['quartiles'][1]:+.1%}"
                        + (f"; all three with the shattering probe amortised: **{probe:+.1%}**" if probe is not None else "")
                        + " |"
                    )
                    continue
                if "cpu_overhead" in row:
                    detail = (
                        f"median CPU {row['cpu_median_on_s'] * 1e3:.1f} ms recorded / "
                        f"{row['cpu_median_off_s'] * 1e3:.1f} ms off over {row['steps_on']}/{row['steps_off']} steps"
                    )
                    if row["sample_every_n_steps"] > 1:
                        detail += (
                            f"; a recorded step costs {row['cpu_recorded_step_overhead']:+.1%} CPU, one step in "
                            f"{row['sample_every_n_steps']} is recorded by default"
                        )
                    lines.append(
                        f"| {model_name} | {key} | {row['cpu_overhead']:+.1%} | {row['wall_overhead']:+.1%} | {detail} |"
                    )
                else:
                    detail = f"probe {row['probe_cpu_median_s']:.2f} s CPU every {row['every_n_steps']} steps"
                    lines.append(
                        f"| {model_name} | {key} | {row['cpu_amortised_overhead']:+.2%} "
                        f"| {row['wall_amortised_overhead']:+.2%} | {detail} |"
                    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
