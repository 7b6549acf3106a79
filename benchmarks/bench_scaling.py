"""How a training step's cost grows with batch size and image size, per task (CPU, fp32, plain loop).

For each task of ``common.task_configs``: the median training step (forward, loss, backward, AdamW) over
``--steps`` steps, at batch sizes 8..128 (image size fixed at the task's) and image sizes 32..256 (batch
fixed at 8). The table gives the step time and the time per megapixel (``step / (batch * H * W)``):
a constant column means cost linear in pixels; a rising one means something grows faster (memory
traffic out of cache), a falling one fixed per-step costs being amortised.

Usage::

    .venv/bin/python benchmarks/bench_scaling.py            # full (several minutes)
    .venv/bin/python benchmarks/bench_scaling.py --quick    # smoke test

Writes ``benchmarks/results/scaling.json`` and ``scaling.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch


def step_time(config: common.TaskConfig, batch: int, size: int, steps: int) -> dict[str, float]:
    batches = common.make_batches(config, 1, batch=batch, size=size) * (steps + 1)
    wall, cpu = common.intervals(common.plain_step_stamps(config, batches), 1)
    cpu_s = common.median(cpu)
    return {
        "cpu_s": cpu_s,
        "wall_s": common.median(wall),
        "cpu_s_per_mpixel": cpu_s / (batch * size * size / 1e6),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, two points per axis")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--tasks", nargs="+", default=["classifier", "segmenter", "detector"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batches, args.sizes = 2, [2, 4], [32, 64]
    torch.set_num_threads(args.threads)
    configs = common.task_configs(args.quick)
    setup = common.machine()
    setup["command"] = "python benchmarks/bench_scaling.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    results: dict[str, Any] = {"setup": setup, "tasks": {}}
    for name in args.tasks:
        config = configs[name]
        fixed_batch = min(8, max(args.batches))
        # the detector's hourglass needs sizes that are multiples of its size divisor: 64 and up
        sizes = [s for s in args.sizes if name != "detector" or s >= 64]
        results["tasks"][name] = {
            "batch": {b: step_time(config, b, config.size, args.steps) for b in args.batches},
            "size": {s: step_time(config, fixed_batch, s, args.steps) for s in sizes},
            "image_size": config.size,
            "fixed_batch": fixed_batch,
        }
    common.write_results(
        args.out, "scaling_quick" if args.quick else "scaling", results, to_markdown(results)
    )
    return results


def to_markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Step cost against batch size and image size (CPU, fp32, plain training loop)",
        "",
        f"Command: `{results['setup']['command']}`. Median process-CPU time per step.",
        "",
        "| task | batch | image | step CPU ms | CPU ms per megapixel |",
        "|---|---|---|---|---|",
    ]
    for name, row in results["tasks"].items():
        for b, v in row["batch"].items():
            lines.append(
                f"| {name} | {b} | {row['image_size']}² | {v['cpu_s'] * 1e3:.1f} | {v['cpu_s_per_mpixel'] * 1e3:.0f} |"
            )
        for s, v in row["size"].items():
            lines.append(
                f"| {name} | {row['fixed_batch']} | {s}² | {v['cpu_s'] * 1e3:.1f} | {v['cpu_s_per_mpixel'] * 1e3:.0f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
