"""The diagnosis zoo: is the end-of-fit diagnosis right? Precision and recall on known pathologies.

Each row pairs a run with a known pathology and its healthy twin, at 3 seeds each. A pathology cell is
green when the diagnosis *names* it: a finding of severity ``warning`` or ``error`` whose ``kind`` is one
of the row's expected kinds. A healthy cell is green when the diagnosis stays quiet: no ``warning`` or
``error`` at all (``info`` lines are fine). Runs are short, on CPU, on generated data:

* variance rows: one training-mode forward through the monitor's standalone ``measure()`` (the
  initialisation, where the regime is set), pre-activation ResNets at widths 8/16/64, depths 18/34;
* shattering row: :func:`shattering_profile` recorded by the monitor (the paper's 1-D setting);
* every other row: a short ``Trainer.fit`` of a small BN ResNet with all three monitors at their defaults
  (so a healthy twin must stay quiet on all of them), read back from the run's ``diagnosis.json``;
* the DDP row: two CPU ranks (gloo, ``ddp_fork``) with the test suite's tiny model and sharded data.

Run: ``make zoo`` (or ``python benchmarks/diagnosis_zoo.py [--seeds 3] [--rows name,...]``). Writes
``benchmarks/results/diagnosis_zoo.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import lightning.pytorch as pl
import torch
from lightning_convnets.callbacks import (
    ActivationVarianceMonitor,
    BatchNormDriftMonitor,
    Finding,
    GradientShatteringMonitor,
    OptimizationMonitor,
    ThroughputMonitor,
)
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_convnets.backbones import create_backbone

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
LOUD = ("warning", "error")


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One run's verdict."""

    row: str
    twin: str  # "pathology" or "healthy"
    seed: int
    ok: bool
    kinds: list[str]  # kinds of the warning/error findings
    note: str  # the key number(s)
    seconds: float
    messages: list[str] = field(default_factory=list)


def score(
    row: str, twin: str, seed: int, findings: list[Finding], expected: set[str], note: str, t0: float
) -> Cell:
    loud = [f for f in findings if f.severity in LOUD]
    kinds = sorted({f.kind for f in loud})
    ok = any(f.kind in expected for f in loud) if twin == "pathology" else not loud
    messages = [f"{f.severity} {f.kind}: {f.message}" for f in findings]
    return Cell(row, twin, seed, ok, kinds, note, time.process_time() - t0, messages)


class _Stub:
    """What the shattering monitor's record() needs of a trainer outside a fit."""

    global_step = 0
    loggers = ()
    is_global_zero = True


# --------------------------------------------------------------------------------------------------
# Rows without a Trainer
# --------------------------------------------------------------------------------------------------


def variance_run(depth: int, width: int, norm: str, seed: int) -> tuple[list[Finding], str]:
    """A pre-activation ResNet at initialisation, one training-mode forward of 8 images 16x16."""
    torch.manual_seed(seed)
    net = create_backbone(f"preact_resnet{depth}", stem="cifar", width=width, norm=norm)
    monitor = ActivationVarianceMonitor()
    metrics = monitor.measure(net, torch.randn(8, 3, 16, 16))
    monitor.append_history({"step": 0.0, **{f"activation_variance/{k}": v for k, v in metrics.items()}})
    findings = monitor.diagnose(None, None)
    growth = next((f for f in findings if f.kind.startswith("variance_")), None)
    note = "-"
    if growth is not None:
        v = growth.values
        note = f"{v['growth_per_block']:.2f}x/block, Var(F) {v['increment_growth']:.2f}x/block"
    return findings, note


class _PaperBlock(nn.Module):
    """h <- W ReLU(BN(h)) + b, plus h itself when residual (Balduzzi et al. 2017, figure 1)."""

    def __init__(self, width: int, residual: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(width)
        self.linear = nn.Linear(width, width)
        self.residual = residual

    def forward(self, h: Tensor) -> Tensor:
        branch = self.linear(torch.relu(self.bn(h)))
        return h + branch if self.residual else branch


def paper_net(depth: int, residual: bool, seed: int, width: int = 200) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(1, width), *[_PaperBlock(width, residual) for _ in range(depth)], nn.Linear(width, 1)
    )
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.normal_(m.bias, 0.0, 0.1)
    return net


def shattering_run(residual: bool, seed: int) -> tuple[list[Finding], str]:
    """The paper's 24-layer network on [-2, 2] (1-D input, 256 points, BN over the points)."""
    net = paper_net(24, residual, seed)
    monitor = GradientShatteringMonitor(probe=(torch.tensor([-2.0]), torch.tensor([2.0])), bn_mode="batch")
    monitor.record(_Stub(), monitor.probe(net))
    findings = monitor.diagnose(_Stub(), net)
    return findings, f"rho(1) = {monitor.last_profile['lag1']:.2f}"


# --------------------------------------------------------------------------------------------------
# Rows with a Trainer
# --------------------------------------------------------------------------------------------------


class Classifier(pl.LightningModule):
    """A small BN ResNet-18 (CIFAR stem, width 8) with a linear head; SGD with momentum."""

    def __init__(self, lr: float = 0.05, width: int = 8, dead_stage: str | None = None) -> None:
        super().__init__()
        self.lr = lr
        self.net = create_backbone("resnet18", stem="cifar", width=width)
        self.head = nn.Linear(self.net.out_channels[-1], 4)
        if dead_stage is not None:  # a bad init in one stage: half of its channels start (and stay) dead
            with torch.no_grad():
                for block in getattr(self.net, dead_stage):
                    channels = block.bn2.bias.numel()
                    block.bn2.bias[: channels // 2] = -50.0

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.net(x)[-1].mean((2, 3)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def images(n: int, seed: int, shift: float = 0.0, scale: float = 1.0, size: int = 16) -> TensorDataset:
    """Four classes, each a fixed random pattern plus noise: learnable in a few dozen steps."""
    gen = torch.Generator().manual_seed(1000 + seed)
    patterns = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(7))
    labels = torch.randint(0, 4, (n,), generator=gen)
    x = patterns[labels] + torch.randn(n, 3, size, size, generator=gen)
    return TensorDataset(x * scale + shift, labels)


def monitors() -> list[pl.Callback]:
    """The monitors at their default schedules (the logging interval aside: 10 steps, so that these
    short fits log a few intervals). The fits here (20-40 steps) lie within the dense phase, where every
    step is recorded; the shattering probe runs at the first step and, with its derived interval, at the
    end of fit."""
    return [
        ActivationVarianceMonitor(log_every_n_steps=10),
        GradientShatteringMonitor(),
        BatchNormDriftMonitor(log_every_n_steps=10),
        ThroughputMonitor(log_every_n_steps=10),
        OptimizationMonitor(log_every_n_steps=10),
    ]


def fit_and_read(
    module: pl.LightningModule,
    train: DataLoader | None,
    steps: int,
    seed: int,
    callbacks: list[pl.Callback] | None = None,
    datamodule: pl.LightningDataModule | None = None,
    **trainer_kw: Any,
) -> list[Finding]:
    """Fit with the three monitors; the findings as written to ``diagnosis.json`` by rank zero."""
    with tempfile.TemporaryDirectory() as root:
        pl.seed_everything(seed, verbose=False)
        options = dict(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            default_root_dir=root,
            callbacks=callbacks if callbacks is not None else monitors(),
            limit_val_batches=0,
            **QUIET,
        )
        options.update(trainer_kw)
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl.Trainer(**options).fit(module, train, datamodule=datamodule)
        path = Path(root) / "diagnosis.json"
        rows = json.loads(path.read_text()) if path.is_file() else []
    return [Finding(**row) for row in rows]


class PlainCNN(pl.LightningModule):
    """Four conv-LeakyReLU layers (no normalisation) and a linear head; SGD with momentum. Leaky, so that a
    too-high rate diverges to NaN/Inf instead of killing every unit first (a dead net stays finite)."""

    def __init__(self, lr: float = 0.02, width: int = 16) -> None:
        super().__init__()
        self.lr = lr
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(3 if i == 0 else width, width, 3, padding=1, stride=2 if i else 1),
                nn.LeakyReLU(0.1),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def nonfinite_run(lr_factor: float, seed: int) -> tuple[list[Finding], str]:
    """A norm-free CNN (BatchNorm would keep the activations finite): no BN monitor in this row."""
    torch.manual_seed(seed)
    module = PlainCNN(lr=0.02 * lr_factor)
    train = DataLoader(images(640, seed), batch_size=32, shuffle=True)
    callbacks = monitors()[:2]
    findings = fit_and_read(module, train, steps=20, seed=seed, callbacks=callbacks)
    bad = next((f for f in findings if f.kind == "nonfinite" and f.monitor == "activation_variance"), None)
    return findings, (f"first NaN/Inf: {bad.layers[0]} at step {bad.step}" if bad else "all finite")


def dead_run(dead: bool, seed: int) -> tuple[list[Finding], str]:
    torch.manual_seed(seed)
    module = Classifier(dead_stage="layer2" if dead else None)
    train = DataLoader(images(640, seed), batch_size=32, shuffle=True)
    findings = fit_and_read(module, train, steps=20, seed=seed)
    hit = next((f for f in findings if f.kind == "dead_relu"), None)
    return findings, (
        f"{hit.values['dead_fraction']:.0%} dead in {hit.layers[0]}" if hit else "no dead layer"
    )


class ValidationCheck(pl.Callback):
    """After the fit, the BN monitor's standalone ``measure()`` on two validation batches against the running
    statistics the fit left (on a copy of the network): the train/test check a user runs before evaluating.
    Its findings replace the fit's BN findings in the report."""

    def __init__(self, val: DataLoader) -> None:
        self.val = val

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import copy

        from lightning_convnets.callbacks.diagnosis import diagnosis_for

        model = copy.deepcopy(pl_module).train()
        check = BatchNormDriftMonitor()
        batches = [x for (x, _), _ in zip(self.val, range(2))]
        metrics = check.measure(model, batches)
        check.append_history(
            {"step": float(trainer.global_step), **{f"batchnorm/{k}": v for k, v in metrics.items()}}
        )
        diagnosis_for(trainer).add(check.diagnose(trainer, pl_module))


def shift_run(shifted: bool, seed: int) -> tuple[list[Finding], str]:
    torch.manual_seed(seed)
    module = Classifier(lr=0.02)
    train = DataLoader(images(1280, seed), batch_size=32, shuffle=True)
    val_data = images(128, seed + 50, shift=0.5 if shifted else 0.0, scale=2.0 if shifted else 1.0)
    val = DataLoader(val_data, batch_size=64)
    callbacks = [ValidationCheck(val), *monitors()]  # the check runs before the monitors report
    findings = fit_and_read(module, train, steps=40, seed=seed, callbacks=callbacks)
    z = [f.values.get("z_shift", math.nan) for f in findings if f.kind == "bn_train_test_shift"]
    r = [f.values.get("variance_factor", math.nan) for f in findings if f.kind == "bn_variance_mismatch"]
    note = ", ".join(([f"z-shift {z[0]:.2f}"] if z else []) + ([f"var x{r[0]:.1f}"] if r else [])) or "-"
    return findings, note


def small_batch_run(batch: int, seed: int) -> tuple[list[Finding], str]:
    torch.manual_seed(seed)
    module = Classifier(lr=0.05 * batch / 64)  # the linear scaling rule
    train = DataLoader(images(max(batch * 40, 256), seed), batch_size=batch, shuffle=True, drop_last=True)
    findings = fit_and_read(module, train, steps=40, seed=seed)
    hit = next((f for f in findings if f.kind == "bn_noisy_batch_stats"), None)
    return findings, (f"z-shift {hit.values['z_shift']:.2f}" if hit else "-")


class Shards(pl.LightningDataModule):
    """:func:`images` with the odd-indexed ones shifted by ``shift``, dealt to the ranks by a
    DistributedSampler: in order (``shuffle=False``: rank 1 of 2 gets only shifted images, non-i.i.d.
    shards) or shuffled (each rank a random half: i.i.d. shards). Lightning keeps a loader that already
    holds a DistributedSampler."""

    def __init__(self, shuffle: bool, seed: int, shift: float = 1.5, batch_size: int = 16) -> None:
        super().__init__()
        self.shuffle, self.seed, self.batch_size = shuffle, seed, batch_size
        self.dataset = images(1024, seed)
        self.dataset.tensors[0][1::2] += shift

    def train_dataloader(self) -> DataLoader:
        import torch.distributed as dist
        from torch.utils.data import DistributedSampler

        sampler = None
        if dist.is_available() and dist.is_initialized():
            sampler = DistributedSampler(self.dataset, shuffle=self.shuffle, seed=self.seed)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True)


def ddp_run(non_iid: bool, seed: int) -> tuple[list[Finding], str]:
    """Two CPU ranks (gloo, ``ddp_fork``, DDP's default buffer broadcast), 32 steps of batch 16 per rank."""
    sys.path.insert(0, str(ROOT / "tests"))
    from ddp_utils import ddp_hygiene  # restores the environment, fails on leaked workers or ports

    with ddp_hygiene():
        torch.manual_seed(seed)
        findings = fit_and_read(
            Classifier(lr=0.05),
            None,
            steps=32,
            seed=seed,
            datamodule=Shards(shuffle=not non_iid, seed=seed),
            devices=2,
            strategy="ddp_fork",
        )
    hit = next((f for f in findings if f.kind == "bn_rank_disagreement"), None)
    return findings, (
        f"spread {hit.values['rank_spread']:.2f} ({hit.values['rank_noise_ratio']:.0f}x noise)"
        if hit
        else "-"
    )


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    pathology: str  # what is wrong, in words
    healthy: str  # the twin
    expected: set[str]  # finding kinds that name the pathology
    run: Callable[[bool, int], tuple[list[Finding], str]]  # (pathological?, seed) -> (findings, note)


def rows() -> list[Row]:
    table = []
    for depth in (18, 34):
        for width in (8, 16, 64):
            table.append(
                Row(
                    f"variance-d{depth}-w{width}",
                    f"pre-act ResNet-{depth}, width {width}, no normalisation: exponential variance growth",
                    "the same net with BatchNorm (linear growth)",
                    {"variance_exponential"},
                    lambda bad, seed, d=depth, w=width: variance_run(d, w, "none" if bad else "batch", seed),
                )
            )
    table += [
        Row(
            "shattering",
            "24-layer plain network (Balduzzi et al. figure 1): shattered gradients",
            "the 24-block residual twin",
            {"shattered"},
            lambda bad, seed: shattering_run(not bad, seed),
        ),
        Row(
            "nonfinite",
            "learning rate 100x too high (2.0, a norm-free 4-layer leaky-ReLU CNN): non-finite activations, first module named",
            "the normal rate (0.02)",
            {"nonfinite"},
            lambda bad, seed: nonfinite_run(100.0 if bad else 1.0, seed),
        ),
        Row(
            "dead-relu",
            "bias -50 on half the channels closing each branch of layer2: dead ReLUs",
            "normal init",
            {"dead_relu"},
            dead_run,
        ),
        Row(
            "bn-train-test",
            "validation inputs shifted (+0.5) and rescaled (x2) against training: BN train/test discrepancy",
            "validation from the training distribution",
            {"bn_train_test_shift", "bn_variance_mismatch"},
            shift_run,
        ),
        Row(
            "ddp-non-iid",
            "two DDP ranks, shards dealt in order (rank 1 gets only the images shifted by 1.5): BN running stats disagree",
            "shuffled shards",
            {"bn_rank_disagreement"},
            ddp_run,
        ),
        Row(
            "small-batch",
            "batch of 2 per step: noisy BN statistics",
            "batch of 64",
            {"bn_noisy_batch_stats"},
            lambda bad, seed: small_batch_run(2 if bad else 64, seed),
        ),
    ]
    # the rows of the newer findings, in their own modules (which import this one: imported here)
    from zoo_optim import rows as optim_rows
    from zoo_throughput import rows as throughput_rows

    table += throughput_rows() + optim_rows()
    return table


def run_zoo(selected: list[Row], seeds: int) -> list[Cell]:
    cells = []
    for row in selected:
        for twin in ("pathology", "healthy"):
            for seed in range(seeds):
                t0 = time.process_time()
                findings, note = row.run(twin == "pathology", seed)
                cell = score(row.name, twin, seed, findings, row.expected, note, t0)
                cells.append(cell)
                mark = "ok " if cell.ok else "BAD"
                print(
                    f"{mark} {row.name:18s} {twin:9s} seed {seed}: {note}; loud: {cell.kinds or '-'}",
                    flush=True,
                )
    return cells


def markdown(
    selected: list[Row], cells: list[Cell], seeds: int, wall: float, cpu: float, load: tuple[str, str]
) -> str:
    lines = [
        "# Diagnosis zoo",
        "",
        "Each pathology must be named (a `warning`/`error` finding of the expected kind) in every seed; each "
        "healthy twin must get no `warning`/`error` at all. A cell: the verdict, then the key number. "
        "Generated by `make zoo` (`python benchmarks/diagnosis_zoo.py`).",
        "",
        "| row | pathology (must be flagged) | expected kind | "
        + " | ".join(f"seed {s}" for s in range(seeds))
        + " | healthy twin (must stay quiet) | "
        + " | ".join(f"seed {s}" for s in range(seeds))
        + " |",
        "|---|---|---|" + "---|" * seeds + "---|" + "---|" * seeds,
    ]
    for row in selected:
        bad = [c for c in cells if c.row == row.name and c.twin == "pathology"]
        good = [c for c in cells if c.row == row.name and c.twin == "healthy"]

        def show(c: Cell) -> str:
            verdict = (
                ("flagged" if c.ok else "MISSED")
                if c.twin == "pathology"
                else ("quiet" if c.ok else "WARNED")
            )
            extra = "" if c.ok or c.twin == "pathology" else f" ({', '.join(c.kinds)})"
            return f"{'✅' if c.ok else '❌'} {verdict}{extra}: {c.note}"

        lines.append(
            f"| {row.name} | {row.pathology} | {', '.join(sorted(row.expected))} | "
            + " | ".join(show(c) for c in bad)
            + f" | {row.healthy} | "
            + " | ".join(show(c) for c in good)
            + " |"
        )
    flagged = sum(c.ok for c in cells if c.twin == "pathology")
    quiet = sum(c.ok for c in cells if c.twin == "healthy")
    n_bad = sum(c.twin == "pathology" for c in cells)
    n_good = sum(c.twin == "healthy" for c in cells)
    lines += [
        "",
        f"Recall (pathology runs flagged with the right kind): {flagged}/{n_bad}. "
        f"Quiet healthy runs (no warning): {quiet}/{n_good}.",
        "",
        f"Wall time {wall:.0f} s, process CPU time {cpu:.0f} s (plus the DDP workers'), torch "
        f"{torch.__version__}, lightning {pl.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} thread(s); load average before: {load[0]}, after: {load[1]}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell (default 3)")
    parser.add_argument("--rows", default="", help="comma-separated row names or prefixes (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "diagnosis_zoo.md", help="markdown output")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    torch.set_num_threads(args.threads)
    wanted = [w for w in args.rows.split(",") if w]
    selected = [r for r in rows() if not wanted or any(r.name.startswith(w) for w in wanted)]
    if not selected:
        parser.error(f"--rows {args.rows!r} matches no row; rows: {[r.name for r in rows()]}")
    load_before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    wall, cpu = time.perf_counter(), time.process_time()
    cells = run_zoo(selected, args.seeds)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    load_after = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    load = (" ".join(load_before), " ".join(load_after))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(selected, cells, args.seeds, wall, cpu, load))
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "seeds": args.seeds,
                "wall_s": wall,
                "cpu_s": cpu,
                "load": load,
                "cells": [asdict(c) for c in cells],
            },
            indent=1,
        )
    )
    ok = all(c.ok for c in cells)
    print(
        f"{'all cells green' if ok else 'SOME CELLS FAILED'}; wrote {args.out} ({wall:.0f} s wall, {cpu:.0f} s CPU)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
