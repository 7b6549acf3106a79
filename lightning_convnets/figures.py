"""One helper that sends a matplotlib figure to every attached Lightning logger.

Tasks and callbacks both call :func:`log_figure`; no code elsewhere knows which loggers exist.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl
    from matplotlib.figure import Figure


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.replace("/", "__")).strip("_") or "figure"


def figure_dir(trainer: pl.Trainer) -> Path:
    """Folder where PNG copies of figures go: ``<first logger's log_dir>/figures`` (or the trainer's
    ``default_root_dir/figures`` when no logger is attached)."""
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if log_dir:
            return Path(log_dir) / "figures"
    return Path(trainer.default_root_dir) / "figures"


def log_figure(
    trainer: pl.Trainer, name: str, figure: Figure, step: int | None = None, close: bool = True
) -> Path | None:
    """Send ``figure`` to every logger of ``trainer`` and keep a PNG copy next to the logs.

    * TensorBoard: ``add_figure`` (an image summary);
    * Weights & Biases: ``wandb.Image`` through the run's ``log``;
    * MLflow: ``MlflowClient.log_figure`` as an artifact of the run;
    * every logger (CSV and any other): a PNG under :func:`figure_dir`, named ``<name>_step<step>.png``.

    Only global rank zero writes; other ranks return ``None`` at once.

    Args:
        trainer: the running trainer.
        name: a tag such as ``"monitors/activation_variance"`` (slashes become ``__`` in file names).
        figure: a matplotlib figure.
        step: the step to record; defaults to ``trainer.global_step``.
        close: close the figure afterwards (frees its memory).

    Returns:
        The path of the PNG copy on rank zero, else ``None``.

    Example (not run by the doctests: it needs the ``trainer`` of a run):
        >>> import matplotlib.pyplot as plt  # doctest: +SKIP
        >>> fig, ax = plt.subplots(); ax.plot([1, 2, 3])  # doctest: +SKIP
        >>> log_figure(trainer, "debug/line", fig)  # doctest: +SKIP
    """
    if not trainer.is_global_zero:
        if close:
            _close(figure)
        return None
    step = int(trainer.global_step if step is None else step)
    for logger in trainer.loggers:
        kind = type(logger).__name__
        try:
            if kind == "TensorBoardLogger":
                logger.experiment.add_figure(name, figure, global_step=step, close=False)
            elif kind == "WandbLogger":
                import wandb

                logger.experiment.log({name: wandb.Image(figure), "trainer/global_step": step})
            elif kind == "MLFlowLogger":
                logger.experiment.log_figure(
                    logger.run_id, figure, f"figures/{_safe_name(name)}_step{step}.png"
                )
        except Exception as err:  # a broken logger must not kill training; say so once per call
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"log_figure: {kind} could not take figure {name!r}: {err}")
    out_dir = figure_dir(trainer)
    os.makedirs(out_dir, exist_ok=True)
    path = out_dir / f"{_safe_name(name)}_step{step:07d}.png"
    figure.savefig(path, dpi=100, bbox_inches="tight")
    if close:
        _close(figure)
    return path


def _close(figure: Any) -> None:
    import matplotlib.pyplot as plt

    plt.close(figure)
