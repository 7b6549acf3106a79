"""Semantic segmentation: a per-pixel classifier on a dense feature map (:class:`SemanticSegmenter`).

The dense map comes from a dense backbone (``unet``, a stacked hourglass, ``smp:...``) or from a U-Net
decoder put on a pyramid encoder. When valid padding makes the output smaller than the mask, the mask is
cropped to it; otherwise the logits are resized. The rules are in ``docs/segmentation.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_convnets import drawing
from lightning_convnets.backbones.unet import UNet
from lightning_convnets.metrics import SegmentationMetrics
from lightning_convnets.nn import center_crop, crop_offsets
from lightning_convnets.nn.losses import CrossEntropyDiceLoss
from lightning_convnets.predict import large, tiling
from lightning_convnets.predict.export import SegmenterGraph
from lightning_convnets.predict.readers import open_image
from lightning_convnets.predict.tta import parse_tta
from lightning_convnets.predict.writers import MaskPNGWriter
from lightning_convnets.tasks.adapters import attached_trainer
from lightning_convnets.tasks.base import BackboneSpec, ConvNetTask

_STAGES = ("train_", "val_", "test_")
# tile side of streamed images (TIFF, Zarr) when the task has no tile_size
STREAMED_TILE_SIZE = large.STREAMED_TILE_SIZE


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
        tile_size, tile_overlap, tile_batch_size, tta: predict and test on tiles of this size (images
            of any size, full resolution) and with test-time augmentation (``"none"``, ``"flip"``,
            ``"flip+scales"``); see :mod:`lightning_convnets.predict.tiling` and :mod:`lightning_convnets.predict.tta`.
        num_sample_figures: images in the sample figure (0 disables it).
        **kwargs: the arguments every task shares (``backbone_kwargs``, ``in_channels``, ``optimizer``,
            ``lr_scheduler``, ``monitor``, ``freeze_backbone``, ``channels_last``...): see
            :class:`ConvNetTask`. ``backbone_lr_mult`` applies to the backbone, not to the decoder.

    Example:
        >>> model = SemanticSegmenter("unet", num_classes=4,
        ...                           backbone_kwargs={"width": 8, "depth": 2})
        >>> model(torch.zeros(1, 3, 64, 64))[-1].shape
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
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        tile_batch_size: int = 4,
        tta: str = "none",
        num_sample_figures: int = 4,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        tiling.check_prediction_options(tile_size, tile_overlap, tile_batch_size, tta)
        super().__init__(
            backbone=backbone, num_classes=num_classes, num_sample_figures=num_sample_figures, **kwargs
        )

    @property
    def binary(self) -> bool:
        """Binary mode: one sigmoid channel for foreground vs background."""
        return bool(self.hparams.binary)

    @property
    def ignore_index(self) -> int | None:
        """Mask value left out of the loss and the metrics."""
        return self.hparams.ignore_index

    @staticmethod
    def _supervised_channels(backbone: nn.Module) -> list[int]:
        # Dense maps at the finest reduction are the outputs (one per hourglass stack); coarser extras
        # (if a dense backbone returns any) are not supervised.
        finest = min(backbone.reductions)
        return [c for c, r in zip(backbone.out_channels, backbone.reductions) if r == finest]

    def configure_models(self, num_classes: int) -> None:
        """Decoder (pyramid encoders) and one 1x1 head per supervised map."""
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
        if getattr(self.backbone, "dense", False):
            self.decoder: nn.Module | None = None
            dense_channels = self._supervised_channels(self.backbone)
        else:
            # The encoder is shared, not copied: backbone parameters stay in the backbone group, the
            # decoder's (new, randomly initialised) ones go with the head.
            self.decoder = UNet(encoder=self.backbone, width=hp.decoder_width, norm="batch")
            dense_channels = [hp.decoder_width]
        out = 1 if self.binary else num_classes
        self.heads = nn.ModuleList(nn.Conv2d(c, out, kernel_size=1) for c in dense_channels)

    def configure_losses(self) -> None:
        """``ce_weight * cross-entropy + dice_weight * Dice`` (:class:`~lightning_convnets.nn.losses.CrossEntropyDiceLoss`)."""
        hp = self.hparams
        self.criterion = CrossEntropyDiceLoss(
            binary=self.binary,
            ignore_index=self.ignore_index,
            ce_weight=hp.ce_weight,
            dice_weight=hp.dice_weight,
            class_weights=hp.class_weights,
        )

    def configure_metrics(self, num_classes: int) -> None:
        """One :class:`~lightning_convnets.metrics.SegmentationMetrics` per stage."""
        # One confusion matrix per stage gives all four metrics (lightning_convnets.metrics). Training
        # metrics skip the input checks (a host sync a step): the loss has refused out-of-range targets.
        self.metrics = nn.ModuleDict(
            {stage: self._make_metrics(self.num_classes, stage != "train_") for stage in _STAGES}
        )

    def _make_metrics(self, num_classes: int, validate: bool = True) -> SegmentationMetrics:
        return SegmentationMetrics(num_classes, ignore_index=self.ignore_index, validate_args=validate)

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
    def tiling_options(self) -> tiling.TilingOptions:
        """How test and predict run (tiles, TTA), from ``tile_size``, ``tile_overlap``, ``tile_batch_size``, ``tta``."""
        hp = self.hparams
        return tiling.TilingOptions(
            hp.get("tile_size"), hp.get("tile_overlap"), hp.get("tile_batch_size", 4), hp.get("tta", "none")
        )

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
        """Loss averaged over the supervised maps, predicted masks, (cropped) masks and images."""
        images, mask = self.unpack_batch(batch)
        if mask is None:
            raise ValueError(f"{stage} batches need masks: got images only")
        mask = self._check_mask(mask, images)
        size = tuple(images.shape[-2:])
        losses = []
        target = mask
        options = self.tiling_options
        tiled = stage == "test" and options.active  # full-resolution tiles / TTA
        for logits in [tiling.segmentation_logits(self, images, options)] if tiled else self(images):
            logits, target = self.align(logits, mask, size)
            losses.append(self.criterion(logits, target))
        # Intermediate supervision: every stack's output gets the full loss, averaged.
        loss = torch.stack(losses).mean()
        if target.shape[-2:] != mask.shape[-2:]:
            images = center_crop(images, *target.shape[-2:])
        return loss, self.to_mask(logits.detach()), target, images

    def predict_step(
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> Tensor | large.LargePrediction:
        """Class-index masks ``(N, H, W)`` (int64) at the input size; for a streamed image (a
        ``predict_dir`` TIFF or Zarr file), its mask written tile by tile (:meth:`predict_streamed`)."""
        if isinstance(batch, large.StreamedSource):
            return self.predict_streamed(batch)
        images, _ = self.unpack_batch(batch)
        # the folded copy is built and checked on what the network sees: a tile under tiled prediction
        options = self.tiling_options
        with self.fused_for_predict(tiling.example_input(self, images, options)):
            if options.active:
                return self.to_mask(tiling.segmentation_logits(self, images, options))
            logits = self(images)[-1]
        size = tuple(images.shape[-2:])
        logits, _ = self.align(logits, None, size)
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

    def predict_streamed(
        self, item: large.StreamedSource, output: str | Path | None = None
    ) -> large.LargePrediction:
        """Segment an image larger than memory, read window by window, into a mask written tile by tile
        (:class:`~lightning_convnets.predict.large.LargeImagePredictor`) with this task's tiling options
        (``tile_size``, default 512 here; ``tile_overlap``, ``tile_batch_size``; ``tta`` per tile batch,
        as the in-memory tiled path does). ``fast_predict``'s folded copy is built and checked on the first
        tile's window.

        Args:
            item: the image: ``path``, ``mean``, ``std`` (a data module's ``StreamedImage``).
            output: the mask file (default: the :class:`MaskPNGWriter`'s folder, ``<stem>.tif``).

        Raises:
            ValueError: naming the file, for rescaled test-time augmentation views (``scales``) with a
                valid-padding network (its exact tiles cannot be rescaled one by one; flips can).
        """
        options = self.tiling_options
        if self.border > 0 and parse_tta(options.tta).scales != (1.0,):
            raise ValueError(
                f"{item.path}: tta={options.tta!r} rescales the image, which the exact tiles of a valid-padding "
                "network cannot do on an image streamed from disk (TIFF, Zarr); use flips (tta='flip' or "
                "'flip+vflip')"
            )
        trainer = attached_trainer(self)
        if output is None:
            output = self._streamed_mask_path(trainer, item.path)
        predictor = large.LargeImagePredictor(
            self,
            options.tile_size or STREAMED_TILE_SIZE,
            options.tile_overlap,
            options.tile_batch_size,
            mean=item.mean,
            std=item.std,
            reduce=lambda logits: self.to_mask(logits[None])[0],
            tta=options.tta,
            progress=trainer is not None and trainer.progress_bar_callback is not None,
        )
        reader = open_image(item.path)
        try:
            example = predictor.first_input(reader).to(self.device)
            with self.fused_for_predict(example):
                return predictor.predict(reader, output)
        finally:
            reader.close()

    @staticmethod
    def _streamed_mask_path(trainer: Any, source: str | Path) -> Path:
        for callback in getattr(trainer, "callbacks", None) or []:
            if isinstance(callback, MaskPNGWriter) and callback.folder is not None:
                return callback.streamed_mask_path(source)
        root = Path((trainer.log_dir or trainer.default_root_dir) if trainer is not None else ".")
        return root / "predictions" / "masks" / f"{Path(source).stem}.tif"

    def accepts_data_num_classes(self, count: int) -> bool:
        """The same count; in binary mode, data with one (foreground) or two classes."""
        return count == self.num_classes or (self.binary and count in (1, 2))

    def check_datamodule(self) -> None:
        """The base checks, and the datamodule's ``ignore_index`` against the model's."""
        super().check_datamodule()
        dm = self.datamodule
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
        """Scalar metrics, with the per-class IoU flattened to ``<stage>/iou/<class>``."""
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
        """Loss and mean IoU."""
        return {f"{stage}/loss", f"{stage}/miou"}

    # --------------------------------------------------------------------------------------- figures
    def plot_samples(self, images: Tensor, preds: Tensor, target: Tensor | None) -> Any:
        """Rows of image, true mask and predicted mask (:func:`lightning_convnets.drawing.plot_mask_overlays`)."""
        pictures = self.display_images(images)
        rows = [
            (pictures[k].numpy(), None if target is None else target[k].numpy(), preds[k].numpy())
            for k in range(pictures.shape[0])
        ]
        return drawing.plot_mask_overlays(rows, self.class_names(self.num_classes))

    def default_prediction_writer(self) -> Callback | None:
        """:class:`~lightning_convnets.predict.writers.MaskPNGWriter`."""
        return MaskPNGWriter()

    def export_metadata(self) -> dict[str, Any]:
        """What an exported file records of this task (``docs/export.md``): binary mode, threshold, border."""
        meta = {"binary": self.binary, "threshold": self.hparams.threshold, "border": self.border}
        return {**meta, "class_names": self.class_names(2)} if self.binary else meta

    def export_graph(self) -> nn.Module:
        """``images -> logits`` of the last map (:class:`~lightning_convnets.predict.export.SegmenterGraph`)."""
        return SegmenterGraph(self.backbone, self.decoder, self.heads, self.border)
