"""Prediction on images larger than the network's input: overlap-tile segmentation and tiled detection.

Owns the tiling strategies and :class:`TilingOptions` (what the tasks hand in); box merging lives in
:mod:`lightning_convnets.nn.boxes`, the views of test-time augmentation in
:mod:`lightning_convnets.predict.tta`.

:class:`TiledPredictor` (segmentation) chooses overlap-tile with mirrored context for valid-padding
networks (exact against one forward of the whole mirror-padded image) or blended overlapping tiles for
same-padding ones; :class:`TiledDetector` merges the boxes of overlapping tiles (NMS or weighted box
fusion). :func:`segmentation_logits` / :func:`detect` are what the tasks call, with their options. Memory stays bounded by
the tile batch. The strategies in full: ``docs/tiling.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_convnets.nn.boxes import MergeMethod, merge_detections, weighted_box_fusion
from lightning_convnets.predict.tta import TTAConfig, detect_tta, parse_tta, segment_tta

__all__ = [
    "BlendAccumulator",
    "TiledDetector",
    "TiledPredictor",
    "TilingOptions",
    "check_image",
    "check_prediction_options",
    "detect",
    "example_input",
    "expected_channels",
    "merge_detections",
    "mirror_pad",
    "network_geometry",
    "reflect_indices",
    "segmentation_logits",
    "tile_starts",
    "weighted_box_fusion",
]

Window = Literal["gaussian", "linear", "constant"]
Detections = list[dict[str, Tensor]]


# ------------------------------------------------------------------------------------------ geometry
def reflect_indices(start: int, length: int, size: int, device: torch.device | None = None) -> Tensor:
    """Indices ``start .. start + length - 1`` along an axis of ``size`` pixels, mirrored outside it.

    Mirroring does not repeat the edge pixel (``torch``'s ``"reflect"``, numpy's ``"reflect"``): index
    ``-1`` reads pixel 1, index ``size`` reads ``size - 2``. Unlike ``F.pad`` it works for any extent
    (the mirror is repeated, period ``2 * (size - 1)``).

    Example:
        >>> reflect_indices(-2, 7, 4).tolist()
        [2, 1, 0, 1, 2, 3, 2]
    """
    idx = torch.arange(start, start + length, device=device)
    if size == 1:
        return torch.zeros_like(idx)
    period = 2 * (size - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= size, period - idx, idx)


def mirror_pad(image: Tensor, top: int, bottom: int, left: int, right: int) -> Tensor:
    """Mirror-pad the last two dims of ``image`` (any extent; equals ``F.pad(..., mode="reflect")``
    where that is defined).

    Example:
        >>> mirror_pad(torch.arange(3.0).reshape(1, 1, 3), 0, 0, 2, 1).tolist()
        [[[2.0, 1.0, 0.0, 1.0, 2.0, 1.0]]]
    """
    h, w = image.shape[-2:]
    rows = reflect_indices(-top, h + top + bottom, h, image.device)
    cols = reflect_indices(-left, w + left + right, w, image.device)
    return image.index_select(-2, rows).index_select(-1, cols)


def tile_starts(size: int, tile: int, step: int, align: int = 1) -> list[int]:
    """Tile origins covering ``[0, size)`` with tiles of ``tile`` pixels, ``step`` apart.

    Origins are multiples of ``align`` (``step`` is rounded down to one, at least ``align``) except the
    last, which is shifted inward to end exactly at ``size``. A side no longer than the tile gets one
    tile at 0.

    Example:
        >>> tile_starts(100, 32, 24)
        [0, 24, 48, 68]
    """
    if tile < 1 or step < 1:
        raise ValueError(f"tile and step must be >= 1, got tile={tile}, step={step}")
    if size <= tile:
        return [0]
    step = max(align, step // align * align)
    return list(range(0, size - tile, step)) + [size - tile]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class NetworkGeometry:
    """What tiling needs to know about a dense network.

    Attributes:
        border: pixels removed on each side by valid convolutions (0: same padding).
        multiple: input sides (and overlap-tile window origins) must be multiples of this (total stride).
        valid_input_size: smallest accepted input side ``>= n`` (valid padding), if the network says.
    """

    border: int = 0
    multiple: int = 1
    valid_input_size: Callable[[int], int] | None = None


def network_geometry(module: Any) -> NetworkGeometry:
    """Read ``border``, ``multiple`` and ``valid_input_size`` off a network, a task's ``decoder`` or its
    ``backbone`` (the first that has each attribute).

    Example:
        >>> from lightning_convnets.backbones import create_backbone
        >>> g = network_geometry(create_backbone("unet", padding="valid", width=2, depth=2))
        >>> g.border, g.multiple
        (20, 4)
    """
    candidates = [module, getattr(module, "decoder", None), getattr(module, "backbone", None)]
    candidates = [c for c in candidates if c is not None]

    def first(name: str) -> Any:
        for c in candidates:
            value = getattr(c, name, None)
            if value is not None and not (isinstance(value, Tensor)):
                return value
        return None

    border = int(first("border") or 0)
    multiple = first("multiple")
    if not isinstance(multiple, int) or multiple < 1:
        reductions = first("reductions")
        multiple = int(max(reductions)) if reductions else 1
    sizer = first("valid_input_size") if border > 0 else None
    return NetworkGeometry(border=border, multiple=int(multiple), valid_input_size=sizer)


def _window_1d(length: int, kind: Window, ramp: int) -> Tensor:
    i = torch.arange(length, dtype=torch.float32) + 0.5
    if kind == "constant":
        return torch.ones(length)
    if kind == "linear":
        ramp = max(1, ramp)
        return torch.minimum(torch.minimum(i, length - i) / ramp, torch.ones(()))
    if kind == "gaussian":
        sigma = length / 8
        w = torch.exp(-((i - length / 2) ** 2) / (2 * sigma**2))
        # Floor as nnU-Net does, so corners of edge tiles (no neighbour there) keep a usable weight.
        return w.clamp_min(1e-3)
    raise ValueError(f"window must be 'gaussian', 'linear' or 'constant', got {kind!r}")


def _call_dense(model: Callable[[Tensor], Any], x: Tensor) -> Tensor:
    out = model(x)
    if isinstance(out, list | tuple):
        out = out[-1]  # tasks return one map per supervised stack: the last one predicts
    if not isinstance(out, Tensor) or out.ndim != 4:
        raise TypeError(
            f"the tiled model must return logits (N, K, h, w) or a list of them, got {type(out).__name__} "
            f"{tuple(getattr(out, 'shape', ()))}"
        )
    return out


def expected_channels(model: Any) -> int | None:
    """Input channels of the model's first convolution (``None``: not a module, or no convolution)."""
    if isinstance(model, nn.Module):
        for layer in model.modules():
            if isinstance(layer, nn.Conv2d):
                return int(layer.in_channels)
    return None


def check_image(image: Tensor, model: Any, what: str, dims: tuple[int, ...] = (3, 4)) -> None:
    """Raise a ``ValueError`` naming ``image``'s shape and the expected one unless it is ``(C, H, W)`` or
    ``(N, C, H, W)`` (as ``dims`` allows) with the channels the model's first convolution takes.

    Args:
        image: the image (or batch) given to tiled prediction.
        model: the network (its first ``nn.Conv2d`` gives the channel count; none: any count).
        what: who is asking, for the message (``"TiledPredictor.predict"``...).
        dims: the accepted numbers of dimensions: 3 (one image), 4 (a batch).

    Example:
        >>> check_image(torch.zeros(3, 64, 64), nn.Conv2d(3, 8, 3), "tiling")
        >>> check_image(torch.zeros(64, 64, 3), nn.Conv2d(3, 8, 3), "tiling")
        Traceback (most recent call last):
        ...
        ValueError: tiling: the image has shape (64, 64, 3); expected (3, H, W) or (N, 3, H, W) (channels first, 3 channels as the network's first convolution takes). It looks channels-last (..., H, W, C): image.permute(2, 0, 1)
    """
    if not isinstance(image, Tensor):
        raise TypeError(f"{what}: expected an image tensor, got {type(image).__name__}")
    channels = expected_channels(model)
    c = "C" if channels is None else str(channels)
    shapes = " or ".join({3: f"({c}, H, W)", 4: f"(N, {c}, H, W)"}[d] for d in dims)
    if image.ndim in dims and (channels is None or image.shape[-3] == channels):
        return
    message = f"{what}: the image has shape {tuple(image.shape)}; expected {shapes} (channels first"
    message += ")" if channels is None else f", {channels} channels as the network's first convolution takes)"
    if channels is not None and image.ndim in (3, 4) and image.shape[-1] == channels:
        permute = "(2, 0, 1)" if image.ndim == 3 else "(0, 3, 1, 2)"
        message += f". It looks channels-last (..., H, W, C): image.permute{permute}"
    raise ValueError(message)


def _flip(x: Tensor, hflip: bool, vflip: bool) -> Tensor:
    dims = [d for d, on in ((-1, hflip), (-2, vflip)) if on]
    return x.flip(dims) if dims else x


def _model_device(model: Any) -> torch.device | None:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return None


# ------------------------------------------------------------------------------ segmentation tiling
class TiledPredictor:
    """Predict dense logits (or a per-pixel reduction of them) of an image of any size, tile by tile.

    The strategy follows the network's ``border`` (see the module docstring): overlap-tile with mirror
    padding for valid padding (exact: equals one forward of the whole mirror-padded image), blended
    overlapping tiles for same padding.

    Args:
        model: a callable from a batch ``(B, C, h, w)`` to logits ``(B, K, h', w')`` or a list of them (the
            last is used), e.g. a :class:`~lightning_convnets.tasks.SemanticSegmenter` or a U-Net plus head.
        tile_size: output side of a tile in pixels. Valid padding: each tile is predicted from a window of
            ``tile_size + 2 * border`` (rounded up to a size the network accepts). Same padding: rounded up
            to the network's ``multiple``.
        overlap: pixels shared by neighbouring tiles (same padding; default ``tile_size // 4``). Ignored
            with valid padding, where tiles are exact and need no overlap.
        batch_size: tiles per forward; the memory bound.
        window: blending weights (same padding): ``"gaussian"`` (sigma = tile / 8), ``"linear"`` (ramps
            over the overlap) or ``"constant"``.
        geometry: ``border``/``multiple``/``valid_input_size``; default: read from ``model`` with
            :func:`network_geometry`.
        device: where tiles are run (default: the model's parameters' device); the image and the output
            stay where the image is.
        tta: test-time augmentation applied to every tile batch (see
            :func:`~lightning_convnets.predict.tta.parse_tta`): each tile's logits are the mean over the
            views, flipped (and, for same padding, resized) back. Rescaled views need same padding: a
            valid-padding tile is an exact window, which a rescaled copy is not (:func:`segmentation_logits`
            rescales the whole image around the tiles instead).

    Example:
        >>> from lightning_convnets.backbones import create_backbone
        >>> unet, head = create_backbone("unet", width=4, depth=2).eval(), nn.Conv2d(4, 3, 1)
        >>> tiler = TiledPredictor(lambda x: head(unet(x)[0]), tile_size=32, overlap=8,
        ...                        geometry=network_geometry(unet))
        >>> tiler.predict(torch.rand(3, 70, 50)).shape
        torch.Size([3, 70, 50])
        >>> tiler.predict(torch.rand(3, 70, 50), reduce=lambda logits: logits.argmax(0)).shape
        torch.Size([70, 50])
    """

    def __init__(
        self,
        model: Callable[[Tensor], Any],
        tile_size: int = 256,
        overlap: int | None = None,
        batch_size: int = 4,
        window: Window = "gaussian",
        geometry: NetworkGeometry | None = None,
        device: torch.device | str | None = None,
        tta: str | TTAConfig = "none",
    ) -> None:
        if not isinstance(tile_size, int) or tile_size < 1:
            raise ValueError(f"TiledPredictor: tile_size must be a positive int, got {tile_size!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"TiledPredictor: batch_size must be a positive int, got {batch_size!r}")
        if window not in ("gaussian", "linear", "constant"):
            raise ValueError(f"TiledPredictor: window must be gaussian, linear or constant, got {window!r}")
        self.model = model
        self.geometry = geometry if geometry is not None else network_geometry(model)
        self.batch_size = batch_size
        self.window = window
        self.device = torch.device(device) if device is not None else _model_device(model)
        g = self.geometry
        if g.border > 0:
            self.mode = "overlap-tile"
            self.tile_in = self._valid_size(tile_size + 2 * g.border)
            self.tile_out = self.tile_in - 2 * g.border
            self.step = self.tile_out // g.multiple * g.multiple
            if self.step < 1:
                raise ValueError(
                    f"TiledPredictor: tile_size={tile_size} gives output tiles of {self.tile_out} px, less "
                    f"than the network's stride {g.multiple}; use a larger tile_size"
                )
            self.overlap = 0
        else:
            self.mode = "blend"
            self.tile_in = self.tile_out = _round_up(tile_size, g.multiple)
            overlap = self.tile_out // 4 if overlap is None else overlap
            if not isinstance(overlap, int) or not 0 <= overlap < self.tile_out:
                raise ValueError(
                    f"TiledPredictor: overlap must be an int in [0, tile_size) = [0, {self.tile_out}), "
                    f"got {overlap!r}"
                )
            self.overlap = overlap
            self.step = self.tile_out - overlap
        self.tta = parse_tta(tta)
        if self.mode == "overlap-tile" and self.tta.scales != (1.0,):
            raise ValueError(
                f"TiledPredictor: tta scales {list(self.tta.scales)} rescale the image, which the exact tiles of "
                "a valid-padding network cannot do tile by tile; use flips on tiles (tta='flip' or "
                "'flip+vflip') or rescale the whole image (segmentation_logits does)"
            )

    def _valid_size(self, n: int) -> int:
        g = self.geometry
        if g.valid_input_size is not None:
            return int(g.valid_input_size(n))
        return _round_up(n, g.multiple)

    # -------------------------------------------------------------------------------------- plans
    def _axis(self, size: int) -> tuple[int, int, list[int]]:
        """``(window side, output side, output origins)`` along one image axis."""
        g = self.geometry
        if self.mode == "overlap-tile":
            t_in, t_out = self.tile_in, self.tile_out
            if size < t_out:  # a small image gets one smaller exact tile
                t_in = self._valid_size(size + 2 * g.border)
                t_out = t_in - 2 * g.border
            n = 1 if size <= t_out else math.ceil((size - t_out) / self.step) + 1
            return t_in, t_out, [k * self.step for k in range(n)]
        t = min(self.tile_out, _round_up(size, g.multiple))
        return t, t, tile_starts(size, t, self.step, align=g.multiple)

    def plan(self, size: int) -> tuple[int, int, list[int]]:
        """``(input window side, output tile side, output tile origins)`` along one image axis of ``size``
        pixels: what :meth:`predict` cuts, and what streaming prediction
        (:mod:`lightning_convnets.predict.large`) reads window by window. Window ``k`` covers the image
        pixels ``origins[k] - border .. + window side`` (mirrored outside the image).

        Example:
            >>> TiledPredictor(nn.Conv2d(3, 2, 1), tile_size=32, overlap=8).plan(70)
            (32, 32, [0, 24, 38])
        """
        return self._axis(size)

    def forward_batch(self, batch: Tensor) -> Tensor:
        """Float logits ``(B, K, h, w)`` of a batch of input windows (moved to :attr:`device` first): the
        mean over the :attr:`tta` views, each flipped (and resized) back."""
        if self.device is not None:
            batch = batch.to(self.device, non_blocking=True)
        if self.tta.is_identity:
            return _call_dense(self.model, batch).float()
        size = tuple(batch.shape[-2:])
        m = self.geometry.multiple
        views = self.tta.views()
        total: Tensor | None = None
        for scale, hflip, vflip in views:
            x = batch
            if scale != 1.0:
                scaled = tuple(max(m, round(n * scale / m) * m) for n in size)
                x = F.interpolate(x, size=scaled, mode="bilinear", align_corners=False)
            logits = _flip(_call_dense(self.model, _flip(x, hflip, vflip)).float(), hflip, vflip)
            if scale != 1.0:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            total = logits if total is None else total + logits
        assert total is not None
        return total / len(views)

    def blend_weight(self, height: int, width: int) -> Tensor:
        """The blending weights ``(height, width)`` of one tile (same padding: :attr:`window` over the
        overlap)."""
        return _window_1d(height, self.window, self.overlap)[:, None] * _window_1d(
            width, self.window, self.overlap
        )

    def check_output(self, logits: Tensor, height: int, width: int) -> None:
        """Raise a ``RuntimeError`` unless the network's tile output is ``height x width``."""
        self._check_out(logits, height, width)

    def num_tiles(self, height: int, width: int) -> int:
        """How many tiles an image of ``height x width`` takes."""
        return len(self._axis(height)[2]) * len(self._axis(width)[2])

    def whole_image_padding(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Overlap-tile only: ``(top, bottom, left, right)`` mirror padding after which one forward of the
        whole image gives what the tiles give (output cropped to the image at the top-left)."""
        if self.mode != "overlap-tile":
            raise ValueError("whole_image_padding applies to valid-padding networks (overlap-tile)")
        b = self.geometry.border
        pads = []
        for size in (height, width):
            t_in, _, starts = self._axis(size)
            pads += [b, starts[-1] + t_in - b - size]
        return pads[0], pads[1], pads[2], pads[3]

    # --------------------------------------------------------------------------------- prediction
    @torch.no_grad()
    def predict(self, image: Tensor, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Logits ``(K, H, W)`` of one image ``(C, H, W)`` (or ``(N, C, H, W)`` -> ``(N, K, H, W)``).

        Args:
            image: the image(s); they stay on their device, tiles go to :attr:`device`.
            reduce: a per-pixel function applied to finished logits ``(K, h, w)`` (e.g.
                ``lambda l: l.argmax(0)``), so that full-size logits are never held; its output
                ``(..., h, w)`` is what is returned, stitched.
        """
        check_image(image, self.model, "TiledPredictor.predict")
        if image.ndim == 4:
            return torch.stack([self.predict(im, reduce) for im in image])
        if self.mode == "overlap-tile":
            return self._overlap_tile(image, reduce)
        return self._blend(image, reduce)

    def first_window(self, image: Tensor) -> Tensor:
        """The input window of the first tile of ``image`` ``(C, H, W)``: what the network's first forward
        sees (mirror-padded context included under overlap-tile)."""
        h, w = image.shape[-2:]
        b = self.geometry.border
        th_in, _, ys = self._axis(h)
        tw_in, _, xs = self._axis(w)
        rows = reflect_indices(ys[0] - b, th_in, h, image.device)
        cols = reflect_indices(xs[0] - b, tw_in, w, image.device)
        return image.index_select(-2, rows).index_select(-1, cols)

    def _forward(self, windows: list[Tensor]) -> Tensor:
        return self.forward_batch(torch.stack(windows))

    def _tiles(self, image: Tensor) -> Iterator[tuple[list[tuple[int, int, int, int]], Tensor]]:
        """Batches of ``((row, col, y, x) per tile, logits)`` in raster order."""
        h, w = image.shape[-2:]
        b = self.geometry.border
        th_in, _, ys = self._axis(h)
        tw_in, _, xs = self._axis(w)
        rows = [reflect_indices(y - b, th_in, h, image.device) for y in ys]
        cols = [reflect_indices(x - b, tw_in, w, image.device) for x in xs]
        pending: list[tuple[int, int, int, int]] = []
        windows: list[Tensor] = []
        for r, y in enumerate(ys):
            strip = image.index_select(-2, rows[r])
            for c, x in enumerate(xs):
                pending.append((r, c, y, x))
                windows.append(strip.index_select(-1, cols[c]))
                if len(windows) == self.batch_size:
                    yield pending, self._forward(windows)
                    pending, windows = [], []
            del strip
        if windows:
            yield pending, self._forward(windows)

    def _check_out(self, logits: Tensor, th: int, tw: int) -> None:
        if tuple(logits.shape[-2:]) != (th, tw):
            raise RuntimeError(
                f"TiledPredictor: the network returned {tuple(logits.shape[-2:])} for a tile that should give "
                f"{(th, tw)} (border={self.geometry.border}, multiple={self.geometry.multiple}); pass the "
                "network's geometry explicitly"
            )

    def _overlap_tile(self, image: Tensor, reduce: Callable[[Tensor], Tensor] | None) -> Tensor:
        h, w = image.shape[-2:]
        _, th, _ = self._axis(h)
        _, tw, _ = self._axis(w)
        out: Tensor | None = None
        for tiles, logits in self._tiles(image):
            self._check_out(logits, th, tw)
            for (_, _, y, x), tile in zip(tiles, logits):
                hh, ww = min(th, h - y), min(tw, w - x)
                value = tile[:, :hh, :ww].to(image.device)
                value = reduce(value) if reduce is not None else value
                if out is None:
                    out = value.new_empty((*value.shape[:-2], h, w))
                out[..., y : y + hh, x : x + ww] = value
        assert out is not None
        return out

    def _blend(self, image: Tensor, reduce: Callable[[Tensor], Tensor] | None) -> Tensor:
        h, w = image.shape[-2:]
        th, _, ys = self._axis(h)
        tw, _, xs = self._axis(w)
        blender = BlendAccumulator(h, w, ys, xs, self.blend_weight(th, tw).to(image.device))
        out: Tensor | None = None
        for tiles, logits in self._tiles(image):
            self._check_out(logits, th, tw)
            for (r, c, _, _), tile in zip(tiles, logits):
                for y, x, value in blender.add(r, c, tile.to(image.device)):
                    value = reduce(value) if reduce is not None else value
                    if out is None:
                        out = value.new_empty((*value.shape[:-2], h, w))
                    out[..., y : y + value.shape[-2], x : x + value.shape[-1]] = value
        assert out is not None
        return out


class BlendAccumulator:
    """Blends same-padding tiles added in raster order and hands back each region once no later tile
    touches it, so that neither the whole output nor a strip of tile rows across the width is held.

    A pixel's value is the weighted mean of the tiles covering it (``sum(w * tile) / sum(w)``), summed in
    the order the tiles arrive. What is kept: the current tile row's columns not yet finished (at most one
    tile wide) and the band of rows that the next tile row overlaps (``overlap`` rows by the image width,
    with its weight sums): memory grows with the width only through that band, not through a strip of
    ``tile`` rows.

    Args:
        height: image rows.
        width: image columns.
        ys: tile origins along the rows (increasing, as :meth:`TiledPredictor.plan` gives them).
        xs: tile origins along the columns.
        weight: the blending weights ``(tile_h, tile_w)`` of one tile.

    Example:
        >>> blender = BlendAccumulator(6, 6, [0, 2], [0, 2], torch.ones(4, 4))
        >>> blocks = [b for r in range(2) for c in range(2) for b in blender.add(r, c, torch.ones(1, 4, 4))]
        >>> [(y, x, tuple(v.shape)) for y, x, v in blocks]
        [(0, 0, (1, 2, 2)), (0, 2, (1, 2, 4)), (2, 0, (1, 4, 2)), (2, 2, (1, 4, 4))]
    """

    def __init__(self, height: int, width: int, ys: Sequence[int], xs: Sequence[int], weight: Tensor) -> None:
        self.height, self.width = height, width
        self.ys, self.xs = list(ys), list(xs)
        self.weight = weight
        th = weight.shape[0]
        # rows of tile row r + 1 that tile rows up to r have already touched
        self._band_rows = max([th - (b - a) for a, b in zip(self.ys, self.ys[1:])], default=0)
        self._band: Tensor | None = None  # weighted sums of those rows, (..., band rows, width)
        self._band_w: Tensor | None = None  # their weight sums
        self._carried = 0  # how many band rows the current tile row starts with
        self._start = 0  # first column of the current tile row not yet handed back
        self._acc: Tensor | None = None  # (..., th, columns from _start)
        self._acc_w: Tensor | None = None

    @property
    def held_values(self) -> int:
        """How many values (logits and weight sums) the accumulator holds now: its whole memory."""
        held = [self._acc, self._acc_w, self._band, self._band_w]
        return sum(t.untyped_storage().nbytes() // t.element_size() for t in held if t is not None)

    def add(self, r: int, c: int, tile: Tensor) -> list[tuple[int, int, Tensor]]:
        """Add tile ``(r, c)`` (logits ``(..., tile_h, tile_w)``); return the regions it finished as
        ``(y, x, blended values (..., h, w))``."""
        y, x = self.ys[r], self.xs[c]
        th = self.weight.shape[0]
        ww = min(self.weight.shape[1], self.width - x)
        if c == 0:
            self._start = 0
            self._acc = tile.new_zeros((*tile.shape[:-2], th, 0))
            self._acc_w = self.weight.new_zeros((th, 0))
        assert self._acc is not None and self._acc_w is not None
        have = self._start + self._acc.shape[-1]
        if x + ww > have:  # new columns start from what the tile rows above left in them
            new = tile.new_zeros((*tile.shape[:-2], th, x + ww - have))
            new_w = self.weight.new_zeros((th, x + ww - have))
            if self._carried:
                assert self._band is not None and self._band_w is not None
                new[..., : self._carried, :] = self._band[..., : self._carried, have : x + ww]
                new_w[: self._carried] = self._band_w[: self._carried, have : x + ww]
            self._acc = torch.cat([self._acc, new], dim=-1)
            self._acc_w = torch.cat([self._acc_w, new_w], dim=-1)
        a = x - self._start
        self._acc[..., a : a + ww] += (tile * self.weight)[..., :ww]
        self._acc_w[:, a : a + ww] += self.weight[:, :ww]
        # columns left of the next tile are final in this tile row; rows above the next tile row are final
        end_x = self.xs[c + 1] if c + 1 < len(self.xs) else self.width
        last_row = r + 1 == len(self.ys)
        done = min(th, self.height - y) if last_row else self.ys[r + 1] - y
        n = end_x - self._start
        value = self._acc[..., :done, :n] / self._acc_w[:done, :n]
        if not last_row and th > done:
            if self._band is None:
                self._band = tile.new_empty((*tile.shape[:-2], self._band_rows, self.width))
                self._band_w = self.weight.new_empty((self._band_rows, self.width))
            assert self._band_w is not None
            self._band[..., : th - done, self._start : end_x] = self._acc[..., done:, :n]
            self._band_w[: th - done, self._start : end_x] = self._acc_w[done:, :n]
        finished = [(y, self._start, value)]
        self._acc, self._acc_w = self._acc[..., n:], self._acc_w[:, n:]
        self._start = end_x
        if c + 1 == len(self.xs):
            self._carried = th - done if not last_row else 0
        return finished


# ------------------------------------------------------------------------------- detection tiling
class TiledDetector:
    """Detect objects in an image larger than the detector's input, tile by tile.

    Tiles overlap by ``overlap`` pixels and reach every image edge (the last tile of a row or column is
    shifted inward). A detection whose box comes within ``edge_margin`` pixels of a tile border that lies
    inside the image is dropped: the object is cut there, and a neighbouring tile sees it whole when
    ``overlap >= object size + 2 * edge_margin``. The remaining boxes, mapped back to image coordinates,
    are merged class-wise (:func:`merge_detections`: NMS, or weighted box fusion).

    Args:
        detector: a callable from a list of ``[C, h, w]`` images to detections (dicts with ``boxes`` xyxy
            tile pixels, ``scores``, ``labels``), e.g. an :class:`~lightning_convnets.tasks.ObjectDetector`
            in eval mode.
        tile_size: tile side in pixels.
        overlap: pixels shared by neighbouring tiles (default ``tile_size // 4``): more than the largest
            object.
        batch_size: tiles per detector call.
        merge: ``"nms"`` or ``"wbf"``.
        iou_threshold: overlap above which two boxes of a class are merged.
        edge_margin: pixels from an inner tile border within which a box counts as cut.
        max_detections: keep the best this many per image (``None``: all).
        multiple: round the tile side up to this (the detector's size divisor; avoids zero padding).
        tta: test-time augmentation applied to every tile (see
            :func:`~lightning_convnets.predict.tta.detect_tta`): a tile's detections are its views' boxes
            mapped back and fused, before the tiles are merged.

    Example:
        >>> def toy(images):  # a 5x5 box around each lit pixel
        ...     out = []
        ...     for im in images:
        ...         ys, xs = im[0].nonzero(as_tuple=True)
        ...         xy = torch.stack([xs, ys, xs, ys], 1).float()
        ...         out.append({"boxes": xy + torch.tensor([-2.0, -2, 3, 3]), "scores": torch.ones(len(xs)),
        ...                     "labels": torch.zeros(len(xs), dtype=torch.long)})
        ...     return out
        >>> image = torch.zeros(1, 100, 100); image[0, 50, 60] = 1
        >>> TiledDetector(toy, tile_size=40, overlap=16)(image)["boxes"].tolist()
        [[58.0, 48.0, 63.0, 53.0]]
    """

    def __init__(
        self,
        detector: Callable[[list[Tensor]], Detections],
        tile_size: int = 512,
        overlap: int | None = None,
        batch_size: int = 4,
        merge: MergeMethod = "nms",
        iou_threshold: float = 0.5,
        edge_margin: int = 2,
        max_detections: int | None = None,
        multiple: int = 1,
        tta: str | TTAConfig = "none",
    ) -> None:
        if not isinstance(tile_size, int) or tile_size < 1:
            raise ValueError(f"TiledDetector: tile_size must be a positive int, got {tile_size!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"TiledDetector: batch_size must be a positive int, got {batch_size!r}")
        if merge not in ("nms", "wbf"):
            raise ValueError(f"TiledDetector: merge must be 'nms' or 'wbf', got {merge!r}")
        self.tile = _round_up(tile_size, max(1, multiple))
        overlap = self.tile // 4 if overlap is None else overlap
        if not isinstance(overlap, int) or not 0 <= overlap < self.tile:
            raise ValueError(f"TiledDetector: overlap must be an int in [0, {self.tile}), got {overlap!r}")
        self.detector = detector
        self.overlap = overlap
        self.batch_size = batch_size
        self.merge = merge
        self.iou_threshold = iou_threshold
        self.edge_margin = edge_margin
        self.max_detections = max_detections
        self.tta = parse_tta(tta)

    def tiles(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """``(y, x, tile height, tile width)`` of every tile of an image."""
        th, tw = min(self.tile, height), min(self.tile, width)
        step = self.tile - self.overlap
        return [(y, x, th, tw) for y in tile_starts(height, th, step) for x in tile_starts(width, tw, step)]

    def detect_tiles(self, tiles: list[Tensor]) -> Detections:
        """Detections of a batch of tiles ``[C, h, w]`` in tile pixels (their :attr:`tta` views fused)."""
        if self.tta.is_identity:
            return self.detector(tiles)
        return detect_tta(self.detector, tiles, self.tta)

    def keep(
        self, detections: dict[str, Tensor], tile: tuple[int, int, int, int], height: int, width: int
    ) -> dict[str, Tensor]:
        """One tile's detections in image pixels, without the boxes cut by a tile border that lies inside
        the image (within :attr:`edge_margin` of it).

        Args:
            detections: the tile's ``boxes`` (xyxy tile pixels), ``scores``, ``labels``.
            tile: ``(y, x, tile height, tile width)`` as :meth:`tiles` gives it.
            height, width: the image's size.
        """
        y, x, th, tw = tile
        m = self.edge_margin
        boxes = detections["boxes"].reshape(-1, 4).float()
        cut = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
        if x > 0:
            cut |= boxes[:, 0] < m
        if x + tw < width:
            cut |= boxes[:, 2] > tw - m
        if y > 0:
            cut |= boxes[:, 1] < m
        if y + th < height:
            cut |= boxes[:, 3] > th - m
        keep = ~cut
        return {
            "boxes": boxes[keep] + boxes.new_tensor([x, y, x, y]),
            "scores": detections["scores"].reshape(-1)[keep],
            "labels": detections["labels"].reshape(-1)[keep],
        }

    @torch.no_grad()
    def __call__(self, image: Tensor) -> dict[str, Tensor]:
        """Detections of one ``[C, H, W]`` image in its own pixel coordinates."""
        check_image(image, self.detector, "TiledDetector", dims=(3,))
        h, w = image.shape[-2:]
        tiles = self.tiles(h, w)
        kept: list[dict[str, Tensor]] = []
        for start in range(0, len(tiles), self.batch_size):
            chunk = tiles[start : start + self.batch_size]
            dets = self.detect_tiles([image[:, y : y + th, x : x + tw] for y, x, th, tw in chunk])
            kept.extend(self.keep(det, tile, h, w) for tile, det in zip(chunk, dets))
        return merge_detections(kept, self.merge, self.iou_threshold, 1, self.max_detections)


# ------------------------------------------------------------------------------------ task glue
def check_prediction_options(
    tile_size: int | None, tile_overlap: int | None, tile_batch_size: int, tta: str
) -> None:
    """Validate a task's tiling / TTA options (raises ``ValueError`` naming the option)."""
    if tile_size is not None and (not isinstance(tile_size, int) or tile_size < 1):
        raise ValueError(f"tile_size must be a positive int or None, got {tile_size!r}")
    if tile_overlap is not None and (not isinstance(tile_overlap, int) or tile_overlap < 0):
        raise ValueError(f"tile_overlap must be an int >= 0 or None, got {tile_overlap!r}")
    if tile_size is not None and tile_overlap is not None and tile_overlap >= tile_size:
        raise ValueError(f"tile_overlap ({tile_overlap}) must be smaller than tile_size ({tile_size})")
    if not isinstance(tile_batch_size, int) or tile_batch_size < 1:
        raise ValueError(f"tile_batch_size must be a positive int, got {tile_batch_size!r}")
    parse_tta(tta)


@dataclass(frozen=True)
class TilingOptions:
    """How a task predicts at test and predict time: on tiles, with test-time augmentation, or plainly.

    The tasks build one from their own arguments (``tile_size``, ``tile_overlap``, ``tile_batch_size``,
    ``tta``) and hand it to :func:`segmentation_logits`, :func:`detect` and :func:`example_input`.

    Attributes:
        tile_size: tile side in pixels (``None``: whole images).
        tile_overlap: pixels shared by neighbouring tiles (``None``: a quarter tile).
        tile_batch_size: tiles per forward.
        tta: the test-time augmentation (see :func:`lightning_convnets.predict.tta.parse_tta`).

    Example:
        >>> TilingOptions(tile_size=256, tta="flip").active, TilingOptions().active
        (True, False)
    """

    tile_size: int | None = None
    tile_overlap: int | None = None
    tile_batch_size: int = 4
    tta: str = "none"

    def __post_init__(self) -> None:
        check_prediction_options(self.tile_size, self.tile_overlap, self.tile_batch_size, self.tta)

    @property
    def active(self) -> bool:
        """Whether tiles or test-time augmentation are asked for."""
        return self.tile_size is not None or not parse_tta(self.tta).is_identity


def segmentation_logits(model: Any, images: Tensor, options: TilingOptions) -> Tensor:
    """Full-resolution logits ``(N, K, H, W)`` of a dense model (e.g. a segmentation task) under
    ``options``.

    Without ``tile_size``, a valid-padding network still runs overlap-tile (one tile the image's size,
    mirror-padded) so that every pixel gets a prediction; a same-padding one runs whole-image forwards
    (resized logits when its output is coarser).
    """
    tile_size = options.tile_size
    check_image(images, model, f"{type(model).__name__} (tiled / TTA prediction)", dims=(4,))
    geometry = network_geometry(model)
    h, w = images.shape[-2:]
    if tile_size is None and geometry.border > 0:
        tile_size = max(h, w)
    if tile_size is not None:
        # test-time augmentation runs per tile batch (what streamed images do too: both paths agree), except
        # the rescaled views of a valid-padding network, whose exact tiles cannot be rescaled: the whole
        # image is rescaled around the tiles for them
        config = parse_tta(options.tta)
        around = TTAConfig()
        if geometry.border > 0:
            around = TTAConfig(scales=config.scales)
            config = TTAConfig(hflip=config.hflip, vflip=config.vflip)
        tiler = TiledPredictor(
            model, tile_size, options.tile_overlap, options.tile_batch_size, geometry=geometry, tta=config
        )
        return segment_tta(tiler.predict, images, around, multiple=1)

    def dense(x: Tensor) -> Tensor:
        logits = _call_dense(model, x)
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    return segment_tta(dense, images, options.tta, multiple=geometry.multiple)


def example_input(
    model: Any, images: Tensor | Sequence[Tensor], options: TilingOptions, size_divisor: int = 1
) -> Tensor | list[Tensor]:
    """One input as the model sees it under ``options``: the first tile (window) of the first image when
    it predicts on tiles, else the first image, as a batch of one (a tensor for a segmentation batch, a
    list for detection). ``fast_predict`` builds and checks its folded copy on it: a whole image may have
    a size the network refuses that its tiles never have."""
    tile_size = options.tile_size
    if isinstance(images, Tensor):
        check_image(images, model, f"{type(model).__name__} (prediction)", dims=(4,))
        geometry = network_geometry(model)
        if tile_size is None and geometry.border > 0:
            tile_size = max(images.shape[-2:])
        if tile_size is None:
            return images[:1]
        tiler = TiledPredictor(
            model, tile_size, options.tile_overlap, options.tile_batch_size, geometry=geometry
        )
        return tiler.first_window(images[0])[None]
    images = list(images)
    if tile_size is None or not images:
        return images[:1]
    tiler = TiledDetector(
        model, tile_size, options.tile_overlap, options.tile_batch_size, multiple=size_divisor
    )
    y, x, th, tw = tiler.tiles(*images[0].shape[-2:])[0]
    return [images[0][:, y : y + th, x : x + tw]]


def detect(
    detector: Any,
    images: Sequence[Tensor],
    options: TilingOptions,
    max_detections: int = 100,
    size_divisor: int = 1,
) -> Detections:
    """Detections of ``detector`` (e.g. a detection task in eval mode) under ``options``, one dict per
    image; tiles are rounded up to a multiple of ``size_divisor``."""
    for image in images:
        check_image(image, detector, f"{type(detector).__name__} (tiled / TTA detection)", dims=(3,))
    if options.tile_size is not None:  # test-time augmentation per tile (as on streamed images)
        tiler = TiledDetector(
            detector,
            options.tile_size,
            options.tile_overlap,
            options.tile_batch_size,
            max_detections=max_detections,
            multiple=size_divisor,
            tta=options.tta,
        )
        return [tiler(im) for im in images]
    return detect_tta(detector, list(images), options.tta, max_detections=max_detections)
