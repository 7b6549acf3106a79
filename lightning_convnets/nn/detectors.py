"""Detection networks built on any backbone of the contract: CenterNet and torchvision's FPN detectors.

* :class:`CenterNet` puts :class:`~lightning_convnets.nn.centernet.CenterNetHead` s on a stride-4 map:
  every stack of a stacked hourglass (intermediate supervision), the dense map of a same-padding U-Net
  (average-pooled to stride 4), or the output of an :class:`UpsamplingNeck` over a pyramid encoder.
* :func:`build_torchvision_detector` wraps a pyramid backbone in :class:`FPNBackbone` and hands it to
  torchvision's Faster R-CNN, RetinaNet or FCOS.
* :class:`CenterNetFamily` and :class:`TorchvisionFamily` drive either kind through one interface, the
  protocol of torchvision's detectors (:class:`DetectorFamily`: loss parts in training, detections with
  0-based labels in eval, an export graph); :func:`detector_family` picks one by name.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_convnets.nn.centernet import CenterNetHead, centernet_loss, decode_detections, encode_targets

__all__ = [
    "DETECTOR_FAMILIES",
    "TORCHVISION_FAMILIES",
    "CenterNet",
    "CenterNetFamily",
    "CenterNetGraph",
    "DetectorFamily",
    "FPNBackbone",
    "TorchvisionFamily",
    "TorchvisionGraph",
    "UpsamplingNeck",
    "batch_images",
    "build_torchvision_detector",
    "clean_target",
    "detector_family",
]

Detections = list[dict[str, Tensor]]

TORCHVISION_FAMILIES = ("fasterrcnn", "retinanet", "fcos")


def batch_images(images: Sequence[Tensor] | Tensor, size_divisor: int = 32) -> Tensor:
    """Stack images of varying size into one zero-padded batch (padding at the bottom/right).

    Padding only at the bottom/right keeps box coordinates valid; the height and width are rounded up
    to a multiple of ``size_divisor`` so every down/up-sampling stage of the backbone lines up.
    """
    if isinstance(images, Tensor):
        images = list(images) if images.ndim == 4 else [images]
    if not images:
        raise ValueError("batch_images got no images")
    channels = images[0].shape[0]
    height = max(int(im.shape[-2]) for im in images)
    width = max(int(im.shape[-1]) for im in images)
    height = math.ceil(height / size_divisor) * size_divisor
    width = math.ceil(width / size_divisor) * size_divisor
    batch = images[0].new_zeros(len(images), channels, height, width)
    for i, im in enumerate(images):
        if im.ndim != 3 or im.shape[0] != channels:
            raise ValueError(
                f"image {i} has shape {tuple(im.shape)}; every image must be [C, H, W] with C={channels}"
            )
        batch[i, :, : im.shape[-2], : im.shape[-1]] = im
    return batch


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UpsamplingNeck(nn.Module):
    """Bring a fine-to-coarse feature pyramid up to one map at ``output_stride`` (bilinear + conv).

    Starting from the coarsest map, each step doubles the resolution, adds a 1x1 projection of the
    backbone map at that stride when there is one (the skip keeps small objects' detail, as in the
    paper's DLA variant), and smooths with ``3x3 conv -> BN -> ReLU``.

    Args:
        in_channels: channels of each backbone map.
        reductions: stride of each backbone map.
        channels: channels of the neck (and of its output).
        output_stride: stride of the output map.

    Example:
        >>> import torch
        >>> neck = UpsamplingNeck([8, 16, 32], [4, 8, 16], channels=8)
        >>> neck([torch.zeros(1, 8, 16, 16), torch.zeros(1, 16, 8, 8), torch.zeros(1, 32, 4, 4)]).shape
        torch.Size([1, 8, 16, 16])
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        reductions: Sequence[int],
        channels: int = 64,
        output_stride: int = 4,
    ) -> None:
        super().__init__()
        coarsest = max(reductions)
        if coarsest < output_stride:
            raise ValueError(
                f"the backbone's coarsest map has stride {coarsest}, finer than the neck's output stride "
                f"{output_stride}; use a backbone that downsamples at least {output_stride}x (e.g. the "
                "'imagenet' stem) or a dense backbone"
            )
        steps = round(math.log2(coarsest / output_stride))
        if 2**steps * output_stride != coarsest:
            raise ValueError(f"stride {coarsest} is not {output_stride} times a power of two")
        self.output_stride = output_stride
        self.out_channels = channels
        # Map index per stride, from coarsest to output_stride; None where the backbone has no map.
        by_stride = {r: i for i, r in enumerate(reductions)}
        self._sources = [by_stride.get(coarsest // 2**s) for s in range(steps + 1)]
        self.lateral = nn.ModuleDict(
            {str(i): nn.Conv2d(in_channels[i], channels, 1) for i in self._sources if i is not None}
        )
        self.smooth = nn.ModuleList(_conv_bn_relu(channels, channels) for _ in range(steps + 1))

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        x = self.smooth[0](self.lateral[str(self._sources[0])](features[self._sources[0]]))
        for step, source in enumerate(self._sources[1:], start=1):
            if source is None:
                x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            else:
                skip = self.lateral[str(source)](features[source])
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False) + skip
            x = self.smooth[step](x)
        return x


class CenterNet(nn.Module):
    """Backbone + (neck or pooling) + CenterNet heads, returning head outputs per supervised map.

    * dense backbone (``backbone.dense``): every map at the finest stride gets its own head (a stacked
      hourglass returns one per stack, all supervised); finer than ``stride`` maps are average-pooled
      to ``stride``. Valid-padding networks (``backbone.border > 0``) are refused: their output does
      not cover the image, so centres near the border would have no cell.
    * pyramid backbone: an :class:`UpsamplingNeck` to ``stride``, one head.

    Args:
        backbone: any module of the backbone contract.
        num_classes: heatmap channels.
        head_channels: hidden channels of each head branch.
        neck_channels: channels of the upsampling neck (pyramid backbones only).
        stride: output stride (4 in the paper).

    Example:
        >>> import torch
        >>> from lightning_convnets.backbones import create_backbone
        >>> net = CenterNet(create_backbone("resnet18", width=8), num_classes=3, head_channels=8)
        >>> [tuple(o["heatmap"].shape) for o in net(torch.zeros(1, 3, 64, 64))]
        [(1, 3, 16, 16)]
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        head_channels: int = 64,
        neck_channels: int = 64,
        stride: int = 4,
    ) -> None:
        super().__init__()
        name = type(backbone).__name__
        reductions = list(backbone.reductions)
        channels = list(backbone.out_channels)
        self.backbone = backbone
        self.dense = bool(getattr(backbone, "dense", False))
        if self.dense:
            border = int(getattr(backbone, "border", 0))
            if border > 0:
                raise ValueError(
                    f"CenterNet needs a same-padding dense backbone; {name} uses valid padding "
                    f"(border={border} px): its output does not cover the image. "
                    "Build it with padding='same'."
                )
            finest = min(reductions)
            self._maps = [i for i, r in enumerate(reductions) if r == finest]
            if finest < stride:
                if stride % finest:
                    raise ValueError(f"{name}'s stride {finest} does not divide the output stride {stride}")
                self.pool: nn.Module = nn.AvgPool2d(stride // finest)
            else:
                self.pool = nn.Identity()
                stride = finest
            self.neck = None
            in_channels = [channels[i] for i in self._maps]
        else:
            self.pool = nn.Identity()
            self.neck = UpsamplingNeck(channels, reductions, neck_channels, stride)
            in_channels = [neck_channels]
        self.stride = stride
        self.num_classes = num_classes
        self.heads = nn.ModuleList(CenterNetHead(c, num_classes, head_channels) for c in in_channels)

    def forward(self, images: Tensor) -> list[dict[str, Tensor]]:
        """Head outputs for every supervised map; the last one is the prediction."""
        features = self.backbone(images)
        if self.neck is not None:
            return [self.heads[0](self.neck(features))]
        return [head(self.pool(features[i])) for head, i in zip(self.heads, self._maps)]


class FPNBackbone(nn.Module):
    """A pyramid backbone + torchvision's ``FeaturePyramidNetwork``, in the form torchvision detectors take.

    Returns an ``OrderedDict`` of maps named ``"0"``, ``"1"``... (fine to coarse) plus the extra levels,
    and exposes ``out_channels`` (the FPN width) as torchvision expects.

    Args:
        backbone: a pyramid encoder of our contract (``reductions`` fine to coarse).
        min_stride: the finest backbone stride used (4 for Faster R-CNN's P2, 8 for RetinaNet/FCOS's P3).
        channels: FPN width.
        extra: ``"pool"`` (a max-pooled extra level, Faster R-CNN) or ``"p6p7"`` (two strided convs,
            RetinaNet/FCOS).
    """

    def __init__(
        self, backbone: nn.Module, min_stride: int = 4, channels: int = 256, extra: str = "pool"
    ) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

        reductions = list(backbone.reductions)
        self._maps = [i for i, r in enumerate(reductions) if r >= min_stride]
        if not self._maps:
            raise ValueError(
                f"{type(backbone).__name__} has no map of stride >= {min_stride} (strides {reductions})"
            )
        if extra == "pool":
            extra_block = LastLevelMaxPool()
            extra_count = 1
        elif extra == "p6p7":
            extra_block = LastLevelP6P7(channels, channels)
            extra_count = 2
        else:
            raise ValueError(f"extra must be 'pool' or 'p6p7', got {extra!r}")
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(
            [backbone.out_channels[i] for i in self._maps], channels, extra_blocks=extra_block
        )
        self.out_channels = channels
        used = [reductions[i] for i in self._maps]
        self.strides = used + [used[-1] * 2 ** (k + 1) for k in range(extra_count)]
        self.names = [str(k) for k in range(len(used))] + (["pool"] if extra == "pool" else ["p6", "p7"])

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        features = self.body(images)
        picked = OrderedDict((str(k), features[i]) for k, i in enumerate(self._maps))
        return self.fpn(picked)


def build_torchvision_detector(
    family: str,
    backbone: nn.Module,
    num_classes: int,
    min_size: int = 800,
    max_size: int = 1333,
    anchor_size: int | None = None,
    fpn_channels: int = 256,
    score_threshold: float = 0.05,
    detections_per_image: int = 100,
    detector_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Faster R-CNN, RetinaNet or FCOS on an FPN over ``backbone``.

    Labels stay 0-based for RetinaNet and FCOS (their classifiers have no background); Faster R-CNN's
    class 0 is background, so callers shift labels by one (the task does). Images are expected already
    normalised by the data pipeline: the detectors' own normalisation is set to the identity.

    Args:
        family: ``"fasterrcnn"``, ``"retinanet"`` or ``"fcos"``.
        backbone: a pyramid encoder of our contract (ours or ``torchvision:``/``timm:`` adapters).
        num_classes: object classes (no background).
        min_size, max_size: the detectors' internal resize (shorter side to ``min_size``, longer side at
            most ``max_size``); set them to the data's size to avoid upsampling small images.
        anchor_size: anchor size at the finest level, doubled per level (Faster R-CNN / RetinaNet;
            None: torchvision's 32). FCOS takes its per-level sizes from the strides.
        fpn_channels: FPN width.
        score_threshold: minimum score of returned detections.
        detections_per_image: most detections per image.
        detector_kwargs: more keyword arguments for the torchvision class (e.g. Faster R-CNN's
            ``rpn_post_nms_top_n_test``: 1000 proposals per image is far more than small images need, and
            the box head's cost grows with it).
    """
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    family = family.lower()
    if family not in TORCHVISION_FAMILIES:
        raise ValueError(
            f"unknown torchvision detector family {family!r}; choose one of {TORCHVISION_FAMILIES}"
        )
    if getattr(backbone, "dense", False):
        raise ValueError(
            f"{family} needs a pyramid encoder (ResNet, timm, torchvision); {type(backbone).__name__} is a "
            "dense network: use family='centernet'"
        )
    common = dict(min_size=min_size, max_size=max_size, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
    if family == "fasterrcnn":
        body = FPNBackbone(backbone, min_stride=4, channels=fpn_channels, extra="pool")
        base = anchor_size or 32
        sizes = tuple((base * 2**k,) for k in range(len(body.names)))
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        roi_pool = MultiScaleRoIAlign(featmap_names=body.names[:-1], output_size=7, sampling_ratio=2)
        return FasterRCNN(
            body,
            num_classes=num_classes + 1,
            rpn_anchor_generator=anchors,
            box_roi_pool=roi_pool,
            box_score_thresh=score_threshold,
            box_detections_per_img=detections_per_image,
            **common,
        )
    body = FPNBackbone(backbone, min_stride=8, channels=fpn_channels, extra="p6p7")
    if family == "retinanet":
        base = anchor_size or 32
        sizes = tuple(
            tuple(round(base * 2**k * 2 ** (s / 3)) for s in range(3)) for k in range(len(body.names))
        )
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        return RetinaNet(
            body,
            num_classes=num_classes,
            anchor_generator=anchors,
            score_thresh=score_threshold,
            detections_per_img=detections_per_image,
            **common,
        )
    if fpn_channels % 32:
        raise ValueError(
            f"fcos: fpn_channels must be a multiple of 32 (torchvision's FCOS head uses GroupNorm(32, C)), "
            f"got {fpn_channels}"
        )
    # FCOS reads each level's anchor size as its stride to assign objects to levels by size.
    anchors = AnchorGenerator(tuple((s,) for s in body.strides), ((1.0,),) * len(body.strides))
    return FCOS(
        body,
        num_classes=num_classes,
        anchor_generator=anchors,
        score_thresh=score_threshold,
        detections_per_img=detections_per_image,
        **common,
    )


# ------------------------------------------------------------------------------------ export graphs
class CenterNetGraph(nn.Module):
    """``images -> (boxes, scores, labels)`` of a CenterNet :class:`~lightning_convnets.ObjectDetector`.

    The decoding of :func:`lightning_convnets.nn.centernet.decode_detections` without the per-image
    threshold (a fixed ``top_k`` per image keeps the outputs rectangular): sigmoid, 3x3 max-pool peaks,
    top-K over classes and cells, centre + offset +- size / 2, times the stride, clipped to the image.
    """

    output_names = ("boxes", "scores", "labels")

    def __init__(self, detector: nn.Module, stride: int, top_k: int) -> None:
        super().__init__()
        self.detector = detector
        self.stride = int(stride)
        self.top_k = int(top_k)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.detector(images)[-1]
        heatmap, size, offset = out["heatmap"], out["size"], out["offset"]
        batch, _, height, width = heatmap.shape
        prob = torch.sigmoid(heatmap.float())
        peaks = prob * (F.max_pool2d(prob, 3, stride=1, padding=1) == prob).to(prob.dtype)
        scores, flat = peaks.reshape(batch, -1).topk(self.top_k, dim=1)
        cells = height * width
        labels = torch.div(flat, cells, rounding_mode="floor")
        cell = flat - labels * cells
        ys = torch.div(cell, width, rounding_mode="floor")
        xs = cell - ys * width
        index = cell.unsqueeze(1).expand(batch, 2, self.top_k)
        wh = size.float().reshape(batch, 2, -1).gather(2, index)
        off = offset.float().reshape(batch, 2, -1).gather(2, index)
        cx = xs.to(prob.dtype) + off[:, 0]
        cy = ys.to(prob.dtype) + off[:, 1]
        half_w = wh[:, 0].clamp(min=0) / 2
        half_h = wh[:, 1].clamp(min=0) / 2
        boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1) * self.stride
        # Clip to the image (its height and width may be symbolic: no Python float of them).
        x = boxes[..., 0::2].clamp(min=0)
        y = boxes[..., 1::2].clamp(min=0)
        x = torch.minimum(x, torch.ones_like(x) * images.shape[-1])
        y = torch.minimum(y, torch.ones_like(y) * images.shape[-2])
        boxes = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)
        return boxes, scores, labels


class TorchvisionGraph(nn.Module):
    """``images -> (boxes, scores, labels)`` lists of a torchvision detector (0-based labels); torch.export
    only (its data-dependent post-processing has no ONNX path)."""

    output_names = ("detections",)
    onnx_exportable = False

    def __init__(self, detector: nn.Module, label_shift: int) -> None:
        super().__init__()
        self.detector = detector
        self.label_shift = label_shift

    def forward(self, images: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        detections = self.detector(list(images.unbind(0)))
        return [(d["boxes"], d["scores"], d["labels"] - self.label_shift) for d in detections]


# ------------------------------------------------------------------------------- the detector interface
def clean_target(target: Mapping[str, Tensor], drop_empty: bool = True) -> dict[str, Tensor]:
    """``boxes`` ``[K, 4]`` float, ``labels`` ``[K]`` int64 (and ``iscrowd``), without the zero-area
    boxes unless ``drop_empty=False`` (finding them is a host sync on an accelerator).

    Example:
        >>> t = clean_target({"boxes": torch.tensor([[0.0, 0, 4, 4], [2.0, 2, 2, 5]]), "labels": torch.tensor([1, 2])})
        >>> t["labels"].tolist()
        [1]
    """
    boxes = target["boxes"].reshape(-1, 4).float()
    labels = target["labels"].reshape(-1).long()
    crowd = target["iscrowd"].reshape(-1) if "iscrowd" in target else None
    if drop_empty:
        # Zero-area boxes carry no object (and torchvision's losses refuse them).
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not bool(keep.all()):  # the usual case: no copy (a boolean index syncs with the device anyway)
            boxes, labels = boxes[keep], labels[keep]
            crowd = None if crowd is None else crowd[keep]
    out = {"boxes": boxes, "labels": labels}
    if crowd is not None:
        out["iscrowd"] = crowd
    return out


class DetectorFamily:
    """How a detection task drives one family of networks: torchvision's detector protocol (loss parts in
    training, detections in eval) for every family, with 0-based labels and no background class.

    The network is passed to every call (the task may swap in a BatchNorm-folded copy for ``predict``).

    Attributes:
        computes_eval_loss: whether :meth:`evaluate` gives a loss (else validation logs metrics only).
        size_divisor: images are padded to a multiple of this (set by :meth:`build`).
    """

    computes_eval_loss = False
    size_divisor = 1

    @property
    def default_monitor(self) -> str:
        """The metric a ``ReduceLROnPlateau`` scheduler watches: ``val/loss`` where the family computes a
        validation loss, else ``val/map``."""
        return "val/loss" if self.computes_eval_loss else "val/map"

    def build(self, backbone: nn.Module, num_classes: int) -> nn.Module:
        """The network over ``backbone`` for ``num_classes`` object classes."""
        raise NotImplementedError

    def losses(
        self, network: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, parts)`` of a training batch (the network in train mode)."""
        raise NotImplementedError

    def detect(self, network: nn.Module, images: Sequence[Tensor]) -> Detections:
        """Detections per image (``boxes`` xyxy input pixels, ``scores``, 0-based ``labels``; eval mode)."""
        raise NotImplementedError

    def evaluate(
        self, network: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[Tensor | None, Detections]:
        """``(loss or None, detections)`` of a validation or test batch (eval mode)."""
        return None, self.detect(network, images)

    def export_graph(self, network: nn.Module) -> nn.Module:
        """``images -> detections`` as one traceable module (:mod:`lightning_convnets.predict.export`)."""
        raise NotImplementedError


class CenterNetFamily(DetectorFamily):
    """CenterNet (:class:`CenterNet`) in the detector protocol: targets encoded as heatmaps, the loss summed
    over the stacks (intermediate supervision), peaks decoded into boxes.

    Args:
        head_channels, neck_channels: see :class:`CenterNet`.
        size_weight, offset_weight: weights of the size and offset losses.
        min_overlap: IoU of the CornerNet radius rule for the Gaussian splats.
        top_k: peaks kept per image.
        score_threshold: lowest score returned.
        size_divisor: pad images to a multiple of this; ``None``: the backbone's requirement (``multiple``)
            and the coarsest strides of backbone and network.

    Example:
        >>> from lightning_convnets.nn.heads import ClassificationHead  # any module of the contract works
        >>> family = CenterNetFamily(head_channels=8, neck_channels=8)
        >>> family.computes_eval_loss, family.default_monitor
        (True, 'val/loss')
    """

    computes_eval_loss = True

    def __init__(
        self,
        head_channels: int = 64,
        neck_channels: int = 64,
        size_weight: float = 0.1,
        offset_weight: float = 1.0,
        min_overlap: float = 0.3,
        top_k: int = 100,
        score_threshold: float = 0.05,
        size_divisor: int | None = None,
        **_ignored: Any,
    ) -> None:
        self.head_channels, self.neck_channels = head_channels, neck_channels
        self.size_weight, self.offset_weight, self.min_overlap = size_weight, offset_weight, min_overlap
        self.top_k, self.score_threshold = top_k, score_threshold
        self.requested_divisor = size_divisor

    def build(self, backbone: nn.Module, num_classes: int) -> nn.Module:
        network = CenterNet(
            backbone, num_classes, head_channels=self.head_channels, neck_channels=self.neck_channels
        )
        needs = [network.stride, max(backbone.reductions)]
        multiple = getattr(backbone, "multiple", None)
        if isinstance(multiple, int) and multiple > 0:
            needs.append(multiple)
        self.size_divisor = int(self.requested_divisor or math.lcm(*needs))
        return network

    def _decode(self, output: dict[str, Tensor], network: nn.Module, images: Sequence[Tensor]) -> Detections:
        return decode_detections(
            output["heatmap"],
            output["size"],
            output["offset"],
            stride=network.stride,
            top_k=self.top_k,
            score_threshold=self.score_threshold,
            image_sizes=[tuple(im.shape[-2:]) for im in images],
        )

    def _run(
        self, network: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]], decode: bool
    ) -> tuple[Tensor, dict[str, Tensor], Detections | None]:
        outputs = network(batch_images(images, self.size_divisor))
        last = outputs[-1]["heatmap"]
        encoded = encode_targets(
            [t["boxes"] for t in targets],
            [t["labels"] for t in targets],
            network.num_classes,
            tuple(last.shape[-2:]),
            stride=network.stride,
            min_overlap=self.min_overlap,
            device=last.device,
            check_labels=not network.training,  # no host read on a training step
        )
        # Intermediate supervision: every stack is trained on the same targets, losses summed.
        per_stack = [centernet_loss(o, encoded, self.size_weight, self.offset_weight) for o in outputs]
        parts = {key: torch.stack([p[key] for p in per_stack]).sum() for key in per_stack[0]}
        detections = self._decode(outputs[-1], network, images) if decode else None
        return parts.pop("loss"), parts, detections

    def losses(
        self, network: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        loss, parts, _ = self._run(network, images, targets, decode=False)
        return loss, parts

    def evaluate(
        self, network: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[Tensor | None, Detections]:
        loss, _, detections = self._run(network, images, targets, decode=True)
        return loss, detections or []

    def detect(self, network: nn.Module, images: Sequence[Tensor]) -> Detections:
        return self._decode(network(batch_images(images, self.size_divisor))[-1], network, images)

    def export_graph(self, network: nn.Module) -> nn.Module:
        return CenterNetGraph(network, network.stride, self.top_k)


class TorchvisionFamily(DetectorFamily):
    """torchvision's Faster R-CNN, RetinaNet or FCOS (:func:`build_torchvision_detector`) with 0-based labels
    (Faster R-CNN's background class is added and removed here).

    Args:
        family: ``"fasterrcnn"``, ``"retinanet"`` or ``"fcos"``.
        min_size, max_size, anchor_size, fpn_channels, score_threshold, detector_kwargs: see
            :func:`build_torchvision_detector`.
        top_k: detections per image.

    Example:
        >>> TorchvisionFamily("fasterrcnn").label_shift, TorchvisionFamily("fcos").default_monitor
        (1, 'val/map')
    """

    def __init__(
        self,
        family: str,
        min_size: int = 800,
        max_size: int = 1333,
        anchor_size: int | None = None,
        fpn_channels: int = 256,
        score_threshold: float = 0.05,
        top_k: int = 100,
        detector_kwargs: dict[str, Any] | None = None,
        **_ignored: Any,
    ) -> None:
        if family not in TORCHVISION_FAMILIES:
            raise ValueError(
                f"unknown torchvision detector family {family!r}; choose one of {TORCHVISION_FAMILIES}"
            )
        self.family = family
        self.label_shift = 1 if family == "fasterrcnn" else 0  # Faster R-CNN's class 0 is background
        self.options = dict(
            min_size=min_size,
            max_size=max_size,
            anchor_size=anchor_size,
            fpn_channels=fpn_channels,
            score_threshold=score_threshold,
            detections_per_image=top_k,
            detector_kwargs=detector_kwargs,
        )

    def build(self, backbone: nn.Module, num_classes: int) -> nn.Module:
        return build_torchvision_detector(self.family, backbone, num_classes, **self.options)

    def _shifted(self, targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        return [{"boxes": t["boxes"], "labels": t["labels"] + self.label_shift} for t in targets]

    def losses(
        self, network: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        try:
            parts = network(images, self._shifted(targets))
        except (AssertionError, ValueError):
            # torchvision refuses zero-area boxes (its own check, a host read it makes anyway): drop them
            # and go again; training targets are not cleaned beforehand, which would be one more read
            cleaned = [clean_target(t) for t in targets]
            if all(len(c["boxes"]) == len(t["boxes"]) for c, t in zip(cleaned, targets)):
                raise
            parts = network(images, self._shifted(cleaned))
        return torch.stack(list(parts.values())).sum(), parts

    def from_torchvision(self, detections: Detections) -> Detections:
        """torchvision's detections with 0-based labels (int64)."""
        return [
            {"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"].long() - self.label_shift}
            for d in detections
        ]

    def detect(self, network: nn.Module, images: Sequence[Tensor]) -> Detections:
        return self.from_torchvision(network(list(images)))

    def export_graph(self, network: nn.Module) -> nn.Module:
        return TorchvisionGraph(network, self.label_shift)


#: Detector families by name (``ObjectDetector(family=...)``).
DETECTOR_FAMILIES: dict[str, Any] = {
    "centernet": CenterNetFamily,
    **{name: functools.partial(TorchvisionFamily, name) for name in TORCHVISION_FAMILIES},
}


def detector_family(name: str, **options: Any) -> DetectorFamily:
    """The :class:`DetectorFamily` called ``name`` (see :data:`DETECTOR_FAMILIES`) with ``options`` (each
    family takes the ones it knows).

    Example:
        >>> type(detector_family("retinanet", top_k=50)).__name__
        'TorchvisionFamily'
    """
    if name not in DETECTOR_FAMILIES:
        raise ValueError(f"detector family must be one of {tuple(DETECTOR_FAMILIES)}, got {name!r}")
    return DETECTOR_FAMILIES[name](**options)
