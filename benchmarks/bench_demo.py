"""The demo's time to each quickstart's promise: ``make demo`` as a user runs it, timed per task.

Each task runs as the demo runs it (``lightning_convnets.demo.run_task``: fit as shipped, test on the best
checkpoint, predict, in this process), in a fresh temporary folder with a fresh data cache, so that the
data generation of a first run is counted. Reported per task: fit wall and process CPU seconds (all
threads), test + predict wall, the test metric and whether the promise held, the time to target (the
first validation at which the promise held on the validation split: its epoch, wall and CPU seconds since
the fit started), and the load average before and after; then the demo's total wall time.

    python benchmarks/bench_demo.py                          # the three, as `make demo` runs them
    python benchmarks/bench_demo.py --tasks detection --seeds 0 1 2   # other data and init seeds
    python benchmarks/bench_demo.py --threads 1              # one thread (the demo's choice on a busy machine)
    python benchmarks/bench_demo.py --out /tmp/demo          # elsewhere than benchmarks/results/demo
    python benchmarks/bench_demo.py --out /tmp/smoke --extra --trainer.limit_train_batches=2  # a smoke test

A seed ``s`` passes ``--seed_everything s --data.init_args.seed s`` (new images, new initialisation);
without ``--seeds`` the configs' own seeds are used. Writes ``<out>.json`` and ``<out>.md`` (default
``benchmarks/results/demo``), the command that produced them included. The promise is 4 minutes of wall
time for the three on a quiet 2-core machine; time it there (load average under 1 before the start).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "demo"
BUDGET_SECONDS = 240.0


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def time_to_target(task: str, validations: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first validation at which ``task``'s promise held on the validation split, or ``None``."""
    from lightning_convnets.demo import promise_met

    for row in validations:
        if promise_met(task, row["metrics"], stage="val"):
            return {k: row[k] for k in ("epoch", "step", "wall_seconds", "cpu_seconds")}
    return None


def run(task: str, seed: int | None, extra_args: list[str] | None = None) -> dict[str, Any]:
    """One demo task (fit, test, predict) in the working directory; its timings, metric and time to target.

    Args:
        task: the quickstart.
        seed: data and init seed, ``None`` for the config's.
        extra_args: more CLI arguments for the three commands (a smoke test's tiny limits).
    """
    from lightning_convnets import demo

    extra = [*([] if seed is None else ["--seed_everything", str(seed), "--data.init_args.seed", str(seed)])]
    extra += list(extra_args or [])
    load_before = _load()
    wall = time.perf_counter()
    result = demo.run_task(task, extra)
    wall = time.perf_counter() - wall
    spec = demo.QUICKSTARTS[task]
    return {
        "task": task,
        "seed": seed,
        "config": spec.config,
        "settings": result["settings"],
        "metric": spec.metric,
        "score": result["score"],
        "promise": spec.promise,
        "promise_met": result["promise_met"],
        "test_metrics": result["test_metrics"],
        "fit_wall_seconds": round(result["fit_seconds"], 1),
        "fit_cpu_seconds": round(result["fit_cpu_seconds"], 1),
        "task_wall_seconds": round(wall, 1),
        "test_predict_wall_seconds": round(wall - result["fit_seconds"], 1),
        "time_to_target": time_to_target(task, result["validations"]),
        "validations": result["validations"],
        "load_before": load_before,
        "load_after": _load(),
    }


def to_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: one row per run, then the total."""
    lines = [
        "# The demo's time to each promise",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}; torch threads: {report['threads']}; data cache: "
        f"{'fresh (generation counted in the fit)' if report['fresh_cache'] else 'warm'}.",
        "",
        "Time to target: the first validation at which the promise held on the validation split (epoch, then "
        "wall / CPU seconds since the fit started). Fit CPU: process CPU time, all threads.",
        "",
        "| task | seed | test metric | promise | time to target | fit wall (CPU) | test + predict | load before -> after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        ttt = r["time_to_target"]
        target = (
            "not reached"
            if ttt is None
            else (f"epoch {ttt['epoch']}: {ttt['wall_seconds']:.0f} s ({ttt['cpu_seconds']:.0f} s CPU)")
        )
        score = "n/a" if r["score"] is None else f"{r['metric'].split('/', 1)[1]} {r['score']:.3f}"
        kept = {True: "kept", False: "MISSED", None: "n/a"}[r["promise_met"]]
        lines.append(
            f"| {r['task']} | {'config' if r['seed'] is None else r['seed']} | {score} | {kept}: {r['promise']} | "
            f"{target} | {r['fit_wall_seconds']:.0f} s ({r['fit_cpu_seconds']:.0f} s) | "
            f"{r['test_predict_wall_seconds']:.0f} s | {r['load_before']} -> {r['load_after']} |"
        )
    lines += [""]
    for seed, total in report["total_wall_seconds"].items():
        verdict = "within" if total <= BUDGET_SECONDS else "OVER"
        lines.append(
            f"Total wall time of the demo's tasks (seed {seed}): {total:.0f} s, {verdict} the "
            f"{BUDGET_SECONDS / 60:.0f}-minute budget (imports and process start not included)."
        )
    lines += [
        "",
        "Settings of each fit: "
        + "; ".join(sorted({f"{r['task']}: {r['settings']}" for r in report["runs"]})),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write ``<out>.json`` and ``<out>.md``; return the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["classification", "segmentation", "detection"])
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=None, help="data and init seeds (default: the configs')"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: what the demo picks)"
    )
    parser.add_argument("--warm-cache", action="store_true", help="generate the data before the clock starts")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--extra", nargs=argparse.REMAINDER, default=[], help="CLI arguments for every command (smoke tests)"
    )
    args = parser.parse_args(argv)

    import torch

    from lightning_convnets import demo

    unknown = [t for t in args.tasks if t not in demo.TASKS]
    if unknown:
        parser.error(f"--tasks: unknown {unknown}; choose from {list(demo.TASKS)}")
    threads = args.threads
    if threads is None:
        threads = demo.busy_machine_threads(_load() or 0.0, os.cpu_count() or 1, dict(os.environ))
    if threads is not None:
        torch.set_num_threads(threads)
    command = " ".join(["python benchmarks/bench_demo.py", *(sys.argv[1:] if argv is None else argv)])

    runs: list[dict[str, Any]] = []
    totals: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        workdir = Path(tmp)
        before_env = os.environ.get("LIGHTNING_CONVNETS_CACHE")
        os.environ["LIGHTNING_CONVNETS_CACHE"] = str(workdir / "cache")
        try:
            with _chdir(workdir):
                for seed in args.seeds or [None]:
                    if args.warm_cache:
                        _generate(args.tasks, seed)
                    start = time.perf_counter()
                    for task in args.tasks:
                        runs.append(run(task, seed, args.extra))
                        print(
                            json.dumps({k: v for k, v in runs[-1].items() if k != "validations"}), flush=True
                        )
                    totals["config" if seed is None else str(seed)] = round(time.perf_counter() - start, 1)
        finally:
            if before_env is None:
                os.environ.pop("LIGHTNING_CONVNETS_CACHE", None)
            else:
                os.environ["LIGHTNING_CONVNETS_CACHE"] = before_env

    report = {
        "command": command,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "threads": torch.get_num_threads(),
        "fresh_cache": not args.warm_cache,
        "torch": torch.__version__,
        "runs": runs,
        "total_wall_seconds": totals,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report))
    return report


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _generate(tasks: list[str], seed: int | None) -> None:
    """Generate the tasks' data into the cache (``--warm-cache``), outside the timed runs."""
    from lightning_convnets import demo
    from lightning_convnets.cli import ConvNetsCLI

    for task in tasks:
        extra = [] if seed is None else ["--data.init_args.seed", str(seed)]
        config = str(demo.find_config(demo.QUICKSTARTS[task].config))
        ConvNetsCLI(args=["--config", config, *extra], run=False).datamodule.prepare_data()


if __name__ == "__main__":
    main()
