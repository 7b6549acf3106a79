"""Segmentation of images larger than memory: windows streamed from disk, the mask written tile by tile.

:func:`predict_large` is the one call (``predict_large(model, "slide.tif", "mask.tif", tile_size=512)``);
:class:`LargeImagePredictor` is what it runs, and what the segmentation task runs on a large file of a
``predict_dir``. The input is read through a reader (:mod:`lightning_convnets.predict.readers`: tiled TIFF,
BigTIFF, OME-TIFF, Zarr, numpy memmaps, PIL formats) one tile window at a time, the next tile batch is
read in a background thread while the network runs, and the results go to a sink that never holds the
whole output: :class:`TiffTileSink` (a tiled, compressed TIFF, BigTIFF when over 2 GiB, written by
``tifffile`` from a queue of finished tiles) or :class:`ZarrSink`. Both write under a temporary name
and rename at the end, so a failure (a truncated input, a full disk) never leaves a half-written file
under the final name.

The tiling is :class:`~lightning_convnets.predict.tiling.TiledPredictor`'s: overlap-tile for valid
padding (exact: equals one forward of the whole mirror-padded image) and blended tiles for same padding
(:class:`~lightning_convnets.predict.tiling.BlendAccumulator` hands back each region once no later tile
touches it). Memory: a few tile batches, the blend band (``(K + 1) x overlap x width`` floats: the rows
the next tile row overlaps, same padding only) and the sink's unfinished bands of output rows
(``~2 x output tile x width`` bytes per output channel). The story: ``docs/tiling.md``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from lightning_convnets.nn.boxes import MergeMethod, merge_detections
from lightning_convnets.predict.readers import ImageReader, open_image
from lightning_convnets.predict.tiling import (
    BlendAccumulator,
    NetworkGeometry,
    TiledDetector,
    TiledPredictor,
    Window,
    check_image,
    expected_channels,
    network_geometry,
    reflect_indices,
)
from lightning_convnets.predict.tta import TTAConfig

__all__ = [
    "DetectionRecords",
    "LargeDetections",
    "LargeImageDetector",
    "LargeImagePredictor",
    "LargePrediction",
    "OutputSink",
    "StreamedRun",
    "StreamedSource",
    "TiffTileSink",
    "ZarrSink",
    "open_sink",
    "pixels_to_unit",
    "predict_large",
    "predict_large_detections",
]

TIFF_OUTPUT_SUFFIXES = (".tif", ".tiff")
#: the tile side the tasks stream an image with when they are given no ``tile_size``
STREAMED_TILE_SIZE = 512


@runtime_checkable
class StreamedSource(Protocol):
    """An image to stream with its normalisation: what a data module hands a task for a file it does
    not load (``lightning_convnets.datamodules.io.StreamedImage``)."""

    path: Path
    mean: Sequence[float]
    std: Sequence[float]


# ------------------------------------------------------------------------------------------- sinks
class OutputSink(Protocol):
    """Where streamed results go: ``write`` blocks of rows/columns, ``rows_done`` when every row above
    ``end`` is final, then ``commit`` (or ``abort`` on failure: nothing left under the final name)."""

    path: Path
    dtype: np.dtype

    def write(self, y: int, x: int, values: np.ndarray) -> None:
        """Put ``values`` ``(h, w, channels)`` at ``(y, x)``."""
        ...

    def rows_done(self, end: int) -> None:
        """Every row above ``end`` is final (it may be flushed to disk)."""
        ...

    def commit(self) -> None:
        """Finish the file and move it to :attr:`path`."""
        ...

    def abort(self) -> None:
        """Drop the temporary file."""
        ...


def _temporary(path: Path) -> Path:
    # hidden and without the final suffix, so that no folder scan mistakes it for an image
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


class _Abort(Exception):
    pass


class TiffTileSink:
    """A tiled, compressed TIFF written tile by tile in raster order, never holding the whole output.

    Finished rows are cut into ``tile x tile`` TIFF tiles and queued to a ``tifffile.TiffWriter`` running
    in a thread (compression overlaps the caller's work); at most the bands of rows not yet final are
    held (``tile`` rows each). Written to a hidden temporary name and renamed by :meth:`commit`.

    Args:
        path: the final file (``.tif``/``.tiff``).
        height, width, channels: the output's size.
        dtype: the output's dtype (``uint8``, ``uint16``...).
        tile: TIFF tile side (a multiple of 16).
        compression: ``tifffile`` compression that needs no extra codec: ``"zlib"`` (deflate), ``"lzma"``
            or ``None``.
        resolution, resolution_unit: carried into the file (from the input's TIFF tags).
        colormap: a ``(3, 2**bits)`` uint16 palette for a ``uint8`` mask (opens in colour, reads back as
            indices).

    Example:
        >>> import tempfile, tifffile
        >>> path = Path(tempfile.mkdtemp()) / "mask.tif"
        >>> sink = TiffTileSink(path, 40, 50, 1, np.uint8, tile=16)
        >>> sink.write(0, 0, np.ones((40, 50, 1), np.uint8)); sink.commit()
        >>> tifffile.imread(path).shape, int(tifffile.imread(path).sum())
        ((40, 50), 2000)
    """

    def __init__(
        self,
        path: str | Path,
        height: int,
        width: int,
        channels: int,
        dtype: Any,
        tile: int = 256,
        compression: str | None = "zlib",
        resolution: tuple[float, float] | None = None,
        resolution_unit: int | None = None,
        colormap: np.ndarray | None = None,
    ) -> None:
        import tifffile

        if tile < 16 or tile % 16:
            raise ValueError(f"TiffTileSink: tile must be a multiple of 16, got {tile}")
        self.path = Path(path)
        self.tmp = _temporary(self.path)
        self.height, self.width, self.channels = int(height), int(width), int(channels)
        self.dtype = np.dtype(dtype)
        self.tile = tile
        self._columns = math.ceil(self.width / tile)
        self._bands: dict[int, np.ndarray] = {}
        self._flushed = 0  # index of the next band to flush
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(8, 2 * self._columns))
        self._error: BaseException | None = None
        self._closed = False
        shape: tuple[int, ...] = (self.height, self.width)
        if self.channels > 1:
            shape = (*shape, self.channels)
        size = self.height * self.width * self.channels * self.dtype.itemsize
        options: dict[str, Any] = {
            "shape": shape,
            "dtype": self.dtype,
            "tile": (tile, tile),
            "compression": compression,
            "photometric": "palette" if colormap is not None else "minisblack",
            "metadata": None,
        }
        if colormap is not None:
            options["colormap"] = colormap
        if self.channels > 1:
            options["planarconfig"] = "contig"
        if resolution is not None:
            options["resolution"] = resolution
            if resolution_unit is not None:
                options["resolutionunit"] = resolution_unit
        self.path.parent.mkdir(parents=True, exist_ok=True)

        def run() -> None:
            try:
                with tifffile.TiffWriter(self.tmp, bigtiff=size > 2**31 - 2**25) as writer:
                    writer.write(self._tiles(), **options)
            except BaseException as err:  # reported to the caller by _put / commit
                self._error = err

        self._thread = threading.Thread(target=run, name=f"TiffTileSink({self.path.name})", daemon=True)
        self._thread.start()

    def _tiles(self) -> Iterator[np.ndarray]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if item is _Abort:
                raise _Abort()
            yield item

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err = self._error
            self._cleanup()
            raise OSError(f"{self.path}: writing the output failed: {type(err).__name__}: {err}") from err

    def _put(self, item: Any) -> None:
        while True:
            self._raise_if_failed()
            if not self._thread.is_alive():
                self._raise_if_failed()
                if item is None:  # tifffile stops reading once it has every tile
                    return
                raise OSError(f"{self.path}: the TIFF writer stopped before the output was complete")
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def write(self, y: int, x: int, values: np.ndarray) -> None:
        """Put ``values`` ``(h, w, channels)`` at ``(y, x)`` (rows not yet flushed)."""
        h, w = values.shape[:2]
        t = self.tile
        if y // t < self._flushed:
            raise RuntimeError(
                f"{self.path}: rows from {y} were already written (tiles must come in row order)"
            )
        for k in range(y // t, (y + h - 1) // t + 1):
            band = self._bands.get(k)
            if band is None:
                band = self._bands[k] = np.zeros((t, self._columns * t, self.channels), self.dtype)
            top, bottom = max(y, k * t), min(y + h, (k + 1) * t)
            band[top - k * t : bottom - k * t, x : x + w] = values[top - y : bottom - y]

    def rows_done(self, end: int) -> None:
        """Flush every band of TIFF tiles whose rows all lie above ``end``."""
        t = self.tile
        while self._flushed * t < self.height and ((self._flushed + 1) * t <= end or end >= self.height):
            band = self._bands.pop(self._flushed, None)
            if band is None:
                band = np.zeros((t, self._columns * t, self.channels), self.dtype)
            for j in range(self._columns):
                part = band[:, j * t : (j + 1) * t]
                self._put(np.ascontiguousarray(part if self.channels > 1 else part[..., 0]))
            self._flushed += 1

    def commit(self) -> None:
        """Flush the rest, finish the file and rename it to :attr:`path`."""
        self.rows_done(self.height)
        self._put(None)
        self._thread.join()
        self._raise_if_failed()
        self._closed = True
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Stop the writer and delete the temporary file."""
        if self._closed:
            return
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        with contextlib.suppress(queue.Full):  # emptied just above
            self._queue.put_nowait(_Abort)
        self._thread.join(timeout=30)
        self._cleanup()

    def _cleanup(self) -> None:
        self._closed = True
        self._bands.clear()
        if self.tmp.exists():
            self.tmp.unlink()


class ZarrSink:
    """A Zarr array written region by region (chunks ``tile x tile``), in a temporary folder renamed by
    :meth:`commit`.

    Example:
        >>> import tempfile, zarr
        >>> path = Path(tempfile.mkdtemp()) / "mask.zarr"
        >>> sink = ZarrSink(path, 40, 50, 1, np.uint8, tile=16)
        >>> sink.write(8, 8, np.ones((4, 4, 1), np.uint8)); sink.commit()
        >>> int(zarr.open_array(path, mode="r")[:].sum())
        16
    """

    def __init__(
        self, path: str | Path, height: int, width: int, channels: int, dtype: Any, tile: int = 256, **_: Any
    ) -> None:
        import zarr

        self.path = Path(path)
        self.tmp = _temporary(self.path)
        self.channels = channels
        self.dtype = np.dtype(dtype)
        shape: tuple[int, ...] = (height, width) if channels == 1 else (height, width, channels)
        chunks: tuple[int, ...] = (tile, tile) if channels == 1 else (tile, tile, channels)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._array = zarr.create_array(
                store=str(self.tmp), shape=shape, chunks=chunks, dtype=np.dtype(dtype), fill_value=0
            )
        except Exception as err:
            self._cleanup()
            raise OSError(f"{self.path}: cannot create the output ({type(err).__name__}: {err})") from err

    def write(self, y: int, x: int, values: np.ndarray) -> None:
        """Write ``values`` ``(h, w, channels)`` at ``(y, x)``."""
        h, w = values.shape[:2]
        try:
            self._array[y : y + h, x : x + w] = values if self.channels > 1 else values[..., 0]
        except Exception as err:
            self._cleanup()
            raise OSError(f"{self.path}: writing the output failed: {type(err).__name__}: {err}") from err

    def rows_done(self, end: int) -> None:
        """Nothing to flush: regions are written as they come."""

    def commit(self) -> None:
        """Rename the finished store to :attr:`path` (replacing an older one)."""
        if self.path.exists():
            shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Delete the temporary store."""
        self._cleanup()

    def _cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def open_sink(
    path: str | Path, height: int, width: int, channels: int, dtype: Any, tile: int = 256, **options: Any
) -> OutputSink:
    """A :class:`TiffTileSink` for ``.tif``/``.tiff``, a :class:`ZarrSink` for ``.zarr``.

    Raises:
        ValueError: naming ``path`` for another suffix.
    """
    suffix = Path(path).suffix.lower()
    if suffix in TIFF_OUTPUT_SUFFIXES:
        return TiffTileSink(path, height, width, channels, dtype, tile, **options)
    if suffix == ".zarr":
        return ZarrSink(path, height, width, channels, dtype, tile)
    raise ValueError(f"{path}: the output must end in .tif, .tiff or .zarr (a tiled TIFF or a Zarr array)")


# --------------------------------------------------------------------------------------- prediction
@dataclass
class StreamedRun:
    """What every streamed prediction reports.

    Attributes:
        source: the input (its path).
        height, width: the image's size.
        tiles: tiles run.
        seconds: wall time of the prediction.
    """

    source: str
    height: int
    width: int
    tiles: int
    seconds: float

    @property
    def mpix_per_s(self) -> float:
        """Input megapixels per second."""
        return self.height * self.width / 1e6 / max(self.seconds, 1e-9)


@dataclass(kw_only=True)  # not frozen: Lightning's apply_to_collection rebuilds what a predict_step returns
class LargePrediction(StreamedRun):
    """What :func:`predict_large` wrote (and :class:`StreamedRun`'s numbers).

    Attributes:
        output: the class mask file.
        probabilities: the per-class probabilities file, or ``None``.
    """

    output: Path
    probabilities: Path | None = None


def _default_reduce(logits: Tensor) -> Tensor:
    return logits.argmax(0) if logits.shape[0] > 1 else (logits[0] > 0).long()


def _default_probabilities(logits: Tensor) -> Tensor:
    return logits.softmax(0) if logits.shape[0] > 1 else torch.sigmoid(logits)


# Pixels to the 0..1 scale, the rule of the in-memory path too (datamodules' image loading): integers by
# their dtype's maximum (uint8 / 255, uint16 / 65535, whatever the image's own peak), bool as 0/1, floats
# taken as 0..1 already (clipped to it).
_SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(bool): 1.0}


def pixels_to_unit(array: np.ndarray) -> np.ndarray:
    """``float32`` pixels on the 0..1 scale: ``uint8`` / 255, ``uint16`` / 65535 (the dtype's maximum,
    never the image's peak: a dark 16-bit image stays dark), ``bool`` as 0/1, floats clipped to 0..1.

    Raises:
        ValueError: for another dtype.

    Example:
        >>> (pixels_to_unit(np.array([0, 255, 65535], np.uint16)) * 65535).round().tolist()
        [0.0, 255.0, 65535.0]
    """
    dtype = np.dtype(array.dtype)
    out = array.astype(np.float32)
    if np.issubdtype(dtype, np.floating):
        return np.clip(out, 0.0, 1.0, out=out)
    scale = _SCALES.get(dtype)
    if scale is None:
        raise ValueError(f"pixels of dtype {dtype}; expected uint8, uint16, bool or floats")
    if scale != 1.0:
        out *= 1.0 / scale
    return out


class _Prefetcher:
    """``(item, load(item))`` for each item, the next ``depth`` loads running in one background thread."""

    def __init__(
        self, load: Callable[[Any], Any], items: Sequence[Any], enabled: bool, depth: int = 1
    ) -> None:
        self.load, self.items, self.enabled, self.depth = load, items, enabled, depth

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        if not self.enabled:
            for item in self.items:
                yield item, self.load(item)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-reader") as pool:
            pending: list[Future] = [pool.submit(self.load, item) for item in self.items[: self.depth + 1]]
            try:
                for k, item in enumerate(self.items):
                    result = pending.pop(0).result()
                    ahead = k + self.depth + 1
                    if ahead < len(self.items):
                        pending.append(pool.submit(self.load, self.items[ahead]))
                    yield item, result
            finally:
                for future in pending:
                    future.cancel()


class _WindowInput:
    """The input side of streaming: a model's channels and normalisation, windows read and normalised."""

    def __init__(self, model: Any, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        self.model = model
        self.channels = expected_channels(model)
        self.mean = None if mean is None else np.asarray(mean, np.float32)
        self.std = None if std is None else np.asarray(std, np.float32)
        if self.std is not None and (self.std <= 0).any():
            raise ValueError(f"{type(self).__name__}: std must be positive, got {list(self.std)}")

    def check_reader(self, reader: ImageReader) -> None:
        """Raise a ``ValueError`` naming the file unless its channels and dtype can be fed to the model."""
        channels = reader.shape[2]
        if (
            self.channels is not None
            and channels != self.channels
            and not (channels == 1 and self.channels == 3)
        ):
            raise ValueError(
                f"{reader.path}: the image has {channels} channels; the network's first convolution takes "
                f"{self.channels} (a 1-channel image is repeated to 3; other counts are refused)"
            )
        dtype = np.dtype(reader.dtype)
        if dtype not in _SCALES and not np.issubdtype(dtype, np.floating):
            raise ValueError(
                f"{reader.path}: pixels of dtype {dtype}; expected uint8, uint16, bool or floats"
            )
        for name, stats in (("mean", self.mean), ("std", self.std)):
            width = self.channels or channels
            if stats is not None and len(stats) not in (1, width):
                raise ValueError(
                    f"{reader.path}: {name} has {len(stats)} values; the network takes {width} channels"
                )

    def _tensor(self, window: np.ndarray, dtype: np.dtype) -> Tensor:
        array = pixels_to_unit(window)
        if array.shape[2] == 1 and self.channels == 3:
            array = np.repeat(array, 3, axis=2)
        if self.mean is not None:
            array -= self.mean
        if self.std is not None:
            array /= self.std
        return torch.from_numpy(array).permute(2, 0, 1)

    def _window(self, reader: ImageReader, y0: int, h: int, x0: int, w: int) -> Tensor:
        """The input window ``h x w`` at ``(y0, x0)`` (may reach outside: mirrored), as a ``(C, h, w)`` float
        tensor; only the pixels inside the image are read."""
        height, width = reader.shape[:2]
        rows = reflect_indices(y0, h, height).numpy()
        cols = reflect_indices(x0, w, width).numpy()
        r0, c0 = int(rows.min()), int(cols.min())
        data = reader.read(r0, c0, int(rows.max()) + 1 - r0, int(cols.max()) + 1 - c0)
        if data.shape[0] != h or rows[0] != r0 or not (np.diff(rows) == 1).all():
            data = data[rows - r0]
        if data.shape[1] != w or cols[0] != c0 or not (np.diff(cols) == 1).all():
            data = data[:, cols - c0]
        return self._tensor(data, np.dtype(reader.dtype))


@contextlib.contextmanager
def streaming_run(model: Any, reader: ImageReader, source: Any, outputs: list[Any]) -> Iterator[None]:
    """The frame of one streamed prediction: the model in eval mode under ``torch.inference_mode``; every
    output in ``outputs`` (appended to while the run goes: a sink with ``commit``/``abort``) committed to
    its final name on success and aborted (its temporary file removed) on any failure; the model's mode
    restored; ``reader`` closed unless the caller passed it in (``source``)."""
    was_training = isinstance(model, nn.Module) and model.training
    try:
        if was_training:
            model.eval()
        with torch.inference_mode():
            yield
        for output in outputs:
            output.commit()
    except BaseException:
        for output in outputs:
            output.abort()
        raise
    finally:
        if was_training:
            model.train()
        if reader is not source:
            reader.close()


class LargeImagePredictor(_WindowInput):
    """Segment an image read window by window into a mask written tile by tile.

    Args:
        model: a dense network, images ``(B, C, h, w)`` to logits ``(B, K, h', w')`` or a list of them
            (e.g. a :class:`~lightning_convnets.tasks.SemanticSegmenter`).
        tile_size, overlap, batch_size, window, geometry, device: as :class:`TiledPredictor`.
        mean, std: per-channel normalisation on the 0..1 scale (the data module's ``mean``/``std``);
            ``None``: none. Pixels are first scaled to 0..1 by :func:`pixels_to_unit` (``uint8`` / 255,
            ``uint16`` / 65535, floats clipped to 0..1), the rule of the in-memory path.
        reduce: finished logits ``(K, h, w)`` -> class indices ``(h, w)`` (default: argmax; one channel:
            logit > 0).
        probabilities: finished logits -> per-class probabilities ``(K, h, w)`` (default: softmax; one
            channel: sigmoid), written when an output for them is given.
        prefetch: read the next tile batch in a background thread while the network runs.
        channels_last: feed the network channels-last batches (faster convolutions on GPUs).
        autocast: run the network under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``).
        progress: show a progress bar (tiles done, Mpix/s, time left).
        output_tile: the output file's tile (chunk) side.
        compression: the TIFF output's compression (``"zlib"``, ``"lzma"``, ``None``).
        probability_dtype: the probabilities' file: ``"uint8"`` (``p * 255``, rounded) or ``"float32"``.
        tta: test-time augmentation per tile batch (``"flip"``, ``"flip+vflip"``; rescaled views need a
            same-padding network), as :class:`TiledPredictor` does in memory: both paths agree.

    Example:
        >>> import tempfile, tifffile
        >>> from lightning_convnets.backbones import create_backbone
        >>> unet, head = create_backbone("unet", width=4, depth=2, padding="valid").eval(), nn.Conv2d(4, 2, 1)
        >>> folder = Path(tempfile.mkdtemp())
        >>> tifffile.imwrite(folder / "in.tif", np.zeros((90, 70, 3), np.uint8), tile=(32, 32))
        >>> predictor = LargeImagePredictor(lambda x: head(unet(x)[0]), tile_size=32,
        ...                                 geometry=network_geometry(unet), progress=False)
        >>> predictor.predict(folder / "in.tif", folder / "mask.tif").tiles
        9
        >>> tifffile.imread(folder / "mask.tif").shape
        (90, 70)
    """

    def __init__(
        self,
        model: Callable[[Tensor], Any],
        tile_size: int = 512,
        overlap: int | None = None,
        batch_size: int = 4,
        window: Window = "gaussian",
        geometry: NetworkGeometry | None = None,
        device: torch.device | str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
        probabilities: Callable[[Tensor], Tensor] | None = None,
        prefetch: bool = True,
        channels_last: bool = False,
        autocast: torch.dtype | None = None,
        progress: bool = True,
        output_tile: int = 256,
        compression: str | None = "zlib",
        probability_dtype: Literal["uint8", "float32"] = "uint8",
        tta: str | TTAConfig = "none",
    ) -> None:
        if probability_dtype not in ("uint8", "float32"):
            raise ValueError(
                f"LargeImagePredictor: probability_dtype must be 'uint8' or 'float32', got {probability_dtype!r}"
            )
        self.probability_dtype = probability_dtype
        super().__init__(model, mean, std)
        self.tiler = TiledPredictor(
            model, tile_size, overlap, batch_size, window, geometry or network_geometry(model), device, tta
        )
        self.reduce = reduce or _default_reduce
        self.to_probabilities = probabilities or _default_probabilities
        self.prefetch = prefetch
        self.channels_last = channels_last
        self.autocast = autocast
        self.progress = progress
        self.output_tile = output_tile
        self.compression = compression

    def first_input(self, source: Any) -> Tensor:
        """The first tile's input window ``(1, C, h, w)``, as the network sees it: what ``fast_predict``
        builds and checks its folded copy on."""
        reader = open_image(source)
        try:
            self.check_reader(reader)
            height, width = reader.shape[:2]
            th_in, _, ys = self.tiler.plan(height)
            tw_in, _, xs = self.tiler.plan(width)
            b = self.tiler.geometry.border
            return self._window(reader, ys[0] - b, th_in, xs[0] - b, tw_in)[None]
        finally:
            if reader is not source:
                reader.close()

    # ------------------------------------------------------------------------------------ running
    def _forward(self, batch: Tensor) -> Tensor:
        device = self.tiler.device
        if device is not None and device.type == "cuda":
            batch = batch.to(device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        if self.autocast is None:
            return self.tiler.forward_batch(batch)
        device_type = device.type if device is not None else "cpu"
        with torch.autocast(device_type, dtype=self.autocast):
            return self.tiler.forward_batch(batch)

    def predict(
        self, source: Any, output: str | Path, probabilities: str | Path | None = None, level: int = 0
    ) -> LargePrediction:
        """Segment ``source`` (a path, array or reader; see :func:`~lightning_convnets.predict.readers.open_image`)
        into the class mask ``output`` (``.tif``/``.tiff``: a tiled, compressed TIFF; ``.zarr``), and the
        per-class probabilities (uint8, ``p * 255``) into ``probabilities`` when given.

        Raises:
            ImageReadError: naming the input when it is missing, unreadable or truncated.
            ValueError: naming the input when its channels or dtype do not fit the network, or an output
                of an unknown type.
            OSError: naming the output when writing fails (nothing is left under its name).
        """
        output = Path(output)
        probabilities = None if probabilities is None else Path(probabilities)
        for target in (output, probabilities):
            if target is not None and target.suffix.lower() not in (*TIFF_OUTPUT_SUFFIXES, ".zarr"):
                raise ValueError(f"{target}: the output must end in .tif, .tiff or .zarr")
        reader = open_image(source, level=level)
        sinks: list[OutputSink] = []
        with streaming_run(self.model, reader, source, sinks):
            self.check_reader(reader)
            start = time.perf_counter()
            tiles = self._run(reader, output, probabilities, sinks)
        seconds = time.perf_counter() - start
        height, width = reader.shape[:2]
        return LargePrediction(str(reader.path), height, width, tiles, seconds, output=output, probabilities=probabilities)

    def _open_sinks(
        self, reader: ImageReader, classes: int, output: Path, probabilities: Path | None, sinks: list
    ) -> None:
        height, width = reader.shape[:2]
        dtype = np.uint8 if classes <= 256 else np.uint16
        options: dict[str, Any] = {"compression": self.compression}
        resolution = getattr(reader, "resolution", None)
        if resolution is not None:
            options.update(resolution=resolution, resolution_unit=getattr(reader, "resolution_unit", None))
        mask_options = dict(options)
        if dtype == np.uint8 and output.suffix.lower() in TIFF_OUTPUT_SUFFIXES:
            from lightning_convnets.drawing import palette

            mask_options["colormap"] = np.asarray(palette(256), np.uint16).reshape(256, 3).T * 257
        sinks.append(open_sink(output, height, width, 1, dtype, self.output_tile, **mask_options))
        if probabilities is not None:
            kind = np.dtype(self.probability_dtype)
            sinks.append(open_sink(probabilities, height, width, classes, kind, self.output_tile, **options))

    def _emit(self, sinks: list, y: int, x: int, logits: Tensor) -> None:
        mask = self.reduce(logits)
        sinks[0].write(y, x, mask.to("cpu").numpy().astype(sinks[0].dtype)[..., None])
        if len(sinks) > 1:
            p = self.to_probabilities(logits.float())
            if self.probability_dtype == "uint8":
                p = p.mul(255).round_().clamp_(0, 255).to(torch.uint8)
            sinks[1].write(y, x, p.permute(1, 2, 0).to("cpu").numpy())

    def _run(self, reader: ImageReader, output: Path, probabilities: Path | None, sinks: list) -> int:
        tiler = self.tiler
        height, width = reader.shape[:2]
        th_in, th, ys = tiler.plan(height)
        tw_in, tw, xs = tiler.plan(width)
        b = tiler.geometry.border
        tiles = [(r, c, y, x) for r, y in enumerate(ys) for c, x in enumerate(xs)]
        batches = [tiles[i : i + tiler.batch_size] for i in range(0, len(tiles), tiler.batch_size)]
        pin = tiler.device is not None and tiler.device.type == "cuda"

        def load(batch: list[tuple[int, int, int, int]]) -> Tensor:
            windows = torch.stack([self._window(reader, y - b, th_in, x - b, tw_in) for _, _, y, x in batch])
            return windows.pin_memory() if pin else windows

        bar = _progress(len(tiles), height * width, reader.path, self.progress)
        blender = None
        if tiler.mode == "blend":
            blender = BlendAccumulator(height, width, ys, xs, tiler.blend_weight(th, tw))
        try:
            for batch, inputs in _Prefetcher(load, batches, self.prefetch):
                logits = self._forward(inputs)
                tiler.check_output(logits, th, tw)
                if not sinks:
                    self._open_sinks(reader, logits.shape[1], output, probabilities, sinks)
                for (r, c, y, x), tile in zip(batch, logits):
                    if blender is None:
                        self._emit(sinks, y, x, tile[:, : min(th, height - y), : min(tw, width - x)])
                    else:
                        for by, bx, value in blender.add(r, c, tile.to("cpu")):
                            self._emit(sinks, by, bx, value)
                    if c == len(xs) - 1:  # a tile row is complete: its rows above the next row are final
                        end = ys[r + 1] if r + 1 < len(ys) else height
                        for sink in sinks:
                            sink.rows_done(end)
                bar.update(len(batch))
        finally:
            bar.close()
        return len(tiles)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(tiles: int, pixels: int, name: str, enabled: bool) -> Any:
    """A tqdm bar of tiles with the input Mpix/s in its postfix (tqdm adds the time left)."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    class Bar(tqdm):  # type: ignore[misc, valid-type]
        def update(self, n: float | None = 1) -> bool | None:
            done = super().update(n)
            elapsed = max(self.format_dict["elapsed"], 1e-9)
            self.set_postfix_str(
                f"{pixels * self.n / max(tiles, 1) / 1e6 / elapsed:.2f} Mpix/s", refresh=False
            )
            return done

    return Bar(total=tiles, unit="tile", desc=Path(name).name, leave=False)


def predict_large(
    model: Callable[[Tensor], Any],
    source: Any,
    output: str | Path,
    tile_size: int = 512,
    overlap: int | None = None,
    batch_size: int = 4,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    probabilities: str | Path | None = None,
    level: int = 0,
    progress: bool = True,
    **options: Any,
) -> LargePrediction:
    """Segment an image larger than memory into a mask file, tile by tile (one call).

    ``model`` may be a segmentation task (its ``to_mask`` turns logits into classes: the binary
    threshold is honoured) or any dense network. ``mean``/``std`` must be the normalisation the model was
    trained with (the data module's ``mean``/``std``).

    Args:
        model: the network (or task), in eval mode for the call.
        source: the image: a path (TIFF, BigTIFF, OME-TIFF, ``.zarr``, ``.npy``, PNG...), an array or a reader.
        output: the mask file: ``.tif``/``.tiff`` (a tiled, deflate-compressed TIFF with the VOC palette,
            the input's resolution carried over) or ``.zarr``.
        tile_size, overlap, batch_size: the tiling (see :class:`TiledPredictor`).
        mean, std: per-channel normalisation on the 0..1 scale.
        probabilities: also write per-class probabilities (uint8, ``p * 255``) to this ``.tif``/``.zarr``.
        level: the input's pyramid level (0: full resolution).
        progress: show a progress bar (tiles done, Mpix/s, time left).
        **options: the other arguments of :class:`LargeImagePredictor` (``window``, ``device``,
            ``prefetch``, ``channels_last``, ``autocast``, ``output_tile``, ``compression``, ``reduce``...).

    Example:
        >>> import tempfile, tifffile
        >>> from lightning_convnets.backbones import create_backbone
        >>> folder = Path(tempfile.mkdtemp())
        >>> tifffile.imwrite(folder / "slide.tif", np.zeros((100, 80, 3), np.uint8), tile=(32, 32))
        >>> unet = create_backbone("unet", width=4, depth=2)
        >>> model = lambda x, head=nn.Conv2d(4, 3, 1): head(unet(x)[0])  # or a SemanticSegmenter
        >>> result = predict_large(model, folder / "slide.tif", folder / "mask.tif", tile_size=64,
        ...                        mean=[0.5] * 3, std=[0.25] * 3, progress=False)
        >>> result.tiles, tifffile.imread(result.output).shape
        (4, (100, 80))
    """
    to_mask = getattr(model, "to_mask", None)
    if callable(to_mask) and "reduce" not in options:
        options["reduce"] = lambda logits: to_mask(logits[None])[0]
    predictor = LargeImagePredictor(
        model, tile_size, overlap, batch_size, mean=mean, std=std, progress=progress, **options
    )
    return predictor.predict(source, output, probabilities, level=level)


# ---------------------------------------------------------------------------------------- detection
class _JsonArrayFile:
    """A json document whose one array is written record by record, under a temporary name renamed by
    :meth:`commit` (nothing under the final name on failure)."""

    def __init__(self, path: Path, head: str, tail: str) -> None:
        self.path = Path(path)
        self.tmp = _temporary(self.path)
        self._tail = tail
        self._first = True
        self._file: Any = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.tmp, "w", encoding="utf-8")  # noqa: SIM115 - closed by commit/abort
            self._file.write(head)
        except OSError as err:
            self.abort()
            raise OSError(f"{self.path}: cannot create the output ({type(err).__name__}: {err})") from err

    def add(self, records: Sequence[dict[str, Any]]) -> None:
        try:
            for record in records:
                self._file.write(("\n" if self._first else ",\n") + json.dumps(record))
                self._first = False
        except OSError as err:
            self.abort()
            raise OSError(f"{self.path}: writing the output failed: {type(err).__name__}: {err}") from err

    def commit(self) -> None:
        try:
            self._file.write("\n" + self._tail)
            self._file.close()
        except OSError as err:
            self.abort()
            raise OSError(f"{self.path}: writing the output failed: {type(err).__name__}: {err}") from err
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


class DetectionRecords:
    """Detections of one image streamed to a COCO results json and/or a GeoJSON-like FeatureCollection,
    record by record (never the whole list in memory), both under temporary names renamed by
    :meth:`commit`.

    * COCO: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]`` (``COCO.loadRes`` input);
    * GeoJSON: ``{"type": "FeatureCollection", "properties": {source, width, height}, "features": [...]}``,
      one ``Polygon`` feature per box in pixel coordinates (x right, y down: the ring
      ``(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)``), with properties ``label`` (0-based),
      ``class_name``, ``category_id`` and ``score``.

    Args:
        coco, geojson: the files (at least one).
        image_id: the COCO ``image_id`` of every record.
        class_names: name of each 0-based label (default: the label as text).
        category_ids: the dataset's category id of each label (default: the label).
        source, height, width: the image, recorded in the GeoJSON's properties.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> out = DetectionRecords(folder / "a.json", folder / "a.geojson", class_names=["cell"])
        >>> out.write({"boxes": torch.tensor([[1.0, 2, 5, 9]]), "scores": torch.tensor([0.5]),
        ...            "labels": torch.tensor([0])})
        1
        >>> out.commit()
        >>> json.loads((folder / "a.json").read_text())
        [{'image_id': 0, 'category_id': 0, 'bbox': [1.0, 2.0, 4.0, 7.0], 'score': 0.5}]
        >>> json.loads((folder / "a.geojson").read_text())["features"][0]["properties"]
        {'label': 0, 'class_name': 'cell', 'category_id': 0, 'score': 0.5}
    """

    def __init__(
        self,
        coco: str | Path | None = None,
        geojson: str | Path | None = None,
        image_id: int = 0,
        class_names: Sequence[str] | None = None,
        category_ids: Sequence[int] | None = None,
        source: str = "",
        height: int = 0,
        width: int = 0,
    ) -> None:
        if coco is None and geojson is None:
            raise ValueError("DetectionRecords: give coco= (a .json path) and/or geojson= (a .geojson path)")
        for name, target, suffixes in (
            ("coco", coco, (".json",)),
            ("geojson", geojson, (".geojson", ".json")),
        ):
            if target is not None and Path(target).suffix.lower() not in suffixes:
                raise ValueError(f"{target}: {name} output must end in {' or '.join(suffixes)}")
        self.image_id = int(image_id)
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        self.category_ids = None if category_ids is None else [int(i) for i in category_ids]
        self.count = 0
        self._coco: _JsonArrayFile | None = None
        self._geojson: _JsonArrayFile | None = None
        if coco is not None:
            self._coco = _JsonArrayFile(Path(coco), "[", "]\n")
        if geojson is not None:
            head = json.dumps(
                {
                    "type": "FeatureCollection",
                    "properties": {
                        "source": source,
                        "width": int(width),
                        "height": int(height),
                        "coordinates": "pixels, x right, y down",
                    },
                }
            )
            try:
                self._geojson = _JsonArrayFile(Path(geojson), head[:-1] + ', "features": [', "]}\n")
            except BaseException:
                self.abort()
                raise

    def _category(self, label: int) -> int:
        if self.category_ids is None:
            return label
        if not 0 <= label < len(self.category_ids):
            raise ValueError(
                f"label {label} has no category id (category_ids has {len(self.category_ids)} entries)"
            )
        return self.category_ids[label]

    def _name(self, label: int) -> str:
        if self.class_names is not None and 0 <= label < len(self.class_names):
            return self.class_names[label]
        return str(label)

    def write(self, detections: dict[str, Tensor]) -> int:
        """Append ``boxes`` (xyxy image pixels), ``scores``, 0-based ``labels``; returns how many."""
        boxes = detections["boxes"].reshape(-1, 4).float().cpu().tolist()
        scores = detections["scores"].reshape(-1).float().cpu().tolist()
        labels = [int(v) for v in detections["labels"].reshape(-1).cpu().tolist()]
        coco, features = [], []
        for (x0, y0, x1, y1), score, label in zip(boxes, scores, labels):
            x0, y0, x1, y1 = (round(v, 2) for v in (x0, y0, x1, y1))
            score = round(float(score), 5)
            category = self._category(label)
            coco.append({"image_id": self.image_id, "category_id": category,
                         "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)], "score": score})  # fmt: skip
            ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [ring]},
                    "properties": {
                        "label": label,
                        "class_name": self._name(label),
                        "category_id": category,
                        "score": score,
                    },
                }
            )
        try:
            if self._coco is not None:
                self._coco.add(coco)
            if self._geojson is not None:
                self._geojson.add(features)
        except BaseException:
            self.abort()
            raise
        self.count += len(coco)
        return len(coco)

    def commit(self) -> None:
        """Finish both files and rename them to their final names."""
        try:
            for part in (self._coco, self._geojson):
                if part is not None:
                    part.commit()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Delete the temporary files."""
        for part in (self._coco, self._geojson):
            if part is not None:
                part.abort()


@dataclass(kw_only=True)  # not frozen: Lightning's apply_to_collection rebuilds what a predict_step returns
class LargeDetections(StreamedRun):
    """What :func:`predict_large_detections` wrote (and :class:`StreamedRun`'s numbers).

    Attributes:
        coco: the COCO results json, or ``None``.
        geojson: the GeoJSON FeatureCollection, or ``None``.
        detections: detections written.
    """

    coco: Path | None
    geojson: Path | None
    detections: int


def _box_clusters(boxes: Tensor, labels: Tensor) -> Tensor:
    """Per box, the smallest index of its cluster: boxes of one class joined while the bounding boxes of
    their clusters intersect (every box a merge could join to another lies in one cluster)."""
    n = boxes.shape[0]
    comp = torch.arange(n)
    if n == 0:
        return comp
    same = labels[:, None] == labels[None, :]
    while True:
        hull = torch.stack(
            [
                torch.full((n,), math.inf).scatter_reduce(0, comp, boxes[:, 0], "amin"),
                torch.full((n,), math.inf).scatter_reduce(0, comp, boxes[:, 1], "amin"),
                torch.full((n,), -math.inf).scatter_reduce(0, comp, boxes[:, 2], "amax"),
                torch.full((n,), -math.inf).scatter_reduce(0, comp, boxes[:, 3], "amax"),
            ],
            1,
        )[comp]
        meet = (
            same
            & (
                torch.minimum(hull[:, None, 2], hull[None, :, 2])
                > torch.maximum(hull[:, None, 0], hull[None, :, 0])
            )
            & (
                torch.minimum(hull[:, None, 3], hull[None, :, 3])
                > torch.maximum(hull[:, None, 1], hull[None, :, 1])
            )
        )
        new = torch.where(meet, comp[None, :].expand(n, n), comp[:, None].expand(n, n)).amin(1)
        new = torch.minimum(new, comp)
        while not torch.equal(new[new], new):
            new = new[new]
        if torch.equal(new, comp):
            return comp
        comp = new


class _PendingBoxes:
    """Kept tile detections (image pixels, on the CPU) not yet merged: those a later tile row may still
    merge with."""

    def __init__(self) -> None:
        self.parts: list[dict[str, Tensor]] = []

    def add(self, detections: dict[str, Tensor]) -> None:
        if detections["boxes"].shape[0]:
            self.parts.append({k: detections[k].detach().to("cpu") for k in ("boxes", "scores", "labels")})

    def __len__(self) -> int:
        return sum(p["boxes"].shape[0] for p in self.parts)

    def pop_final(self, limit: float) -> dict[str, Tensor] | None:
        """The clusters lying wholly above row ``limit`` (no later box can reach them), removed."""
        if not self.parts:
            return None
        boxes = torch.cat([p["boxes"] for p in self.parts])
        scores = torch.cat([p["scores"] for p in self.parts])
        labels = torch.cat([p["labels"] for p in self.parts])
        comp = _box_clusters(boxes, labels)
        bottom = torch.full((boxes.shape[0],), -math.inf).scatter_reduce(0, comp, boxes[:, 3], "amax")
        final = bottom[comp] <= limit
        rest = ~final
        self.parts = (
            [{"boxes": boxes[rest], "scores": scores[rest], "labels": labels[rest]}] if rest.any() else []
        )
        if not final.any():
            return None
        return {"boxes": boxes[final], "scores": scores[final], "labels": labels[final]}


class LargeImageDetector(_WindowInput):
    """Detect objects in an image read window by window, streaming the detections to files as tile rows
    finish.

    The tiles are :class:`~lightning_convnets.predict.tiling.TiledDetector`'s (overlapping, reaching every
    edge; boxes cut by an inner tile border dropped) and so is the merge (class-wise NMS or weighted box
    fusion); the result equals the in-memory tiled detection of the whole image (without its per-image
    ``max_detections``). Boxes wait in memory only while a later tile row may still merge with them: after
    each tile row, the clusters of kept boxes lying wholly above the next row's first pixel are merged and
    written (:class:`DetectionRecords`).

    Args:
        detector: a list of ``[C, h, w]`` tiles to one dict (``boxes`` xyxy tile pixels, ``scores``,
            0-based ``labels``) each, e.g. an :class:`~lightning_convnets.tasks.ObjectDetector`.
        tile_size, overlap, batch_size, merge, iou_threshold, edge_margin, multiple, tta: as
            :class:`~lightning_convnets.predict.tiling.TiledDetector` (``tta`` per tile).
        mean, std: per-channel normalisation on the 0..1 scale (pixels scaled by :func:`pixels_to_unit`).
        score_threshold: write only merged detections scoring at least this.
        device: where tiles run (default: the detector's parameters').
        prefetch: read the next tile batch in a background thread while the detector runs.
        progress: show a progress bar (tiles done, Mpix/s, time left).

    Example:
        >>> import tempfile, tifffile
        >>> def toy(tiles):  # a 5x5 box around each bright pixel
        ...     out = []
        ...     for t in tiles:
        ...         ys, xs = (t[0] > 0.5).nonzero(as_tuple=True)
        ...         xy = torch.stack([xs, ys, xs, ys], 1).float() + torch.tensor([-2.0, -2, 3, 3])
        ...         out.append({"boxes": xy, "scores": torch.ones(len(xs)), "labels": torch.zeros(len(xs)).long()})
        ...     return out
        >>> folder = Path(tempfile.mkdtemp())
        >>> image = np.zeros((100, 90), np.uint8); image[50, 60] = 255
        >>> tifffile.imwrite(folder / "in.tif", image, tile=(32, 32))
        >>> found = LargeImageDetector(toy, tile_size=40, overlap=16, progress=False).predict(
        ...     folder / "in.tif", coco=folder / "in.json")
        >>> found.detections, json.loads(found.coco.read_text())[0]["bbox"]
        (1, [58.0, 48.0, 5.0, 5.0])
    """

    def __init__(
        self,
        detector: Callable[[list[Tensor]], Any],
        tile_size: int = 512,
        overlap: int | None = None,
        batch_size: int = 4,
        merge: MergeMethod = "nms",
        iou_threshold: float = 0.5,
        edge_margin: int = 2,
        multiple: int = 1,
        tta: str | TTAConfig = "none",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        score_threshold: float = 0.0,
        device: torch.device | str | None = None,
        prefetch: bool = True,
        progress: bool = True,
    ) -> None:
        super().__init__(detector, mean, std)
        self.tiler = TiledDetector(
            detector, tile_size, overlap, batch_size, merge, iou_threshold, edge_margin, None, multiple, tta
        )
        if device is None and isinstance(detector, nn.Module):
            device = next((p.device for p in detector.parameters()), None)
        self.device = None if device is None else torch.device(device)
        self.score_threshold = float(score_threshold)
        self.prefetch = prefetch
        self.progress = progress

    def first_input(self, source: Any) -> list[Tensor]:
        """The first tile ``[C, h, w]`` (in a list), as the detector sees it: what ``fast_predict`` builds and
        checks its folded copy on."""
        reader = open_image(source)
        try:
            self.check_reader(reader)
            y, x, th, tw = self.tiler.tiles(*reader.shape[:2])[0]
            return [self._window(reader, y, th, x, tw)]
        finally:
            if reader is not source:
                reader.close()

    def predict(
        self,
        source: Any,
        coco: str | Path | None = None,
        geojson: str | Path | None = None,
        image_id: int = 0,
        class_names: Sequence[str] | None = None,
        category_ids: Sequence[int] | None = None,
        level: int = 0,
    ) -> LargeDetections:
        """Detect objects in ``source`` (a path, array or reader; see
        :func:`~lightning_convnets.predict.readers.open_image`) into ``coco`` (a COCO results ``.json``)
        and/or ``geojson`` (a ``.geojson`` FeatureCollection); see :class:`DetectionRecords`.

        Raises:
            ImageReadError: naming the input when it is missing, unreadable or truncated.
            ValueError: naming the input when its channels or dtype do not fit the detector, or an output
                of an unknown type.
            OSError: naming the output when writing fails (nothing is left under its name).
        """
        reader = open_image(source, level=level)
        outputs: list[DetectionRecords] = []
        with streaming_run(self.model, reader, source, outputs):
            self.check_reader(reader)
            height, width = reader.shape[:2]
            records = DetectionRecords(
                coco, geojson, image_id, class_names, category_ids, str(reader.path), height, width
            )
            outputs.append(records)
            start = time.perf_counter()
            tiles = self._run(reader, records)
        seconds = time.perf_counter() - start
        return LargeDetections(
            str(reader.path),
            height,
            width,
            tiles,
            seconds,
            coco=None if coco is None else Path(coco),
            geojson=None if geojson is None else Path(geojson),
            detections=records.count,
        )

    def _emit(self, records: DetectionRecords, final: dict[str, Tensor] | None) -> None:
        if final is None:
            return
        tiler = self.tiler
        merged = merge_detections([final], tiler.merge, tiler.iou_threshold, 1, None)
        if self.score_threshold > 0:
            keep = merged["scores"] >= self.score_threshold
            merged = {k: v[keep] for k, v in merged.items()}
        records.write(merged)

    def _run(self, reader: ImageReader, records: DetectionRecords) -> int:
        tiler = self.tiler
        height, width = reader.shape[:2]
        tiles = tiler.tiles(height, width)
        rows = sorted({y for y, _, _, _ in tiles})
        after = dict(zip(rows, [*rows[1:], None]))
        batches = [tiles[i : i + tiler.batch_size] for i in range(0, len(tiles), tiler.batch_size)]
        pin = self.device is not None and self.device.type == "cuda"

        def load(batch: list[tuple[int, int, int, int]]) -> list[Tensor]:
            windows = [self._window(reader, y, th, x, tw) for y, x, th, tw in batch]
            return [w.pin_memory() for w in windows] if pin else windows

        pending = _PendingBoxes()
        # a later row's kept boxes start at or below its first pixel (plus a negative edge margin)
        reach = min(float(tiler.edge_margin), 0.0)
        bar = _progress(len(tiles), height * width, reader.path, self.progress)
        try:
            for batch, inputs in _Prefetcher(load, batches, self.prefetch):
                if self.device is not None:
                    inputs = [t.to(self.device, non_blocking=True) for t in inputs]
                if batch[0] == tiles[0]:
                    check_image(inputs[0], self.model, f"{reader.path}", dims=(3,))
                for tile, det in zip(batch, tiler.detect_tiles(inputs)):
                    pending.add(tiler.keep(det, tile, height, width))
                    y, x, _, tw = tile
                    if x + tw >= width:  # the tile row is complete
                        below = after[y]
                        self._emit(records, pending.pop_final(math.inf if below is None else below + reach))
                bar.update(len(batch))
        finally:
            bar.close()
        assert len(pending) == 0
        return len(tiles)


def predict_large_detections(
    detector: Callable[[list[Tensor]], Any],
    source: Any,
    coco: str | Path | None = None,
    geojson: str | Path | None = None,
    tile_size: int = 512,
    overlap: int | None = None,
    batch_size: int = 4,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    category_ids: Sequence[int] | None = None,
    image_id: int = 0,
    level: int = 0,
    progress: bool = True,
    **options: Any,
) -> LargeDetections:
    """Detect objects in an image larger than memory, tile by tile, streaming the detections to a COCO
    results json and/or a GeoJSON FeatureCollection (one call).

    ``detector`` may be a detection task (its ``size_divisor``, ``category_ids`` and class names are used
    when not given) or any callable from a list of tiles to detection dicts. ``mean``/``std`` must be the
    normalisation it was trained with (the data module's ``mean``/``std``).

    Args:
        detector: the detector (or task), in eval mode for the call.
        source: the image: a path (TIFF, BigTIFF, OME-TIFF, ``.zarr``, ``.npy``, PNG...), an array or a reader.
        coco: the COCO results file (``.json``).
        geojson: the GeoJSON FeatureCollection (``.geojson``): box polygons in pixel coordinates.
        tile_size, overlap, batch_size: the tiling (see :class:`~lightning_convnets.predict.tiling.TiledDetector`).
        mean, std: per-channel normalisation on the 0..1 scale.
        class_names, category_ids: per 0-based label, its name and dataset category id.
        image_id: the COCO records' ``image_id``.
        level: the input's pyramid level (0: full resolution).
        progress: show a progress bar (tiles done, Mpix/s, time left).
        **options: the other arguments of :class:`LargeImageDetector` (``merge``, ``iou_threshold``,
            ``edge_margin``, ``multiple``, ``tta``, ``score_threshold``, ``device``, ``prefetch``).

    Example:
        >>> import tempfile, tifffile
        >>> folder = Path(tempfile.mkdtemp())
        >>> tifffile.imwrite(folder / "scene.tif", np.zeros((100, 80, 3), np.uint8), tile=(32, 32))
        >>> nothing = lambda tiles: [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
        ...                           "labels": torch.zeros(0, dtype=torch.long)} for _ in tiles]
        >>> result = predict_large_detections(nothing, folder / "scene.tif", folder / "scene.json",
        ...                                   folder / "scene.geojson", tile_size=64, progress=False)
        >>> result.tiles, json.loads(result.coco.read_text()), json.loads(result.geojson.read_text())["features"]
        (4, [], [])
    """
    if "multiple" not in options and isinstance(getattr(detector, "size_divisor", None), int):
        options["multiple"] = detector.size_divisor  # type: ignore[attr-defined]
    if category_ids is None and getattr(detector, "category_ids", None) is not None:
        category_ids = list(detector.category_ids)  # type: ignore[attr-defined]
    names = getattr(detector, "class_names", None)
    count = getattr(detector, "num_classes", None)
    if class_names is None and callable(names) and isinstance(count, int):
        class_names = names(count)
    runner = LargeImageDetector(
        detector, tile_size, overlap, batch_size, mean=mean, std=std, progress=progress, **options
    )
    return runner.predict(source, coco, geojson, image_id, class_names, category_ids, level)
