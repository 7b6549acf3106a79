"""Box operations on detection sets: class-wise merging (NMS or weighted box fusion) and flips.

Shared by tiled detection (:mod:`lightning_convnets.predict.tiling`: tiles of one image) and test-time
augmentation (:mod:`lightning_convnets.predict.tta`: views of one image). Boxes are ``xyxy`` pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["MergeMethod", "flip_boxes", "merge_detections", "weighted_box_fusion"]

MergeMethod = Literal["nms", "wbf"]


def flip_boxes(boxes: Tensor, size: tuple[int, int], hflip: bool, vflip: bool) -> Tensor:
    """``xyxy`` boxes of an image of ``size`` ``(h, w)`` mirrored as the image is (a flip is its own
    inverse: this maps boxes of a flipped image back too).

    Example:
        >>> flip_boxes(torch.tensor([[0.0, 2, 5, 9]]), (20, 30), True, False).tolist()
        [[25.0, 2.0, 30.0, 9.0]]
    """
    h, w = size
    out = boxes.clone()
    if hflip:
        out[:, 0], out[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    if vflip:
        out[:, 1], out[:, 3] = h - boxes[:, 3], h - boxes[:, 1]
    return out


def weighted_box_fusion(
    boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float = 0.55, num_sources: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted box fusion (Solovyev et al. 2019), class-wise.

    Boxes are visited by decreasing score; each joins the first cluster of its class whose fused box
    overlaps it by more than ``iou_threshold``, else starts one. A cluster's box is the score-weighted mean
    of its members; its score the members' summed score divided by ``max(members, num_sources)`` (with
    ``num_sources`` views, e.g. TTA transforms, a box seen by few of them is down-weighted).

    Example:
        >>> b = torch.tensor([[0.0, 0, 10, 10], [1.0, 0, 11, 10], [50.0, 50, 60, 60]])
        >>> fused, s, l = weighted_box_fusion(b, torch.tensor([0.9, 0.3, 0.5]), torch.tensor([0, 0, 0]))
        >>> fused.tolist(), [round(v, 2) for v in s.tolist()]
        ([[0.25, 0.0, 10.25, 10.0], [50.0, 50.0, 60.0, 60.0]], [0.6, 0.5])
    """
    from torchvision.ops import box_iou

    out_boxes, out_scores, out_labels = [], [], []
    for cls in labels.unique().tolist():
        sel = (labels == cls).nonzero().flatten()
        sel = sel[scores[sel].argsort(descending=True)]
        fused: list[Tensor] = []
        members: list[list[int]] = []
        for i in sel.tolist():
            if fused:
                iou = box_iou(boxes[i : i + 1], torch.stack(fused))[0]
                j = int(iou.argmax())
                if float(iou[j]) > iou_threshold:
                    members[j].append(i)
                    m = torch.tensor(members[j], device=boxes.device)
                    wgt = scores[m][:, None]
                    fused[j] = (boxes[m] * wgt).sum(0) / wgt.sum()
                    continue
            fused.append(boxes[i].clone())
            members.append([i])
        for box, group in zip(fused, members):
            out_boxes.append(box)
            out_scores.append(scores[group].sum() / max(len(group), num_sources))
            out_labels.append(labels[group[0]])
    if not out_boxes:
        return boxes[:0], scores[:0], labels[:0]
    scores_t = torch.stack(out_scores)
    order = scores_t.argsort(descending=True)
    return torch.stack(out_boxes)[order], scores_t[order], torch.stack(out_labels)[order]


def merge_detections(
    detections: Sequence[dict[str, Tensor]],
    method: MergeMethod = "nms",
    iou_threshold: float = 0.5,
    num_sources: int = 1,
    max_detections: int | None = None,
) -> dict[str, Tensor]:
    """Merge several detection sets of one image (tiles, TTA views) into one, class-wise.

    Args:
        detections: dicts with ``boxes`` ``[K, 4]`` xyxy, ``scores`` ``[K]``, ``labels`` ``[K]`` in one
            coordinate frame.
        method: ``"nms"`` (keep the best of overlapping boxes of a class) or ``"wbf"``
            (:func:`weighted_box_fusion`).
        iou_threshold: overlap above which two boxes of a class are the same object.
        num_sources: number of views for WBF's score (1 for tiles).
        max_detections: keep the best this many (``None``: all).

    Example:
        >>> a = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "scores": torch.tensor([0.9]),
        ...      "labels": torch.tensor([1])}
        >>> b = {"boxes": torch.tensor([[1.0, 0, 10, 10]]), "scores": torch.tensor([0.8]),
        ...      "labels": torch.tensor([1])}
        >>> merge_detections([a, b])["scores"].tolist()
        [0.8999999761581421]
    """
    from torchvision.ops import batched_nms

    if method not in ("nms", "wbf"):
        raise ValueError(f"merge method must be 'nms' or 'wbf', got {method!r}")
    if not detections:
        raise ValueError("merge_detections got no detection sets")
    boxes = torch.cat([d["boxes"].reshape(-1, 4).float() for d in detections])
    scores = torch.cat([d["scores"].reshape(-1).float() for d in detections])
    labels = torch.cat([d["labels"].reshape(-1).long() for d in detections])
    if method == "nms":
        keep = batched_nms(boxes, scores, labels, iou_threshold)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    else:
        boxes, scores, labels = weighted_box_fusion(boxes, scores, labels, iou_threshold, num_sources)
    if max_detections is not None:
        boxes, scores, labels = boxes[:max_detections], scores[:max_detections], labels[:max_detections]
    return {"boxes": boxes, "scores": scores, "labels": labels}
