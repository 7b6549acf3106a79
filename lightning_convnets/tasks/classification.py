"""Image classification: backbone -> global pooling -> dropout -> linear layer."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelF1Score,
)

from lightning_convnets import drawing
from lightning_convnets.figures import log_figure
from lightning_convnets.metrics import ClassificationMetrics
from lightning_convnets.nn.heads import ClassificationHead
from lightning_convnets.predict.export import ClassifierGraph
from lightning_convnets.predict.tta import classify_tta, parse_tta, tta_logits
from lightning_convnets.predict.writers import ClassProbabilitiesWriter
from lightning_convnets.tasks.base import BackboneSpec, ConvNetTask

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
        num_classes: number of classes; ``None`` takes the datamodule's ``num_classes`` at setup (see
            :class:`ConvNetTask`: the checkpoint, not the hyperparameters, records the count then).
        dropout: dropout before the linear layer.
        label_smoothing: cross-entropy label smoothing (single-label mode).
        class_weights: per-class loss weights (``pos_weight`` in multi-label mode).
        multilabel: targets are ``(N, num_classes)`` 0/1 vectors instead of class indices.
        threshold: probability above which a label counts as predicted (multi-label mode).
        tta: test-time augmentation at test and predict: ``"none"``, ``"flip"``, ``"flip+scales"`` (mean
            probabilities over the views; see :mod:`lightning_convnets.predict.tta`).
        **kwargs: the arguments every task shares (``backbone_kwargs``, ``in_channels``, ``optimizer``,
            ``lr_scheduler``, ``monitor``, ``freeze_backbone``, ``channels_last``...): see
            :class:`ConvNetTask`.

    Example:
        >>> model = ImageClassifier("preact_resnet18", num_classes=10,
        ...                         backbone_kwargs={"stem": "cifar", "width": 16})
        >>> model(torch.zeros(2, 3, 32, 32)).shape
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
        tta: str = "none",
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        parse_tta(tta)
        super().__init__(backbone=backbone, num_classes=num_classes, **kwargs)

    @property
    def multilabel(self) -> bool:
        """Multi-label mode (a sigmoid per class) rather than single-label (softmax)."""
        return bool(self.hparams.multilabel)

    def configure_models(self, num_classes: int) -> None:
        """The linear head for ``num_classes``."""
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

    def configure_losses(self) -> None:
        """The class weights of the loss (:meth:`loss`)."""
        weights = self.hparams.class_weights
        weight = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.register_buffer("class_weight", weight, persistent=False)

    def configure_metrics(self, num_classes: int) -> None:
        """Metrics per stage and (single-label) the confusion matrices of validation and test."""
        # Training metrics skip torchmetrics' input checks (host reads of the batch every step): the
        # single-label loss refuses class indices out of range, and validation (the sanity check comes
        # before the first training step) and test keep the checks.
        self.metrics = nn.ModuleDict(
            {stage: self._make_metrics(num_classes, validate=stage != "train_") for stage in _STAGES}
        )
        self.confusion = nn.ModuleDict(
            {}
            if self.multilabel
            else {
                stage: MulticlassConfusionMatrix(num_classes, normalize="true") for stage in ("val_", "test_")
            }
        )

    def _make_metrics(self, num_classes: int, validate: bool = True) -> Metric | MetricCollection:
        if not self.multilabel and not validate:
            # one confusion matrix, no host read per batch (torchmetrics' bincount reads one on a GPU)
            return ClassificationMetrics(num_classes, top_k=5 if num_classes > 5 else None)
        if self.multilabel:
            thr = self.hparams.threshold
            return MetricCollection(
                {
                    "acc": MultilabelAccuracy(
                        num_classes, threshold=thr, average="micro", validate_args=validate
                    ),
                    "f1": MultilabelF1Score(
                        num_classes, threshold=thr, average="macro", validate_args=validate
                    ),
                }
            )
        metrics: dict[str, Any] = {
            "acc": MulticlassAccuracy(num_classes, average="micro", validate_args=validate),
            "f1": MulticlassF1Score(num_classes, average="macro", validate_args=validate),
        }
        if num_classes > 5:
            metrics["acc_top5"] = MulticlassAccuracy(
                num_classes, top_k=5, average="micro", validate_args=validate
            )
        return MetricCollection(metrics)

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)``."""
        return self.head(self.backbone(images)[-1])

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy (binary cross-entropy per class in multi-label mode)."""
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, target.float(), pos_weight=self.class_weight)
        return F.cross_entropy(
            logits, target.long(), weight=self.class_weight, label_smoothing=self.hparams.label_smoothing
        )

    def shared_step(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Loss, logits, targets and images of a labelled batch (validation/test also feed the confusion)."""
        images, target = self.unpack_batch(batch)
        if target is None:
            raise ValueError(f"{stage} batches need labels: got images only")
        logits = (
            tta_logits(self, images, self.hparams.tta, self.multilabel) if stage == "test" else self(images)
        )
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
        with self.fused_for_predict(images):
            return classify_tta(self, images, self.hparams.get("tta", "none"), self.multilabel)

    def progress_bar_metrics_for(self, stage: str) -> set[str]:
        """Loss and accuracy."""
        return {f"{stage}/loss", f"{stage}/acc"}

    # --------------------------------------------------------------------------------------- figures
    def log_figures(self, stage: str) -> None:
        """Sample predictions and (single-label) the confusion matrix; resets the confusion matrix."""
        super().log_figures(stage)
        if self.multilabel:
            return
        confusion = self.confusion[f"{stage}_"]
        if self.figures_due(stage):
            # compute() is a collective under DDP: every rank runs it; log_figure writes on rank 0 only.
            matrix = confusion.compute().cpu()
            log_figure(
                self.trainer, f"{stage}/confusion_matrix", self.plot_confusion(matrix), step=self.global_step
            )
        confusion.reset()

    def plot_confusion(self, matrix: Tensor) -> Any:
        """Row-normalised confusion matrix (:func:`lightning_convnets.drawing.plot_confusion_matrix`)."""
        return drawing.plot_confusion_matrix(matrix.numpy(), self.class_names(matrix.shape[0]))

    def plot_samples(self, images: Tensor, preds: Tensor, target: Tensor | None) -> Any:
        """Grid of images titled with the predicted (and true) classes, green when right, red when wrong."""
        names = self.class_names(preds.shape[1])
        probs = torch.sigmoid(preds) if self.multilabel else torch.softmax(preds, dim=1)
        titles, colours = [], []
        for k in range(probs.shape[0]):
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
                correct = target is None or int(i) == int(target[k])
                if target is not None:
                    title += f"\ntrue: {names[int(target[k])]}"
            titles.append(title)
            colours.append("green" if correct else "red")
        return drawing.plot_image_grid(list(self.display_images(images)), titles, colours)

    def default_prediction_writer(self) -> Callback | None:
        """:class:`~lightning_convnets.predict.writers.ClassProbabilitiesWriter`."""
        return ClassProbabilitiesWriter()

    def export_graph(self) -> nn.Module:
        """``images -> logits`` (:class:`~lightning_convnets.predict.export.ClassifierGraph`) for export."""
        return ClassifierGraph(self.backbone, self.head)
