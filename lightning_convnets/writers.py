"""Prediction writers: files a user can open after ``lightning-convnets predict``.

* :class:`ClassProbabilitiesWriter`: one CSV row per image (source, predicted class, one probability column
  per class).
* :class:`MaskPNGWriter`: one PNG per image holding the predicted class index of every pixel (a palette
  PNG, so it opens in colour in any viewer and still reads back as indices), plus ``masks_overlay.png``:
  the first images with their true (when the data has masks) and predicted masks drawn over them.

Both are attached automatically by the tasks in ``predict`` when no writer is configured; rows and files
are named after the source image when the dataset exposes its file paths (an attribute ``paths``,
``files``, ``image_paths``, ``images``, ImageFolder-style ``samples`` or ``(image, mask)`` ``pairs``), else after the dataset index.
Under DDP each rank writes its own CSV (``<name>.rank<k>.csv``).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

_PATH_ATTRIBUTES = ("paths", "files", "image_paths", "images", "samples", "pairs")


def display_images(pl_module: pl.LightningModule, images: Tensor) -> np.ndarray:
    """Images ``(N, C, H, W)`` as displayable ``(N, H, W, 3)`` floats in [0, 1].

    Uses the task's ``display_images`` (which undoes the datamodule's normalisation) when it has one, else
    stretches each image to [0, 1]. Grayscale is repeated to three channels.
    """
    x = images.detach().float().cpu()
    show = getattr(pl_module, "display_images", None)
    if callable(show):
        out = show(x).detach().float().cpu()
    else:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        out = ((x - lo) / (hi - lo).clamp_min(1e-6))[:, :3].permute(0, 2, 3, 1)
    if out.shape[-1] == 1:
        out = out.repeat(1, 1, 1, 3)
    return out.clamp(0, 1).numpy()


def class_names_of(trainer: pl.Trainer, count: int) -> list[str]:
    """The datamodule's ``class_names`` when there are ``count`` of them, else ``"0"``, ``"1"`` ..."""
    names = getattr(getattr(trainer, "datamodule", None), "class_names", None)
    if names is not None and len(names) == count:
        return [str(n) for n in names]
    return [str(i) for i in range(count)]


def save_figure(figure: Any, path: Path) -> Path:
    """Save a matplotlib figure as a PNG and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def _default_dir(trainer: pl.Trainer) -> Path:
    return Path(trainer.log_dir or trainer.default_root_dir) / "predictions"


def _source_names(
    trainer: pl.Trainer, dataloader_idx: int, indices: Sequence[int] | None, count: int
) -> list[str]:
    """File stems (or dataset indices) for the ``count`` items of a batch."""
    if indices is None:
        return ["" for _ in range(count)]
    dataset = None
    loaders = trainer.predict_dataloaders
    if loaders is not None:
        loaders = loaders if isinstance(loaders, Sequence) else [loaders]
        if dataloader_idx < len(loaders):
            dataset = getattr(loaders[dataloader_idx], "dataset", None)
    sources = None
    for attribute in _PATH_ATTRIBUTES:
        value = getattr(dataset, attribute, None)
        if isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0:
            sources = value
            break
    names = []
    for index in list(indices)[:count]:
        source = None
        if sources is not None and 0 <= int(index) < len(sources):
            item = sources[int(index)]
            item = item[0] if isinstance(item, tuple | list) else item
            source = str(item) if isinstance(item, str | Path) else None
        names.append(source if source is not None else str(int(index)))
    return names


class ClassProbabilitiesWriter(BasePredictionWriter):
    """Write class probabilities to a CSV file, one row per image.

    Columns: ``index`` (dataset index), ``source`` (file path when known), ``predicted`` (class name),
    ``predicted_index``, then ``p_<class>`` per class. Class names come from the datamodule's
    ``class_names`` when it has them.

    Args:
        output_dir: folder for the CSV (default: ``<trainer.log_dir>/predictions``).
        filename: CSV file name.

    Example:
        >>> trainer = Trainer(callbacks=[ClassProbabilitiesWriter("out")])  # doctest: +SKIP
        >>> trainer.predict(model, datamodule=dm, return_predictions=False)  # doctest: +SKIP
    """

    def __init__(self, output_dir: str | None = None, filename: str = "probabilities.csv") -> None:
        super().__init__(write_interval="batch")
        if not filename.endswith(".csv"):
            raise ValueError(f"ClassProbabilitiesWriter: filename must end in .csv, got {filename!r}")
        self.output_dir = output_dir
        self.filename = filename
        self.path: Path | None = None
        self._file: Any = None
        self._writer: Any = None
        self._class_names: list[str] | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = Path(self.output_dir) if self.output_dir else _default_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        name = self.filename
        if trainer.world_size > 1:
            name = name[: -len(".csv")] + f".rank{trainer.global_rank}.csv"
        self.path = folder / name
        self._file = open(self.path, "w", newline="")  # noqa: SIM115 - closed in on_predict_end
        self._writer = csv.writer(self._file)
        self._class_names = None

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, Tensor) or prediction.ndim != 2:
            raise TypeError(
                "ClassProbabilitiesWriter expects predict_step to return probabilities (N, num_classes), got "
                f"{type(prediction).__name__} {tuple(getattr(prediction, 'shape', ()))}"
            )
        probs = prediction.detach().float().cpu()
        if self._class_names is None:
            names = getattr(getattr(trainer, "datamodule", None), "class_names", None)
            num = probs.shape[1]
            self._class_names = (
                [str(n) for n in names]
                if names is not None and len(names) == num
                else [str(i) for i in range(num)]
            )
            self._writer.writerow(
                ["index", "source", "predicted", "predicted_index", *(f"p_{n}" for n in self._class_names)]
            )
        sources = _source_names(trainer, dataloader_idx, batch_indices, probs.shape[0])
        indices = list(batch_indices) if batch_indices is not None else [""] * probs.shape[0]
        best = probs.argmax(dim=1).tolist()
        for row, (index, source, top) in enumerate(zip(indices, sources, best)):
            self._writer.writerow(
                [
                    index,
                    source if source != str(index) else "",
                    self._class_names[top],
                    top,
                    *(f"{p:.6f}" for p in probs[row].tolist()),
                ]
            )

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            rank_zero_info(f"class probabilities written to {self.path}")


def _palette(num_colours: int = 256) -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved), so small indices get distinct, familiar colours."""
    palette = []
    for index in range(num_colours):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


class MaskPNGWriter(BasePredictionWriter):
    """Write each predicted mask as a PNG of class indices (palette mode, VOC colours), and an overlay
    figure of the first masks on their images.

    File names are the source image's stem (``<stem>.png``) when known, else the dataset index
    (``000123.png``). Reading a file back with ``numpy.array(PIL.Image.open(path))`` gives the indices.
    The figure, ``masks_overlay.png`` next to the mask folder, has one row per image: the image, the true
    mask over it (when the batches carry masks) and the predicted mask over it; background and the
    ignore value are not tinted.

    Args:
        output_dir: folder for the PNGs (default: ``<trainer.log_dir>/predictions/masks``).
        palette: write palette PNGs (True) or plain 8-bit grayscale (False).
        num_figure_images: images in the overlay figure (0: no figure).

    Example:
        >>> trainer = Trainer(callbacks=[MaskPNGWriter("masks")])  # doctest: +SKIP
        >>> trainer.predict(model, datamodule=dm, return_predictions=False)  # doctest: +SKIP
    """

    def __init__(
        self, output_dir: str | None = None, palette: bool = True, num_figure_images: int = 6
    ) -> None:
        super().__init__(write_interval="batch")
        if num_figure_images < 0:
            raise ValueError(f"MaskPNGWriter: num_figure_images must be >= 0, got {num_figure_images}")
        self.output_dir = output_dir
        self.palette = palette
        self.num_figure_images = num_figure_images
        self.folder: Path | None = None
        self.figure_path: Path | None = None
        self.count = 0
        self._shown: list[tuple[np.ndarray, np.ndarray | None, np.ndarray]] = []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder = Path(self.output_dir) if self.output_dir else _default_dir(trainer) / "masks"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.figure_path = None
        self.count = 0
        self._shown = []

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        from PIL import Image

        if not isinstance(prediction, Tensor) or prediction.ndim != 3:
            raise TypeError(
                "MaskPNGWriter expects predict_step to return class-index masks (N, H, W), got "
                f"{type(prediction).__name__} {tuple(getattr(prediction, 'shape', ()))}"
            )
        masks = prediction.detach().cpu()
        if masks.numel() and (int(masks.min()) < 0 or int(masks.max()) > 255):
            raise ValueError("MaskPNGWriter: class indices must lie in [0, 255] to fit an 8-bit PNG")
        masks = masks.to(torch.uint8).numpy()
        sources = _source_names(trainer, dataloader_idx, batch_indices, masks.shape[0])
        for k, mask in enumerate(masks):
            if sources[k] and not sources[k].isdigit():
                stem = Path(sources[k]).stem
            else:
                index = int(sources[k]) if sources[k] else batch_idx * masks.shape[0] + k
                stem = f"{index:06d}"
            image = Image.fromarray(np.ascontiguousarray(mask))
            if self.palette:
                image.putpalette(_palette())  # turns the "L" image into "P" with the same index values
            image.save(self.folder / f"{stem}.png")
            self.count += 1
        self._keep_for_figure(pl_module, batch, masks)

    def _keep_for_figure(self, pl_module: pl.LightningModule, batch: Any, masks: np.ndarray) -> None:
        room = self.num_figure_images - len(self._shown)
        if room <= 0:
            return
        images = batch[0] if isinstance(batch, list | tuple) else batch
        if not isinstance(images, Tensor) or images.ndim != 4:
            return  # nothing we know how to draw
        truth = batch[1] if isinstance(batch, list | tuple) and len(batch) > 1 else None
        truth = truth[:, 0] if isinstance(truth, Tensor) and truth.ndim == 4 else truth
        if not isinstance(truth, Tensor) or truth.shape[-2:] != images.shape[-2:]:
            truth = None
        pictures = display_images(pl_module, images[:room])
        for k in range(pictures.shape[0]):
            true_mask = None if truth is None else truth[k].detach().cpu().numpy()
            self._shown.append((pictures[k], true_mask, masks[k]))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._shown and self.folder is not None and trainer.is_global_zero:
            num_classes = int(getattr(pl_module, "num_classes", 0) or 0)
            num_classes = max(num_classes, *(int(m[m != 255].max(initial=0)) + 1 for _, _, m in self._shown))
            names = class_names_of(trainer, num_classes)
            figure = plot_mask_overlays(self._shown, names)
            self.figure_path = save_figure(figure, self.folder.parent / "masks_overlay.png")
            rank_zero_info(f"overlay of {len(self._shown)} predicted masks written to {self.figure_path}")
        self._shown = []
        rank_zero_info(f"{self.count} predicted masks written to {self.folder}")


def plot_mask_overlays(
    rows: Sequence[tuple[np.ndarray, np.ndarray | None, np.ndarray]], class_names: Sequence[str]
) -> Any:
    """A figure with one row per ``(image HxWx3, true mask or None, predicted mask)``: the image, then the
    masks drawn over it (class 0 and values >= ``len(class_names)`` untinted), with a class legend."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    num = max(len(class_names), 2)
    cmap = plt.get_cmap("tab10" if num <= 10 else "tab20", num)
    with_truth = any(t is not None for _, t, _ in rows)
    cols = 3 if with_truth else 2
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.4 * cols, 2.4 * len(rows) + 0.6), squeeze=False)
    for r, (picture, truth, pred) in enumerate(rows):
        panels = [("image", None)] + ([("true mask", truth)] if with_truth else []) + [("predicted", pred)]
        for c, (title, mask) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(picture)
            if mask is not None:
                shown = np.ma.masked_where((mask == 0) | (mask >= len(class_names)), mask)
                ax.imshow(shown, cmap=cmap, vmin=0, vmax=num - 1, alpha=0.6, interpolation="nearest")
            elif title != "image":
                title += " (none)"
            if r == 0:
                ax.set_title(title, fontsize=9)
            ax.axis("off")
    handles = [Patch(color=cmap(k), label=name) for k, name in enumerate(class_names) if k > 0]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05 if handles else 0, 1, 1))
    return fig
