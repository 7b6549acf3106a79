"""Object detection: CenterNet on any backbone, or torchvision's Faster R-CNN / RetinaNet / FCOS with an FPN.

Conventions (every family):

* batches are ``(images, targets)`` with ``images`` a list of ``[C, H, W]`` tensors (sizes may differ) or
  one ``[N, C, H, W]`` tensor, and ``targets`` a list of dicts with ``boxes`` (float ``[K, 4]``, ``xyxy``
  input pixels) and ``labels`` (int64 ``[K]``); ``K`` may be 0 (an image without objects);
* labels are **0-based class indices with no background id**; Faster R-CNN's background class is added
  and removed inside the task. The dataset's own category ids (COCO ids need not be contiguous) are
  kept in the hyperparameters (``label_category_ids``, ``class_names``), so a checkpoint knows its label
  mapping and :class:`~lightning_convnets.detection_writers.CocoResultsWriter` writes the original ids.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.detection import MeanAveragePrecision

from lightning_convnets import tiling
from lightning_convnets.nn.centernet import centernet_loss, decode_detections, encode_targets
from lightning_convnets.nn.detectors import (
    TORCHVISION_FAMILIES,
    CenterNet,
    batch_images,
    build_torchvision_detector,
)
from lightning_convnets.tasks.base import BackboneSpec, ConvNetTask

FAMILIES = ("centernet", *TORCHVISION_FAMILIES)
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
            predict (large images), merged by class-wise NMS (see :class:`~lightning_convnets.tiling.TiledDetector`).
        tta: test-time augmentation at test and predict: ``"none"``, ``"flip"``, ``"flip+scales"``
            (boxes mapped back and fused; see :mod:`lightning_convnets.tta`).
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
    def default_monitor(self) -> str:
        """``val/loss`` for CenterNet; ``val/map`` for the torchvision families (no loss in eval mode)."""
        return "val/loss" if self.family == "centernet" else "val/map"

    # ----------------------------------------------------------------------------------- building
    def build_task(self, num_classes: int) -> None:
        """The detection network for ``num_classes`` and the mAP metrics of validation and test."""
        hp = self.hparams
        for key in ("class_names", "label_category_ids"):
            if hp.get(key) is not None and len(hp[key]) != num_classes:
                raise ValueError(
                    f"ObjectDetector: {key} has {len(hp[key])} entries but num_classes is {num_classes}"
                )
        if self.family == "centernet":
            self.detector: nn.Module = CenterNet(
                self.backbone, num_classes, head_channels=hp.head_channels, neck_channels=hp.neck_channels
            )
            self.size_divisor = int(hp.size_divisor or self._auto_size_divisor())
        else:
            self.detector = build_torchvision_detector(
                self.family,
                self.backbone,
                num_classes,
                min_size=hp.min_size,
                max_size=hp.max_size,
                anchor_size=hp.anchor_size,
                fpn_channels=hp.fpn_channels,
                score_threshold=hp.score_threshold,
                detections_per_image=hp.top_k,
                detector_kwargs=hp.detector_kwargs,
            )
            self.size_divisor = 1
        # No training metrics: decoding every training batch costs time and torchvision detectors return
        # no detections in train mode.
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

    def _auto_size_divisor(self) -> int:
        needs = [self.detector.stride, max(self.backbone.reductions)]
        multiple = getattr(self.backbone, "multiple", None)
        if isinstance(multiple, int) and multiple > 0:
            needs.append(multiple)
        return math.lcm(*needs)

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

    @staticmethod
    def _clean(target: Mapping[str, Tensor], drop_empty: bool = True) -> dict[str, Tensor]:
        """``boxes`` ``[K, 4]`` float, ``labels`` ``[K]`` int64 (and ``iscrowd``), without the zero-area
        boxes unless ``drop_empty=False`` (finding them is a host sync on an accelerator)."""
        boxes = target["boxes"].reshape(-1, 4).float()
        labels = target["labels"].reshape(-1).long()
        if not drop_empty:
            out = {"boxes": boxes, "labels": labels}
            if "iscrowd" in target:
                out["iscrowd"] = target["iscrowd"].reshape(-1)
            return out
        # Zero-area boxes carry no object (and torchvision's losses refuse them).
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if bool(keep.all()):  # the usual case: no copy (a boolean index syncs with the device anyway)
            out = {"boxes": boxes, "labels": labels}
            if "iscrowd" in target:
                out["iscrowd"] = target["iscrowd"].reshape(-1)
            return out
        out = {"boxes": boxes[keep], "labels": labels[keep]}
        if "iscrowd" in target:
            out["iscrowd"] = target["iscrowd"].reshape(-1)[keep]
        return out

    # ------------------------------------------------------------------------------------ forward
    def forward(self, images: Sequence[Tensor] | Tensor) -> Detections:
        """Detections per image (``boxes`` xyxy input pixels, ``scores``, 0-based ``labels``).

        Call it in eval mode; in train mode the torchvision detectors need targets.
        """
        if isinstance(images, Tensor):
            images = list(images) if images.ndim == 4 else [images]
        if self.family == "centernet":
            outputs = self.detector(batch_images(images, self.size_divisor))
            return self._decode(outputs[-1], images)
        detections = self.detector(list(images))
        return self._from_torchvision(detections)

    def _decode(self, output: dict[str, Tensor], images: Sequence[Tensor]) -> Detections:
        hp = self.hparams
        return decode_detections(
            output["heatmap"],
            output["size"],
            output["offset"],
            stride=self.detector.stride,
            top_k=hp.top_k,
            score_threshold=hp.score_threshold,
            image_sizes=[tuple(im.shape[-2:]) for im in images],
        )

    def _from_torchvision(self, detections: Detections) -> Detections:
        shift = 1 if self.family == "fasterrcnn" else 0
        return [
            {"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"].long() - shift}
            for d in detections
        ]

    def _centernet_step(
        self, images: list[Tensor], targets: list[dict[str, Tensor]], decode: bool
    ) -> tuple[Tensor, dict[str, Tensor], Detections | None]:
        hp = self.hparams
        outputs = self.detector(batch_images(images, self.size_divisor))
        encoded = encode_targets(
            [t["boxes"] for t in targets],
            [t["labels"] for t in targets],
            self.num_classes,
            tuple(outputs[-1]["heatmap"].shape[-2:]),
            stride=self.detector.stride,
            min_overlap=hp.min_overlap,
            device=outputs[-1]["heatmap"].device,
            check_labels=not self.training,  # no host read on a training step
        )
        # Intermediate supervision: every stack is trained on the same targets, losses summed.
        per_stack = [centernet_loss(o, encoded, hp.size_weight, hp.offset_weight) for o in outputs]
        parts = {key: torch.stack([p[key] for p in per_stack]).sum() for key in per_stack[0]}
        detections = self._decode(outputs[-1], images) if decode else None
        return parts.pop("loss"), parts, detections

    def _torchvision_losses(
        self, images: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[Tensor, dict]:
        shift = 1 if self.family == "fasterrcnn" else 0
        try:
            parts = self.detector(images, [{"boxes": t["boxes"], "labels": t["labels"] + shift} for t in targets])
        except (AssertionError, ValueError):
            # torchvision refuses zero-area boxes (its own check, a host read it makes anyway): drop them
            # and go again; training targets are not cleaned beforehand, which would be one more read
            cleaned = [self._clean(t) for t in targets]
            if all(len(c["boxes"]) == len(t["boxes"]) for c, t in zip(cleaned, targets)):
                raise
            parts = self.detector(images, [{"boxes": t["boxes"], "labels": t["labels"] + shift} for t in cleaned])
        return torch.stack(list(parts.values())).sum(), parts

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
        targets = [self._clean(t, drop_empty=not train) for t in targets]
        loss: Tensor | None = None
        detections: Detections | None = None
        if self.family == "centernet":
            loss, parts, detections = self._centernet_step(images, targets, decode=not train)
        elif train:
            loss, parts = self._torchvision_losses(images, targets)
        else:
            detections = self.forward(images)
        if stage == "test" and tiling.uses_tiling_or_tta(self):  # metrics on tiles / TTA (loss: plain)
            detections = tiling.detect(self, images)
        if train and self._logging_step():  # step-only values: on other steps Lightning would discard them
            self.log_dict(
                {f"train/loss_{k}": v.detach() for k, v in parts.items()},
                on_step=True,
                on_epoch=False,
                batch_size=len(images),
            )
        return loss, detections, targets, images

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Detections:
        """Per image ``boxes`` (xyxy input pixels), ``scores``, 0-based ``labels`` and ``image_size``
        (``[H, W]`` of the input); ``image_id`` and ``orig_size`` are passed through from the targets
        when the batch has them (the COCO writer uses them)."""
        images, targets = self._split_batch(batch)
        # the folded copy is built and checked on what the network sees: a tile under tiled detection
        with self.fused_for_predict(tiling.example_input(self, images)):
            detections = tiling.detect(self, images)  # self.forward, on tiles / with TTA when asked
        for i, det in enumerate(detections):
            det["image_size"] = torch.tensor(images[i].shape[-2:], dtype=torch.int64)
            if targets is not None:
                for key in ("image_id", "orig_size"):
                    if key in targets[i]:
                        det[key] = targets[i][key]
        return detections

    # ------------------------------------------------------------------------------------ logging
    def epoch_metrics(self, stage: str) -> dict[str, Tensor]:
        """The base's, without ``<stage>/loss`` where torchvision detectors computed none (val, test)."""
        if stage == "train" or self.family == "centernet":
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
    def remember_samples(self, stage: str, batch_idx: int, images: Any, preds: Any, target: Any) -> None:
        """Keep the first batch's first images, detections and targets (on the CPU) for the figure."""
        k = self.hparams.num_sample_figures
        if batch_idx != 0 or not k or stage in self._samples or not self._figures_due(stage):
            return
        if self._trainer is not None and self.trainer.sanity_checking:
            return
        cpu = [{key: v.detach().cpu() for key, v in d.items()} for d in preds[:k]]
        truth = (
            None if target is None else [{key: v.detach().cpu() for key, v in d.items()} for d in target[:k]]
        )
        self._samples[stage] = ([im.detach().float().cpu() for im in images[:k]], cpu, truth)

    def plot_samples(self, images: Any, preds: Any, target: Any) -> Any:
        """Images with ground-truth boxes (green, dashed) and detections scoring >= 0.3 (red)."""
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle

        names = self.class_names(self.num_classes or 0)
        n = len(images)
        cols = min(n, 4)
        rows = -(-n // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
        for k, ax in enumerate(axes.flat):
            ax.axis("off")
            if k >= n:
                continue
            picture = self.display_images(images[k].unsqueeze(0))[0]
            ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray")
            if target is not None:
                for box in target[k]["boxes"].tolist():
                    ax.add_patch(
                        Rectangle(
                            box[:2], box[2] - box[0], box[3] - box[1], fill=False, ec="lime", ls="--", lw=1
                        )
                    )
            det = preds[k]
            shown = det["scores"] >= 0.3
            for box, score, label in zip(
                det["boxes"][shown].tolist(), det["scores"][shown].tolist(), det["labels"][shown].tolist()
            ):
                ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, ec="red", lw=1))
                name = names[label] if 0 <= label < len(names) else str(label)
                ax.text(box[0], box[1], f"{name} {score:.2f}", color="red", fontsize=6, va="bottom")
        fig.tight_layout()
        return fig

    # ---------------------------------------------------------------------------------- prediction
    def default_prediction_writer(self) -> Callback | None:
        """:class:`~lightning_convnets.detection_writers.CocoResultsWriter`."""
        from lightning_convnets.detection_writers import CocoResultsWriter

        return CocoResultsWriter()
