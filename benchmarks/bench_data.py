"""Does the data pipeline keep the training step fed? Loader images/s at num_workers 0, 1, 2 vs step images/s.

For each task, ``ShapesDataModule`` (generated images on disk, the default train augmentations, the task's
batch size of ``common.task_configs``) is read through its ``train_dataloader`` at ``num_workers`` 0, 1 and
2 (``persistent_workers`` when > 0); the first batch (worker start-up) is not timed. Against it: the
training step's images/s for the same batch (the plain loop of ``bench_tasks``: forward, loss, backward,
AdamW), in one process. ``loader / step > 1`` means the loader alone outruns the step; with
``num_workers=0`` the two add up (the step waits for every batch), with workers they overlap as long as
there is a free core.

Usage::

    .venv/bin/python benchmarks/bench_data.py            # full
    .venv/bin/python benchmarks/bench_data.py --quick    # smoke test

Writes ``benchmarks/results/data.json`` and ``data.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch
from lightning_convnets.datamodules import ShapesDataModule

KINDS = {"classifier": "classification", "segmenter": "segmentation", "detector": "detection"}


def loader_rate(dm: ShapesDataModule, batches: int) -> dict[str, float]:
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # worker start-up and the first batch are not timed
    start = common.clock()
    seen = 0
    for _ in range(batches):
        try:
            images = next(it)[0]
        except StopIteration:
            it = iter(loader)
            images = next(it)[0]
        seen += len(images)
    end = common.clock()
    del it
    return {"images_per_s": seen / (end[0] - start[0]), "main_cpu_s": end[1] - start[1]}


def step_rate(config: common.TaskConfig, steps: int) -> float:
    stamps = common.plain_step_stamps(config, common.make_batches(config, steps + 2))
    wall, _ = common.intervals(stamps, 2)
    return config.batch / common.median(wall)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny data and models, workers 0 and 1")
    parser.add_argument("--batches", type=int, default=20, help="timed loader batches per setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=list(KINDS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", default=None, help="where the shapes are generated (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.workers = 3, [0, 1]
    torch.set_num_threads(args.threads)
    configs = common.task_configs(args.quick)
    setup = common.machine()
    setup["command"] = "python benchmarks/bench_data.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    results: dict[str, Any] = {"setup": setup, "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or tmp
        for name in args.tasks:
            config = configs[name]
            rows: dict[str, Any] = {"batch": config.batch, "size": config.size, "loader": {}}
            for workers in args.workers:
                dm = ShapesDataModule(
                    task=KINDS[name],
                    root=str(Path(root) / name),
                    image_size=config.size,
                    num_train=max(64, config.batch * 8) if not args.quick else 16,
                    num_val=8,
                    num_test=8,
                    batch_size=config.batch,
                    num_workers=workers,
                    persistent_workers=workers > 0,
                )
                dm.prepare_data()
                dm.setup("fit")
                rows["loader"][workers] = loader_rate(dm, args.batches)
            rows["step_images_per_s"] = step_rate(config, 4 if args.quick else 12)
            results["tasks"][name] = rows
    common.write_results(args.out, "data_quick" if args.quick else "data", results, to_markdown(results))
    return results


def to_markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Data pipeline: ShapesDataModule train loader vs the training step (CPU)",
        "",
        f"Command: `{results['setup']['command']}`. Loader: default train augmentations; step: plain loop.",
        "",
        "| task | batch | num_workers | loader images/s | step images/s | loader / step |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results["tasks"].items():
        step = row["step_images_per_s"]
        for workers, rate in row["loader"].items():
            lines.append(
                f"| {name} | {row['batch']}x{row['size']}² | {workers} | {rate['images_per_s']:.0f} | {step:.0f} | "
                f"{rate['images_per_s'] / step:.1f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
