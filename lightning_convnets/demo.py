"""The quickstart demo (``make demo``): train on generated shapes, test the best checkpoint, say where things are.

Runs, in this process, the equivalent of::

    lightning-convnets fit  --config configs/quickstart.yaml
    lightning-convnets test --config configs/quickstart.yaml --ckpt_path <best checkpoint of the fit>

Extra arguments go to both commands, e.g. ``python -m lightning_convnets.demo --trainer.max_epochs 2``.
The config is looked up next to the package (a source checkout) and then in the working directory.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def busy_machine_threads(load: float, cores: int, env: dict[str, str]) -> int | None:
    """Thread count to force on a machine that is already busy, else ``None`` (keep torch's default).

    When other processes already keep every core busy, OpenMP threads spend their time spin-waiting for
    each other: measured here, the quickstart needed 6x more CPU time with 2 threads than with 1 on a
    loaded 2-core machine. An explicit ``OMP_NUM_THREADS`` always wins.
    """
    if "OMP_NUM_THREADS" in env or cores <= 1:
        return None
    return 1 if load >= cores else None


def quickstart_config() -> Path:
    """Path of ``configs/quickstart.yaml`` (source checkout first, then the working directory).

    Raises:
        FileNotFoundError: when neither place has it.
    """
    candidates = [
        Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml",
        Path.cwd() / "configs" / "quickstart.yaml",
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        "configs/quickstart.yaml not found (looked in " + ", ".join(str(p) for p in candidates) + "); "
        "run the demo from a source checkout of lightning-convnets"
    )


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Fit, then test the best checkpoint; print where the logs and checkpoint are.

    Args:
        argv: extra LightningCLI arguments for both commands (default: ``sys.argv[1:]``).

    Returns:
        ``{"best_checkpoint", "best_score", "log_dir", "test_metrics", "fit_seconds"}``.
    """
    from lightning_convnets.cli import ConvNetsCLI

    extra = list(sys.argv[1:] if argv is None else argv)
    config = str(quickstart_config())
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
    fit = ConvNetsCLI(args=["fit", "--config", config, *extra])
    fit_seconds = time.perf_counter() - start
    checkpoint = fit.trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None else ""
    if not best:
        raise RuntimeError(
            "the fit saved no checkpoint; is ModelCheckpoint still in configs/quickstart.yaml?"
        )
    best_score = None if checkpoint.best_model_score is None else float(checkpoint.best_model_score)
    log_dir = fit.trainer.log_dir

    test = ConvNetsCLI(args=["test", "--config", config, *extra, "--ckpt_path", best])
    test_metrics = {k: float(v) for k, v in test.trainer.callback_metrics.items() if k.startswith("test/")}

    monitor = checkpoint.monitor or "score"
    lines = [
        "",
        f"Quickstart done: fit took {fit_seconds:.0f} s.",
        f"  best checkpoint : {best}"
        + (f"  ({monitor} = {best_score:.3f})" if best_score is not None else ""),
        f"  logs            : {log_dir}   (view: tensorboard --logdir {Path(log_dir).parent.parent})",
        f"  figures (PNG)   : {Path(log_dir) / 'figures'}",
        "  test metrics    : " + ", ".join(f"{k} = {v:.3f}" for k, v in sorted(test_metrics.items())),
        f"  test it again   : lightning-convnets test --config {config} --ckpt_path {best}",
    ]
    print("\n".join(lines))
    return {
        "best_checkpoint": best,
        "best_score": best_score,
        "log_dir": log_dir,
        "test_metrics": test_metrics,
        "fit_seconds": fit_seconds,
    }


if __name__ == "__main__":  # pragma: no cover
    main()
