"""The demo (``make demo``): the three quickstarts on generated shapes, each fit, tested on its best
checkpoint and run in ``predict``, then one summary table of what came out and where it is.

The runs are shortened (see :data:`QUICKSTARTS`); ``--full`` runs the configs as shipped. Usage::

    python -m lightning_convnets.demo [--task classification|segmentation|detection] [--full] [CLI args]

Start with :func:`run_task` (fit, test, predict of one quickstart) and :func:`format_summary`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("classification", "segmentation", "detection")


@dataclass(frozen=True)
class Quickstart:
    """One task's quickstart: its config, how the demo shortens it, and what it reports.

    Args:
        config: config path relative to the repository root.
        model: a short description of the network for the summary.
        metric: the test metric shown in the summary.
        demo_args: CLI overrides of the shortened demo run.
        shortened: the demo's settings, in words.
        promise: what the config as shipped promises, in words.

    Example:
        >>> QUICKSTARTS["segmentation"].metric
        'test/miou'
    """

    config: str
    model: str
    metric: str
    demo_args: list[str] = field(default_factory=list)
    shortened: str = ""
    promise: str = ""


QUICKSTARTS: dict[str, Quickstart] = {
    "classification": Quickstart(
        config="configs/quickstart.yaml",
        model="pre-act ResNet-18, width 8",
        metric="test/acc",
        demo_args=["--trainer.max_epochs", "2"],
        shortened="2 epochs instead of 3",
        promise="3 epochs: validation accuracy >= 0.90 (measured ~0.98)",
    ),
    "segmentation": Quickstart(
        config="configs/segmentation/shapes_unet.yaml",
        model="U-Net (same padding), width 16, depth 4",
        metric="test/miou",
        demo_args=["--trainer.max_epochs", "3"],
        shortened="3 epochs instead of 5",
        promise="5 epochs: test mIoU >= 0.90, every class >= 0.85, <= 3 CPU-minutes",
    ),
    "detection": Quickstart(
        config="configs/detection/centernet_hourglass_shapes.yaml",
        model="CenterNet, 2-stack hourglass",
        metric="test/map_50",
        demo_args=["--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "3"],
        shortened="3 epochs instead of 7",
        promise="7 epochs: test mAP@50 >= 0.5 (measured 0.74), ~3 CPU-minutes",
    ),
}


def busy_machine_threads(load: float, cores: int, env: dict[str, str]) -> int | None:
    """Thread count to force on a machine that is already busy, else ``None`` (keep torch's default).

    When other processes already keep every core busy, OpenMP threads spend their time spin-waiting for
    each other: measured here, the quickstart needed 6x more CPU time with 2 threads than with 1 on a
    loaded 2-core machine. An explicit ``OMP_NUM_THREADS`` always wins.
    """
    if "OMP_NUM_THREADS" in env or cores <= 1:
        return None
    return 1 if load >= cores else None


def find_config(relative: str) -> Path:
    """Path of a config shipped with the repository (source checkout first, then the working directory).

    Raises:
        FileNotFoundError: when neither place has it.
    """
    candidates = [Path(__file__).resolve().parents[1] / relative, Path.cwd() / relative]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{relative} not found (looked in " + ", ".join(str(p) for p in candidates) + "); "
        "run the demo from a source checkout of lightning-convnets"
    )


def quickstart_config() -> Path:
    """Path of ``configs/quickstart.yaml`` (the classification quickstart)."""
    return find_config(QUICKSTARTS["classification"].config)


def parse_args(argv: list[str]) -> tuple[list[str], bool, list[str]]:
    """Split the demo's own options from the extra CLI arguments.

    Args:
        argv: command-line arguments, e.g. ``["--task", "detection", "--trainer.max_epochs", "1"]``.

    Returns:
        ``(tasks to run, full, extra LightningCLI arguments)``; ``--task all`` (the default) or an empty
        ``TASK`` (as ``make demo TASK=`` passes) means all three.

    Raises:
        SystemExit: for an unknown ``--task`` (argparse prints the choices).
    """
    parser = argparse.ArgumentParser(prog="python -m lightning_convnets.demo", add_help=True)
    parser.add_argument(
        "--task",
        default="all",
        type=lambda s: s.strip().lower() or "all",
        choices=["all", *TASKS],
        help="which quickstart to run (default: all three)",
    )
    parser.add_argument("--full", action="store_true", help="run the configs as shipped, not shortened")
    known, extra = parser.parse_known_args(argv)
    tasks = list(TASKS) if known.task == "all" else [known.task]
    return tasks, bool(known.full), extra


def _relative(path: str | Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _predictions_of(log_dir: Path) -> list[Path]:
    folder = log_dir / "predictions"
    found = sorted(p for p in folder.glob("*") if p.is_file())
    masks = folder / "masks"
    if masks.is_dir():
        found.append(masks)
    return found


def run_task(task: str, extra: list[str], full: bool = False) -> dict[str, Any]:
    """Fit one quickstart, test its best checkpoint, predict with it; return what the summary shows.

    Args:
        task: ``"classification"``, ``"segmentation"`` or ``"detection"``.
        extra: LightningCLI arguments appended to all three commands (after the demo's settings).
        full: run the config as shipped (no demo shortening).

    Returns:
        ``{"task", "model", "metric", "score", "test_metrics", "fit_seconds", "fit_cpu_seconds",
        "best_checkpoint", "log_dir", "figures", "predictions", "shortened"}``.

    Raises:
        ValueError: for an unknown task.
        RuntimeError: when the fit saved no checkpoint.
    """
    if task not in QUICKSTARTS:
        raise ValueError(f"task must be one of {list(QUICKSTARTS)}, got {task!r}")
    from lightning_convnets.cli import ConvNetsCLI

    spec = QUICKSTARTS[task]
    config = str(find_config(spec.config))
    common = ["--config", config, *([] if full else spec.demo_args), *extra]
    print(
        f"\n=== {task}: {spec.model} ({'as shipped' if full else 'demo: ' + spec.shortened}) ===", flush=True
    )

    wall, cpu = time.perf_counter(), time.process_time()
    fit = ConvNetsCLI(args=["fit", *common])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    checkpoint = fit.trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None else ""
    if not best:
        raise RuntimeError(f"the {task} fit saved no checkpoint; is ModelCheckpoint still in {config}?")
    log_dir = Path(fit.trainer.log_dir or fit.trainer.default_root_dir)

    # test and predict write into the fit's folder (no new logger version, the fit's config.yaml kept).
    after = [
        *common,
        "--ckpt_path",
        best,
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(log_dir),
    ]
    test = ConvNetsCLI(args=["test", *after], save_config_callback=None)
    test_metrics = {k: float(v) for k, v in test.trainer.callback_metrics.items() if k.startswith("test/")}
    ConvNetsCLI(args=["predict", *after], save_config_callback=None)

    figures = log_dir / "figures"
    return {
        "task": task,
        "model": spec.model,
        "metric": spec.metric,
        "score": test_metrics.get(spec.metric),
        "test_metrics": test_metrics,
        "fit_seconds": wall,
        "fit_cpu_seconds": cpu,
        "best_checkpoint": best,
        "log_dir": str(log_dir),
        "figures": sorted(str(p) for p in figures.glob("*.png")) if figures.is_dir() else [],
        "predictions": [str(p) for p in _predictions_of(log_dir)],
        "shortened": "" if full else spec.shortened,
    }


def format_summary(results: list[dict[str, Any]], total_seconds: float | None = None) -> str:
    """One table of the runs: task, model, test metric, fit time, and where everything is.

    Paths inside a run's log folder are shown relative to it (``<logs>/...``). Shortened runs are said to
    be so, with the promise of the config as shipped.

    Args:
        results: :func:`run_task` results.
        total_seconds: wall time of the whole demo, printed under the table when given.

    Example:
        >>> print(format_summary([]))
        No quickstart ran.
    """
    if not results:
        return "No quickstart ran."
    header = ["task", "model", "test metric", "fit (CPU)", "logs", "checkpoint", "figures", "predictions"]
    rows = []
    for r in results:
        logs = Path(r["log_dir"])

        def inside(path: str | Path, logs: Path = logs) -> str:
            p = Path(path)
            try:
                return "<logs>/" + str(p.resolve().relative_to(logs.resolve())) + ("/" if p.is_dir() else "")
            except ValueError:
                return _relative(p)

        score = "n/a" if r["score"] is None else f"{r['metric'].split('/', 1)[-1]} {r['score']:.3f}"
        figures = f"<logs>/figures/ ({len(r['figures'])} PNG)" if r["figures"] else "-"
        rows.append(
            [
                r["task"],
                r["model"],
                score,
                f"{r['fit_seconds']:.0f} s ({r['fit_cpu_seconds']:.0f} s)",
                _relative(logs),
                inside(r["best_checkpoint"]),
                figures,
                ", ".join(inside(p) for p in r["predictions"]) or "-",
            ]
        )
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    out = ["", "Demo summary", line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    shortened = [r for r in results if r.get("shortened")]
    if shortened:
        out += [
            "",
            "These demo runs are shortened; the configs as shipped (--full, or lightning-convnets fit) promise:",
        ]
        out += [f"  {r['task']}: {r['shortened']}; {QUICKSTARTS[r['task']].promise}" for r in shortened]
    if total_seconds is not None:
        out += ["", f"Total demo time: {total_seconds:.0f} s."]
    out += ["View the logs: tensorboard --logdir lightning_logs"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the quickstarts chosen by ``argv`` (default ``sys.argv[1:]``) and print the summary table.

    Returns:
        The :func:`run_task` result of each task run.
    """
    tasks, full, extra = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on every platform
        load = 0.0
    threads = busy_machine_threads(load, os.cpu_count() or 1, dict(os.environ))
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
        print(
            f"The machine is busy (load {load:.1f} on {os.cpu_count()} cores): training with {threads} thread."
        )
    start = time.perf_counter()
    results = [run_task(task, extra, full) for task in tasks]
    print(format_summary(results, time.perf_counter() - start))
    return results


if __name__ == "__main__":  # pragma: no cover
    main()
