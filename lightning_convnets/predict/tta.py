"""Test-time augmentation: predict on flipped (and rescaled) copies, undo each transform, average.

Owns the views (:class:`TTAConfig`, :func:`parse_tta`) and their merging per task kind; boxes are mapped
back and fused with :mod:`lightning_convnets.nn.boxes`.

``tta`` is ``"none"``, ``"flip"``, ``"flip+scales"`` or ``+``-joined tokens (``hflip``, ``vflip``,
``scales=0.5,1,2``). :func:`classify_tta` averages probabilities, :func:`segment_tta` logits mapped back,
:func:`detect_tta` boxes mapped back and fused. Details: ``docs/tiling.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_convnets.nn.boxes import flip_boxes, merge_detections

__all__ = [
    "DEFAULT_SCALES",
    "TTAConfig",
    "classify_tta",
    "detect_tta",
    "parse_tta",
    "segment_tta",
    "tta_logits",
]

DEFAULT_SCALES = (0.75, 1.0, 1.25)
Detections = list[dict[str, Tensor]]


@dataclass(frozen=True)
class TTAConfig:
    """Which views test-time augmentation predicts on.

    Attributes:
        hflip: add horizontally mirrored views.
        vflip: add vertically mirrored views (with ``hflip``, also both flips).
        scales: image scales (1.0 is the original size).

    Example:
        >>> parse_tta("flip+vflip").views()
        [(1.0, False, False), (1.0, True, False), (1.0, False, True), (1.0, True, True)]
    """

    hflip: bool = False
    vflip: bool = False
    scales: tuple[float, ...] = (1.0,)

    def views(self) -> list[tuple[float, bool, bool]]:
        """``(scale, hflip, vflip)`` of every view; the plain image first."""
        flips = [(False, False)]
        if self.hflip:
            flips.append((True, False))
        if self.vflip:
            flips.append((False, True))
        if self.hflip and self.vflip:
            flips.append((True, True))
        order = sorted(self.scales, key=lambda s: s != 1.0)  # scale 1 first
        return [(float(s), h, v) for s in order for h, v in flips]

    @property
    def is_identity(self) -> bool:
        return self.views() == [(1.0, False, False)]


def parse_tta(spec: str | TTAConfig | None) -> TTAConfig:
    """Turn a ``tta`` string (see the module docstring) into a :class:`TTAConfig`.

    Raises:
        ValueError: for an unknown token or a bad scale list, naming the option.

    Example:
        >>> parse_tta("flip+scales")
        TTAConfig(hflip=True, vflip=False, scales=(0.75, 1.0, 1.25))
    """
    if isinstance(spec, TTAConfig):
        return spec
    if spec is None:
        return TTAConfig()
    if not isinstance(spec, str):
        raise ValueError(f"tta must be a string such as 'none', 'flip', 'flip+scales', got {spec!r}")
    text = spec.strip().lower()
    if text in ("", "none"):
        return TTAConfig()
    hflip = vflip = False
    scales: tuple[float, ...] = (1.0,)
    for token in text.split("+"):
        token = token.strip()
        if token in ("flip", "hflip"):
            hflip = True
        elif token == "vflip":
            vflip = True
        elif token == "scales":
            scales = DEFAULT_SCALES
        elif token.startswith("scales="):
            try:
                scales = tuple(float(v) for v in token[len("scales=") :].split(",") if v.strip())
            except ValueError:
                raise ValueError(f"tta {spec!r}: scales must be numbers, e.g. 'scales=0.75,1,1.25'") from None
            if not scales or min(scales) <= 0:
                raise ValueError(f"tta {spec!r}: scales must be positive numbers")
        else:
            raise ValueError(
                f"tta {spec!r}: unknown part {token!r}; expected 'none', 'flip', 'flip+scales' or '+'-joined "
                "hflip, vflip, scales, scales=a,b,c"
            )
    return TTAConfig(hflip=hflip, vflip=vflip, scales=scales)


def _flip(x: Tensor, hflip: bool, vflip: bool) -> Tensor:
    dims = [d for d, on in ((-1, hflip), (-2, vflip)) if on]
    return x.flip(dims) if dims else x


def _scaled_size(size: int, scale: float, multiple: int) -> int:
    return max(multiple, round(size * scale / multiple) * multiple)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def segment_tta(
    dense: Callable[[Tensor], Tensor], images: Tensor, tta: str | TTAConfig = "flip", multiple: int = 1
) -> Tensor:
    """Mean logits ``(N, K, H, W)`` over the TTA views of ``images`` ``(N, C, H, W)``.

    Args:
        dense: images ``(N, C, h, w)`` to logits ``(N, K, h, w)`` (same size; e.g. a tiled predictor).
        images: the batch.
        tta: the views (see :func:`parse_tta`).
        multiple: rescaled sides are rounded to a multiple of this (the network's requirement).

    Example:
        >>> x = torch.rand(1, 2, 8, 8)
        >>> torch.equal(segment_tta(lambda t: t * 2, x, "flip+vflip"), x * 2)
        True
    """
    size = tuple(images.shape[-2:])
    config = parse_tta(tta)
    count = len(config.views())
    total: Tensor | None = None
    for x, hflip, vflip in _view_inputs(images, config, multiple):  # one rescaled view alive at a time
        logits = _flip(dense(_flip(x, hflip, vflip)), hflip, vflip)
        logits = _resize(logits.float(), size)
        total = logits if total is None else total + logits
    assert total is not None
    return total / count if count > 1 else total


def _view_inputs(images: Tensor, config: TTAConfig, multiple: int) -> Iterator[tuple[Tensor, bool, bool]]:
    """``(input at the view's scale, hflip, vflip)`` for every view (the flips are left to the caller)."""
    size = tuple(images.shape[-2:])
    for scale, hflip, vflip in config.views():
        x = images
        if scale != 1.0:
            x = _resize(x, (_scaled_size(size[0], scale, multiple), _scaled_size(size[1], scale, multiple)))
        yield x, hflip, vflip


@torch.no_grad()
def classify_tta(
    logits_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    tta: str | TTAConfig = "flip",
    multilabel: bool = False,
) -> Tensor:
    """Mean class probabilities ``(N, num_classes)`` over the TTA views (softmax, or sigmoid per class).

    Example:
        >>> f = lambda t: t.mean(dim=(2, 3))  # flip-invariant logits
        >>> x = torch.rand(2, 3, 8, 8)
        >>> torch.allclose(classify_tta(f, x, "flip"), torch.softmax(f(x), 1))
        True
    """
    config = parse_tta(tta)
    count = len(config.views())
    total: Tensor | None = None
    for x, hflip, vflip in _view_inputs(images, config, 1):
        logits = logits_fn(_flip(x, hflip, vflip)).float()
        probs = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
        total = probs if total is None else total + probs
    assert total is not None
    return total / count


def tta_logits(
    model: Callable[[Tensor], Tensor], images: Tensor, tta: str | TTAConfig, multilabel: bool = False
) -> Tensor:
    """A classifier's logits under test-time augmentation ``tta`` (what a classification task's test step
    scores).

    ``"none"``: the model's logits. Otherwise logits whose softmax (sigmoid in multi-label mode) is the
    mean of the views' probabilities (``log p``, resp. ``logit p``), so that the loss, the metrics and the
    confusion matrix read them exactly as they read plain logits.
    """
    config = parse_tta(tta)
    if config.is_identity:
        return model(images)
    probs = classify_tta(model, images, config, multilabel)
    if multilabel:
        return torch.logit(probs.clamp(1e-7, 1 - 1e-7))
    return probs.clamp_min(1e-12).log()


@torch.no_grad()
def detect_tta(
    detect_fn: Callable[[list[Tensor]], Detections],
    images: Sequence[Tensor],
    tta: str | TTAConfig = "flip",
    merge: str = "wbf",
    iou_threshold: float = 0.55,
    max_detections: int | None = None,
) -> Detections:
    """Detections per image merged over the TTA views, in the original image's pixel coordinates.

    Args:
        detect_fn: a list of ``[C, h, w]`` images to one dict (``boxes`` xyxy, ``scores``, ``labels``) each.
        images: the images (sizes may differ).
        tta: the views (see :func:`parse_tta`); ``"none"`` calls ``detect_fn`` once, unchanged.
        merge: ``"wbf"`` (weighted box fusion; a box found in few views is down-weighted) or ``"nms"``.
        iou_threshold: overlap above which two boxes of a class are one object.
        max_detections: keep the best this many per image.

    Example:
        >>> def toy(ims):  # a box around the nonzero pixels of channel 0
        ...     out = []
        ...     for im in ims:
        ...         ys, xs = im[0].nonzero(as_tuple=True)
        ...         box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()[None]
        ...         out.append({"boxes": box, "scores": torch.ones(1), "labels": torch.zeros(1).long()})
        ...     return out
        >>> im = torch.zeros(1, 20, 30); im[0, 2:5, 3:9] = 1
        >>> detect_tta(toy, [im], "flip+vflip")[0]["boxes"].tolist()
        [[3.0, 2.0, 9.0, 5.0]]
    """
    config = parse_tta(tta)
    images = list(images)
    if config.is_identity:
        return detect_fn(images)
    views = config.views()
    per_image: list[list[dict[str, Tensor]]] = [[] for _ in images]
    for scale, hflip, vflip in views:
        batch, sizes = [], []
        for im in images:
            x = im
            if scale != 1.0:
                h, w = im.shape[-2:]
                x = _resize(im[None], (_scaled_size(h, scale, 1), _scaled_size(w, scale, 1)))[0]
            sizes.append(tuple(x.shape[-2:]))
            batch.append(_flip(x, hflip, vflip))
        for k, det in enumerate(detect_fn(batch)):
            boxes = flip_boxes(det["boxes"].reshape(-1, 4).float(), sizes[k], hflip, vflip)
            h, w = images[k].shape[-2:]
            sh, sw = sizes[k]
            boxes = boxes * boxes.new_tensor([w / sw, h / sh, w / sw, h / sh])
            per_image[k].append({"boxes": boxes, "scores": det["scores"], "labels": det["labels"]})
    return [
        merge_detections(dets, merge, iou_threshold, num_sources=len(views), max_detections=max_detections)
        for dets in per_image
    ]
