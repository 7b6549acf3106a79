"""Reading images and masks from disk, and the errors raised for bad files.

Every function here names the offending file in its error, so a broken dataset fails with a message a
user can act on (which file, what is wrong, what was expected) instead of a stack trace from PIL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Segmentation and detection stream these from disk at predict time, window by window (never loaded
# whole): TIFF (tiled or striped, BigTIFF, OME-TIFF) files and Zarr stores (folders).
STREAMED_EXTENSIONS = (".tif", ".tiff", ".btf", ".zarr")


class DataValidationError(ValueError):
    """A dataset file or annotation is missing, unreadable or inconsistent (the message names it)."""


def is_image_file(path: str | Path) -> bool:
    """Whether ``path`` has an image extension (case-insensitive) and is not a hidden file."""
    path = Path(path)
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (other files are ignored).

    Raises:
        DataValidationError: for a directory named like an image (``cat.png/``): most likely an
            unpacking accident, and never an image.
    """
    images = []
    for path in sorted(Path(folder).iterdir()):
        if not is_image_file(path):
            continue
        if path.is_dir():
            raise DataValidationError(
                f"{path}: a directory named like an image file; expected an image file (rename or remove it)"
            )
        if path.is_file():
            images.append(path)
    return images


def scan_predict_folder(
    folder: str | Path, what: str = "predict_dir", streamed: bool = False
) -> list[tuple[Path, tuple[int, int]]]:
    """``(path, (width, height))`` of the image files directly inside ``folder``, sorted by name, each
    checked with :func:`verify_image`. Files without an image extension are skipped; subfolders are not
    searched. With ``streamed``, ``.zarr`` stores are listed too, and they and TIFF files are checked
    from their headers (:func:`streamed_image_size`: they are never decoded whole).

    Raises:
        DataValidationError: naming ``what`` and ``folder`` when it is missing, not a directory or holds no
            image file (listing its subfolders, if any, since a class-per-folder tree is a likely mix-up),
            or naming the file that is unreadable.
    """
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise DataValidationError(f"{folder}: {what} not found; expected a folder of images")
    if not folder.is_dir():
        raise DataValidationError(f"{folder}: {what} is not a directory; expected a folder of images")
    images = list_images(folder)
    if streamed:
        stores = [p for p in folder.iterdir() if p.suffix.lower() == ".zarr" and not p.name.startswith(".")]
        images = sorted(images + stores)
    if not images:
        subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        inside = f"; it has subfolders {subfolders[:10]}, which are not searched" if subfolders else ""
        raise DataValidationError(
            f"{folder}: {what} holds no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)} directly "
            f"inside it{inside})"
        )
    if streamed:
        return [(p, streamed_image_size(p) if is_streamed_image(p) else verify_image(p)) for p in images]
    return [(path, verify_image(path)) for path in images]


def is_streamed_image(path: str | Path) -> bool:
    """Whether segmentation and detection stream ``path`` at predict time (a TIFF file or a ``.zarr``
    store)."""
    return Path(path).suffix.lower() in STREAMED_EXTENSIONS


def streamed_image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of a TIFF file (level 0 of its first series) or a Zarr store, read from its
    header (``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` arrays; a group: its array ``"0"``).

    Raises:
        DataValidationError: naming ``path`` when it is missing or its header is unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise DataValidationError(f"{path}: image file not found")
    try:
        if path.suffix.lower() == ".zarr":
            import zarr

            node: Any = zarr.open(str(path), mode="r")
            if isinstance(node, zarr.Group):
                node = node["0"]
            shape = tuple(node.shape)
            if len(shape) == 3 and shape[0] <= 4 < shape[2]:
                shape = shape[1:]
            height, width = shape[:2]
        else:
            import tifffile

            with tifffile.TiffFile(path) as tiff:
                series = tiff.series[0]
                axes, shape = series.axes, series.shape
                height, width = shape[axes.index("Y")], shape[axes.index("X")]
    except Exception as err:
        raise DataValidationError(f"{path}: unreadable image header ({type(err).__name__}: {err})") from err
    return int(width), int(height)


def check_inside_root(path: str | Path, root: str | Path, allow_outside: bool, what: str = "file") -> None:
    """Raise when ``path`` (after following symlinks) lies outside ``root`` and that is not allowed."""
    real, real_root = Path(path).resolve(), Path(root).resolve()
    if not allow_outside and not real.is_relative_to(real_root):
        raise DataValidationError(
            f"{path}: {what} is a symlink to {real}, outside the data root {real_root}; expected files under "
            "the root (pass allow_symlinks_outside_root=True to follow such links)"
        )


def verify_image(path: str | Path) -> tuple[int, int]:
    """Cheap integrity check (PIL ``verify``: header and, for PNG, chunk checksums) without decoding.

    Returns:
        The image size as ``(width, height)``.

    Raises:
        DataValidationError: naming ``path`` when the file is missing, not an image, or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise DataValidationError(f"{path}: empty file (0 bytes); expected an image")
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... depending on the codec
        raise DataValidationError(f"{path}: unreadable or truncated image ({err})") from err
    return size


def _to_uint8(array: np.ndarray, bits: int | None = None) -> np.ndarray:
    """8-bit pixels from a deeper image, by the scale rule every path shares (the streamed one too:
    ``lightning_convnets.predict.large.pixels_to_unit``): integers over their bit depth's full range
    (``bits``, else the dtype's: 16-bit / 65535, whatever the image's own peak, so that a dark 16-bit
    image stays dark and every image of a sensor gets the same scale), bool as 0/1, floats taken as 0..1
    (clipped)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        unit = np.clip(array.astype(np.float64), 0.0, 1.0)
    else:
        if bits is None:
            bits = 16 if array.dtype.itemsize <= 2 else 8 * array.dtype.itemsize
        unit = np.clip(array.astype(np.float64) / (2.0**bits - 1), 0.0, 1.0)
    return (unit * 255.0 + 0.5).astype(np.uint8)


def convert_channels(image: Image.Image, in_channels: int) -> np.ndarray:
    """Convert a PIL image to an ``H x W x in_channels`` uint8 array.

    Rules: transparency (RGBA, LA, palette with transparency) is composited onto black; grayscale is
    replicated to 3 channels when ``in_channels == 3``; colour is converted to luminance when
    ``in_channels == 1``; 16-bit images are rescaled to 8 bits over the 16-bit range (``value / 65535``,
    never by the image's own peak; PIL's 32-bit integer mode ``I``, which is how it opens 16-bit PNGs and
    TIFFs, counts as 16-bit); float images are taken as 0..1.
    """
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)
        image = Image.fromarray((rgb + 0.5).astype(np.uint8), mode="RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F", "1"):
        gray = _to_uint8(np.asarray(image), bits=16 if image.mode.startswith("I") else None)
        image = Image.fromarray(gray, mode="L")
    array = np.asarray(image.convert("RGB" if in_channels == 3 else "L"))
    if in_channels == 1:
        array = array[..., None]
    return np.ascontiguousarray(array)


def load_image(path: str | Path, in_channels: int = 3) -> np.ndarray:
    """Decode an image file into an ``H x W x in_channels`` uint8 array (see :func:`convert_channels`).

    Raises:
        DataValidationError: naming ``path`` when the file is missing, unreadable or truncated.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return convert_channels(image, in_channels)
    except FileNotFoundError as err:
        raise DataValidationError(f"{path}: image file not found") from err
    except Exception as err:
        raise DataValidationError(f"{path}: unreadable or truncated image ({err})") from err


def load_mask(path: str | Path) -> np.ndarray:
    """Read a segmentation mask (class index per pixel) as an ``H x W`` uint8 array.

    Palette PNGs give their palette indices (the VOC convention), single-channel PNGs their values,
    RGB images are accepted only when the three channels are equal (a gray image saved as RGB).

    Raises:
        DataValidationError: naming ``path`` when it is missing, unreadable, colour-coded, or holds
            values above 255.
    """
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(f"{path}: mask file not found")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            array = np.array(image)  # a writable copy: torch warns on read-only arrays
    except Exception as err:
        raise DataValidationError(f"{path}: unreadable or truncated mask ({err})") from err
    if mode in ("RGB", "RGBA"):
        rgb = array[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise DataValidationError(
                f"{path}: mask is a colour ({mode}) image; expected a palette or single-channel PNG "
                "holding one class index per pixel"
            )
        array = rgb[..., 0]
    elif mode == "LA":
        array = array[..., 0]
    if array.ndim != 2:
        raise DataValidationError(f"{path}: mask has shape {array.shape}; expected a single channel")
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.size and (array.min() < 0 or array.max() > 255):
        raise DataValidationError(
            f"{path}: mask values range {array.min()}..{array.max()}; expected class indices 0..255"
        )
    return array.astype(np.uint8, copy=False)


def check_mask_values(mask: np.ndarray, num_classes: int, ignore_index: int | None, path: str | Path) -> None:
    """Raise naming ``path`` when ``mask`` holds a value that is neither a class nor ``ignore_index``."""
    bad = mask >= num_classes
    if ignore_index is not None:
        bad &= mask != ignore_index
    if bad.any():
        values = sorted({int(v) for v in np.unique(mask[bad])})
        raise DataValidationError(
            f"{path}: mask values {values[:10]} are outside the classes 0..{num_classes - 1} "
            f"and not the ignore value {ignore_index}"
        )
