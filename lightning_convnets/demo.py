"""The demo (``make demo``): the three quickstarts on generated shapes, each fit as shipped, tested on its
best checkpoint and run in ``predict``, then one summary table of what came out, whether each config's
promise held, and where everything is.

Usage::

    python -m lightning_convnets.demo [--task classification|segmentation|detection] [CLI args]

Start with :func:`run_task` (fit, test, predict of one quickstart) and :func:`format_summary`; the
reference is ``docs/demo.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

TASKS = ("classification", "segmentation", "detection")


@dataclass(frozen=True)
class Quickstart:
    """One task's quickstart: its config, what the summary reports, and the promise it keeps.

    Args:
        config: config path relative to the repository root.
        model: a short description of the network for the summary.
        metric: the test metric shown in the summary.
        targets: the promise as minimum values of metrics named without their stage (``"acc"``, not
            ``"test/acc"``); a name ending in ``/*`` is every metric under that prefix (one per class).
        promise: the promise, in words.

    Example:
        >>> spec = QUICKSTARTS["segmentation"]
        >>> spec.metric, spec.targets["miou"]
        ('test/miou', 0.9)
    """

    config: str
    model: str
    metric: str
    targets: dict[str, float] = field(default_factory=dict)
    promise: str = ""


# fmt: off
QUICKSTARTS: dict[str, Quickstart] = {
    # task: Quickstart(config, model, metric, targets, promise)
    "classification": Quickstart(
        "configs/quickstart.yaml", "pre-act ResNet-18, width 8", "test/acc", {"acc": 0.95}, "accuracy >= 0.95"
    ),
    "segmentation": Quickstart(
        "configs/segmentation/shapes_unet.yaml", "U-Net (same padding), width 16, depth 4", "test/miou",
        {"miou": 0.90, "iou/*": 0.85}, "mIoU >= 0.90, every class >= 0.85",
    ),
    "detection": Quickstart(
        "configs/detection/centernet_hourglass_shapes.yaml", "CenterNet, 2-stack hourglass", "test/map_50",
        {"map_50": 0.5}, "mAP@50 >= 0.5",
    ),
}
# fmt: on


def promise_met(task: str, metrics: Mapping[str, float], stage: str = "test") -> bool | None:
    """Whether ``metrics`` (as logged, e.g. ``{"test/acc": 0.97}``) keep ``task``'s promise at ``stage``.

    Returns:
        ``True`` or ``False``; ``None`` when a metric of the promise is missing.

    Example:
        >>> promise_met("classification", {"val/acc": 0.97}, stage="val")
        True
        >>> promise_met("segmentation", {"test/miou": 0.93, "test/iou/circle": 0.96, "test/iou/cross": 0.8})
        False
    """
    met = True
    for name, minimum in QUICKSTARTS[task].targets.items():
        if name.endswith("/*"):
            prefix = f"{stage}/{name[:-1]}"
            values = [float(v) for k, v in metrics.items() if k.startswith(prefix)]
        else:
            values = [float(metrics[f"{stage}/{name}"])] if f"{stage}/{name}" in metrics else []
        if not values:
            return None
        met = met and min(values) >= minimum
    return met


def busy_machine_threads(load: float, cores: int, env: dict[str, str]) -> int | None:
    """Thread count to force on a machine that is already busy, else ``None`` (keep torch's default).

    When other processes already keep every core busy, OpenMP threads spend their time spin-waiting for
    each other: measured here, the quickstart needed 6x more CPU time with 2 threads than with 1 on a
    loaded 2-core machine. An explicit ``OMP_NUM_THREADS`` always wins.
    """
    if "OMP_NUM_THREADS" in env or cores <= 1:
        return None
    return 1 if load >= cores else None


def validation_interval(max_epochs: int | None, every: int | None) -> int | None:
    """The ``check_val_every_n_epoch`` closest to ``every`` that validates at the last of ``max_epochs``.

    Lightning validates after epoch ``e`` (1-based) when ``e`` is a multiple of the interval, so a fit
    whose length is not one (``max_epochs=1`` with a config validating every 7 epochs) never validates
    at its end, and a checkpoint watching a validation metric is never written. The answer is the largest
    divisor of ``max_epochs`` not above ``every``; ``every`` itself when it already divides, or when the
    length is unknown (``None``, ``-1``: the fit is bounded by steps or time).

    Example:
        >>> validation_interval(1, 7), validation_interval(7, 7), validation_interval(8, 3)
        (1, 7, 2)
    """
    if not max_epochs or max_epochs < 1 or not every or every < 1 or max_epochs % every == 0:
        return every
    return max(d for d in range(1, min(every, max_epochs) + 1) if max_epochs % d == 0)


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


def parse_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split the demo's own options from the extra CLI arguments.

    Args:
        argv: command-line arguments, e.g. ``["--task", "detection", "--trainer.max_epochs", "1"]``.

    Returns:
        ``(tasks to run, extra LightningCLI arguments)``; ``--task all`` (the default) or an empty
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
    # The demo used to shorten the configs and --full ran them as shipped; it now always runs them as
    # shipped, and --full is still accepted so that old command lines keep working.
    parser.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    known, extra = parser.parse_known_args(argv)
    tasks = list(TASKS) if known.task == "all" else [known.task]
    return tasks, extra


class ValidationLog(pl.Callback):
    """Records every validation of a fit (not the sanity check): epoch, step, the wall and process CPU
    seconds since the fit started, and the ``val/`` metrics.

    The demo adds one to each fit; ``benchmarks/bench_demo.py`` reads the time to a promise from it.

    Example:
        >>> ValidationLog().rows
        []
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._start = (time.perf_counter(), time.process_time())

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.rows.append(
            {
                "epoch": trainer.current_epoch + 1,
                "step": trainer.global_step,
                "wall_seconds": time.perf_counter() - self._start[0],
                "cpu_seconds": time.process_time() - self._start[1],
                "metrics": metrics,
            }
        )


def _demo_cli(explicit_interval: bool) -> type:
    """``ConvNetsCLI`` that, for ``fit``, moves the validation interval so that the fit validates at its
    end (:func:`validation_interval`), unless the user chose the interval; records what it changed."""
    from lightning_convnets.cli import ConvNetsCLI

    class DemoCLI(ConvNetsCLI):
        def before_instantiate_classes(self) -> None:
            self.interval_change: tuple[int, int] | None = None
            if self.subcommand != "fit" or explicit_interval:
                return
            trainer = self.config[self.subcommand].trainer
            every = trainer.check_val_every_n_epoch
            wanted = validation_interval(trainer.max_epochs, every)
            if wanted != every:
                trainer.check_val_every_n_epoch = wanted
                self.interval_change = (every, wanted)

    return DemoCLI


def _shipped_trainer_settings(config: Path) -> dict[str, Any]:
    import yaml

    with open(config) as f:
        trainer = (yaml.safe_load(f) or {}).get("trainer") or {}
    # absent keys take the Trainer's defaults (max_epochs: 1000 when max_steps is unset too; every epoch)
    return {
        "max_epochs": trainer.get("max_epochs"),
        "check_val_every_n_epoch": trainer.get("check_val_every_n_epoch", 1),
    }


def _epochs(n: int | None) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _validation_words(n: int | None) -> str:
    return (
        "no epoch-based validation" if not n else "validation every " + ("epoch" if n == 1 else f"{n} epochs")
    )


def describe_settings(
    shipped: Mapping[str, Any],
    used: Mapping[str, Any],
    interval_change: tuple[int, int] | None = None,
    extra: list[str] | None = None,
) -> str:
    """The fit's length and validation interval in words, next to the config's where they differ.

    Args:
        shipped: ``max_epochs`` and ``check_val_every_n_epoch`` as the config file sets them.
        used: the same two as the fit's trainer had them.
        interval_change: ``(from, to)`` when the demo moved the validation interval.
        extra: the user's extra CLI arguments, quoted at the end.

    Example:
        >>> describe_settings({"max_epochs": 7, "check_val_every_n_epoch": 7},
        ...                   {"max_epochs": 1, "check_val_every_n_epoch": 1}, (7, 1))
        '1 epoch (the config: 7), validation every epoch (the config: every 7 epochs, which would not validate the end of this fit)'
    """
    epochs, every = used.get("max_epochs"), used.get("check_val_every_n_epoch")
    parts = [_epochs(epochs)]
    if epochs != shipped.get("max_epochs"):
        parts[0] += f" (the config: {shipped.get('max_epochs')})"
    validation = _validation_words(every)
    if interval_change is not None:
        validation += (
            f" (the config: {_validation_words(interval_change[0]).replace('validation ', '')}, which would "
            "not validate the end of this fit)"
        )
    elif every != shipped.get("check_val_every_n_epoch"):
        validation += f" (the config: {shipped.get('check_val_every_n_epoch')})"
    parts.append(validation)
    text = ", ".join(parts)
    if epochs == shipped.get("max_epochs") and interval_change is None and not extra:
        text = "as shipped: " + text
    if extra:
        text += "; your arguments: " + " ".join(extra)
    return text


def _no_checkpoint_reason(task: str, fit: Any, validations: list[dict[str, Any]], config: str) -> str:
    trainer = fit.trainer
    checkpoint = trainer.checkpoint_callback
    if checkpoint is None:
        return f"the {task} fit saved no checkpoint: {config} (with your arguments) has no ModelCheckpoint"
    monitor = getattr(checkpoint, "monitor", None)
    if not validations:
        return (
            f"the {task} fit saved no best checkpoint: it ran {_epochs(trainer.current_epoch)} "
            f"({trainer.global_step} steps) and never validated (max_epochs={trainer.max_epochs}, "
            f"check_val_every_n_epoch={trainer.check_val_every_n_epoch}, "
            f"limit_val_batches={trainer.limit_val_batches}), so the checkpoint watching {monitor!r} was "
            "never written; let the fit validate at least once, at its end"
        )
    logged = sorted(validations[-1]["metrics"])
    if monitor and monitor not in logged:
        return (
            f"the {task} fit saved no best checkpoint: the ModelCheckpoint watches {monitor!r}, which "
            f"validation never logged (it logged {logged})"
        )
    return (
        f"the {task} fit saved no best checkpoint although it validated {len(validations)} time(s) and "
        f"logged {monitor!r}: check the ModelCheckpoint settings (save_top_k, every_n_epochs) in {config}"
    )


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


def run_task(task: str, extra: list[str]) -> dict[str, Any]:
    """Fit one quickstart as shipped, test its best checkpoint, predict with it; return what the summary
    shows.

    The fit always validates at its end: when ``extra`` changes ``trainer.max_epochs`` to a length that
    the config's ``check_val_every_n_epoch`` does not divide, the interval is moved to the largest divisor
    not above it (:func:`validation_interval`), unless ``extra`` sets the interval too.

    Args:
        task: ``"classification"``, ``"segmentation"`` or ``"detection"``.
        extra: LightningCLI arguments appended to all three commands.

    Returns:
        ``{"task", "model", "metric", "score", "test_metrics", "promise_met", "settings", "validations",
        "fit_seconds", "fit_cpu_seconds", "best_checkpoint", "log_dir", "figures", "predictions"}``;
        ``validations`` holds a :class:`ValidationLog` row per validation of the fit.

    Raises:
        ValueError: for an unknown task.
        RuntimeError: when the fit saved no best checkpoint, naming why (it never validated, the
            checkpoint watches a metric that was not logged, or the config has no ``ModelCheckpoint``).
    """
    if task not in QUICKSTARTS:
        raise ValueError(f"task must be one of {list(QUICKSTARTS)}, got {task!r}")
    spec = QUICKSTARTS[task]
    config_path = find_config(spec.config)
    config = str(config_path)
    common = ["--config", config, *extra]
    print(f"\n=== {task}: {spec.model} ({spec.config}) ===", flush=True)

    explicit = any("check_val_every_n_epoch" in a for a in extra)
    log = ValidationLog()
    wall, cpu = time.perf_counter(), time.process_time()
    fit = _demo_cli(explicit)(args=["fit", *common], trainer_defaults={"callbacks": [log]})
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    checkpoint = fit.trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None else ""
    if not best:
        raise RuntimeError(_no_checkpoint_reason(task, fit, log.rows, config))
    log_dir = Path(fit.trainer.log_dir or fit.trainer.default_root_dir)
    used = {
        "max_epochs": fit.trainer.max_epochs,
        "check_val_every_n_epoch": fit.trainer.check_val_every_n_epoch,
    }
    settings = describe_settings(_shipped_trainer_settings(config_path), used, fit.interval_change, extra)

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
    from lightning_convnets.cli import ConvNetsCLI

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
        "promise_met": promise_met(task, test_metrics),
        "settings": settings,
        "validations": log.rows,
        "fit_seconds": wall,
        "fit_cpu_seconds": cpu,
        "best_checkpoint": best,
        "log_dir": str(log_dir),
        "figures": sorted(str(p) for p in figures.glob("*.png")) if figures.is_dir() else [],
        "predictions": [str(p) for p in _predictions_of(log_dir)],
    }


def format_summary(results: list[dict[str, Any]], total_seconds: float | None = None) -> str:
    """One table of the runs: task, model, test metric, whether the promise held, fit time, and where
    everything is; under it, each fit's settings and each config's promise.

    Paths inside a run's log folder are shown relative to it (``<logs>/...``).

    Args:
        results: :func:`run_task` results.
        total_seconds: wall time of the whole demo, printed under the table when given.

    Example:
        >>> print(format_summary([]))
        No quickstart ran.
    """
    if not results:
        return "No quickstart ran."
    header = [
        "task",
        "model",
        "test metric",
        "promise",
        "fit (CPU)",
        "logs",
        "checkpoint",
        "figures",
        "predictions",
    ]
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
        met = r.get("promise_met")
        figures = f"<logs>/figures/ ({len(r['figures'])} PNG)" if r["figures"] else "-"
        rows.append(
            [
                r["task"],
                r["model"],
                score,
                "n/a" if met is None else ("kept" if met else "MISSED"),
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
    out += ["", "Settings of each fit, and the promise of each config on its test split:"]
    for r in results:
        spec = QUICKSTARTS.get(r["task"])
        promise = f"; promise: {spec.promise}" if spec is not None else ""
        out.append(f"  {r['task']}: {r.get('settings', '')}{promise}")
    if any(r.get("promise_met") is False for r in results):
        out.append(
            "A promise was missed: a fit shorter than the config's, or a regression (see docs/demo.md)."
        )
    if total_seconds is not None:
        out += ["", f"Total demo time: {total_seconds:.0f} s."]
    out += ["View the logs: tensorboard --logdir lightning_logs"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the quickstarts chosen by ``argv`` (default ``sys.argv[1:]``) and print the summary table.

    Returns:
        The :func:`run_task` result of each task run.
    """
    tasks, extra = parse_args(list(sys.argv[1:] if argv is None else argv))
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
    results = [run_task(task, extra) for task in tasks]
    print(format_summary(results, time.perf_counter() - start))
    return results


if __name__ == "__main__":  # pragma: no cover
    main()
