"""COCO-format detection results: the json that ``pycocotools``' ``COCO.loadRes`` and ``COCOeval`` read.

Attached automatically by :class:`~lightning_convnets.tasks.detection.ObjectDetector` in ``predict`` when
no other writer is configured.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


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

    Args:
        output: json path (default: ``<trainer.log_dir>/predictions/coco_results.json``).
        category_ids: category id of each 0-based label.
        score_threshold: drop detections scoring below this.

    Example:
        >>> trainer = Trainer(callbacks=[CocoResultsWriter("results.json")])  # doctest: +SKIP
        >>> trainer.predict(detector, datamodule=dm, return_predictions=False)  # doctest: +SKIP
    """

    def __init__(
        self, output: str | None = None, category_ids: list[int] | None = None, score_threshold: float = 0.0
    ) -> None:
        super().__init__(write_interval="batch")
        if output is not None and not str(output).endswith(".json"):
            raise ValueError(f"CocoResultsWriter: output must be a .json path, got {output!r}")
        self.output = output
        self.category_ids = category_ids
        self.score_threshold = score_threshold
        self.path: Path | None = None
        self._results: list[dict[str, Any]] = []
        self._ids: list[int] | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        default = Path(trainer.log_dir or trainer.default_root_dir) / "predictions" / "coco_results.json"
        self.path = Path(self.output) if self.output else default
        self._results = []
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
        self._results = []
