"""Image classification: backbone -> global pooling -> dropout -> linear layer."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelF1Score,
)

from lightning_convnets.nn.heads import ClassificationHead
from lightning_convnets.tasks.base import BackboneSpec, ConvNetTask, WarmupCosineLR

_STAGES = ("train_", "val_", "test_")


class ImageClassifier(ConvNetTask):
    """Image classifier on any backbone: pooled last feature map, dropout, linear layer.

    Single-label mode trains with cross-entropy (optional label smoothing and class weights) and logs, per
    stage, ``<stage>/loss``, ``<stage>/acc`` (top-1), ``<stage>/acc_top5`` (when ``num_classes > 5``) and
    ``<stage>/f1`` (macro); validation and test also log a confusion-matrix figure and a grid of sample
    predictions. Multi-label mode (``multilabel=True``) uses a sigmoid per class with binary cross-entropy
    (``class_weights`` become BCE's ``pos_weight``) and multilabel accuracy / macro F1 at ``threshold``.
    :meth:`predict_step` returns class probabilities ``(N, num_classes)``.

    Args:
        backbone: registry name, ``class_path`` dict or module (see :class:`ConvNetTask`).
        num_classes: number of classes; ``None`` takes the datamodule's ``num_classes`` at setup (and
            stores it in the hyperparameters, so checkpoints rebuild the head).
        dropout: dropout before the linear layer.
        label_smoothing: cross-entropy label smoothing (single-label mode).
        class_weights: per-class loss weights (``pos_weight`` in multi-label mode).
        multilabel: targets are ``(N, num_classes)`` 0/1 vectors instead of class indices.
        threshold: probability above which a label counts as predicted (multi-label mode).
        backbone_kwargs: keyword arguments for the backbone builder.
        in_channels: image channels.
        optimizer: optimizer factory (default AdamW, lr 1e-3, weight decay 0.01).
        lr_scheduler: scheduler factory (default :class:`WarmupCosineLR` over the whole run).
        lr_scheduler_interval: ``"auto"``, ``"step"`` or ``"epoch"``.
        monitor: metric watched by a ``ReduceLROnPlateau`` scheduler.
        freeze_backbone: ``True`` or an epoch count (see :class:`ConvNetTask`).
        freeze_bn: keep the backbone's BatchNorm statistics fixed.
        backbone_lr_mult: backbone learning rate relative to the head's.
        num_sample_figures: images in the sample-prediction figure (0 disables it).
        figure_every_n_epochs: validation figure frequency (0: never).
        channels_last: run convolutions in the channels-last memory format (faster on CPU and tensor cores).
        compile: ``True`` or :func:`torch.compile` keyword arguments; compiles in place (see :class:`ConvNetTask`).

    Example:
        >>> model = ImageClassifier("preact_resnet18", num_classes=10,
        ...                         backbone_kwargs={"stem": "cifar", "width": 16})  # doctest: +SKIP
        >>> model(torch.zeros(2, 3, 32, 32)).shape  # doctest: +SKIP
        torch.Size([2, 10])
    """

    def __init__(
        self,
        backbone: BackboneSpec = "resnet18",
        num_classes: int | None = None,
        dropout: float = 0.0,
        label_smoothing: float = 0.0,
        class_weights: list[float] | None = None,
        multilabel: bool = False,
        threshold: float = 0.5,
        backbone_kwargs: dict[str, Any] | None = None,
        in_channels: int = 3,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        lr_scheduler_interval: Literal["auto", "step", "epoch"] = "auto",
        monitor: str = "val/loss",
        freeze_backbone: bool | int = False,
        freeze_bn: bool = False,
        backbone_lr_mult: float = 1.0,
        num_sample_figures: int = 8,
        figure_every_n_epochs: int = 1,
        channels_last: bool = False,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__(
            backbone=backbone,
            backbone_kwargs=backbone_kwargs,
            in_channels=in_channels,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            lr_scheduler_interval=lr_scheduler_interval,
            monitor=monitor,
            freeze_backbone=freeze_backbone,
            freeze_bn=freeze_bn,
            backbone_lr_mult=backbone_lr_mult,
            num_sample_figures=num_sample_figures,
            figure_every_n_epochs=figure_every_n_epochs,
            channels_last=channels_last,
            compile=compile,
        )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.multilabel = multilabel
        self._init_task(num_classes)

    def build_task(self, num_classes: int) -> None:
        hp = self.hparams
        if num_classes < 2 and not self.multilabel:
            raise ValueError(
                f"num_classes={num_classes}: single-label classification needs at least 2 classes "
                "(use multilabel=True for one independent yes/no output)"
            )
        if hp.class_weights is not None and len(hp.class_weights) != num_classes:
            raise ValueError(
                f"class_weights has {len(hp.class_weights)} entries but num_classes is {num_classes}"
            )
        self.head = ClassificationHead(self.backbone.out_channels[-1], num_classes, dropout=hp.dropout)
        weight = None if hp.class_weights is None else torch.as_tensor(hp.class_weights, dtype=torch.float32)
        self.register_buffer("class_weight", weight, persistent=False)
        self.metrics = nn.ModuleDict({stage: self._make_metrics(num_classes) for stage in _STAGES})
        self.confusion = nn.ModuleDict(
            {}
            if self.multilabel
            else {
                stage: MulticlassConfusionMatrix(num_classes, normalize="true") for stage in ("val_", "test_")
            }
        )

    def _make_metrics(self, num_classes: int) -> MetricCollection:
        if self.multilabel:
            thr = self.hparams.threshold
            return MetricCollection(
                {
                    "acc": MultilabelAccuracy(num_classes, threshold=thr, average="micro"),
                    "f1": MultilabelF1Score(num_classes, threshold=thr, average="macro"),
                }
            )
        metrics: dict[str, Any] = {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        }
        if num_classes > 5:
            metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        return MetricCollection(metrics)

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)``."""
        return self.head(self.backbone(images)[-1])

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, target.float(), pos_weight=self.class_weight)
        return F.cross_entropy(
            logits, target.long(), weight=self.class_weight, label_smoothing=self.hparams.label_smoothing
        )

    def shared_step(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        images, target = self.unpack_batch(batch)
        if target is None:
            raise ValueError(f"{stage} batches need labels: got images only")
        logits = self(images)
        if self.multilabel and target.shape != logits.shape:
            raise ValueError(
                f"multilabel targets must have shape {tuple(logits.shape)} (one 0/1 per class), got "
                f"{tuple(target.shape)}"
            )
        loss = self.loss(logits, target)
        if stage in ("val", "test") and not self.multilabel:
            self.confusion[f"{stage}_"].update(logits.detach(), target)
        target = target.long() if self.multilabel else target
        return loss, logits.detach(), target, images

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class probabilities ``(N, num_classes)`` (softmax, or per-class sigmoid in multi-label mode)."""
        images, _ = self.unpack_batch(batch)
        logits = self(images)
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)

    def check_datamodule(self) -> None:
        super().check_datamodule()
        dm = self.datamodule
        count = getattr(dm, "num_classes", None)
        if count is not None and int(count) != self.num_classes:
            raise ValueError(
                f"{type(dm).__name__}.num_classes is {count} but the model was built for {self.num_classes} "
                f"classes; set model num_classes to {count} (or leave it unset to take it from the data)"
            )

    def progress_bar_metrics_for(self, stage: str) -> set[str]:
        return {f"{stage}/loss", f"{stage}/acc"}

    # --------------------------------------------------------------------------------------- figures
    def log_figures(self, stage: str) -> None:
        super().log_figures(stage)
        if self.multilabel:
            return
        confusion = self.confusion[f"{stage}_"]
        if self._figures_due(stage):
            # compute() is a collective under DDP: every rank runs it; log_figure writes on rank 0 only.
            matrix = confusion.compute().cpu()
            from lightning_convnets.figures import log_figure

            log_figure(
                self.trainer, f"{stage}/confusion_matrix", self.plot_confusion(matrix), step=self.global_step
            )
        confusion.reset()

    def plot_confusion(self, matrix: Tensor) -> Any:
        """Row-normalised confusion matrix (rows: true class, columns: predicted)."""
        import matplotlib.pyplot as plt

        names = self.class_names(matrix.shape[0])
        size = min(12, 2 + 0.5 * len(names))
        fig, ax = plt.subplots(figsize=(size, size))
        image = ax.imshow(matrix.numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (row-normalised)")
        if len(names) <= 30:
            ax.set_xticks(range(len(names)), names, rotation=90)
            ax.set_yticks(range(len(names)), names)
            for (i, j), value in zip(
                torch.cartesian_prod(torch.arange(len(names)), torch.arange(len(names))).tolist(),
                matrix.flatten().tolist(),
            ):
                if value >= 0.005:
                    ax.text(
                        j,
                        i,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if value > 0.5 else "black",
                    )
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        return fig

    def plot_samples(self, images: Tensor, preds: Tensor, target: Tensor | None) -> Any:
        import matplotlib.pyplot as plt

        pictures = self.display_images(images)
        names = self.class_names(preds.shape[1])
        n = pictures.shape[0]
        cols = min(n, 4)
        rows = -(-n // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
        probs = torch.sigmoid(preds) if self.multilabel else torch.softmax(preds, dim=1)
        for k, ax in enumerate(axes.flat):
            ax.axis("off")
            if k >= n:
                continue
            picture = pictures[k]
            ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray")
            if self.multilabel:
                predicted = {
                    names[i] for i in (probs[k] > self.hparams.threshold).nonzero().flatten().tolist()
                }
                truth = None if target is None else {names[i] for i in target[k].nonzero().flatten().tolist()}
                title = f"pred: {','.join(sorted(predicted)) or '-'}"
                if truth is not None:
                    title += f"\ntrue: {','.join(sorted(truth)) or '-'}"
                correct = truth is None or predicted == truth
            else:
                p, i = probs[k].max(dim=0)
                title = f"pred: {names[int(i)]} ({float(p):.2f})"
                correct = True
                if target is not None:
                    title += f"\ntrue: {names[int(target[k])]}"
                    correct = int(i) == int(target[k])
            ax.set_title(title, fontsize=8, color="green" if correct else "red")
        fig.tight_layout()
        return fig

    def default_prediction_writer(self) -> Callback | None:
        from lightning_convnets.writers import ClassProbabilitiesWriter

        return ClassProbabilitiesWriter()
