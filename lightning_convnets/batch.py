"""Find the input images in a batch, whatever shape the batch has.

One helper shared by the tasks and the monitors (callbacks may import it: it knows nothing of tasks).
Batches come as a tensor, ``(images, targets)`` tuples or lists, dicts (``{"image": ...}``,
``{"pixel_values": ...}``, torchgeo-style), or detection batches whose first element is a list of
images of varying sizes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["INPUT_KEYS", "TARGET_KEYS", "batch_inputs", "split_batch"]

INPUT_KEYS = ("image", "images", "pixel_values", "input", "inputs", "x", "img", "imgs")
"""Dict keys tried first, in order, when a batch is a mapping and no key is given."""
TARGET_KEYS = ("label", "labels", "mask", "masks", "target")
"""Dict keys of the targets, tried in order by :func:`split_batch`."""


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(images, targets)`` of a batch the tasks take: a tensor (no targets), a ``(images, targets, ...)``
    sequence or a dict with one of :data:`INPUT_KEYS` and one of :data:`TARGET_KEYS`; targets may be None.

    Example:
        >>> split_batch({"image": torch.zeros(1, 3, 4, 4), "mask": torch.zeros(1, 4, 4)})[1].shape
        torch.Size([1, 4, 4])
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        images = next((batch[k] for k in INPUT_KEYS if k in batch), None)
        if images is None:
            raise KeyError(f"batch dict needs one of the keys {list(INPUT_KEYS)}, got keys {sorted(batch)}")
        return images, next((batch[k] for k in TARGET_KEYS if k in batch), None)
    if isinstance(batch, list | tuple) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(f"cannot read images from a batch of type {type(batch).__name__}")


def _is_batched(x: Any) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 2


def _image_list(x: Any) -> bool:
    return isinstance(x, list | tuple) and len(x) > 0 and all(_is_image(i) for i in x)


def _is_image(x: Any) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 1


def _stack_images(images: list[Tensor] | tuple[Tensor, ...], limit: int | None) -> Tensor:
    first = images[0]
    same = [x for x in images if x.shape == first.shape]
    return torch.stack(same[:limit] if limit else same)


def batch_inputs(batch: Any, key: str | int | None = None, *, max_images: int | None = None) -> Tensor:
    """The input tensor ``(N, C, ...)`` of ``batch``.

    Without ``key``: the batch itself if it is a floating tensor; for a mapping, the first of
    :data:`INPUT_KEYS` present, else the first floating tensor with a batch dimension; for a tuple or
    list, its first floating tensor with a batch dimension, or its first element when that is a list of
    images (detection batches: the images of the first image's shape are stacked). ``key`` names the dict
    key (or the tuple index) instead.

    Args:
        batch: a training/validation batch as the dataloader yields it.
        key: dict key or sequence index of the inputs; ``None`` looks for them.
        max_images: stack at most this many images of a detection batch (``None``: all of the first
            image's shape).

    Returns:
        The inputs (not copied).

    Raises:
        KeyError: ``key`` is not in the batch.
        TypeError: no floating tensor could be found; the message says what the batch holds.

    Example:
        >>> import torch
        >>> batch_inputs({"label": torch.tensor([1]), "pixel_values": torch.zeros(1, 3, 8, 8)}).shape
        torch.Size([1, 3, 8, 8])
        >>> batch_inputs(([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)], [{}, {}])).shape
        torch.Size([2, 3, 8, 8])
    """
    if key is not None:
        try:
            value = batch[key]
        except (KeyError, IndexError, TypeError) as err:
            raise KeyError(f"input key {key!r} is not in the batch ({describe_batch(batch)})") from err
        if _image_list(value):
            return _stack_images(value, max_images)
        if not isinstance(value, Tensor):
            raise TypeError(f"batch[{key!r}] is a {type(value).__name__}, not a tensor")
        return value
    if isinstance(batch, Tensor):
        if not batch.is_floating_point():
            raise TypeError(f"the batch is a {batch.dtype} tensor, not floating-point images")
        return batch
    if isinstance(batch, Mapping):
        for name in INPUT_KEYS:
            value = batch.get(name)
            if _is_batched(value):
                return value
            if _image_list(value):
                return _stack_images(value, max_images)
        for value in batch.values():
            if _is_batched(value):
                return value
    elif isinstance(batch, list | tuple) and batch:
        if _image_list(batch[0]) and not _is_batched(batch[0]):
            return _stack_images(batch[0], max_images)
        for value in batch:
            if _is_batched(value):
                return value
    raise TypeError(
        f"cannot find the inputs in a batch of type {type(batch).__name__} ({describe_batch(batch)}): expected a floating tensor, a "
        f"tuple/list holding one, a list of images, or a dict with one of {list(INPUT_KEYS)}; name it "
        "with input_key="
    )


def describe_batch(batch: Any, depth: int = 0) -> str:
    """A short description of a batch's structure for error messages, e.g. ``dict(image: float32[4, 3,
    32, 32], label: int64[4])``."""
    if isinstance(batch, Tensor):
        return f"{str(batch.dtype).replace('torch.', '')}{list(batch.shape)}"
    if depth >= 2:
        return type(batch).__name__
    if isinstance(batch, Mapping):
        items = list(batch.items())[:6]
        return "dict(" + ", ".join(f"{k}: {describe_batch(v, depth + 1)}" for k, v in items) + ")"
    if isinstance(batch, list | tuple):
        items = [describe_batch(v, depth + 1) for v in batch[:4]]
        more = ", ..." if len(batch) > 4 else ""
        return f"{type(batch).__name__}({', '.join(items)}{more})"
    return type(batch).__name__
