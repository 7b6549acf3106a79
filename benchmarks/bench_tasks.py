"""A task inside a Trainer against a hand-written loop: is the library free?

For each task of issue 12 (``ImageClassifier``: CIFAR-stem pre-act ResNet-18 width 16, batch 64, 32x32;
``SemanticSegmenter``: same-padding U-Net, batch 8, 64x64; ``ObjectDetector``: CenterNet on the detection
quickstart's 2-stack hourglass, batch 16, 64x64):

* **task**: ``Trainer.fit`` of the task with its metrics, logging at the default interval (50 steps, to a
  CSV logger), progress bar on, no checkpointing;
* **plain**: ``for batch in loader: zero_grad; loss = <the same network and loss>; backward; step;
  scheduler.step()`` with the same network (an identical copy), loss functions, AdamW + WarmupCosineLR,
  batches (the same tensors, through the same ``DataLoader``) and precision (fp32);
* **bare Lightning**: the plain loop's loss as the ``training_step`` of a minimal ``LightningModule``
  (no metric, no ``self.log``) in the same ``Trainer`` as the task: what Lightning itself costs (its loop,
  hooks, progress bar), so that ``bare / task`` is what the library adds on top of Lightning.

The three run interleaved in one process (ABCABC..., ``--rounds`` rounds of ``--steps`` steps each, models
continuing their training across rounds). A step is the interval between consecutive batch starts (it
includes the loader, every hook and the optimizer); the first ``--skip`` of each round are dropped. Reported:
the median over rounds of each round's median step, in process CPU time and wall time, and the mean step
(includes the logging steps), with ``throughput ratio = plain step / task step`` (1.0: free).

Usage::

    .venv/bin/python benchmarks/bench_tasks.py                # full (several minutes)
    .venv/bin/python benchmarks/bench_tasks.py --quick        # smoke test (seconds)
    .venv/bin/python benchmarks/bench_tasks.py --profile      # + one torch.profiler table per task

Writes ``benchmarks/results/tasks.json`` and ``tasks.md``.
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger


class _Stamps(pl.Callback):
    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.stamps.append(common.clock())

    def on_train_end(self, *args: Any) -> None:
        self.stamps.append(common.clock())


DEVICE, PRECISION = "cpu", "32-true"


def _to(batch: Any, device: str) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def run_task(
    task: pl.LightningModule, batches: list[Any], root: str, steps: int
) -> list[tuple[float, float]]:
    stamps = _Stamps()
    trainer = pl.Trainer(
        accelerator="gpu" if DEVICE == "cuda" else "cpu",
        devices=1,
        precision=PRECISION,
        max_steps=steps,
        logger=CSVLogger(root, name="bench_tasks"),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=True,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[stamps],
        default_root_dir=root,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the progress bar draws to a buffer: it costs what it costs, without flooding the terminal
        err = sys.stderr
        sys.stderr = io.StringIO()
        try:
            trainer.fit(task, common.loader(batches))
        finally:
            sys.stderr = err
    return stamps.stamps[:-1]  # the last stamp is on_train_end (after the epoch-end work)


class BareModule(pl.LightningModule):
    """The plain loop's loss, optimizer and per-batch schedule as a minimal LightningModule."""

    def __init__(self, model: torch.nn.Module, config: common.TaskConfig) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = common.plain_loss(config, model)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss_fn(batch)

    def configure_optimizers(self) -> Any:
        opt, sched = common.plain_optimizer(self.model, total_steps=10**6)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def run_plain(model: torch.nn.Module, config: common.TaskConfig, batches: list[Any], state: dict) -> list:
    if "opt" not in state:
        state["opt"], state["sched"] = common.plain_optimizer(model, total_steps=10**6)
        state["loss"] = common.plain_loss(config, model)
    opt, sched, loss_fn = state["opt"], state["sched"], state["loss"]
    model.to(DEVICE).train()
    stamps = []
    autocast = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=PRECISION == "bf16-mixed")
    for batch in common.loader(batches):
        stamps.append(common.clock())
        batch = _to(batch, DEVICE)
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(batch)
        loss.backward()
        opt.step()
        sched.step()
    stamps.append(common.clock())
    return stamps[:-1]


def profile_task(task: pl.LightningModule, batches: list[Any], root: str) -> str:
    """The top operators of a few task steps (torch.profiler, CPU time), as text."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_task(task, batches, root, len(batches))
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def bench(config: common.TaskConfig, steps: int, rounds: int, skip: int, root: str) -> dict[str, Any]:
    torch.manual_seed(0)
    task = config.build()
    plain = copy.deepcopy(task)  # identical network and loss modules
    bare = BareModule(copy.deepcopy(task), config)
    batches = common.make_batches(config, steps)
    state: dict = {}
    rows: dict[str, dict[str, list[float]]] = {
        side: {"wall": [], "cpu": [], "wall_mean": []} for side in ("task", "plain", "lightning")
    }
    sides = ("task", "plain", "lightning")
    for r in range(rounds):
        # ABCABC..., the order rotated every round so no side always runs first
        order = sides[r % 3 :] + sides[: r % 3]
        for side in order:
            if side == "task":
                stamps = run_task(task, batches, root, steps)
            elif side == "lightning":
                stamps = run_task(bare, batches, root, steps)
            else:
                stamps = run_plain(plain, config, batches, state)
            wall, cpu = common.intervals(stamps, skip)
            rows[side]["wall"].append(common.median(wall))
            rows[side]["cpu"].append(common.median(cpu))
            rows[side]["wall_mean"].append(sum(wall) / max(1, len(wall)))
    summary = {side: {k: common.median(v) for k, v in vals.items()} for side, vals in rows.items()}
    return {
        "batch": config.batch,
        "size": config.size,
        "rounds": rounds,
        "steps": steps,
        "per_round": rows,
        "median_step_s": summary,
        "ratio_cpu": summary["plain"]["cpu"] / summary["task"]["cpu"],
        "ratio_wall": summary["plain"]["wall"] / summary["task"]["wall"],
        "ratio_wall_mean": summary["plain"]["wall_mean"] / summary["task"]["wall_mean"],
        "ratio_cpu_lightning": summary["plain"]["cpu"] / summary["lightning"]["cpu"],
        "ratio_cpu_task_vs_lightning": summary["lightning"]["cpu"] / summary["task"]["cpu"],
    }


def to_markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Task in a Trainer vs a hand-written loop ({results['setup'].get('device', 'cpu')}, "
        f"{results['setup'].get('precision', '32-true')})",
        "",
        f"Command: `{results['setup']['command']}`. Interleaved ABAB in one process; medians over rounds of",
        "per-round median steps (ms). Ratio = plain step / task step (throughput of the task relative to",
        "the plain loop; 1.0 = free, goal >= 0.98). Bare Lightning: the plain loop's loss as the training_step",
        "of a minimal LightningModule in the same Trainer (what Lightning itself costs).",
        "",
        "| task | batch | task CPU ms | plain CPU ms | ratio (CPU) | task wall ms | plain wall ms | ratio (wall) "
        "| ratio (mean wall, incl. logging steps) | bare Lightning CPU ms | plain / bare Lightning (CPU) "
        "| bare Lightning / task (CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["tasks"].items():
        t, p = row["median_step_s"]["task"], row["median_step_s"]["plain"]
        bare = row["median_step_s"].get("lightning")
        extra = (
            f" {bare['cpu'] * 1e3:.1f} | {row['ratio_cpu_lightning']:.3f} | {row['ratio_cpu_task_vs_lightning']:.3f} |"
            if bare
            else " - | - | - |"
        )
        lines.append(
            f"| {name} | {row['batch']}x{row['size']}² | {t['cpu'] * 1e3:.1f} | {p['cpu'] * 1e3:.1f} | "
            f"{row['ratio_cpu']:.3f} | {t['wall'] * 1e3:.1f} | {p['wall'] * 1e3:.1f} | {row['ratio_wall']:.3f} | "
            f"{row['ratio_wall_mean']:.3f} |" + extra
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 1 round of 4 steps (smoke test)")
    parser.add_argument("--steps", type=int, default=60, help="steps per round and side")
    parser.add_argument("--rounds", type=int, default=4, help="ABAB rounds")
    parser.add_argument("--skip", type=int, default=3, help="untimed steps at the start of each round")
    parser.add_argument("--tasks", nargs="+", default=["classifier", "segmenter", "detector"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table per task")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.skip = 4, 2, 1
    global DEVICE, PRECISION
    DEVICE, PRECISION = args.device, args.precision
    torch.set_num_threads(args.threads)
    configs = common.task_configs(args.quick)
    unknown = sorted(set(args.tasks) - set(configs))
    if unknown:
        parser.error(f"--tasks: unknown {unknown}; choose from {sorted(configs)}")
    setup = common.machine()
    setup["command"] = "python benchmarks/bench_tasks.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    results: dict[str, Any] = {"setup": setup, "tasks": {}}
    with tempfile.TemporaryDirectory() as root:
        for name in args.tasks:
            results["tasks"][name] = bench(configs[name], args.steps, args.rounds, args.skip, root)
            if args.profile:
                torch.manual_seed(0)
                table = profile_task(configs[name].build(), common.make_batches(configs[name], 10), root)
                results["tasks"][name]["profile"] = table
                print(f"== {name}\n{table}")
    stem = "tasks_quick" if args.quick else "tasks" if args.device == "cpu" else f"tasks_{args.device}"
    setup.update(device=args.device, precision=args.precision)
    common.write_results(args.out, stem, results, to_markdown(results))
    return results


if __name__ == "__main__":
    main()
