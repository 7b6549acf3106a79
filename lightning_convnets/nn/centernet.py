"""CenterNet pieces ("Objects as Points", Zhou, Wang and Krähenbühl, 2019): targets, loss, decoding.

Start with :func:`encode_targets`, :func:`centernet_loss` and :func:`decode_detections`. The target
rules (Gaussian splats, sizes in grid units, conventions) are in ``docs/centernet.md``.

Example:
    >>> import torch
    >>> boxes = [torch.tensor([[8.0, 8.0, 24.0, 40.0]])]
    >>> labels = [torch.tensor([1])]
    >>> t = encode_targets(boxes, labels, num_classes=2, output_size=(16, 16), stride=4)
    >>> float(t.heatmap[0, 1, 6, 4])  # the centre (16, 24) px lands on cell (x=4, y=6)
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CenterNetHead",
    "CenterNetTargets",
    "centernet_loss",
    "decode_detections",
    "dense_targets",
    "encode_targets",
    "focal_loss",
    "gaussian_radius",
    "regression_l1",
]

# sigmoid(-2.19) ~= 0.1: the paper's prior so the first focal-loss steps are not swamped by background.
HEATMAP_PRIOR_BIAS = -2.19


def gaussian_radius(height: Tensor, width: Tensor, min_overlap: float = 0.3) -> Tensor:
    """Largest corner displacement that keeps IoU >= ``min_overlap`` with the true box (CornerNet rule).

    Law and Deng (CornerNet, 2018) bound the radius by three cases: one corner inside and one outside the
    box, both corners inside (a shrunk box), both outside (a grown box). Each gives a quadratic in ``r``;
    the radius is the smallest of the three roots. This is the exact form of the rule with the paper's
    IoU of 0.3. The widely copied reference code writes 0.7 but slips in the quadratic formula's
    constants; its radii come out about 1.2x the exact 0.3 ones (e.g. 5.5 vs 4.5 cells for a 20x20 box),
    whereas the exact rule at 0.7 would give near-spikes (1.6 cells) that train poorly.

    Args:
        height: box heights (any shape), in the grid units the heatmap uses.
        width: box widths, same shape.
        min_overlap: IoU a box with corners moved by ``r`` must still reach.

    Returns:
        Non-negative radii (float), same shape as ``height``.
    """
    h, w, o = height.float(), width.float(), float(min_overlap)
    s = h + w
    # One corner in, one out: (h - r)(w - r) / (2hw - (h - r)(w - r)) >= o.
    c1 = h * w * (1 - o) / (1 + o)
    r1 = (s - torch.sqrt((s * s - 4 * c1).clamp(min=0))) / 2
    # Both inside: (h - 2r)(w - 2r) >= o hw.
    r2 = (2 * s - torch.sqrt((4 * s * s - 16 * (1 - o) * h * w).clamp(min=0))) / 8
    # Both outside: hw >= o (h + 2r)(w + 2r).
    r3 = (-2 * o * s + torch.sqrt((4 * o * o * s * s + 16 * o * (1 - o) * h * w).clamp(min=0))) / (8 * o)
    return torch.minimum(torch.minimum(r1, r2), r3).clamp(min=0)


@dataclass
class CenterNetTargets:
    """Training targets for one batch.

    Attributes:
        heatmap: ``[B, C, H, W]`` Gaussian splats, exactly 1 at each object's centre cell.
        size: ``[B, M, 2]`` box ``(width, height)`` in grid units, M = most boxes in an image of the batch.
        offset: ``[B, M, 2]`` sub-cell offset ``centre / stride - floor(centre / stride)`` in ``[0, 1)``.
        index: ``[B, M]`` flat index ``y * W + x`` of each centre cell.
        mask: ``[B, M]`` True for real boxes (padding and degenerate boxes are False).
    """

    heatmap: Tensor
    size: Tensor
    offset: Tensor
    index: Tensor
    mask: Tensor

    @property
    def num_objects(self) -> int:
        """Real boxes in the batch (a host sync: use it in tests and logs, not in the hot path)."""
        return int(self.mask.sum())


def _pad_boxes(
    boxes: Sequence[Tensor], labels: Sequence[Tensor], device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Stack ragged per-image boxes into ``[B, M, 4]`` / ``[B, M]`` plus a validity mask."""
    if len(boxes) != len(labels):
        raise ValueError(f"got boxes for {len(boxes)} images but labels for {len(labels)}")
    batch = len(boxes)
    most = max([int(b.shape[0]) for b in boxes] + [1])
    padded = torch.zeros(batch, most, 4, device=device)
    padded_labels = torch.zeros(batch, most, dtype=torch.long, device=device)
    valid = torch.zeros(batch, most, dtype=torch.bool, device=device)
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        n = int(b.shape[0])
        if b.ndim != 2 or b.shape[-1] != 4:
            raise ValueError(f"boxes of image {i} must have shape [K, 4] (xyxy), got {tuple(b.shape)}")
        if lab.shape != (n,):
            raise ValueError(f"labels of image {i} must have shape [{n}], got {tuple(lab.shape)}")
        padded[i, :n] = b.to(device=device, dtype=torch.float32)
        padded_labels[i, :n] = lab.to(device=device, dtype=torch.long)
        valid[i, :n] = True
    return padded, padded_labels, valid


def encode_targets(
    boxes: Sequence[Tensor],
    labels: Sequence[Tensor],
    num_classes: int,
    output_size: tuple[int, int],
    stride: float = 4.0,
    min_overlap: float = 0.3,
    device: torch.device | str | None = None,
    check_labels: bool = True,
) -> CenterNetTargets:
    """Encode per-image boxes into CenterNet targets on an ``output_size`` grid.

    Boxes are clipped to the input extent ``output_size * stride``; boxes left with no width or height
    are dropped (``mask`` False). Each box splats a Gaussian of standard deviation ``(2r + 1) / 6``
    (``r`` from :func:`gaussian_radius` on the box size in grid units) centred on its integer centre
    cell; overlapping splats of one class keep the maximum.

    Args:
        boxes: per image a ``[K, 4]`` float tensor, ``xyxy`` in input pixels (K may be 0).
        labels: per image a ``[K]`` int tensor of 0-based class indices.
        num_classes: heatmap channels.
        output_size: ``(H, W)`` of the head's output grid.
        stride: input pixels per grid cell.
        min_overlap: IoU for the radius rule.
        device: where to build the targets (default: the first boxes tensor's device).
        check_labels: check that every label lies in ``[0, num_classes)`` (two reads on the host; a
            training step skips it, as its labels were checked by validation's sanity pass and the data
            module, and an out-of-range label still fails the heatmap's scatter).

    Raises:
        ValueError: for malformed shapes or (with ``check_labels``) a label outside ``[0, num_classes)``.
    """
    height, width = int(output_size[0]), int(output_size[1])
    if device is None:
        device = boxes[0].device if len(boxes) else torch.device("cpu")
    padded, cls, valid = _pad_boxes(boxes, labels, torch.device(device))
    if check_labels and valid.any():
        bad = valid & ((cls < 0) | (cls >= num_classes))
        if bad.any():
            raise ValueError(
                f"labels must be 0-based class indices in [0, {num_classes}); got "
                f"{sorted(set(cls[bad].tolist()))}"
            )
    batch, most = cls.shape

    grid = padded / stride
    grid[..., 0::2] = grid[..., 0::2].clamp(0, width)
    grid[..., 1::2] = grid[..., 1::2].clamp(0, height)
    box_w = grid[..., 2] - grid[..., 0]
    box_h = grid[..., 3] - grid[..., 1]
    valid = valid & (box_w > 0) & (box_h > 0)

    centre = torch.stack([(grid[..., 0] + grid[..., 2]) / 2, (grid[..., 1] + grid[..., 3]) / 2], dim=-1)
    # A box touching the right/bottom edge has its centre < W, but clamp for the float edge case.
    cell = centre.floor()
    cell[..., 0] = cell[..., 0].clamp(0, width - 1)
    cell[..., 1] = cell[..., 1].clamp(0, height - 1)
    offset = centre - cell
    index = (cell[..., 1] * width + cell[..., 0]).long()

    radius = gaussian_radius(box_h, box_w, min_overlap).floor()
    sigma = (2 * radius + 1) / 6
    ys = torch.arange(height, device=device, dtype=torch.float32)
    xs = torch.arange(width, device=device, dtype=torch.float32)
    dy = ys.view(1, 1, height, 1) - cell[..., 1].view(batch, most, 1, 1)
    dx = xs.view(1, 1, 1, width) - cell[..., 0].view(batch, most, 1, 1)
    two_var = (2 * sigma * sigma).view(batch, most, 1, 1)
    splat = torch.exp(-(dx * dx + dy * dy) / two_var)
    # The splat is cut at the radius (a (2r+1)^2 window), as in the paper's reference drawing.
    r = radius.view(batch, most, 1, 1)
    splat = splat * ((dx.abs() <= r) & (dy.abs() <= r) & valid.view(batch, most, 1, 1))

    heatmap = torch.zeros(batch, num_classes, height * width, device=device)
    heatmap.scatter_reduce_(
        1,
        cls.view(batch, most, 1).expand(batch, most, height * width),
        splat.view(batch, most, height * width),
        reduce="amax",
    )
    size = torch.stack([box_w, box_h], dim=-1) * valid.unsqueeze(-1)
    return CenterNetTargets(
        heatmap=heatmap.view(batch, num_classes, height, width),
        size=size,
        offset=offset * valid.unsqueeze(-1),
        index=index * valid,
        mask=valid,
    )


def focal_loss(logits: Tensor, target: Tensor, alpha: float = 2.0, beta: float = 4.0) -> Tensor:
    """Penalty-reduced pixel-wise focal loss of CenterNet (CornerNet's variant of Lin et al.'s loss).

    ``-1/N * sum( (1-p)^alpha log p          where y == 1
                  (1-y)^beta p^alpha log(1-p) elsewhere )``

    with ``N`` the number of centre cells (``y == 1``) in the whole batch, at least 1 so that a batch
    of empty images still gets a (background-only) loss.

    Args:
        logits: ``[B, C, H, W]`` heatmap logits.
        target: ``[B, C, H, W]`` splatted targets in ``[0, 1]``.
        alpha: focusing exponent on the prediction.
        beta: penalty reduction exponent on ``1 - y`` near a centre.

    Returns:
        A scalar tensor.
    """
    if logits.shape != target.shape:
        raise ValueError(f"heatmap logits {tuple(logits.shape)} and targets {tuple(target.shape)} differ")
    logits = logits.float()
    prob = torch.sigmoid(logits)
    # logsigmoid keeps log p and log(1-p) finite where the sigmoid saturates.
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    positive = target.eq(1).float()
    pos_term = (1 - prob).pow(alpha) * log_p * positive
    neg_term = (1 - target).pow(beta) * prob.pow(alpha) * log_not_p * (1 - positive)
    num_pos = positive.sum().clamp(min=1)
    return -(pos_term.sum() + neg_term.sum()) / num_pos


def _gather(dense: Tensor, index: Tensor) -> Tensor:
    """Values of ``dense [B, D, H, W]`` at flat indices ``index [B, M]`` as ``[B, M, D]``."""
    batch, depth = dense.shape[:2]
    flat = dense.reshape(batch, depth, -1)
    return flat.gather(2, index.unsqueeze(1).expand(batch, depth, index.shape[1])).transpose(1, 2)


def regression_l1(prediction: Tensor, target: Tensor, index: Tensor, mask: Tensor) -> Tensor:
    """L1 loss of a 2-channel dense map read at the object centres, averaged over objects.

    Args:
        prediction: ``[B, 2, H, W]`` dense regression map.
        target: ``[B, M, 2]`` targets per object.
        index: ``[B, M]`` flat centre indices.
        mask: ``[B, M]`` real objects.
    """
    picked = _gather(prediction.float(), index)
    weight = mask.unsqueeze(-1).float()
    return (torch.abs(picked - target) * weight).sum() / mask.sum().clamp(min=1)


def centernet_loss(
    outputs: dict[str, Tensor],
    targets: CenterNetTargets,
    size_weight: float = 0.1,
    offset_weight: float = 1.0,
    alpha: float = 2.0,
    beta: float = 4.0,
) -> dict[str, Tensor]:
    """The paper's ``L = L_k + lambda_size L_size + lambda_off L_off`` for one set of head outputs.

    Returns:
        ``{"loss", "heatmap", "size", "offset"}`` (the total and its unweighted parts).
    """
    heat = focal_loss(outputs["heatmap"], targets.heatmap, alpha, beta)
    size = regression_l1(outputs["size"], targets.size, targets.index, targets.mask)
    offset = regression_l1(outputs["offset"], targets.offset, targets.index, targets.mask)
    total = heat + size_weight * size + offset_weight * offset
    return {"loss": total, "heatmap": heat, "size": size, "offset": offset}


class CenterNetHead(nn.Module):
    """The three CenterNet output branches, each ``3x3 conv -> ReLU -> 1x1 conv``.

    Args:
        in_channels: channels of the stride-4 feature map.
        num_classes: heatmap channels (one per class, no background).
        head_channels: hidden channels of each branch (256 in the paper; small models do with less).

    Example:
        >>> import torch
        >>> head = CenterNetHead(16, num_classes=3, head_channels=8)
        >>> {k: tuple(v.shape) for k, v in head(torch.zeros(1, 16, 8, 8)).items()}
        {'heatmap': (1, 3, 8, 8), 'size': (1, 2, 8, 8), 'offset': (1, 2, 8, 8)}
    """

    def __init__(self, in_channels: int, num_classes: int, head_channels: int = 64) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.heatmap = self._branch(in_channels, head_channels, num_classes)
        self.size = self._branch(in_channels, head_channels, 2)
        self.offset = self._branch(in_channels, head_channels, 2)
        nn.init.constant_(self.heatmap[-1].bias, HEATMAP_PRIOR_BIAS)
        for branch in (self.size, self.offset):
            nn.init.zeros_(branch[-1].bias)

    @staticmethod
    def _branch(in_channels: int, hidden: int, out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out, 1),
        )

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        return {
            "heatmap": self.heatmap(features),
            "size": self.size(features),
            "offset": self.offset(features),
        }


def decode_detections(
    heatmap: Tensor,
    size: Tensor,
    offset: Tensor,
    stride: float = 4.0,
    top_k: int = 100,
    score_threshold: float = 0.05,
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[dict[str, Tensor]]:
    """Turn head outputs into boxes: 3x3 max-pool peaks, top-K over classes and cells, threshold.

    The max-pool keeps a cell only where it equals its 3x3 neighbourhood maximum, which replaces NMS.
    All of it runs batched; the only loop is over images to drop the below-threshold entries.

    Args:
        heatmap: ``[B, C, H, W]`` logits.
        size: ``[B, 2, H, W]`` ``(width, height)`` in grid units.
        offset: ``[B, 2, H, W]`` sub-cell offsets.
        stride: input pixels per grid cell.
        top_k: candidates per image before the threshold.
        score_threshold: minimum sigmoid score kept.
        image_sizes: optional per-image ``(height, width)`` in input pixels to clip boxes to.

    Returns:
        Per image a dict with ``boxes [N, 4]`` (``xyxy`` input pixels), ``scores [N]``, ``labels [N]``
        (int64, 0-based), sorted by decreasing score.
    """
    batch, classes, height, width = heatmap.shape
    prob = torch.sigmoid(heatmap.float())
    peaks = prob * (F.max_pool2d(prob, 3, stride=1, padding=1) == prob)
    k = min(top_k, classes * height * width)
    scores, flat = peaks.reshape(batch, -1).topk(k, dim=1)  # any memory format (channels-last heads)
    labels = flat // (height * width)
    cell = flat % (height * width)
    ys = (cell // width).float()
    xs = (cell % width).float()
    wh = _gather(size.float(), cell)
    off = _gather(offset.float(), cell)
    cx = xs + off[..., 0]
    cy = ys + off[..., 1]
    half_w = wh[..., 0].clamp(min=0) / 2
    half_h = wh[..., 1].clamp(min=0) / 2
    boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1) * stride
    if image_sizes is not None:
        limits = torch.tensor([[w, h, w, h] for h, w in image_sizes], device=boxes.device, dtype=boxes.dtype)
        boxes = torch.minimum(boxes.clamp(min=0), limits.unsqueeze(1))
    keep = scores >= score_threshold
    return [
        {"boxes": boxes[i][keep[i]], "scores": scores[i][keep[i]], "labels": labels[i][keep[i]]}
        for i in range(batch)
    ]


def dense_targets(targets: CenterNetTargets) -> dict[str, Tensor]:
    """Scatter the per-object size/offset targets back onto dense maps (the ideal head output).

    Used to check that decoding inverts encoding; also handy to visualise targets.
    """
    batch, _, height, width = targets.heatmap.shape
    b, m = targets.mask.nonzero(as_tuple=True)
    cells = targets.index[b, m]
    out = {}
    for key in ("size", "offset"):
        dense = torch.zeros(batch, 2, height * width, device=targets.heatmap.device)
        dense[b, :, cells] = getattr(targets, key)[b, m]
        out[key] = dense.view(batch, 2, height, width)
    return out
