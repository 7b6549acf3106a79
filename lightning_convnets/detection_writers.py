"""COCO-format detection results: the json that ``pycocotools``' ``COCO.loadRes`` and ``COCOeval`` read.

Attached automatically by :class:`~lightning_convnets.tasks.detection.ObjectDetector` in ``predict`` when
no other writer is configured. Next to the json it draws ``boxes_overlay.png``: the first images with their
true boxes (dashed, when the batches carry targets) and the predicted boxes with class and score.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_convnets.writers import class_names_of, display_images, save_figure


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


class CocoResultsWriter(BasePredictionWriter):
    """Write ``predict`` detections to one COCO results json (``COCO.loadRes`` / ``COCOeval`` input).

    Labels go back to the dataset's category ids: ``category_ids`` when given, else the model's
    (``ObjectDetector`` keeps them in its checkpoint), else the datamodule's, else the 0-based label.
    Image ids come from the batch targets (``image_id``, as the COCO and shapes datamodules provide);
    without them the dataset index is used. Under DDP every rank's results are gathered and rank 0 writes
    the file. Note that ``pycocotools`` refuses an empty results list, which an empty file would be.

    The overlay figure (``boxes_overlay.png`` next to the json) shows the first ``num_figure_images``
    images with the detections scoring at least ``figure_score_threshold``.

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
        super().__init__(write_interval="batch")
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
        default = Path(trainer.log_dir or trainer.default_root_dir) / "predictions" / "coco_results.json"
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
        if not isinstance(prediction, list | tuple) or not all(isinstance(p, dict) for p in prediction):
            raise TypeError(
                "CocoResultsWriter expects predict_step to return a list of per-image dicts with boxes, "
                f"scores and labels; got {type(prediction).__name__}"
            )
        kept = []
        for det in prediction:
            keep = torch.as_tensor(det["scores"]) >= self.score_threshold
            kept.append({k: (v[keep] if k in ("boxes", "scores", "labels") else v) for k, v in det.items()})
        indices = list(batch_indices) if batch_indices is not None else None
        self._results.extend(detections_to_coco(kept, self._ids, indices))
        self._keep_for_figure(pl_module, batch, prediction)

    def _keep_for_figure(self, pl_module: pl.LightningModule, batch: Any, prediction: Sequence[dict]) -> None:
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
            picture = display_images(pl_module, image[None])[0]
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
                names = class_names_of(trainer, count) if count else []
                figure = plot_box_overlays(self._shown, names, self.figure_score_threshold)
                self.figure_path = save_figure(figure, self.path.parent / "boxes_overlay.png")
                rank_zero_info(f"overlay of {len(self._shown)} images' boxes written to {self.figure_path}")
        self._results = []
        self._shown = []


def plot_box_overlays(
    rows: Sequence[tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray] | None]],
    class_names: Sequence[str],
    score_threshold: float = 0.3,
) -> Any:
    """A grid of images (``HxWx3`` in [0, 1]) with predicted boxes (solid, ``class score``; those scoring
    below ``score_threshold`` left out) and true boxes (dashed white) when known. Boxes are ``xyxy``
    pixels, labels 0-based indices into ``class_names`` (shown as numbers when out of range)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cols = min(len(rows), 3)
    lines = -(-len(rows) // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(3.0 * cols, 3.0 * lines), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax in axes.flat:
        ax.axis("off")
    for ax, (picture, det, truth) in zip(axes.flat, rows):
        ax.imshow(picture)
        for box in (truth or {}).get("boxes", np.zeros((0, 4))):
            x0, y0, x1, y1 = box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", ls="--", lw=1.0))
        boxes = det.get("boxes", np.zeros((0, 4)))
        labels = det.get("labels", np.zeros(len(boxes)))
        scores = det.get("scores", np.ones(len(boxes)))
        shown = 0
        for box, label, score in zip(boxes, labels, scores):
            if score < score_threshold:
                continue
            label = int(label)
            name = class_names[label] if 0 <= label < len(class_names) else str(label)
            x0, y0, x1, y1 = box
            colour = cmap(label % 10)
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
            shown += 1
        ax.set_title(
            f"{shown} boxes >= {score_threshold:g}" + (" (dashed: true)" if truth else ""), fontsize=7
        )
    fig.tight_layout()
    return fig
