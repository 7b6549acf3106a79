"""Object detection: CenterNet on any backbone, or torchvision's Faster R-CNN / RetinaNet / FCOS with an FPN.

Conventions (every family):

* batches are ``(images, targets)`` with ``images`` a list of ``[C, H, W]`` tensors (sizes may differ) or
  one ``[N, C, H, W]`` tensor, and ``targets`` a list of dicts with ``boxes`` (float ``[K, 4]``, ``xyxy``
  input pixels) and ``labels`` (int64 ``[K]``); ``K`` may be 0 (an image without objects);
* labels are **0-based class indices with no background id**; Faster R-CNN's background class is added
  and removed inside the task. The dataset's own category ids (COCO ids need not be contiguous) are
  kept in the hyperparameters (``label_category_ids``, ``class_names``), so a checkpoint knows its label
  mapping and :class:`~lightning_convnets.predict.writers.CocoResultsWriter` writes the original ids.

The families are driven through one interface (:class:`~lightning_convnets.nn.detectors.DetectorFamily`:
torchvision's detector protocol), so the task itself has no per-family code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.detection import MeanAveragePrecision

from lightning_convnets import drawing
from lightning_convnets.nn.detectors import DETECTOR_FAMILIES, DetectorFamily, clean_target, detector_family
from lightning_convnets.predict import large, tiling
from lightning_convnets.predict.readers import open_image
from lightning_convnets.predict.writers import CocoResultsWriter
from lightning_convnets.tasks.adapters import attached_trainer
from lightning_convnets.tasks.base import BackboneSpec, ConvNetTask

FAMILIES = tuple(DETECTOR_FAMILIES)
# Scalar entries of MeanAveragePrecision.compute() worth logging (the per-class ones are -1 unless asked).
MAP_KEYS = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)

Detections = list[dict[str, Tensor]]
# The arguments the families read (each takes those it knows).
_FAMILY_OPTIONS = (
    "head_channels",
    "neck_channels",
    "size_weight",
    "offset_weight",
    "min_overlap",
    "top_k",
    "score_threshold",
    "size_divisor",
    "min_size",
    "max_size",
    "anchor_size",
    "fpn_channels",
    "detector_kwargs",
)


class ObjectDetector(ConvNetTask):
    """Object detector with one interface over two families of models.

    * ``family="centernet"`` ("Objects as Points", Zhou et al. 2019): per-class centre heatmaps (focal
      loss on Gaussian splats), box size and sub-pixel offset (L1) at stride 4, decoded by 3x3 max-pool
      peaks and top-K. Any backbone works: a stacked hourglass gets heads on every stack and the loss
      summed over stacks; a same-padding U-Net's full-resolution map is average-pooled to stride 4 (a
      valid-padding U-Net is refused); pyramid encoders (ResNet, ``timm:``...) get an upsampling neck.
      Images of a batch are zero-padded at the bottom/right to a common size (boxes stay valid).
    * ``family="fasterrcnn" | "retinanet" | "fcos"``: torchvision's detectors with an FPN over a pyramid
      backbone of ours (``resnet18``...) or torchvision's (``torchvision:resnet50``). They resize images
      internally to ``min_size``/``max_size`` (torchvision's 800/1333 by default: set them to the data's
      size). In eval mode they return detections and no losses, so their validation and test log the
      metrics only (no ``val/loss``). Pretrained weights are used only when asked for, through the
      backbone's own options (``backbone_kwargs={"weights": ...}``).

    Validation and test log torchmetrics' ``MeanAveragePrecision``: ``<stage>/map``, ``map_50``,
    ``map_75``, ``map_small/medium/large`` and ``mar_1/10/100`` (COCO definitions); CenterNet also logs
    ``<stage>/loss``. Training logs ``train/loss`` and its parts. :meth:`predict_step` returns, per image,
    ``boxes`` (``xyxy`` input pixels), ``scores`` and 0-based ``labels``.

    Args:
        backbone: registry name, ``class_path`` dict or module (see :class:`ConvNetTask`).
        family: ``"centernet"``, ``"fasterrcnn"``, ``"retinanet"`` or ``"fcos"``.
        num_classes: object classes (no background); ``None`` takes the datamodule's at setup.
        class_names: names of the classes; ``None`` takes the datamodule's at setup.
        label_category_ids: the dataset's category id of each 0-based label (COCO ids); ``None`` takes
            the datamodule's ``category_ids`` at setup. Stored in the checkpoint's hyperparameters (under a
            name of its own: a datamodule's ``category_ids`` argument may differ, e.g. ``None``, and
            Lightning refuses module and datamodule hyperparameters that share a key with other values).
        head_channels: hidden channels of each CenterNet head branch.
        neck_channels: channels of CenterNet's upsampling neck (pyramid backbones).
        size_weight: CenterNet's size-loss weight (0.1 in the paper).
        offset_weight: CenterNet's offset-loss weight (1 in the paper).
        min_overlap: IoU of the CornerNet radius rule for the Gaussian splats.
        top_k: CenterNet peaks kept per image; also the torchvision detectors' detections per image.
        score_threshold: lowest score returned (keep it low for mAP, raise it for display).
        size_divisor: CenterNet pads images to a multiple of this; ``None``: the backbone's requirement
            (``multiple`` attribute) and its coarsest stride.
        min_size: torchvision detectors' internal resize, shorter side.
        max_size: torchvision detectors' internal resize, longest side.
        anchor_size: Faster R-CNN / RetinaNet anchor size at the finest FPN level (``None``: 32).
        fpn_channels: FPN width of the torchvision detectors (a multiple of 32 for FCOS).
        detector_kwargs: more keyword arguments for the torchvision detector class (e.g. Faster R-CNN's
            ``rpn_post_nms_top_n_test``/``box_batch_size_per_image``, RetinaNet's ``topk_candidates``).
        tile_size, tile_overlap, tile_batch_size: detect on overlapping tiles of this size at test and
            predict (large images), merged by class-wise NMS (see :class:`~lightning_convnets.predict.tiling.TiledDetector`).
        tta: test-time augmentation at test and predict: ``"none"``, ``"flip"``, ``"flip+scales"``
            (boxes mapped back and fused; see :mod:`lightning_convnets.predict.tta`).
        **kwargs: the arguments every task shares (``backbone_kwargs``, ``in_channels``, ``optimizer``,
            ``lr_scheduler``, ``monitor``, ``freeze_backbone``, ``freeze_bn``, ``channels_last``...): see
            :class:`ConvNetTask`. ``monitor`` defaults to ``val/loss`` for CenterNet and ``val/map`` for
            the torchvision families (which log no validation loss: give a ``ReduceLROnPlateau`` scheduler
            ``mode: max`` there); ``freeze_bn`` is the usual choice when fine-tuning a pretrained backbone
            on small detection batches.

    Example:
        >>> model = ObjectDetector("hourglass", num_classes=3,
        ...                        backbone_kwargs={"num_stacks": 2, "order": 2, "width": 16})
        >>> model.eval()([torch.zeros(3, 64, 64)])[0].keys()
        dict_keys(['boxes', 'scores', 'labels'])
    """

    def __init__(
        self,
        backbone: BackboneSpec = "resnet18",
        family: Literal["centernet", "fasterrcnn", "retinanet", "fcos"] = "centernet",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        label_category_ids: list[int] | None = None,
        head_channels: int = 64,
        neck_channels: int = 64,
        size_weight: float = 0.1,
        offset_weight: float = 1.0,
        min_overlap: float = 0.3,
        top_k: int = 100,
        score_threshold: float = 0.05,
        size_divisor: int | None = None,
        min_size: int = 800,
        max_size: int = 1333,
        anchor_size: int | None = None,
        fpn_channels: int = 256,
        detector_kwargs: dict[str, Any] | None = None,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        tile_batch_size: int = 4,
        tta: str = "none",
        **kwargs: Any,
    ) -> None:
        family = str(family).lower()  # type: ignore[assignment]
        if family not in FAMILIES:
            raise ValueError(f"ObjectDetector: family must be one of {FAMILIES}, got {family!r}")
        for name, value in (
            ("top_k", top_k),
            ("head_channels", head_channels),
            ("neck_channels", neck_channels),
        ):
            if int(value) < 1:
                raise ValueError(f"ObjectDetector: {name} must be >= 1, got {value}")
        if not 0.0 <= score_threshold < 1.0:
            raise ValueError(f"ObjectDetector: score_threshold must be in [0, 1), got {score_threshold}")
        if not 0.0 < min_overlap < 1.0:
            raise ValueError(f"ObjectDetector: min_overlap must be in (0, 1), got {min_overlap}")
        tiling.check_prediction_options(tile_size, tile_overlap, tile_batch_size, tta)
        count = num_classes if num_classes is not None or class_names is None else len(class_names)
        super().__init__(backbone=backbone, num_classes=count, **kwargs)

    @property
    def family(self) -> str:
        """``"centernet"``, ``"fasterrcnn"``, ``"retinanet"`` or ``"fcos"``."""
        return str(self.hparams.family)

    @property
    def detector_family(self) -> DetectorFamily:
        """The family's side of the detector interface (:func:`~lightning_convnets.nn.detectors.detector_family`),
        made from this task's arguments."""
        found = self.__dict__.get("_detector_family")
        if found is None:
            hp = self.hparams
            options = {k: hp.get(k) for k in _FAMILY_OPTIONS if k in hp}
            found = self.__dict__["_detector_family"] = detector_family(self.family, **options)
        return found

    @property
    def default_monitor(self) -> str:
        """``val/loss`` for CenterNet; ``val/map`` for the torchvision families (no loss in eval mode)."""
        return self.detector_family.default_monitor

    @property
    def tiling_options(self) -> tiling.TilingOptions:
        """How test and predict run (tiles, TTA), from ``tile_size``, ``tile_overlap``, ``tile_batch_size``, ``tta``."""
        hp = self.hparams
        return tiling.TilingOptions(
            hp.get("tile_size"), hp.get("tile_overlap"), hp.get("tile_batch_size", 4), hp.get("tta", "none")
        )

    def _run_tiled(self, images: Sequence[Tensor]) -> Detections:
        """Detections under :attr:`tiling_options` (``self.forward`` on tiles / with TTA when asked)."""
        return tiling.detect(self, images, self.tiling_options, int(self.hparams.top_k), self.size_divisor)

    # ----------------------------------------------------------------------------------- building
    def configure_models(self, num_classes: int) -> None:
        """The detection network of the family for ``num_classes`` (:meth:`DetectorFamily.build`)."""
        hp = self.hparams
        for key in ("class_names", "label_category_ids"):
            if hp.get(key) is not None and len(hp[key]) != num_classes:
                raise ValueError(
                    f"ObjectDetector: {key} has {len(hp[key])} entries but num_classes is {num_classes}"
                )
        self.detector: nn.Module = self.detector_family.build(self.backbone, num_classes)
        self.size_divisor = self.detector_family.size_divisor

    def configure_metrics(self, num_classes: int) -> None:
        """``MeanAveragePrecision`` for validation and test; no training metrics (decoding every training
        batch costs time, and torchvision detectors return no detections in train mode)."""
        self.metrics = nn.ModuleDict(
            {
                "train_": MetricCollection({}),
                "val_": MeanAveragePrecision(box_format="xyxy", iou_type="bbox"),
                "test_": MeanAveragePrecision(box_format="xyxy", iou_type="bbox"),
            }
        )

    def compile_modules(self) -> list[nn.Module]:
        # training and evaluation call the network directly; forward() adds the decoding around it
        return [self.detector]

    def setup(self, stage: str) -> None:
        """The base setup, then the datamodule's label mapping into the hyperparameters."""
        super().setup(stage)
        # The label mapping goes into the hyperparameters, hence into every checkpoint.
        dm = self.datamodule
        for key, attribute in (("class_names", "class_names"), ("label_category_ids", "category_ids")):
            value = getattr(dm, attribute, None)
            if self.hparams.get(key) is None and value is not None:
                value = [str(v) for v in value] if key == "class_names" else [int(v) for v in value]
                if len(value) == self.num_classes:
                    self.hparams[key] = value

    def check_datamodule(self) -> None:
        """The base checks, and the datamodule's ``category_ids`` against the checkpoint's label mapping."""
        super().check_datamodule()
        dm = self.datamodule
        ids = getattr(dm, "category_ids", None)
        known = self.hparams.get("label_category_ids")
        if ids is not None and known is not None and [int(i) for i in ids] != list(known):
            raise ValueError(
                f"{type(dm).__name__}.category_ids {list(ids)[:10]} differ from the checkpoint's label mapping "
                f"{list(known)[:10]}: the labels would mean different classes"
            )

    @property
    def category_ids(self) -> list[int]:
        """Dataset category id of each label (identity when no mapping is known)."""
        ids = self.hparams.get("label_category_ids")
        return list(ids) if ids is not None else list(range(self.num_classes or 0))

    def class_names(self, num_classes: int) -> list[str]:
        """The ``class_names`` hyperparameter, else the datamodule's, else the label numbers."""
        names = self.hparams.get("class_names")
        if names is not None and len(names) == num_classes:
            return [str(n) for n in names]
        return super().class_names(num_classes)

    # ------------------------------------------------------------------------------------ batches
    def _split_batch(self, batch: Any) -> tuple[list[Tensor], list[dict[str, Tensor]] | None]:
        images, targets = self.unpack_batch(batch)
        if isinstance(images, Tensor):
            images = list(images) if images.ndim == 4 else [images]
        images = list(images)
        if targets is not None:
            if isinstance(targets, Mapping):
                targets = [targets]
            targets = list(targets)
            if len(targets) != len(images):
                raise ValueError(f"detection batch has {len(images)} images but {len(targets)} targets")
            for i, t in enumerate(targets):
                if not isinstance(t, Mapping) or "boxes" not in t or "labels" not in t:
                    raise ValueError(
                        f"detection target {i} must be a dict with 'boxes' [K, 4] xyxy and 'labels' [K]; "
                        f"got {type(t).__name__} with keys {sorted(t) if isinstance(t, Mapping) else '-'}"
                    )
        return images, targets

    #: ``boxes`` float, ``labels`` int64, zero-area boxes dropped (:func:`~lightning_convnets.nn.detectors.clean_target`).
    clean_target = staticmethod(clean_target)

    # ------------------------------------------------------------------------------------ forward
    def forward(self, images: Sequence[Tensor] | Tensor) -> Detections:
        """Detections per image (``boxes`` xyxy input pixels, ``scores``, 0-based ``labels``).

        Call it in eval mode; in train mode the torchvision detectors need targets.
        """
        if isinstance(images, Tensor):
            images = list(images) if images.ndim == 4 else [images]
        return self.detector_family.detect(self.detector, images)

    # -------------------------------------------------------------------------------------- steps
    def shared_step(
        self, batch: Any, stage: str
    ) -> tuple[Tensor | None, Detections | None, Detections, list]:
        """Loss (``None`` for torchvision detectors outside training), detections (``None`` in training:
        no training metrics), cleaned targets and images; training also logs the loss parts."""
        images, targets = self._split_batch(batch)
        if targets is None:
            what = "training" if stage == "train" else stage
            raise ValueError(f"{what} batches need targets: got images only")
        train = stage == "train"
        # Training keeps zero-area boxes: CenterNet's encoding ignores them, torchvision's detectors refuse
        # them (_torchvision_losses then drops them); dropping them here is a host sync every step.
        targets = [clean_target(t, drop_empty=not train) for t in targets]
        detections: Detections | None = None
        if train:
            loss, parts = self.detector_family.losses(self.detector, images, targets)
        else:
            loss, detections = self.detector_family.evaluate(self.detector, images, targets)
        if stage == "test" and self.tiling_options.active:  # metrics on tiles / TTA (loss: plain)
            detections = self._run_tiled(images)
        if train and self.logging_step():  # step-only values: on other steps Lightning would discard them
            self.log_dict(
                {f"train/loss_{k}": v.detach() for k, v in parts.items()},
                on_step=True,
                on_epoch=False,
                batch_size=len(images),
            )
        return loss, detections, targets, images

    def predict_step(
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> Detections | large.LargeDetections:
        """Per image ``boxes`` (xyxy input pixels), ``scores``, 0-based ``labels`` and ``image_size``
        (``[H, W]`` of the input); ``image_id`` and ``orig_size`` are passed through from the targets
        when the batch has them (the COCO writer uses them). For a streamed image (a ``predict_dir`` TIFF
        or Zarr file), its detections streamed to files tile row by tile row (:meth:`predict_streamed`)."""
        if isinstance(batch, large.StreamedSource):
            return self.predict_streamed(batch)
        images, targets = self._split_batch(batch)
        # the folded copy is built and checked on what the network sees: a tile under tiled detection
        example = tiling.example_input(self, images, self.tiling_options, self.size_divisor)
        with self.fused_for_predict(example):
            detections = self._run_tiled(images)
        for i, det in enumerate(detections):
            det["image_size"] = torch.tensor(images[i].shape[-2:], dtype=torch.int64)
            if targets is not None:
                for key in ("image_id", "orig_size"):
                    if key in targets[i]:
                        det[key] = targets[i][key]
        return detections

    def predict_streamed(
        self,
        item: large.StreamedSource,
        coco: str | Path | None = None,
        geojson: str | Path | None = None,
    ) -> large.LargeDetections:
        """Detect objects in an image larger than memory, read window by window, streaming the detections
        to a COCO results json and a GeoJSON FeatureCollection as tile rows finish
        (:class:`~lightning_convnets.predict.large.LargeImageDetector`) with this task's tiling options
        (``tile_size``, default 512 here; ``tile_overlap``, ``tile_batch_size``; ``tta`` per tile) and
        label mapping (``category_ids``, class names). ``top_k`` limits each tile's detections, not the
        image's. ``fast_predict``'s folded copy is built and checked on the first tile.

        Args:
            item: the image: ``path``, ``mean``, ``std`` (and ``index``: the records' ``image_id``), a data
                module's ``StreamedImage``.
            coco, geojson: the files (default: the :class:`CocoResultsWriter`'s folder,
                ``detections/<stem>.json`` and ``detections/<stem>.geojson``).
        """
        options = self.tiling_options
        trainer = attached_trainer(self)
        if coco is None and geojson is None:
            coco, geojson = self._streamed_paths(trainer, item.path)
        runner = large.LargeImageDetector(
            self,
            options.tile_size or large.STREAMED_TILE_SIZE,
            options.tile_overlap,
            options.tile_batch_size,
            multiple=self.size_divisor,
            tta=options.tta,
            mean=item.mean,
            std=item.std,
            progress=trainer is not None and trainer.progress_bar_callback is not None,
        )
        reader = open_image(item.path)
        try:
            example = [t.to(self.device) for t in runner.first_input(reader)]
            with self.fused_for_predict(example):
                return runner.predict(
                    reader,
                    coco,
                    geojson,
                    image_id=int(getattr(item, "index", 0)),
                    class_names=self.class_names(self.num_classes or 0),
                    category_ids=self.category_ids,
                )
        finally:
            reader.close()

    @staticmethod
    def _streamed_paths(trainer: Any, source: str | Path) -> tuple[Path, Path]:
        for callback in getattr(trainer, "callbacks", None) or []:
            if isinstance(callback, CocoResultsWriter) and callback.path is not None:
                return callback.streamed_detection_paths(source)
        root = Path((trainer.log_dir or trainer.default_root_dir) if trainer is not None else ".")
        stem = Path(source).stem
        return (
            root / "predictions" / "detections" / f"{stem}.json",
            root / "predictions" / "detections" / f"{stem}.geojson",
        )

    # ------------------------------------------------------------------------------------ logging
    def epoch_metrics(self, stage: str) -> dict[str, Tensor]:
        """The base's, without ``<stage>/loss`` where torchvision detectors computed none (val, test)."""
        if stage == "train" or self.detector_family.computes_eval_loss:
            return super().epoch_metrics(stage)
        return self.compute_metrics(stage)

    def compute_metrics(self, stage: str) -> dict[str, Tensor]:
        """The scalar entries of ``MeanAveragePrecision`` (none in training)."""
        if stage == "train":
            return {}
        result = self.metrics[f"{stage}_"].compute()
        return {f"{stage}/{k}": result[k].float() for k in MAP_KEYS if k in result}

    def progress_bar_metrics_for(self, stage: str) -> set[str]:
        """Loss, mAP and mAP at IoU 0.5."""
        return {f"{stage}/loss", f"{stage}/map", f"{stage}/map_50"}

    # ------------------------------------------------------------------------------------ figures
    def plot_samples(self, images: Any, preds: Any, target: Any) -> Any:
        """Images with true boxes (dashed) and detections scoring >= 0.3
        (:func:`lightning_convnets.drawing.plot_box_overlays`)."""
        rows = [
            (
                self.display_images(image.unsqueeze(0))[0].numpy(),
                {k: v.numpy() for k, v in det.items()},
                None if target is None else {k: v.numpy() for k, v in target[k_].items()},
            )
            for k_, (image, det) in enumerate(zip(images, preds))
        ]
        return drawing.plot_box_overlays(rows, self.class_names(self.num_classes or 0), score_threshold=0.3)

    # ---------------------------------------------------------------------------------- prediction
    def default_prediction_writer(self) -> Callback | None:
        """:class:`~lightning_convnets.predict.writers.CocoResultsWriter`."""
        return CocoResultsWriter()

    def export_metadata(self) -> dict[str, Any]:
        """What an exported file records of this task (``docs/export.md``): family, score threshold, top-K,
        size divisor and the label mapping."""
        hp = self.hparams
        meta = {"family": self.family, "score_threshold": hp.score_threshold, "top_k": hp.top_k}
        meta["size_divisor"] = int(self.size_divisor)
        if hp.get("label_category_ids") is not None:
            meta["label_category_ids"] = list(hp.label_category_ids)
        return meta

    def export_graph(self) -> nn.Module:
        """``images -> detections`` of the family (:meth:`DetectorFamily.export_graph`) for export."""
        return self.detector_family.export_graph(self.detector)
