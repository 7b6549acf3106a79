"""Prediction writers: files a user can open after ``lightning-convnets predict``.

* :class:`ClassProbabilitiesWriter`: one CSV row per image (source, predicted class, one probability column
  per class).
* :class:`MaskPNGWriter`: one PNG per image holding the predicted class index of every pixel (a palette
  PNG, so it opens in colour in any viewer and still reads back as indices).

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
    """Write each predicted mask as a PNG of class indices (palette mode, VOC colours).

    File names are the source image's stem (``<stem>.png``) when known, else the dataset index
    (``000123.png``). Reading a file back with ``numpy.array(PIL.Image.open(path))`` gives the indices.

    Args:
        output_dir: folder for the PNGs (default: ``<trainer.log_dir>/predictions/masks``).
        palette: write palette PNGs (True) or plain 8-bit grayscale (False).

    Example:
        >>> trainer = Trainer(callbacks=[MaskPNGWriter("masks")])  # doctest: +SKIP
    """

    def __init__(self, output_dir: str | None = None, palette: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.palette = palette
        self.folder: Path | None = None
        self.count = 0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder = Path(self.output_dir) if self.output_dir else _default_dir(trainer) / "masks"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count = 0

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

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(f"{self.count} predicted masks written to {self.folder}")
