"""The one place pictures are drawn: images for display, mask overlays, box overlays, one palette.

The tasks' sample figures (logged during validation and test) and the prediction writers' overlay
figures (written next to the predictions) both draw with these functions, so a class has the same colour
everywhere: :func:`class_colour`, taken from the PASCAL VOC colour map (:func:`palette`) that the mask
PNGs carry too. Like ``torchvision.utils.draw_segmentation_masks`` / ``draw_bounding_boxes``, the
functions take plain tensors and arrays and know nothing of tasks or trainers; matplotlib is imported
only when a figure is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "class_colour",
    "class_names",
    "display_images",
    "draw_boxes",
    "draw_mask",
    "palette",
    "plot_box_overlays",
    "plot_confusion_matrix",
    "plot_image_grid",
    "plot_mask_overlays",
    "save_figure",
    "show_image",
]

BoxRow = tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray] | None]
MaskRow = tuple[np.ndarray, np.ndarray | None, np.ndarray]


def palette(num_colours: int = 256) -> list[int]:
    """The PASCAL VOC colour map as a flat ``[r, g, b, r, g, b, ...]`` list (PIL's ``putpalette``).

    Bit-interleaved, so small indices get distinct, familiar colours: 0 black (background), 1 dark red,
    2 green...

    Example:
        >>> palette(3)
        [0, 0, 0, 128, 0, 0, 0, 128, 0]
    """
    colours = []
    for index in range(num_colours):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours += [r, g, b]
    return colours


_VOC = np.asarray(palette(256), dtype=np.float64).reshape(256, 3) / 255.0


def class_colour(label: int) -> tuple[float, float, float]:
    """The colour of class ``label`` (RGB in [0, 1]) in every figure: its VOC palette entry.

    Example:
        >>> class_colour(1)
        (0.5019607843137255, 0.0, 0.0)
    """
    r, g, b = _VOC[int(label) % 256]
    return float(r), float(g), float(b)


def class_names(names: Sequence[Any] | None, count: int) -> list[str]:
    """``names`` as strings when there are ``count`` of them, else the label numbers.

    Example:
        >>> class_names(["cat", "dog"], 2), class_names(["cat"], 2)
        (['cat', 'dog'], ['0', '1'])
    """
    if names is not None and len(names) == count:
        return [str(n) for n in names]
    return [str(i) for i in range(count)]


def display_images(
    images: Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None, rgb: bool = False
) -> Tensor:
    """Images ``(N, C, H, W)`` as displayable ``(N, H, W, C')`` floats in [0, 1].

    The normalisation ``(x - mean) / std`` is undone when both are given (and fit the channels), else each
    image is stretched to [0, 1] so that it is at least visible. The first three channels are kept (one for
    grayscale; ``rgb=True`` repeats it to three).

    Example:
        >>> display_images(torch.zeros(2, 1, 4, 4), mean=[0.5], std=[0.25]).shape
        torch.Size([2, 4, 4, 1])
        >>> float(display_images(torch.zeros(1, 1, 2, 2), mean=[0.5], std=[0.25], rgb=True).mean())
        0.5
    """
    x = images.detach().float().cpu()
    if mean is not None and std is not None:
        mean_t = torch.as_tensor(mean, dtype=x.dtype).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=x.dtype).reshape(1, -1, 1, 1)
        if mean_t.shape[1] in (1, x.shape[1]):
            x = x * std_t + mean_t
    else:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-6)
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
    if rgb and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.clamp(0, 1).permute(0, 2, 3, 1)


def show_image(ax: Any, picture: Tensor | np.ndarray) -> None:
    """Draw one ``(H, W, C)`` picture on a matplotlib axis (grayscale as gray), without axes."""
    picture = np.asarray(picture)
    ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray")
    ax.axis("off")


def draw_mask(ax: Any, mask: Tensor | np.ndarray, num_classes: int, alpha: float = 0.55) -> None:
    """Tint the classes of ``mask`` ``(H, W)`` over what ``ax`` shows, each in its :func:`class_colour`;
    background (0) and values >= ``num_classes`` (the ignore value) are not tinted."""
    from matplotlib.colors import ListedColormap

    m = np.asarray(mask)
    count = max(int(num_classes), 2)
    shown = np.ma.masked_where((m == 0) | (m >= count), m)
    cmap = ListedColormap([class_colour(k) for k in range(count)])
    ax.imshow(shown, cmap=cmap, vmin=-0.5, vmax=count - 0.5, alpha=alpha, interpolation="nearest")


def draw_boxes(
    ax: Any,
    boxes: Any,
    labels: Any = None,
    scores: Any = None,
    names: Sequence[str] = (),
    score_threshold: float = 0.0,
    truth: bool = False,
) -> int:
    """Draw ``xyxy`` boxes on ``ax``: detections solid in their :func:`class_colour` with ``name score``
    (those scoring below ``score_threshold`` left out), true boxes (``truth=True``) dashed white. Labels are
    0-based indices into ``names`` (numbers when out of range). Returns how many boxes were drawn."""
    from matplotlib.patches import Rectangle

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.zeros(len(boxes)) if labels is None else np.asarray(labels).reshape(-1)
    scores = np.ones(len(boxes)) if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    drawn = 0
    for (x0, y0, x1, y1), label, score in zip(boxes, labels, scores):
        if truth:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", ls="--", lw=1.0))
            drawn += 1
            continue
        if score < score_threshold:
            continue
        label = int(label)
        name = names[label] if 0 <= label < len(names) else str(label)
        colour = class_colour(label + 1)  # + 1: the mask colours, where 0 is background
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=1.5))
        ax.text(
            x0,
            y0,
            f"{name} {score:.2f}",
            color="white",
            fontsize=6,
            va="bottom",
            bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "lw": 0},
        )
        drawn += 1
    return drawn


def plot_mask_overlays(rows: Sequence[MaskRow], names: Sequence[str]) -> Any:
    """A figure with one row per ``(picture HxWxC, true mask or None, predicted mask)``: the picture, then
    the masks drawn over it (:func:`draw_mask`), with a legend of the classes after the background."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    with_truth = any(t is not None for _, t, _ in rows)
    cols = 3 if with_truth else 2
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.4 * cols, 2.4 * len(rows) + 0.6), squeeze=False)
    for r, (picture, truth, pred) in enumerate(rows):
        panels = [("image", None)] + ([("true mask", truth)] if with_truth else []) + [("predicted", pred)]
        for c, (title, mask) in enumerate(panels):
            ax = axes[r, c]
            show_image(ax, picture)
            if mask is not None:
                draw_mask(ax, mask, len(names))
            elif title != "image":
                title += " (none)"
            if r == 0:
                ax.set_title(title, fontsize=9)
    handles = [Patch(color=class_colour(k), label=name) for k, name in enumerate(names) if k > 0]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05 if handles else 0, 1, 1))
    return fig


def plot_box_overlays(rows: Sequence[BoxRow], names: Sequence[str], score_threshold: float = 0.3) -> Any:
    """A grid of pictures (``HxWxC`` in [0, 1]) with predicted boxes (:func:`draw_boxes`; those scoring
    below ``score_threshold`` left out) and true boxes (dashed white) when known. Each row is
    ``(picture, detections, truth or None)`` with ``boxes``, ``labels`` and (detections) ``scores``."""
    import matplotlib.pyplot as plt

    cols = min(len(rows), 3)
    lines = -(-len(rows) // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(3.0 * cols, 3.0 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (picture, det, truth) in zip(axes.flat, rows):
        show_image(ax, picture)
        if truth:
            draw_boxes(ax, truth.get("boxes", np.zeros((0, 4))), truth=True)
        shown = draw_boxes(
            ax,
            det.get("boxes", np.zeros((0, 4))),
            det.get("labels"),
            det.get("scores"),
            names,
            score_threshold,
        )
        ax.set_title(
            f"{shown} boxes >= {score_threshold:g}" + (" (dashed: true)" if truth else ""), fontsize=7
        )
    fig.tight_layout()
    return fig


def plot_image_grid(
    pictures: Sequence[Any], titles: Sequence[str], colours: Sequence[str] | None = None, columns: int = 4
) -> Any:
    """A grid of pictures (``HxWxC`` in [0, 1]) titled (e.g. with predicted and true classes), each title in
    its colour (green for right, red for wrong...).

    Example:
        >>> fig = plot_image_grid([np.zeros((4, 4, 1))] * 3, ["a", "b", "c"], ["green", "red", "green"])
        >>> [ax.get_title() for ax in fig.axes]
        ['a', 'b', 'c']
    """
    import matplotlib.pyplot as plt

    n = len(pictures)
    cols = min(n, columns)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            show_image(ax, pictures[k])
            ax.set_title(titles[k], fontsize=8, color=colours[k] if colours else "black")
    fig.tight_layout()
    return fig


def plot_confusion_matrix(matrix: Tensor | np.ndarray, names: Sequence[str]) -> Any:
    """A row-normalised confusion matrix (rows: true class, columns: predicted), values written in the cells
    (up to 30 classes).

    Example:
        >>> fig = plot_confusion_matrix(np.eye(2), ["cat", "dog"])
        >>> fig.axes[0].get_xlabel(), len(fig.axes[0].texts)
        ('predicted', 2)
    """
    import matplotlib.pyplot as plt

    values = np.asarray(matrix, dtype=np.float64)
    size = min(12, 2 + 0.5 * len(names))
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (row-normalised)")
    if len(names) <= 30:
        ax.set_xticks(range(len(names)), names, rotation=90)
        ax.set_yticks(range(len(names)), names)
        for (i, j), value in np.ndenumerate(values):
            if value >= 0.005:
                colour = "white" if value > 0.5 else "black"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def save_figure(figure: Any, path: Path) -> Path:
    """Save a matplotlib figure as a PNG (folders created) and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
