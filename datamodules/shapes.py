"""Coloured shapes on noisy textured backgrounds: the embedded dataset that needs no download.

Start with :class:`ShapesDataModule`. :func:`generate_shapes` writes the images in the real on-disk formats
(an image-folder tree, image/mask pairs, a COCO json), deterministically from a seed, and the module
reads them back with the same loaders as the real-data modules. The generator's rules (shapes, masks,
boxes, per-image random streams) are in ``docs/data.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image, ImageDraw

from .base import ConvDataModule
from .coco import load_coco_records
from .datasets import ClassificationDataset, DetectionDataset, SegmentationDataset
from .folders import scan_class_folders, scan_segmentation_folder, verify_pairs
from .io import verify_image

SHAPE_NAMES = ("circle", "square", "triangle", "cross", "star")
GENERATOR_VERSION = 2
_SPLITS = ("train", "val", "test")
_SUPERSAMPLE = 4

# Task defaults, chosen so the quickstarts train in about a minute on two CPU cores.
_DEFAULTS: dict[str, dict[str, int]] = {
    "classification": {"image_size": 32, "num_train": 4000, "num_val": 500, "num_test": 500, "max_shapes": 1},
    "segmentation": {"image_size": 64, "num_train": 1000, "num_val": 200, "num_test": 200, "max_shapes": 3},
    "detection": {"image_size": 64, "num_train": 1000, "num_val": 200, "num_test": 200, "max_shapes": 4},
}
# Pixel statistics of generated images (all tasks agree to ~0.02): mean and std per RGB channel.
SHAPES_MEAN = (0.5, 0.5, 0.5)
SHAPES_STD = (0.23, 0.23, 0.23)


def default_cache_root() -> Path:
    """``$LIGHTNING_CONVNETS_CACHE/shapes`` if set, else ``~/.cache/lightning_convnets/shapes``."""
    base = os.environ.get("LIGHTNING_CONVNETS_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "lightning_convnets") / "shapes"


# ----------------------------------------------------------------------------------------- rendering
def _shape_outline(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape of circumradius ``r`` rotated by ``angle`` (radians)."""
    if kind == "square":
        local = [
            (r * math.cos(a), r * math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))
        ]
    elif kind == "triangle":
        local = [
            (r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))
        ]
    elif kind == "cross":
        w = 0.36 * r
        local = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r)]
        local += [(-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
    elif kind == "star":
        local = [
            ((r if k % 2 == 0 else 0.45 * r) * math.cos(a), (r if k % 2 == 0 else 0.45 * r) * math.sin(a))
            for k, a in enumerate(-math.pi / 2 + k * math.pi / 5 for k in range(10))
        ]
    else:
        raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPE_NAMES}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in local]


def _coverage(kind: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Anti-aliased coverage (0..1) of one shape, drawn at 4x and box-filtered down."""
    big = size * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    k = _SUPERSAMPLE
    if kind == "circle":
        draw.ellipse([(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k], fill=255)
    else:
        draw.polygon([(x * k, y * k) for x, y in _shape_outline(kind, cx, cy, r, angle)], fill=255)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random base colour with a random linear colour gradient (float RGB, 0..255).

    Pixel noise is added over the whole scene later. Smooth on purpose: blotchy textures made the
    shapes markedly slower to learn for small CNNs without making a linear probe any better.
    """
    base = rng.uniform(40, 215, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return base + rng.normal(0, 15, 3) * xx[..., None] + rng.normal(0, 15, 3) * yy[..., None]


def render_scene(
    rng: np.random.Generator,
    size: int,
    num_kinds: int,
    num_shapes: int,
    radius_range: tuple[float, float],
    shape_names: Sequence[str],
    max_rotation: float = 20.0,
    noise: float = 8.0,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, tuple[int, int, int, int], int]]]:
    """Draw ``num_shapes`` non-overlapping shapes rotated by up to ``max_rotation`` degrees, plus noise.

    Returns:
        ``(image uint8 HxWx3, mask uint8 HxW with class+1 per shape pixel, instances)`` where each
        instance is ``(class index, (x0, y0, x1, y1) tight pixel box, pixel area)``.
    """
    image = _background(rng, size)
    mask = np.zeros((size, size), np.uint8)
    placed: list[tuple[float, float, float]] = []
    instances = []
    for _ in range(num_shapes):
        cls = int(rng.integers(num_kinds))
        for _attempt in range(50):
            r = float(rng.uniform(*radius_range)) * size
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            if all(math.hypot(cx - px, cy - py) > r + pr + 2 for px, py, pr in placed):
                break
        else:
            continue  # no room left in this image
        placed.append((cx, cy, r))
        angle = math.radians(float(rng.uniform(-max_rotation, max_rotation)))
        alpha = _coverage(shape_names[cls], size, cx, cy, r, angle)
        inside = alpha >= 0.5
        under = image[inside].mean(axis=0) if inside.any() else image.mean(axis=(0, 1))
        for _attempt in range(20):
            colour = rng.uniform(0, 255, size=3)
            if np.linalg.norm(colour - under) > 110:
                break
        # Subtle shading inside the shape so its interior is not a flat colour either.
        shade = rng.normal(0, 12, size=3) * (np.mgrid[0:size, 0:size][0][..., None] / size - 0.5)
        image = image * (1 - alpha[..., None]) + (colour + shade) * alpha[..., None]
        mask[inside] = cls + 1
        ys, xs = np.nonzero(inside)
        if len(xs):
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            instances.append((cls, box, len(xs)))
    image = image + rng.normal(0, noise, size=image.shape)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), mask, instances


def _palette(num_values: int) -> list[int]:
    colours = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48)]
    flat = [c for rgb in colours for c in rgb]
    flat += [128] * (3 * 256 - len(flat))
    flat[3 * 255 : 3 * 256] = [255, 255, 255]  # the ignore value shows white, as in VOC
    return flat


def generate_shapes(
    out_dir: Path,
    task: str,
    shape_names: Sequence[str],
    image_size: int,
    counts: dict[str, int],
    seed: int,
    max_shapes: int,
    max_rotation: float = 20.0,
) -> None:
    """Write a shapes dataset for ``task`` into ``out_dir`` (which must be empty or absent)."""
    radius = (0.22, 0.42) if task == "classification" else (0.09, 0.2)
    palette = _palette(len(shape_names) + 1)
    for split_index, split in enumerate(_SPLITS):
        split_dir = out_dir / split
        if task == "classification":
            for name in shape_names:
                (split_dir / name).mkdir(parents=True, exist_ok=True)
        else:
            (split_dir / "images").mkdir(parents=True, exist_ok=True)
        if task == "segmentation":
            (split_dir / "masks").mkdir(parents=True, exist_ok=True)
        coco: dict[str, Any] = {
            "info": {"description": f"lightning-convnets shapes ({split}), seed {seed}"},
            "images": [],
            "annotations": [],
            "categories": [
                {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(shape_names)
            ],
        }
        for index in range(counts[split]):
            rng = np.random.default_rng([seed, split_index, index])
            num = 1 if task == "classification" else int(rng.integers(1, max_shapes + 1))
            image, mask, instances = render_scene(
                rng, image_size, len(shape_names), num, radius, shape_names, max_rotation
            )
            stem = f"{index:06d}"
            if task == "classification":
                cls = instances[0][0]
                Image.fromarray(image).save(split_dir / shape_names[cls] / f"{stem}.png")
                continue
            Image.fromarray(image).save(split_dir / "images" / f"{stem}.png")
            if task == "segmentation":
                mask_image = Image.fromarray(mask, mode="L").convert("P")
                mask_image.putpalette(palette)
                mask_image.save(split_dir / "masks" / f"{stem}.png")
            else:
                image_id = index + 1
                coco["images"].append(
                    {"id": image_id, "file_name": f"{stem}.png", "width": image_size, "height": image_size}
                )
                for cls, (x0, y0, x1, y1), area in instances:
                    coco["annotations"].append(
                        {
                            "id": len(coco["annotations"]) + 1,
                            "image_id": image_id,
                            "category_id": cls + 1,
                            "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "area": area,
                            "iscrowd": 0,
                        }
                    )
        if task == "detection":
            (split_dir / "annotations.json").write_text(json.dumps(coco))


def _manifest_matches(folder: Path, params: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / "manifest.json").read_text()).get("params") == params
    except (OSError, ValueError):
        return False


def ensure_shapes(root: Path, params: dict[str, Any]) -> Path:
    """Return the folder holding the shapes dataset for ``params``, generating it if needed.

    The folder is ``root/<task>-<hash of params>``; its ``manifest.json`` records the parameters and is
    written last, so a folder without a matching manifest (an interrupted run) is regenerated. Generation
    goes to a temporary folder renamed into place, so concurrent processes never see partial data.
    """
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    target = root / f"{params['task']}-{key}"
    if _manifest_matches(target, params):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        generate_shapes(
            tmp,
            params["task"],
            params["shapes"],
            params["image_size"],
            {"train": params["num_train"], "val": params["num_val"], "test": params["num_test"]},
            params["seed"],
            params["max_shapes"],
            params["max_rotation"],
        )
        (tmp / "manifest.json").write_text(json.dumps({"params": params}, indent=2, sort_keys=True))
        if _manifest_matches(target, params):
            return target  # another process finished first: keep its copy, drop ours
        if target.exists():
            shutil.rmtree(target)  # stale or incomplete: replace it
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "manifest.json").is_file():  # lost a race and the winner is incomplete
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------- module
class ShapesDataModule(ConvDataModule):
    """Generated coloured shapes for classification, segmentation or detection (no download).

    The data is generated on first use (a few seconds), cached under ``root``, and loaded with the same
    loaders as :class:`ImageFolderDataModule`, :class:`SegmentationFolderDataModule` and
    :class:`CocoDetectionDataModule`. Batches follow those modules:

    - classification: ``(images float32 [N, 3, S, S], labels int64 [N])``, ``num_classes = len(shapes)``;
    - segmentation: ``(images, masks int64 [N, S, S])`` with 0 = background and ``k + 1`` = shape ``k``,
      so ``num_classes = len(shapes) + 1`` and ``class_names[0] == "background"``;
    - detection: ``(list of [3, S, S] images, list of dict(boxes float32 [K, 4] xyxy, labels int64 [K],
      image_id, orig_size))``, labels 0-based over ``shapes`` (COCO category ids ``1..K`` on disk).

    Args:
        task: ``"classification"``, ``"segmentation"`` or ``"detection"``.
        root: cache folder (default ``$LIGHTNING_CONVNETS_CACHE/shapes`` or
            ``~/.cache/lightning_convnets/shapes``); each parameter set gets its own subfolder.
        shapes: which shapes, in label order (from ``circle, square, triangle, cross, star``).
        image_size: image side; default 32 (classification) or 64 (segmentation, detection).
        num_train, num_val, num_test: images per split; defaults 4000/500/500 (classification) or
            1000/200/200.
        max_shapes: most shapes per image for segmentation (default 3) and detection (default 4).
        max_rotation: shapes are rotated uniformly in ``[-max_rotation, max_rotation]`` degrees; the
            default 20 keeps the quickstart learnable in a minute, 180 gives every orientation.
        mirror_pad: segmentation only: pixels of mirrored context added on every side of each transformed
            image (its mask gets ``ignore_index`` there), the paper's input for a valid-padding U-Net; with
            the network's ``border`` the output covers the whole generated image. 0: none.
        seed: generation seed (same seed, same bytes).
        batch_size: examples per batch.
        verify_images: check every generated file in ``setup`` (off: the generator wrote them).
        **kwargs: the loader, transform and normalisation arguments of :class:`ConvDataModule`
            (``num_workers``, ``train_transforms`` ...; mean/std default to the generator's statistics).

    Example (not run by the doctests: it generates 5000 images, several seconds):
        >>> dm = ShapesDataModule(task="classification", batch_size=64)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
        >>> images, labels = next(iter(dm.train_dataloader()))  # doctest: +SKIP
        >>> images.shape, labels.dtype  # doctest: +SKIP
        (torch.Size([64, 3, 32, 32]), torch.int64)
    """

    default_mean = SHAPES_MEAN
    default_std = SHAPES_STD

    def __init__(
        self,
        task: Literal["classification", "segmentation", "detection"] = "classification",
        root: str | None = None,
        shapes: list[str] | None = None,
        image_size: int | None = None,
        num_train: int | None = None,
        num_val: int | None = None,
        num_test: int | None = None,
        max_shapes: int | None = None,
        max_rotation: float = 20.0,
        mirror_pad: int = 0,
        seed: int = 0,
        batch_size: int = 64,
        verify_images: bool = False,
        **kwargs: Any,
    ) -> None:
        if task not in _DEFAULTS:
            raise ValueError(f"task must be one of {list(_DEFAULTS)}, got {task!r}")
        defaults = _DEFAULTS[task]
        self.task = task  # before the base's __init__, which saves the arguments this task uses
        super().__init__(
            image_size=image_size or defaults["image_size"],
            seed=seed,
            batch_size=batch_size,
            verify_images=verify_images,
            **kwargs,
        )
        shapes = list(shapes) if shapes is not None else list(SHAPE_NAMES[:4])
        unknown = [s for s in shapes if s not in SHAPE_NAMES]
        if unknown or len(set(shapes)) != len(shapes) or len(shapes) < 2:
            raise ValueError(f"shapes must be >= 2 distinct names from {SHAPE_NAMES}, got {shapes}")
        self.shapes = shapes
        self.root = Path(root).expanduser() if root is not None else default_cache_root()
        self.num_train = defaults["num_train"] if num_train is None else num_train
        self.num_val = defaults["num_val"] if num_val is None else num_val
        self.num_test = defaults["num_test"] if num_test is None else num_test
        self.max_shapes = defaults["max_shapes"] if max_shapes is None else max_shapes
        self.max_rotation = float(max_rotation)
        if mirror_pad < 0 or (mirror_pad and task != "segmentation"):
            raise ValueError(f"mirror_pad must be >= 0 and is for task='segmentation' only, got {mirror_pad}")
        self.mirror_pad = int(mirror_pad)
        if min(self.num_train, self.num_val, self.num_test) < 1 or self.max_shapes < 1:
            raise ValueError("num_train, num_val, num_test and max_shapes must be >= 1")
        self.data_dir: Path | None = None

    @property
    def generation_params(self) -> dict[str, Any]:
        """Everything the generated bytes depend on (recorded in the cache manifest)."""
        return {
            "version": GENERATOR_VERSION,
            "task": self.task,
            "shapes": self.shapes,
            "image_size": self.image_size,
            "num_train": self.num_train,
            "num_val": self.num_val,
            "num_test": self.num_test,
            "max_shapes": 1 if self.task == "classification" else self.max_shapes,
            "max_rotation": self.max_rotation,
            "seed": self.seed,
        }

    def resolve_class_names(self) -> Sequence[str]:
        return (["background"] if self.task == "segmentation" else []) + self.shapes

    @property
    def category_ids(self) -> list[int]:
        """COCO category id of each label (detection only): label ``i`` is category ``i + 1``."""
        if self.task != "detection":
            raise AttributeError("category_ids exists only for task='detection'")
        return list(range(1, len(self.shapes) + 1))

    @property
    def num_train_examples(self) -> int:
        """Training images (known before ``setup``: ``num_train``)."""
        if self.train_dataset is None:
            return self.num_train
        return len(self.train_dataset)  # type: ignore[arg-type]

    def prepare_data(self) -> None:
        """Generate the dataset into the cache if it is not there yet (not for a ``predict`` of
        ``predict_dir``, which reads no shapes)."""
        trainer = getattr(self, "trainer", None)
        if self.predict_dir is not None and trainer is not None and trainer.state.fn == TrainerFn.PREDICTING:
            return
        self.data_dir = ensure_shapes(self.root, self.generation_params)

    def build_datasets(self, splits: Sequence[str]) -> None:
        if self.data_dir is None:
            self.prepare_data()
        assert self.data_dir is not None
        for split in splits:
            folder = self.data_dir / split
            train = split == "train"
            setattr(self, f"{split}_dataset", self._dataset(folder, train))

    def _dataset(self, folder: Path, train: bool) -> Any:
        # The same scanners/datasets as the real-data modules: shapes exercise the real code path.
        pipeline = self.pipeline(train)
        if self.task == "classification":
            samples = scan_class_folders(folder, self.class_names, require_every_class=False)
            if self.verify_images:
                for path, _ in samples:
                    verify_image(path)
            return ClassificationDataset(samples, pipeline, self.in_channels)
        if self.task == "segmentation":
            pairs = scan_segmentation_folder(folder)
            if self.verify_images:
                verify_pairs(pairs, self.num_classes, self.ignore_index)
            if self.mirror_pad:
                pipeline = _MirrorPad(pipeline, self.mirror_pad, self.ignore_index)
            return SegmentationDataset(pairs, self.num_classes, pipeline, self.in_channels, self.ignore_index)
        records, _, _ = load_coco_records(folder / "annotations.json", folder / "images", self.verify_images)
        return DetectionDataset(records, pipeline, self.in_channels)


class _MirrorPad:
    """Run ``pipeline``, then mirror-pad the image tensor by ``pad`` per side and pad its mask with ``ignore``."""

    def __init__(self, pipeline: Any, pad: int, ignore: int) -> None:
        self.pipeline, self.pad, self.ignore = pipeline, pad, ignore

    def __call__(self, **data: Any) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        out = self.pipeline(**data)
        image, mask, p = out["image"], torch.as_tensor(out["mask"]), [self.pad] * 4
        if min(image.shape[-2:]) <= self.pad:
            raise ValueError(f"mirror_pad={self.pad} needs images larger than that, got {tuple(image.shape)}")
        out["image"] = F.pad(image[None], p, mode="reflect")[0]
        out["mask"] = F.pad(mask, p, value=self.ignore)
        return out
