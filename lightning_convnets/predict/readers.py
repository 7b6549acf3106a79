"""Readers of images larger than memory: one window at a time, never the whole array.

A reader is any object with ``shape`` (``(height, width, channels)``), ``dtype``, ``path`` (what error
messages name) and ``read(y0, x0, h, w) -> ndarray (h, w, channels)`` (the window must lie inside the
image), plus ``close()``: the :class:`ImageReader` protocol. :func:`open_image` picks one by file type:

* :class:`TiffReader`: tiled or striped TIFF, BigTIFF, OME-TIFF and pyramidal TIFFs (level 0 by default)
  through ``tifffile``'s Zarr store, which decodes only the TIFF tiles (or strips) a window touches;
* :class:`ZarrReader`: a Zarr array (or the first array of a multiscale group) read by slices;
* :class:`ArrayReader`: an in-memory array or a numpy memmap (``.npy`` files open memory-mapped);
* :class:`PILReader`: PNG, JPEG and the other formats PIL decodes (the whole file is decoded once: these
  formats have no windowed access, and their images fit in memory).

:func:`register_reader` adds a file type (e.g. GeoTIFF through ``rasterio``). The streaming prediction
built on these readers is :mod:`lightning_convnets.predict.large`; the whole story is ``docs/tiling.md``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "ArrayReader",
    "ImageReadError",
    "ImageReader",
    "PILReader",
    "TiffReader",
    "ZarrReader",
    "open_image",
    "register_reader",
]


class ImageReadError(ValueError):
    """A large image cannot be opened or read (the message names the file and what is wrong)."""


@runtime_checkable
class ImageReader(Protocol):
    """What streaming prediction needs of an image: its shape, dtype and windows.

    Example:
        >>> reader = ArrayReader(np.zeros((40, 30, 3), np.uint8))
        >>> isinstance(reader, ImageReader), reader.shape, reader.read(0, 10, 4, 5).shape
        (True, (40, 30, 3), (4, 5, 3))
    """

    path: str
    shape: tuple[int, int, int]
    dtype: np.dtype

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """The window ``[y0, y0 + h) x [x0, x0 + w)`` as ``(h, w, channels)``."""
        ...

    def close(self) -> None:
        """Release the file."""
        ...


def _check_window(reader: Any, y0: int, x0: int, h: int, w: int) -> None:
    height, width = reader.shape[:2]
    if h < 1 or w < 1 or y0 < 0 or x0 < 0 or y0 + h > height or x0 + w > width:
        raise ImageReadError(
            f"{reader.path}: window (y0={y0}, x0={x0}, h={h}, w={w}) is not inside the image "
            f"({height} x {width})"
        )


def _hwc_order(axes: str, path: str) -> tuple[int, ...]:
    """The permutation that brings ``axes`` to ``Y, X[, channels]``."""
    axes = axes.upper()
    if "Y" not in axes or "X" not in axes:
        raise ImageReadError(f"{path}: the image's axes are {axes!r}; expected Y and X axes")
    extra = [a for a in axes if a not in "YX"]
    if len(extra) > 1:
        raise ImageReadError(
            f"{path}: the image's axes are {axes!r}; expected a 2-D image (Y, X) with at most one channel axis "
            "(C or S), e.g. YX, YXS, CYX"
        )
    order = [axes.index("Y"), axes.index("X")] + [axes.index(a) for a in extra]
    return tuple(order)


class _WindowedArray:
    """A reader over an array-like that slices lazily (numpy memmap, zarr array), with axes to
    ``(Y, X, channels)``."""

    def __init__(self, array: Any, axes: str, path: str) -> None:
        self.path = path
        self._array = array
        self._order = _hwc_order(axes, path)
        dims = [int(array.shape[i]) for i in self._order]
        self.shape = (dims[0], dims[1], dims[2] if len(dims) == 3 else 1)
        self.dtype = np.dtype(array.dtype)
        self.reads: list[tuple[int, int, int, int]] | None = None  # set to [] to record the windows read

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        _check_window(self, y0, x0, h, w)
        if self.reads is not None:
            self.reads.append((y0, x0, h, w))
        index: list[Any] = [slice(None)] * len(self._order)
        index[self._order[0]] = slice(y0, y0 + h)
        index[self._order[1]] = slice(x0, x0 + w)
        try:
            window = np.asarray(self._array[tuple(index)])
        except Exception as err:  # codec errors of a truncated or corrupt file
            raise ImageReadError(
                f"{self.path}: cannot read the window (y0={y0}, x0={x0}, h={h}, w={w}): {type(err).__name__}: "
                f"{err} (truncated or corrupt file?)"
            ) from err
        window = window.transpose(self._order)
        return window if window.ndim == 3 else window[..., None]

    def close(self) -> None:
        self._array = None


class ArrayReader(_WindowedArray):
    """Windows of an array already opened: a numpy array, a ``np.memmap`` / ``np.load(mmap_mode="r")``.

    Args:
        array: ``(H, W)``, ``(H, W, C)`` or, with ``axes="CYX"``, ``(C, H, W)``.
        axes: the array's axes (``Y``, ``X`` and at most one channel axis ``C``/``S``); default
            ``"YX"`` or ``"YXC"`` by the number of dimensions.
        path: the name error messages give.

    Example:
        >>> ArrayReader(np.arange(24).reshape(2, 3, 4), axes="CYX").read(0, 0, 1, 2)[..., 1].tolist()
        [[12, 13]]
    """

    def __init__(self, array: Any, axes: str | None = None, path: str = "<array>") -> None:
        if axes is None:
            axes = {2: "YX", 3: "YXC"}.get(len(array.shape), "")
        if len(axes) != len(array.shape):
            raise ImageReadError(f"{path}: array of shape {tuple(array.shape)} does not match axes {axes!r}")
        super().__init__(array, axes, path)


class TiffReader(_WindowedArray):
    """Windows of a TIFF / BigTIFF / OME-TIFF through ``tifffile``'s Zarr store: only the TIFF tiles or
    strips a window touches are decoded.

    The file is checked when opened: a header ``tifffile`` refuses, and data that ends past the end of the
    file (a truncated download or copy), raise :class:`ImageReadError` naming the file.

    Args:
        path: the file.
        level: pyramid level (0: full resolution).
        series: the image series (``tifffile``'s ``series``; OME-TIFF images).

    Example:
        >>> import tempfile, tifffile
        >>> path = Path(tempfile.mkdtemp()) / "slide.tif"
        >>> tifffile.imwrite(path, np.zeros((64, 48, 3), np.uint8), tile=(32, 32), compression="zlib")
        >>> with TiffReader(path) as reader:
        ...     reader.shape, reader.read(30, 10, 8, 8).shape
        ((64, 48, 3), (8, 8, 3))
    """

    def __init__(self, path: str | Path, level: int = 0, series: int = 0) -> None:
        import tifffile
        import zarr

        self.path = str(path)
        try:
            self._file = tifffile.TiffFile(path)
        except FileNotFoundError as err:
            raise ImageReadError(f"{path}: image file not found") from err
        except Exception as err:
            raise ImageReadError(f"{path}: not a readable TIFF ({type(err).__name__}: {err})") from err
        try:
            if not 0 <= series < len(self._file.series):
                raise ImageReadError(
                    f"{path}: series={series}, but the file has {len(self._file.series)} series"
                )
            image = self._file.series[series]
            if not 0 <= level < len(image.levels):
                raise ImageReadError(f"{path}: level={level}, but the image has {len(image.levels)} levels")
            chosen = image.levels[level]
            self._check_complete(chosen)
            array = zarr.open(image.aszarr(level=level), mode="r")
            axes = chosen.axes
            # size-1 axes other than Y/X (OME's T, Z, C of a single plane) are squeezed
            squeeze = tuple(i for i, a in enumerate(axes) if a not in "YX" and chosen.shape[i] == 1)
            if squeeze:
                index = tuple(0 if i in squeeze else slice(None) for i in range(len(axes)))
                array = _Indexed(array, index)
                axes = "".join(a for i, a in enumerate(axes) if i not in squeeze)
            super().__init__(array, axes, self.path)
            self.resolution, self.resolution_unit = _resolution(chosen.keyframe)
        except Exception:
            self._file.close()
            raise

    def _check_complete(self, chosen: Any) -> None:
        size = os.path.getsize(self.path)
        pages = getattr(chosen, "pages", None) or [chosen.keyframe]
        for page in pages:
            if page is None or not hasattr(page, "dataoffsets"):
                continue
            ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c]
            if ends and max(ends) > size:
                raise ImageReadError(
                    f"{self.path}: truncated TIFF: its image data runs to byte {max(ends)} but the file has "
                    f"{size} bytes (an interrupted copy or download?)"
                )

    def close(self) -> None:
        super().close()
        self._file.close()

    def __enter__(self) -> TiffReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Indexed:
    """A fixed index into some axes of a lazily sliced array (the squeezed size-1 axes)."""

    def __init__(self, array: Any, index: tuple[Any, ...]) -> None:
        self._array, self._index = array, index
        self.shape = tuple(s for s, i in zip(array.shape, index) if isinstance(i, slice))
        self.dtype = array.dtype

    def __getitem__(self, key: tuple[Any, ...]) -> Any:
        parts = iter(key)
        full = tuple(next(parts) if isinstance(i, slice) else i for i in self._index)
        return self._array[full]


def _resolution(page: Any) -> tuple[tuple[float, float] | None, int | None]:
    """``((x, y) pixels per unit, unit)`` of a TIFF page, or ``(None, None)``."""
    tags = getattr(page, "tags", {})
    if "XResolution" not in tags or "YResolution" not in tags:
        return None, None
    try:
        x, y = page.resolution
        unit = int(page.resolutionunit)
    except Exception:
        return None, None
    return (float(x), float(y)), unit


class ZarrReader(_WindowedArray):
    """Windows of a Zarr array (a ``.zarr`` folder, or an array or group opened with ``zarr``).

    A group is read at its multiscale level ``level`` (OME-Zarr: the dataset paths of its
    ``multiscales`` attribute; otherwise the array named ``str(level)``). Axes: OME-Zarr ``axes`` when
    given, else ``(H, W)``, ``(H, W, C)`` with ``C <= 4``, or ``(C, H, W)`` with ``C <= 4``.

    Args:
        source: path of the store, or a ``zarr`` array / group.
        level: multiscale level of a group.
        axes: the array's axes (``"YXC"``, ``"CYX"``...), when they cannot be guessed.

    Example:
        >>> import tempfile, zarr
        >>> z = zarr.create_array(Path(tempfile.mkdtemp()) / "a.zarr", shape=(3, 40, 50), dtype="uint8",
        ...                       chunks=(3, 16, 16))
        >>> ZarrReader(z).shape
        (40, 50, 3)
    """

    def __init__(self, source: Any, level: int = 0, axes: str | None = None) -> None:
        import zarr

        path = str(source) if isinstance(source, str | Path) else str(getattr(source, "store", "<zarr>"))
        node = source
        if isinstance(source, str | Path):
            if not Path(source).exists():
                raise ImageReadError(f"{source}: image store not found")
            try:
                node = zarr.open(str(source), mode="r")
            except Exception as err:
                raise ImageReadError(
                    f"{source}: not a readable Zarr store ({type(err).__name__}: {err})"
                ) from err
        if isinstance(node, zarr.Group):
            name, ome_axes = _multiscale_path(node, level)
            if name not in node:
                raise ImageReadError(f"{path}: a Zarr group without an array {name!r} (level {level})")
            node = node[name]
            axes = axes or ome_axes
        if axes is None:
            axes = _guess_axes(tuple(node.shape), path)
        super().__init__(node, axes, path)


def _multiscale_path(group: Any, level: int) -> tuple[str, str | None]:
    attrs = dict(group.attrs)
    scales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if scales:
        datasets = scales[0].get("datasets", [])
        if not 0 <= level < len(datasets):
            raise ImageReadError(
                f"{group.store}: level={level}, but the multiscale group has {len(datasets)} levels"
            )
        names = [
            a.get("name", "?")[0].upper() if isinstance(a, dict) else str(a)[0].upper()
            for a in scales[0].get("axes", [])
        ]
        axes = "".join("S" if n == "C" else n for n in names) or None
        return datasets[level]["path"], axes
    return str(level), None


def _guess_axes(shape: tuple[int, ...], path: str) -> str:
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3 and shape[2] <= 4:
        return "YXC"
    if len(shape) == 3 and shape[0] <= 4:
        return "CYX"
    raise ImageReadError(
        f"{path}: cannot tell the axes of an array of shape {shape}; expected (H, W), (H, W, C) or (C, H, W) "
        "with C <= 4, or pass axes="
    )


class PILReader(ArrayReader):
    """Windows of an image PIL decodes (PNG, JPEG...): decoded once, whole (these formats offer no
    windowed access; prefer TIFF or Zarr for images larger than memory).

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> path = Path(tempfile.mkdtemp()) / "a.png"
        >>> Image.new("RGB", (30, 20)).save(path)
        >>> PILReader(path).shape
        (20, 30, 3)
    """

    def __init__(self, path: str | Path) -> None:
        from PIL import Image

        try:
            with Image.open(path) as image:
                image.load()
                array = np.asarray(image)
        except FileNotFoundError as err:
            raise ImageReadError(f"{path}: image file not found") from err
        except Exception as err:
            raise ImageReadError(
                f"{path}: unreadable or truncated image ({type(err).__name__}: {err})"
            ) from err
        super().__init__(array, path=str(path))


Factory = Callable[[Path], ImageReader]
_READERS: dict[str, Factory] = {}


def register_reader(suffix: str, factory: Factory) -> None:
    """Open files ending in ``suffix`` (case-insensitive, e.g. ``".jp2"``) with ``factory(path)``.

    Example (GeoTIFF through ``rasterio``, an optional extra; not run here):
        >>> class RasterioReader:  # doctest: +SKIP
        ...     def __init__(self, path):
        ...         import rasterio
        ...         self.path, self._ds = str(path), rasterio.open(path)
        ...         self.shape, self.dtype = (self._ds.height, self._ds.width, self._ds.count), np.dtype(self._ds.dtypes[0])
        ...     def read(self, y0, x0, h, w):
        ...         from rasterio.windows import Window
        ...         return self._ds.read(window=Window(x0, y0, w, h)).transpose(1, 2, 0)
        ...     def close(self):
        ...         self._ds.close()
        >>> register_reader(".geotiff", RasterioReader)  # doctest: +SKIP
    """
    if not suffix.startswith("."):
        raise ValueError(f"register_reader: suffix must start with '.', got {suffix!r}")
    _READERS[suffix.lower()] = factory


TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".svs", ".ndpi", ".scn")


def open_image(source: Any, level: int = 0) -> ImageReader:
    """A reader for ``source``: an :class:`ImageReader` (returned as is), a numpy array or memmap, a
    ``zarr`` array or group, or a path (``.tif``/``.tiff``/BigTIFF/OME-TIFF: :class:`TiffReader`;
    ``.zarr``: :class:`ZarrReader`; ``.npy``: memory-mapped :class:`ArrayReader`; a suffix given to
    :func:`register_reader`: its factory; anything else: :class:`PILReader`).

    Raises:
        ImageReadError: naming the file when it is missing, unreadable, truncated or of unknown layout.

    Example:
        >>> open_image(np.zeros((8, 9), np.uint8)).shape
        (8, 9, 1)
    """
    if isinstance(source, ImageReader):
        return source
    if isinstance(source, np.ndarray):
        return ArrayReader(source)
    if not isinstance(source, str | Path):
        import zarr

        if isinstance(source, zarr.Array | zarr.Group):
            return ZarrReader(source, level)
        raise TypeError(f"open_image: expected a path, an array or a reader, got {type(source).__name__}")
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix in _READERS:
        return _READERS[suffix](path)
    if suffix in TIFF_SUFFIXES:
        return TiffReader(path, level=level)
    if suffix == ".zarr" or (path.is_dir() and (path / "zarr.json").exists()):
        return ZarrReader(path, level=level)
    if suffix == ".npy":
        if not path.is_file():
            raise ImageReadError(f"{path}: image file not found")
        try:
            array = np.load(path, mmap_mode="r")
        except Exception as err:
            raise ImageReadError(f"{path}: not a readable .npy file ({type(err).__name__}: {err})") from err
        return ArrayReader(array, path=str(path))
    return PILReader(path)
