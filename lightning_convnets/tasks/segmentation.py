"""Semantic segmentation: a per-pixel classifier on a dense feature map.

Where the dense map comes from:

* a dense backbone (``dense = True``: ``unet``, a stacked hourglass, ``smp:Unet/resnet34``): a 1x1
  convolution on each of its maps at the finest reduction (every hourglass stack is supervised, the last
  one predicts);
* a pyramid encoder (``resnet18``, ``timm:...``): a U-Net decoder is put on top of it
  (:class:`lightning_convnets.backbones.unet.UNet` with ``encoder=``, width ``decoder_width``), climbing back
  to reduction 1.

How logits meet the mask: when the network's output is smaller than the mask because of valid padding
(``backbone.border > 0``, the original U-Net), the **mask is cropped** to the output with
:func:`lightning_convnets.nn.center_crop`, the same rule the network uses for its skip connections (half
the difference on each side, an odd extra pixel from the bottom/right), so every output pixel is scored
against the mask pixel at the centre of its receptive field. Otherwise (reduced or resized outputs) the
**logits are resized** bilinearly to the mask.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex

from lightning_convnets.nn import center_crop, crop_offsets
from lightning_convnets.nn.losses import CrossEntropyDiceLoss
from lightning_convnets.tasks.base import BackboneSpec, ConvNetTask, WarmupCosineLR

_STAGES = ("train_", "val_", "test_")


class SemanticSegmenter(ConvNetTask):
    """Semantic segmentation on a dense backbone, a pyramid encoder (+ U-Net decoder) or an ``smp:`` model.

    Loss: ``ce_weight * cross-entropy + dice_weight * Dice``, both ignoring ``ignore_index`` pixels and
    both taking ``class_weights``. Binary mode (``binary=True``) has one sigmoid output channel (foreground
    probability), binary cross-entropy and binary Dice; its metrics treat background/foreground as two
    classes. Per stage it logs ``<stage>/loss``, ``<stage>/miou`` (mean IoU over classes),
    ``<stage>/iou/<class>``, ``<stage>/dice`` (macro Dice = F1 over pixels) and ``<stage>/pixel_acc``;
    validation and test log a figure of images with true and predicted masks.
    :meth:`predict_step` returns class-index masks ``(N, H, W)`` at the input size (with valid padding, the
    rim the network cannot see is filled with ``ignore_index``).

    Args:
        backbone: registry name, ``class_path`` dict or module (see :class:`ConvNetTask`).
        num_classes: number of classes including background (2 in binary mode); ``None`` takes the
            datamodule's ``num_classes`` at setup.
        binary: one sigmoid channel for foreground vs background.
        ignore_index: mask value left out of the loss and the metrics (``None``: none).
        ce_weight: weight of the cross-entropy term.
        dice_weight: weight of the Dice term.
        class_weights: per-class weights of both loss terms.
        decoder_width: width of the U-Net decoder built over a pyramid encoder (channels at reduction 1;
            ``width * r`` at reduction ``r``).
        threshold: foreground probability threshold in binary mode.
        backbone_kwargs: keyword arguments for the backbone builder.
        in_channels: image channels.
        optimizer: optimizer factory (default AdamW).
        lr_scheduler: scheduler factory (default :class:`WarmupCosineLR` over the whole run).
        lr_scheduler_interval: ``"auto"``, ``"step"`` or ``"epoch"``.
        monitor: metric watched by a ``ReduceLROnPlateau`` scheduler.
        freeze_backbone: ``True`` or an epoch count (see :class:`ConvNetTask`).
        freeze_bn: keep the backbone's BatchNorm statistics fixed.
        backbone_lr_mult: backbone learning rate relative to the head's (and the decoder's).
        num_sample_figures: images in the sample figure (0 disables it).
        figure_every_n_epochs: validation figure frequency (0: never).
        channels_last: run convolutions in the channels-last memory format (faster on CPU and tensor cores).
        compile: ``True`` or :func:`torch.compile` keyword arguments; compiles in place (see :class:`ConvNetTask`).

    Example:
        >>> model = SemanticSegmenter("unet", num_classes=4,
        ...                           backbone_kwargs={"width": 8, "depth": 2})  # doctest: +SKIP
        >>> model(torch.zeros(1, 3, 64, 64))[-1].shape  # doctest: +SKIP
        torch.Size([1, 4, 64, 64])
    """

    def __init__(
        self,
        backbone: BackboneSpec = "unet",
        num_classes: int | None = None,
        binary: bool = False,
        ignore_index: int | None = 255,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        class_weights: list[float] | None = None,
        decoder_width: int = 16,
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
        num_sample_figures: int = 4,
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
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.binary = binary
        self.ignore_index = ignore_index
        if getattr(self.backbone, "dense", False):
            self.decoder: nn.Module | None = None
            self._dense_channels = self._supervised_channels(self.backbone)
        else:
            from lightning_convnets.backbones.unet import UNet

            # The encoder is shared, not copied: backbone parameters stay in the backbone group, the
            # decoder's (new, randomly initialised) ones go with the head.
            self.decoder = UNet(encoder=self.backbone, width=decoder_width, norm="batch")
            self._dense_channels = [decoder_width]
        self._init_task(num_classes)

    @staticmethod
    def _supervised_channels(backbone: nn.Module) -> list[int]:
        # Dense maps at the finest reduction are the outputs (one per hourglass stack); coarser extras
        # (if a dense backbone returns any) are not supervised.
        finest = min(backbone.reductions)
        return [c for c, r in zip(backbone.out_channels, backbone.reductions) if r == finest]

    def build_task(self, num_classes: int) -> None:
        hp = self.hparams
        if self.binary and num_classes not in (1, 2):
            raise ValueError(
                f"binary=True segments foreground vs background: num_classes must be 2, got {num_classes}"
            )
        if not self.binary and num_classes < 2:
            raise ValueError(
                f"num_classes={num_classes}: multi-class segmentation needs >= 2 classes (or binary=True)"
            )
        self.num_classes = 2 if self.binary else num_classes
        if hp.class_weights is not None and len(hp.class_weights) != self.num_classes:
            raise ValueError(
                f"class_weights has {len(hp.class_weights)} entries but there are {self.num_classes} classes"
            )
        out = 1 if self.binary else num_classes
        self.heads = nn.ModuleList(nn.Conv2d(c, out, kernel_size=1) for c in self._dense_channels)
        self.criterion = CrossEntropyDiceLoss(
            binary=self.binary,
            ignore_index=self.ignore_index,
            ce_weight=hp.ce_weight,
            dice_weight=hp.dice_weight,
            class_weights=hp.class_weights,
        )
        # Training metrics skip torchmetrics' input checks (8 torch.unique calls a step): the loss has
        # already refused out-of-range targets by then.
        self.metrics = nn.ModuleDict(
            {stage: self._make_metrics(self.num_classes, stage != "train_") for stage in _STAGES}
        )

    def _make_metrics(self, num_classes: int, validate: bool = True) -> MetricCollection:
        kw = {"ignore_index": self.ignore_index, "validate_args": validate}
        return MetricCollection(
            {
                "miou": MulticlassJaccardIndex(num_classes, average="macro", **kw),
                "iou": MulticlassJaccardIndex(num_classes, average="none", **kw),
                "dice": MulticlassF1Score(num_classes, average="macro", **kw),
                "pixel_acc": MulticlassAccuracy(num_classes, average="micro", **kw),
            },
            compute_groups=False,
        )

    # ------------------------------------------------------------------------------------- forward
    def forward(self, images: Tensor) -> list[Tensor]:
        """Logits of every supervised map (the last one is the prediction), each ``(N, K, h, w)``."""
        if self.decoder is not None:
            maps = self.decoder(images)
        else:
            maps = self.backbone(images)
            finest = min(self.backbone.reductions)
            maps = [m for m, r in zip(maps, self.backbone.reductions) if r == finest]
        return [head(m) for head, m in zip(self.heads, maps)]

    @property
    def border(self) -> int:
        """Pixels the network removes at the top/left (valid padding); 0 for same padding."""
        return int(getattr(self.backbone, "border", 0) or 0)

    def align(
        self, logits: Tensor, mask: Tensor | None, size: tuple[int, int]
    ) -> tuple[Tensor, Tensor | None]:
        """Bring ``logits`` and ``mask`` (of image size ``size``) to one grid: crop the mask with the
        network's rule under valid padding, else resize the logits to the mask."""
        h, w = logits.shape[-2:]
        if (h, w) == tuple(size):
            return logits, mask
        if self.border > 0:
            return logits, None if mask is None else center_crop(mask, h, w)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits, mask

    def to_mask(self, logits: Tensor) -> Tensor:
        """Class indices from logits (threshold on the sigmoid in binary mode)."""
        if self.binary:
            return (torch.sigmoid(logits[:, 0]) > self.hparams.threshold).long()
        return logits.max(dim=1).indices  # = argmax (first maximum), 7x faster over dim 1 on CPU

    def _check_mask(self, mask: Tensor, images: Tensor) -> Tensor:
        if mask.ndim == 4 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.ndim != 3 or mask.shape[-2:] != images.shape[-2:]:
            raise ValueError(
                f"segmentation masks must be (N, H, W) matching the images {tuple(images.shape)}, got "
                f"{tuple(mask.shape)}"
            )
        return mask.long()

    def shared_step(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        images, mask = self.unpack_batch(batch)
        if mask is None:
            raise ValueError(f"{stage} batches need masks: got images only")
        mask = self._check_mask(mask, images)
        size = tuple(images.shape[-2:])
        losses = []
        target = mask
        for logits in self(images):
            logits, target = self.align(logits, mask, size)
            losses.append(self.criterion(logits, target))
        # Intermediate supervision: every stack's output gets the full loss, averaged.
        loss = torch.stack(losses).mean()
        if target.shape[-2:] != mask.shape[-2:]:
            images = center_crop(images, *target.shape[-2:])
        return loss, self.to_mask(logits.detach()), target, images

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class-index masks ``(N, H, W)`` (int64) at the input size."""
        images, _ = self.unpack_batch(batch)
        size = tuple(images.shape[-2:])
        logits, _ = self.align(self(images)[-1], None, size)
        pred = self.to_mask(logits)
        if pred.shape[-2:] == size:
            return pred
        # Valid padding: put the prediction back where it belongs; the unseen rim is "unknown".
        fill = 255 if self.ignore_index is None else self.ignore_index
        full = pred.new_full((pred.shape[0], *size), fill)
        top, _ = crop_offsets(size[0], pred.shape[-2])
        left, _ = crop_offsets(size[1], pred.shape[-1])
        full[:, top : top + pred.shape[-2], left : left + pred.shape[-1]] = pred
        return full

    def check_datamodule(self) -> None:
        super().check_datamodule()
        dm = self.datamodule
        count = getattr(dm, "num_classes", None)
        if (
            count is not None
            and int(count) != self.num_classes
            and not (self.binary and int(count) in (1, 2))
        ):
            raise ValueError(
                f"{type(dm).__name__}.num_classes is {count} but the model segments {self.num_classes} "
                f"classes; set model num_classes to {count} (or leave it unset to take it from the data)"
            )
        data_ignore = getattr(dm, "ignore_index", None)
        if (
            data_ignore is not None
            and self.ignore_index is not None
            and int(data_ignore) != self.ignore_index
        ):
            raise ValueError(
                f"{type(dm).__name__}.ignore_index is {data_ignore} but the model ignores {self.ignore_index}; "
                "set model ignore_index to the same value"
            )

    def compute_metrics(self, stage: str) -> dict[str, Tensor]:
        out = {}
        names = self.class_names(self.num_classes)
        for name, value in self.metrics[f"{stage}_"].compute().items():
            if value.ndim == 1:
                for class_name, v in zip(names, value):
                    out[f"{stage}/{name}/{class_name}"] = v
            else:
                out[f"{stage}/{name}"] = value
        return out

    def progress_bar_metrics_for(self, stage: str) -> set[str]:
        return {f"{stage}/loss", f"{stage}/miou"}

    # --------------------------------------------------------------------------------------- figures
    def plot_samples(self, images: Tensor, preds: Tensor, target: Tensor | None) -> Any:
        import matplotlib.pyplot as plt
        import numpy as np

        pictures = self.display_images(images)
        n = pictures.shape[0]
        cols = 3 if target is not None else 2
        fig, axes = plt.subplots(n, cols, figsize=(2.6 * cols, 2.6 * n), squeeze=False)
        cmap = plt.get_cmap("tab20", max(self.num_classes, 2))

        def overlay(ax: Any, picture: Tensor, mask: Tensor, title: str) -> None:
            ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray")
            m = mask.numpy()
            shown = np.ma.masked_where((m >= self.num_classes) | (m == 0), m)  # background/ignore: no tint
            ax.imshow(
                shown,
                cmap=cmap,
                vmin=0,
                vmax=max(self.num_classes - 1, 1),
                alpha=0.55,
                interpolation="nearest",
            )
            ax.set_title(title, fontsize=8)
            ax.axis("off")

        for k in range(n):
            axes[k, 0].imshow(pictures[k][..., 0] if pictures.shape[-1] == 1 else pictures[k], cmap="gray")
            axes[k, 0].set_title("image", fontsize=8)
            axes[k, 0].axis("off")
            if target is not None:
                overlay(axes[k, 1], pictures[k], target[k], "true mask")
            overlay(axes[k, -1], pictures[k], preds[k], "predicted mask")
        fig.tight_layout()
        return fig

    def default_prediction_writer(self) -> Callback | None:
        from lightning_convnets.writers import MaskPNGWriter

        return MaskPNGWriter()
