"""albumentations pipelines built from a YAML-friendly spec: :func:`build_pipeline`.

A pipeline is augmentation (what ``train_transforms`` / ``eval_transforms`` say: a preset name, an
albumentations file or dict, or a list of ``class_path`` specs), then a size fix, then normalisation and
``ToTensorV2``. The spec forms, the presets and the mask/box rules are in ``docs/data.md``.

Example:
    >>> pipe = build_pipeline([{"class_path": "HorizontalFlip", "init_args": {"p": 1.0}}],
    ...                       kind="classification", train=True, image_size=32,
    ...                       mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    >>> import numpy as np
    >>> pipe(image=np.zeros((40, 50, 3), np.uint8))["image"].shape
    torch.Size([3, 32, 32])
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

TransformSpec = str | dict[str, Any] | list[Any] | None
"""What ``train_transforms`` / ``eval_transforms`` accept (see the module docstring)."""

PRESETS = ("none", "light", "default", "strong")
Kind = Literal["classification", "segmentation", "detection"]


def _resolve_class(path: str) -> type:
    if "." not in path:
        if not hasattr(A, path):
            raise ValueError(f"unknown albumentations transform {path!r} (class_path); check the spelling")
        return getattr(A, path)
    module_name, _, name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import transform class_path {path!r}: {err}") from err


def _build_value(value: Any) -> Any:
    if isinstance(value, dict) and "class_path" in value:
        return transform_from_config(value)
    if isinstance(value, dict) and "__class_fullname__" in value:
        return A.from_dict({"transform": value})
    if isinstance(value, list):
        return [_build_value(v) for v in value]
    return value


def transform_from_config(config: dict[str, Any]) -> A.BasicTransform | A.BaseCompose:
    """Build one transform from ``{"class_path": ..., "init_args": {...}}`` (nested specs allowed)."""
    unknown = set(config) - {"class_path", "init_args"}
    if unknown:
        raise ValueError(f"transform config {config!r} has unknown keys {sorted(unknown)}")
    cls = _resolve_class(config["class_path"])
    kwargs = {k: _build_value(v) for k, v in (config.get("init_args") or {}).items()}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            transform = cls(**kwargs)
    except Exception as err:
        raise ValueError(f"cannot build transform {config['class_path']} with {kwargs}: {err}") from err
    for warning in caught:
        # albumentations only warns about misspelt arguments; a config typo must not pass silently.
        if "not valid for transform" in str(warning.message):
            raise ValueError(
                f"cannot build transform {config['class_path']} with {kwargs}: {warning.message}"
            )
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return transform


def _preset(name: str, kind: Kind, train: bool, image_size: int | None, ignore_index: int) -> list[Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown transform preset {name!r}; expected one of {list(PRESETS)}")
    if name == "none" or not train:
        # Evaluation never augments: every preset means "size fix + normalise" there.
        return []
    flip = A.HorizontalFlip(p=0.5)
    if name == "light" or image_size is None:
        return [flip]
    pad = max(1, image_size // 8)
    steps: list[Any] = [
        A.Resize(image_size, image_size),
        A.PadIfNeeded(
            image_size + 2 * pad,
            image_size + 2 * pad,
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=ignore_index,
        ),
        A.RandomCrop(image_size, image_size),
        flip,
    ]
    if name == "strong":
        steps += [
            A.Affine(
                scale=(0.85, 1.15),
                rotate=(-20, 20),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=ignore_index,
                p=0.5,
            ),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=0.5),
        ]
    return steps


def augmentations_from_spec(
    spec: TransformSpec | A.BasicTransform | A.BaseCompose,
    *,
    kind: Kind = "classification",
    train: bool = True,
    image_size: int | None = None,
    ignore_index: int = 255,
) -> list[Any]:
    """Turn a transform spec (see the module docstring) into a list of albumentations transforms."""
    if spec is None:
        return []
    if isinstance(spec, A.BaseCompose):
        return list(spec.transforms)
    if isinstance(spec, A.BasicTransform):
        return [spec]
    if isinstance(spec, str):
        if Path(spec).suffix.lower() in (".yaml", ".yml", ".json"):
            if not Path(spec).is_file():
                raise ValueError(f"transform file {spec} not found")
            fmt = "json" if spec.lower().endswith(".json") else "yaml"
            return augmentations_from_spec(A.load(spec, data_format=fmt))
        return _preset(spec, kind, train, image_size, ignore_index)
    if isinstance(spec, dict):
        if "transform" in spec:
            return augmentations_from_spec(A.from_dict(spec))
        if "__class_fullname__" in spec:
            return augmentations_from_spec(A.from_dict({"transform": spec}))
        if "class_path" in spec:
            return [transform_from_config(spec)]
        raise ValueError(
            f"transform dict {spec!r} is neither an albumentations dict ('transform' key) nor a "
            "{'class_path': ..., 'init_args': ...} spec"
        )
    if isinstance(spec, Sequence):
        steps: list[Any] = []
        for item in spec:
            if isinstance(item, A.BasicTransform | A.BaseCompose):
                steps.append(item)
            elif isinstance(item, dict):
                steps += augmentations_from_spec(item, kind=kind, train=train, image_size=image_size)
            else:
                raise ValueError(f"transform list item {item!r} is not a dict or an albumentations transform")
        return steps
    raise ValueError(f"cannot build transforms from {type(spec).__name__} {spec!r}")


def build_pipeline(
    spec: TransformSpec | A.BasicTransform | A.BaseCompose,
    *,
    kind: Kind,
    train: bool,
    image_size: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    resize: Literal["resize", "letterbox"] = "resize",
    ignore_index: int = 255,
    min_visibility: float = 0.3,
    min_area: float = 1.0,
) -> A.Compose:
    """The full pipeline: augmentation (``spec``) + size fix + Normalize + ToTensorV2.

    Args:
        spec: the augmentation stage (preset name, file, albumentations dict, list of class_path dicts).
        kind: which targets travel with the image (``mask`` for segmentation, ``bboxes`` + ``labels``
            for detection).
        train: presets only augment in training.
        image_size: side of the square output; ``None`` keeps each image's size.
        mean, std: per-channel statistics on the 0..1 scale.
        resize: ``"resize"`` stretches to a square; ``"letterbox"`` keeps the aspect ratio and pads
            (images with 0, masks with ``ignore_index``).
        ignore_index: mask fill value for padding.
        min_visibility: detection rule: after each transform, boxes are clipped to the image and a box is
            dropped when less than this fraction of its area remains visible.
        min_area: detection rule: boxes whose clipped area falls below this many square pixels are dropped.
    """
    steps = augmentations_from_spec(
        spec, kind=kind, train=train, image_size=image_size, ignore_index=ignore_index
    )
    if image_size is not None:
        if resize == "resize":
            steps.append(A.Resize(image_size, image_size))
        elif resize == "letterbox":
            steps += [
                A.LongestMaxSize(max_size=image_size),
                A.PadIfNeeded(
                    image_size,
                    image_size,
                    position="top_left",
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=0,
                    fill_mask=ignore_index,
                ),
            ]
        else:
            raise ValueError(f"resize must be 'resize' or 'letterbox', got {resize!r}")
    steps += [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    bbox_params = None
    if kind == "detection":
        bbox_params = A.BboxParams(
            format="pascal_voc",
            label_fields=["labels"],
            min_visibility=min_visibility,
            min_area=min_area,
            clip=True,
        )
    with warnings.catch_warnings():
        # A pipeline with no geometric step (eval without resize) is fine: boxes pass through as they are.
        warnings.filterwarnings("ignore", message="Got processor for bboxes, but no transform to process it")
        return A.Compose(steps, bbox_params=bbox_params)
