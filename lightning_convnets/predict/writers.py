"""Prediction writers: files a user can open after ``lightning-convnets predict``.

* :class:`ClassProbabilitiesWriter`: one CSV row per image (source, predicted class, one probability column
  per class).
* :class:`MaskPNGWriter`: one PNG per image holding the predicted class index of every pixel (a palette
  PNG, so it opens in colour in any viewer and still reads back as indices), plus ``masks_overlay.png``:
  the first images with their true (when the data has masks) and predicted masks drawn over them. A
  streamed image (TIFF, Zarr: :mod:`lightning_convnets.predict.large`) gets ``<stem>.tif`` instead, a
  tiled TIFF the task wrote tile by tile (:meth:`MaskPNGWriter.streamed_mask_path`).
* :class:`CocoResultsWriter`: one COCO results json (``pycocotools``' ``COCO.loadRes`` / ``COCOeval``
  input), plus ``boxes_overlay.png``: the first images with their true and predicted boxes. A streamed
  image (TIFF, Zarr) gets its own files instead, ``detections/<stem>.json`` (COCO records) and
  ``detections/<stem>.geojson`` (box polygons), which the task wrote tile row by tile row
  (:meth:`CocoResultsWriter.streamed_detection_paths`).

The tasks attach theirs automatically in ``predict`` when no writer is configured; rows and files are
named after the source image when the dataset exposes its file paths (an attribute ``paths``, ``files``,
``image_paths``, ``images``, ImageFolder-style ``samples`` or ``(image, mask)`` ``pairs``), else after the
dataset index. Under DDP each rank writes its own CSV (``<name>.rank<k>.csv``); COCO results are gathered
on rank 0. The figures are drawn by :mod:`lightning_convnets.drawing`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_convnets.drawing import (
    class_names,
    display_images,
    palette,
    plot_box_overlays,
    plot_mask_overlays,
    save_figure,
)
from lightning_convnets.predict.large import LargeDetections, LargePrediction

__all__ = [
    "BatchContext",
    "CheckedBatchWriter",
    "ClassProbabilitiesWriter",
    "CocoResultsWriter",
    "MaskPNGWriter",
    "detections_to_coco",
]

_PATH_ATTRIBUTES = ("paths", "files", "image_paths", "images", "samples", "pairs")


def _pictures(trainer: pl.Trainer, images: Tensor) -> np.ndarray:
    """Images ``(N, C, H, W)`` as ``(N, H, W, 3)`` floats in [0, 1], the datamodule's normalisation undone."""
    dm = getattr(trainer, "datamodule", None)
    return display_images(images, getattr(dm, "mean", None), getattr(dm, "std", None), rgb=True).numpy()


def _data_class_names(trainer: pl.Trainer, count: int) -> list[str]:
    return class_names(getattr(getattr(trainer, "datamodule", None), "class_names", None), count)


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


@dataclass(frozen=True)
class BatchContext:
    """Where a predict batch came from: what :meth:`CheckedBatchWriter.write_batch` gets besides the
    prediction (the arguments of Lightning's ``write_on_batch_end``)."""

    trainer: pl.Trainer
    pl_module: pl.LightningModule
    batch_indices: Sequence[int] | None
    batch: Any
    batch_idx: int
    dataloader_idx: int


class CheckedBatchWriter(BasePredictionWriter):
    """A writer called after every predict batch that first checks what ``predict_step`` returned.

    Subclasses set :attr:`expected` (what ``predict_step`` should return, for the error), implement
    :meth:`accepts` and :meth:`write_batch`.

    Example:
        >>> class Counter(CheckedBatchWriter):
        ...     expected = "a tensor"
        ...     def accepts(self, prediction):
        ...         return isinstance(prediction, Tensor)
        ...     def write_batch(self, prediction, at):
        ...         print(len(prediction))
        >>> Counter().write_on_batch_end(None, None, torch.zeros(3), None, None, 0, 0)
        3
        >>> Counter().write_on_batch_end(None, None, [1], None, None, 0, 0)
        Traceback (most recent call last):
        ...
        TypeError: Counter expects predict_step to return a tensor, got list ()
    """

    expected: str = "a prediction"

    def __init__(self) -> None:
        super().__init__(write_interval="batch")

    def accepts(self, prediction: Any) -> bool:
        """Whether ``prediction`` is what this writer writes."""
        raise NotImplementedError

    def write_batch(self, prediction: Any, at: BatchContext) -> None:
        """Write one batch's accepted ``prediction``."""
        raise NotImplementedError

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
        if not self.accepts(prediction):
            raise TypeError(
                f"{type(self).__name__} expects predict_step to return {self.expected}, got "
                f"{type(prediction).__name__} {tuple(getattr(prediction, 'shape', ()))}"
            )
        self.write_batch(
            prediction, BatchContext(trainer, pl_module, batch_indices, batch, batch_idx, dataloader_idx)
        )


class ClassProbabilitiesWriter(CheckedBatchWriter):
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

    expected = "probabilities (N, num_classes)"

    def __init__(self, output_dir: str | None = None, filename: str = "probabilities.csv") -> None:
        super().__init__()
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

    def accepts(self, prediction: Any) -> bool:
        """Probabilities ``(N, num_classes)``."""
        return isinstance(prediction, Tensor) and prediction.ndim == 2

    def write_batch(self, prediction: Any, at: BatchContext) -> None:
        """One CSV row per image."""
        probs = prediction.detach().float().cpu()
        if self._class_names is None:
            self._class_names = _data_class_names(at.trainer, probs.shape[1])
            self._writer.writerow(
                ["index", "source", "predicted", "predicted_index", *(f"p_{n}" for n in self._class_names)]
            )
        sources = _source_names(at.trainer, at.dataloader_idx, at.batch_indices, probs.shape[0])
        indices = list(at.batch_indices) if at.batch_indices is not None else [""] * probs.shape[0]
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


class MaskPNGWriter(CheckedBatchWriter):
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

    expected = "class-index masks (N, H, W) or a streamed mask (predict.large.LargePrediction)"

    def __init__(
        self, output_dir: str | None = None, palette: bool = True, num_figure_images: int = 6
    ) -> None:
        super().__init__()
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

    def streamed_mask_path(self, source: str | Path) -> Path:
        """Where the mask of a streamed image (a TIFF or Zarr file, predicted tile by tile, see
        :mod:`lightning_convnets.predict.large`) goes: ``<folder>/<stem>.tif``, a tiled TIFF."""
        if self.folder is None:
            raise RuntimeError("MaskPNGWriter: the output folder is set in on_predict_start")
        return self.folder / f"{Path(source).stem}.tif"

    def accepts(self, prediction: Any) -> bool:
        """Masks ``(N, H, W)``, or a mask already written tile by tile (``LargePrediction``)."""
        return (isinstance(prediction, Tensor) and prediction.ndim == 3) or isinstance(
            prediction, LargePrediction
        )

    def write_batch(self, prediction: Any, at: BatchContext) -> None:
        """One PNG per mask (a streamed mask is already on disk: counted)."""
        from PIL import Image

        if isinstance(prediction, LargePrediction):
            self.count += 1
            return
        masks = prediction.detach().cpu()
        if masks.numel() and (int(masks.min()) < 0 or int(masks.max()) > 255):
            raise ValueError("MaskPNGWriter: class indices must lie in [0, 255] to fit an 8-bit PNG")
        masks = masks.to(torch.uint8).numpy()
        sources = _source_names(at.trainer, at.dataloader_idx, at.batch_indices, masks.shape[0])
        for k, mask in enumerate(masks):
            if sources[k] and not sources[k].isdigit():
                stem = Path(sources[k]).stem
            else:
                index = int(sources[k]) if sources[k] else at.batch_idx * masks.shape[0] + k
                stem = f"{index:06d}"
            image = Image.fromarray(np.ascontiguousarray(mask))
            if self.palette:
                image.putpalette(palette())  # turns the "L" image into "P" with the same index values
            image.save(self.folder / f"{stem}.png")
            self.count += 1
        self._keep_for_figure(at.trainer, at.batch, masks)

    def _keep_for_figure(self, trainer: pl.Trainer, batch: Any, masks: np.ndarray) -> None:
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
        pictures = _pictures(trainer, images[:room])
        for k in range(pictures.shape[0]):
            true_mask = None if truth is None else truth[k].detach().cpu().numpy()
            self._shown.append((pictures[k], true_mask, masks[k]))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._shown and self.folder is not None and trainer.is_global_zero:
            num_classes = int(getattr(pl_module, "num_classes", 0) or 0)
            num_classes = max(num_classes, *(int(m[m != 255].max(initial=0)) + 1 for _, _, m in self._shown))
            names = _data_class_names(trainer, num_classes)
            figure = plot_mask_overlays(self._shown, names)
            self.figure_path = save_figure(figure, self.folder.parent / "masks_overlay.png")
            rank_zero_info(f"overlay of {len(self._shown)} predicted masks written to {self.figure_path}")
        self._shown = []
        rank_zero_info(f"{self.count} predicted masks written to {self.folder}")


# -------------------------------------------------------------------------------- detection
def detections_to_coco(
    detections: Sequence[dict[str, Any]],
    category_ids: Sequence[int] | None = None,
    image_ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Convert per-image detections into COCO result entries.

    Each detection dict holds ``boxes`` (``xyxy`` pixels of the network input), ``scores`` and 0-based
    ``labels``; optionally ``image_id``, and ``image_size`` / ``orig_size`` (``[H, W]`` of the input and of
    the file). When both sizes are there and differ, boxes are scaled back to the file's pixels per axis
    (right for a plain resize; a crop or letterbox pipeline needs its own inverse).

    Args:
        detections: one dict per image.
        category_ids: the dataset's category id of each label (``None``: the label itself).
        image_ids: image id per detection dict when they carry no ``image_id``.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``.

    Raises:
        ValueError: for a label with no category id, or an image with no id.

    Example:
        >>> det = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]), "scores": torch.tensor([0.9]),
        ...        "labels": torch.tensor([1]), "image_id": torch.tensor(7)}
        >>> detections_to_coco([det], category_ids=[1, 3])
        [{'image_id': 7, 'category_id': 3, 'bbox': [10.0, 20.0, 20.0, 40.0], 'score': 0.9}]
    """
    results = []
    for n, det in enumerate(detections):
        if "image_id" in det:
            image_id = int(det["image_id"])
        elif image_ids is not None:
            image_id = int(image_ids[n])
        else:
            raise ValueError(f"detection {n} has no 'image_id' and no image_ids were given")
        boxes = torch.as_tensor(det["boxes"]).detach().float().cpu().reshape(-1, 4)
        if "image_size" in det and "orig_size" in det:
            in_h, in_w = (float(v) for v in torch.as_tensor(det["image_size"]).tolist())
            out_h, out_w = (float(v) for v in torch.as_tensor(det["orig_size"]).tolist())
            if (in_h, in_w) != (out_h, out_w):
                scale = torch.tensor([out_w / in_w, out_h / in_h, out_w / in_w, out_h / in_h])
                boxes = boxes * scale
        scores = torch.as_tensor(det["scores"]).detach().float().cpu().reshape(-1).tolist()
        labels = torch.as_tensor(det["labels"]).detach().cpu().reshape(-1).tolist()
        for box, score, label in zip(boxes.tolist(), scores, labels):
            if category_ids is None:
                category = int(label)
            elif 0 <= int(label) < len(category_ids):
                category = int(category_ids[int(label)])
            else:
                raise ValueError(
                    f"label {label} has no category id (category_ids has {len(category_ids)} entries)"
                )
            x0, y0, x1, y1 = box
            results.append(
                {
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "score": round(float(score), 5),
                }
            )
    return results


class CocoResultsWriter(CheckedBatchWriter):
    """Write ``predict`` detections to one COCO results json (``COCO.loadRes`` / ``COCOeval`` input).

    Labels go back to the dataset's category ids: ``category_ids`` when given, else the model's
    (``ObjectDetector`` keeps them in its checkpoint), else the datamodule's, else the 0-based label.
    Image ids come from the batch targets (``image_id``, as the COCO and shapes datamodules provide);
    without them the dataset index is used. Under DDP every rank's results are gathered and rank 0 writes
    the file. Note that ``pycocotools`` refuses an empty results list, which an empty file would be.

    The overlay figure (``boxes_overlay.png`` next to the json) shows the first ``num_figure_images``
    images with the detections scoring at least ``figure_score_threshold``.

    A streamed image (a TIFF or Zarr file of ``predict_dir``: the task reads it window by window) is not
    in that json: its detections go to ``<folder>/detections/<stem>.json`` (COCO records, ``image_id`` its
    index in the folder) and ``<stem>.geojson`` (a FeatureCollection of box polygons in pixel coordinates,
    with ``label``, ``class_name``, ``category_id``, ``score``), written as its tile rows finish
    (:mod:`lightning_convnets.predict.large`); ``score_threshold`` does not apply to them.

    Args:
        output: json path (default: ``<trainer.log_dir>/predictions/coco_results.json``).
        category_ids: category id of each 0-based label.
        score_threshold: drop detections scoring below this.
        num_figure_images: images in the overlay figure (0: no figure).
        figure_score_threshold: lowest score drawn in the figure.

    Example:
        >>> trainer = Trainer(callbacks=[CocoResultsWriter("results.json")])  # doctest: +SKIP
        >>> trainer.predict(detector, datamodule=dm, return_predictions=False)  # doctest: +SKIP
    """

    def __init__(
        self,
        output: str | None = None,
        category_ids: list[int] | None = None,
        score_threshold: float = 0.0,
        num_figure_images: int = 6,
        figure_score_threshold: float = 0.3,
    ) -> None:
        super().__init__()
        if output is not None and not str(output).endswith(".json"):
            raise ValueError(f"CocoResultsWriter: output must be a .json path, got {output!r}")
        if num_figure_images < 0:
            raise ValueError(f"CocoResultsWriter: num_figure_images must be >= 0, got {num_figure_images}")
        self.output = output
        self.category_ids = category_ids
        self.score_threshold = score_threshold
        self.num_figure_images = num_figure_images
        self.figure_score_threshold = figure_score_threshold
        self.path: Path | None = None
        self.figure_path: Path | None = None
        self._results: list[dict[str, Any]] = []
        self._ids: list[int] | None = None
        self._shown: list[tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray] | None]] = []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        default = _default_dir(trainer) / "coco_results.json"
        self.path = Path(self.output) if self.output else default
        self.figure_path = None
        self._results = []
        self._shown = []
        ids = self.category_ids
        if ids is None:
            ids = (getattr(pl_module, "hparams", {}) or {}).get("label_category_ids")
        if ids is None:
            ids = getattr(getattr(trainer, "datamodule", None), "category_ids", None)
        if ids is None:
            rank_zero_warn(
                "CocoResultsWriter: no category ids known; writing the 0-based labels as category_id"
            )
        self._ids = None if ids is None else [int(i) for i in ids]

    expected = (
        "a list of per-image dicts with boxes, scores and labels, or streamed detections "
        "(predict.large.LargeDetections)"
    )

    def streamed_detection_paths(self, source: str | Path) -> tuple[Path, Path]:
        """Where the detections of a streamed image (a TIFF or Zarr file, detected tile by tile, see
        :mod:`lightning_convnets.predict.large`) go: ``detections/<stem>.json`` (COCO records) and
        ``detections/<stem>.geojson``, next to the results json."""
        if self.path is None:
            raise RuntimeError("CocoResultsWriter: the output path is set in on_predict_start")
        folder = self.path.parent / "detections"
        stem = Path(source).stem
        return folder / f"{stem}.json", folder / f"{stem}.geojson"

    def accepts(self, prediction: Any) -> bool:
        """A list of per-image detection dicts, or detections already written (``LargeDetections``)."""
        if isinstance(prediction, LargeDetections):
            return True
        return isinstance(prediction, list | tuple) and all(isinstance(p, dict) for p in prediction)

    def write_batch(self, prediction: Any, at: BatchContext) -> None:
        """The batch's detections above ``score_threshold``, as COCO results (streamed ones are on disk
        already: reported)."""
        if isinstance(prediction, LargeDetections):
            rank_zero_info(
                f"{prediction.detections} detections of {prediction.source} written to "
                f"{', '.join(str(p) for p in (prediction.coco, prediction.geojson) if p is not None)}"
            )
            return
        kept = []
        for det in prediction:
            keep = torch.as_tensor(det["scores"]) >= self.score_threshold
            kept.append({k: (v[keep] if k in ("boxes", "scores", "labels") else v) for k, v in det.items()})
        indices = list(at.batch_indices) if at.batch_indices is not None else None
        self._results.extend(detections_to_coco(kept, self._ids, indices))
        self._keep_for_figure(at.trainer, at.batch, prediction)

    def _keep_for_figure(self, trainer: pl.Trainer, batch: Any, prediction: Sequence[dict]) -> None:
        room = self.num_figure_images - len(self._shown)
        if room <= 0 or not isinstance(batch, list | tuple) or not batch:
            return
        images, targets = batch[0], (batch[1] if len(batch) > 1 else None)
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            images = list(images)
        if not isinstance(images, list | tuple) or not all(isinstance(i, torch.Tensor) for i in images):
            return
        if not isinstance(targets, list | tuple) or len(targets) != len(images):
            targets = [None] * len(images)

        def arrays(det: Any) -> dict[str, np.ndarray] | None:
            if not isinstance(det, dict) or "boxes" not in det or "labels" not in det:
                return None
            out = {k: torch.as_tensor(det[k]).detach().float().cpu().numpy() for k in ("boxes", "labels")}
            if "scores" in det:
                out["scores"] = torch.as_tensor(det["scores"]).detach().float().cpu().numpy()
            return out

        for image, det, target in list(zip(images, prediction, targets))[:room]:
            picture = _pictures(trainer, image[None])[0]
            self._shown.append((picture, arrays(det) or {}, arrays(target)))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = self._results
        if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, results)
            results = [entry for part in gathered for entry in part]
        if trainer.is_global_zero and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(results))
            rank_zero_info(f"{len(results)} COCO detections written to {self.path}")
            if self._shown:
                count = int(getattr(pl_module, "num_classes", 0) or 0)
                names = _data_class_names(trainer, count) if count else []
                figure = plot_box_overlays(self._shown, names, self.figure_score_threshold)
                self.figure_path = save_figure(figure, self.path.parent / "boxes_overlay.png")
                rank_zero_info(f"overlay of {len(self._shown)} images' boxes written to {self.figure_path}")
        self._results = []
        self._shown = []
