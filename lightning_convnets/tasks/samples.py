"""The sample figures of validation and test: when one is due, and the first batch's samples it shows.

The task keeps the first ``num_sample_figures`` images, predictions and targets of a stage's first batch
(:func:`first_samples`, on the CPU), draws them at the epoch's end with its ``plot_samples`` hook (using
:mod:`lightning_convnets.drawing`) and logs the figure with :func:`lightning_convnets.figures.log_figure`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_convnets import drawing
from lightning_convnets.figures import log_figure
from lightning_convnets.tasks.adapters import attached_trainer

__all__ = ["SampleFigureHooks", "figures_due", "first_samples"]


def figures_due(trainer: Any, stage: str, every_n_epochs: int, epoch: int) -> bool:
    """Whether ``stage`` logs figures this epoch: never without a logger, always at test, every
    ``every_n_epochs`` validation epochs (0: never).

    Example:
        >>> class T: loggers = [object()]
        >>> [figures_due(T(), "val", 2, epoch) for epoch in range(4)], figures_due(T(), "test", 0, 0)
        ([False, True, False, True], True)
    """
    if trainer is None or not trainer.loggers:
        return False
    if stage == "test":
        return True
    return bool(every_n_epochs) and (epoch + 1) % every_n_epochs == 0


def _on_cpu(value: Any, as_float: bool = False) -> Any:
    if isinstance(value, Tensor):
        value = value.detach()
        return (value.float() if as_float else value).cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v, as_float) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_on_cpu(v, as_float) for v in value]
    return value


def first_samples(images: Any, preds: Any, target: Any, count: int) -> tuple[Any, Any, Any]:
    """The first ``count`` images (float), predictions and targets (``None`` stays ``None``), detached on
    the CPU; tensors are sliced, lists (detection: images of varying size, dicts of boxes) too.

    Example:
        >>> import torch
        >>> images, preds, target = first_samples(torch.zeros(4, 3, 8, 8), torch.zeros(4, 2), None, 2)
        >>> images.shape, preds.shape, target
        (torch.Size([2, 3, 8, 8]), torch.Size([2, 2]), None)
    """
    return (
        _on_cpu(images[:count], as_float=True),
        _on_cpu(preds[:count]),
        None if target is None else _on_cpu(target[:count]),
    )


class SampleFigureHooks:
    """The sample figures of a task (mixed into :class:`~lightning_convnets.tasks.ConvNetTask`): the first
    batch's samples kept per stage, drawn by the task's :meth:`plot_samples` hook at the epoch's end and
    logged to every logger."""

    def _kept_samples(self) -> dict[str, tuple[Any, Any, Any]]:
        return self.__dict__.setdefault("_samples", {})

    def figures_due(self, stage: str) -> bool:
        """Whether ``stage`` logs figures this epoch (:func:`figures_due`)."""
        every = self.hparams.figure_every_n_epochs  # type: ignore[attr-defined]
        return figures_due(attached_trainer(self), stage, every, self.current_epoch)  # type: ignore[attr-defined]

    def remember_samples(self, stage: str, batch_idx: int, images: Any, preds: Any, target: Any) -> None:
        """Keep the first batch's first images, predictions and targets (on the CPU) for the figure."""
        k = self.hparams.num_sample_figures  # type: ignore[attr-defined]
        if batch_idx != 0 or not k or stage in self._kept_samples() or not self.figures_due(stage):
            return
        if not self.trainer.sanity_checking:  # type: ignore[attr-defined]
            self._kept_samples()[stage] = first_samples(images, preds, target, k)

    def forget_samples(self, stage: str) -> None:
        """Drop what :meth:`remember_samples` kept for ``stage`` (after a sanity check)."""
        self._kept_samples().pop(stage, None)

    def log_figures(self, stage: str) -> None:
        """Send this stage's figures through :func:`lightning_convnets.figures.log_figure`."""
        kept = self._kept_samples().pop(stage, None)
        figure = self.plot_samples(*kept) if kept is not None and self.figures_due(stage) else None
        if figure is not None:
            log_figure(self.trainer, f"{stage}/samples", figure, step=self.global_step)  # type: ignore[attr-defined]

    def plot_samples(self, images: Any, preds: Any, target: Any) -> Any:
        """Hook: a matplotlib figure of sample predictions (default: none)."""
        return None

    def display_images(self, images: Tensor) -> Tensor:
        """Images for display: ``(N, H, W, C)`` in [0, 1] with the datamodule's normalisation (``mean`` /
        ``std``) undone (:func:`lightning_convnets.drawing.display_images`)."""
        dm = getattr(attached_trainer(self), "datamodule", None)
        return drawing.display_images(images, getattr(dm, "mean", None), getattr(dm, "std", None))

    def class_names(self, num_classes: int) -> list[str]:
        """The datamodule's class names when it has ``num_classes`` of them, else the label numbers."""
        dm = getattr(attached_trainer(self), "datamodule", None)
        return drawing.class_names(getattr(dm, "class_names", None), num_classes)
