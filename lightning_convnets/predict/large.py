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
(the accumulator covers one strip of tile rows). Memory: a few tile batches, the blend strip
(``K x tile x width`` floats, same padding only) and the sink's unfinished bands of output rows
(``~2 x output tile x width`` bytes per output channel). The story: ``docs/tiling.md``.
"""

from __future__ import annotations

import contextlib
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

from lightning_convnets.predict.readers import ImageReader, open_image
from lightning_convnets.predict.tiling import (
    NetworkGeometry,
    TiledPredictor,
    Window,
    expected_channels,
    network_geometry,
    reflect_indices,
)

__all__ = [
    "LargeImagePredictor",
    "LargePrediction",
    "OutputSink",
    "StreamedSource",
    "TiffTileSink",
    "ZarrSink",
    "open_sink",
    "predict_large",
]

TIFF_OUTPUT_SUFFIXES = (".tif", ".tiff")


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
@dataclass  # not frozen: Lightning's apply_to_collection rebuilds dataclasses a predict_step returns
class LargePrediction:
    """What :func:`predict_large` wrote.

    Attributes:
        source: the input (its path).
        output: the class mask file.
        probabilities: the per-class probabilities file, or ``None``.
        height, width: the image's size.
        tiles: tiles predicted.
        seconds: wall time of the prediction.
    """

    source: str
    output: Path
    probabilities: Path | None
    height: int
    width: int
    tiles: int
    seconds: float

    @property
    def mpix_per_s(self) -> float:
        """Input megapixels per second."""
        return self.height * self.width / 1e6 / max(self.seconds, 1e-9)


def _default_reduce(logits: Tensor) -> Tensor:
    return logits.argmax(0) if logits.shape[0] > 1 else (logits[0] > 0).long()


def _default_probabilities(logits: Tensor) -> Tensor:
    return logits.softmax(0) if logits.shape[0] > 1 else torch.sigmoid(logits)


_SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(bool): 1.0}


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


class LargeImagePredictor:
    """Segment an image read window by window into a mask written tile by tile.

    Args:
        model: a dense network, images ``(B, C, h, w)`` to logits ``(B, K, h', w')`` or a list of them
            (e.g. a :class:`~lightning_convnets.tasks.SemanticSegmenter`).
        tile_size, overlap, batch_size, window, geometry, device: as :class:`TiledPredictor`.
        mean, std: per-channel normalisation on the 0..1 scale (the data module's ``mean``/``std``);
            ``None``: none. Pixels are first scaled to 0..1: ``uint8`` / 255, ``uint16`` / 65535, floats
            as they are.
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
    ) -> None:
        if probability_dtype not in ("uint8", "float32"):
            raise ValueError(
                f"LargeImagePredictor: probability_dtype must be 'uint8' or 'float32', got {probability_dtype!r}"
            )
        self.probability_dtype = probability_dtype
        self.tiler = TiledPredictor(
            model, tile_size, overlap, batch_size, window, geometry or network_geometry(model), device
        )
        self.model = model
        self.channels = expected_channels(model)
        self.mean = None if mean is None else np.asarray(mean, np.float32)
        self.std = None if std is None else np.asarray(std, np.float32)
        if self.std is not None and (self.std <= 0).any():
            raise ValueError(f"LargeImagePredictor: std must be positive, got {list(self.std)}")
        self.reduce = reduce or _default_reduce
        self.to_probabilities = probabilities or _default_probabilities
        self.prefetch = prefetch
        self.channels_last = channels_last
        self.autocast = autocast
        self.progress = progress
        self.output_tile = output_tile
        self.compression = compression

    # ------------------------------------------------------------------------------------ inputs
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
        array = window.astype(np.float32)
        scale = _SCALES.get(dtype)
        if scale is not None and scale != 1.0:
            array *= 1.0 / scale
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
        model = self.model
        was_training = isinstance(model, nn.Module) and model.training
        try:
            self.check_reader(reader)
            if was_training:
                model.eval()  # type: ignore[union-attr]
            start = time.perf_counter()
            with torch.inference_mode():
                tiles = self._run(reader, output, probabilities, sinks)
            for sink in sinks:
                sink.commit()
            seconds = time.perf_counter() - start
        except BaseException:
            for sink in sinks:
                sink.abort()
            raise
        finally:
            if was_training:
                model.train()  # type: ignore[union-attr]
            if reader is not source:
                reader.close()
        height, width = reader.shape[:2]
        return LargePrediction(str(reader.path), output, probabilities, height, width, tiles, seconds)

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
        blend = tiler.mode == "blend"
        weight = tiler.blend_weight(th, tw) if blend else None
        acc: Tensor | None = None
        wsum = torch.zeros(th, width) if blend else None
        try:
            for batch, inputs in _Prefetcher(load, batches, self.prefetch):
                logits = self._forward(inputs)
                tiler.check_output(logits, th, tw)
                if not sinks:
                    self._open_sinks(reader, logits.shape[1], output, probabilities, sinks)
                for (r, c, y, x), tile in zip(batch, logits):
                    last = c == len(xs) - 1
                    if not blend:
                        hh, ww = min(th, height - y), min(tw, width - x)
                        self._emit(sinks, y, x, tile[:, :hh, :ww])
                        if last:
                            end = ys[r + 1] if r + 1 < len(ys) else height
                            for sink in sinks:
                                sink.rows_done(end)
                        continue
                    assert weight is not None and wsum is not None
                    tile = tile.to("cpu")
                    if acc is None:
                        acc = tile.new_zeros((tile.shape[0], th, width))
                    ww = min(tw, width - x)
                    acc[:, :, x : x + ww] += (tile * weight)[:, :, :ww]
                    wsum[:, x : x + ww] += weight[:, :ww]
                    if last:  # a tile row is complete: its rows above the next row are final
                        end = ys[r + 1] if r + 1 < len(ys) else min(y + th, height)
                        done = end - y
                        self._emit(sinks, y, 0, acc[:, :done] / wsum[:done])
                        for sink in sinks:
                            sink.rows_done(end)
                        acc = torch.cat([acc[:, done:], acc.new_zeros((acc.shape[0], done, width))], dim=1)
                        wsum = torch.cat([wsum[done:], wsum.new_zeros((done, width))], dim=0)
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
