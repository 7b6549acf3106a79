"""Detection networks built on any backbone of the contract: CenterNet and torchvision's FPN detectors.

* :class:`CenterNet` puts :class:`~lightning_convnets.nn.centernet.CenterNetHead` s on a stride-4 map:
  every stack of a stacked hourglass (intermediate supervision), the dense map of a same-padding U-Net
  (average-pooled to stride 4), or the output of an :class:`UpsamplingNeck` over a pyramid encoder.
* :func:`build_torchvision_detector` wraps a pyramid backbone in :class:`FPNBackbone` and hands it to
  torchvision's Faster R-CNN, RetinaNet or FCOS.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_convnets.nn.centernet import CenterNetHead

__all__ = [
    "TORCHVISION_FAMILIES",
    "CenterNet",
    "FPNBackbone",
    "UpsamplingNeck",
    "batch_images",
    "build_torchvision_detector",
]

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
