"""Images larger than memory: windows read from TIFF / Zarr / memmaps, masks written tile by tile
(detection: ``tests/test_large_detection.py``).

Small generated images (90-200 px) and small tiles stand for the slides: what is checked is that the
streamed result equals one whole forward (valid U-Net) or today's in-memory tiled path (blended tiles),
that the reader is only ever asked for tile windows and the writer holds a few bands of rows, the bad
inputs (truncated TIFF, tile larger than the image, wrong channels, a disk that fills up), and the
CLI (``predict_dir`` of TIFF/Zarr files, with and without ``--ckpt_path``) and Python (``predict_large``)
entry points. Peak RSS on real sizes: ``benchmarks/tiling.py``.
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
import zarr
from lightning_convnets.datamodules.io import load_image
from PIL import Image
from torch import nn

from lightning_convnets.backbones import create_backbone
from lightning_convnets.cli import ConvNetsCLI
from lightning_convnets.predict import large, readers
from lightning_convnets.predict.large import LargeImagePredictor, TiffTileSink, pixels_to_unit, predict_large
from lightning_convnets.predict.readers import ArrayReader, ImageReadError, open_image
from lightning_convnets.predict.tiling import TiledPredictor, TilingOptions, mirror_pad, segmentation_logits
from lightning_convnets.tasks import SemanticSegmenter

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


class DenseNet(nn.Module):
    """A U-Net plus a 1x1 head, exposing the backbone (its geometry)."""

    def __init__(self, classes: int = 3, **unet: object) -> None:
        super().__init__()
        self.backbone = create_backbone("unet", **unet)
        self.head = nn.Conv2d(self.backbone.out_channels[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[0])


def picture(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A smooth uint8 image ``(h, w, channels)`` (structure at several scales, as a real one has)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, channels, h // 8 + 2, w // 8 + 2, generator=g)
    image = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    image = 0.9 * image + 0.1 * torch.rand(channels, h, w, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def normalised(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def write_input(folder: Path, image: np.ndarray, kind: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "tif":
        path = folder / "slide.tif"
        tifffile.imwrite(path, image, tile=(32, 32), compression="zlib", photometric="rgb")
    elif kind == "zarr":
        path = folder / "slide.zarr"
        z = zarr.create_array(
            str(path), shape=image.shape, chunks=(40, 40, image.shape[2]), dtype=image.dtype
        )
        z[:] = image
    else:
        raise ValueError(kind)
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "partial" in p.name or p.name.startswith("."))


# ------------------------------------------------------------------------------------------- readers
def test_every_reader_returns_the_same_windows(tmp_path) -> None:
    image = picture(70, 90)
    tifffile.imwrite(tmp_path / "tiled.tif", image, tile=(32, 32), compression="zlib", photometric="rgb")
    tifffile.imwrite(tmp_path / "strips.tif", image, rowsperstrip=16, photometric="rgb")
    tifffile.imwrite(tmp_path / "big.tif", image, bigtiff=True, tile=(16, 16), photometric="rgb")
    tifffile.imwrite(
        tmp_path / "planar.ome.tif", image.transpose(2, 0, 1), ome=True, metadata={"axes": "CYX"}
    )
    with tifffile.TiffWriter(tmp_path / "pyramid.tif") as tif:  # level 0 plus a half-size level
        tif.write(image, tile=(32, 32), subifds=1, photometric="rgb")
        tif.write(image[::2, ::2], tile=(32, 32), subfiletype=1, photometric="rgb")
    for name, array, chunks in (
        ("yxc.zarr", image, (32, 32, 3)),
        ("cyx.zarr", image.transpose(2, 0, 1), (3, 32, 32)),
    ):
        z = zarr.create_array(str(tmp_path / name), shape=array.shape, chunks=chunks, dtype="uint8")
        z[:] = array
    np.save(tmp_path / "array.npy", image)
    Image.fromarray(image).save(tmp_path / "image.png")
    names = ["tiled.tif", "strips.tif", "big.tif", "planar.ome.tif", "pyramid.tif", "yxc.zarr", "cyx.zarr"]
    for name in [*names, "array.npy", "image.png"]:
        reader = open_image(tmp_path / name)
        try:
            assert reader.shape == (70, 90, 3), name
            assert np.array_equal(reader.read(13, 21, 20, 30), image[13:33, 21:51]), name
            assert np.array_equal(reader.read(0, 0, 70, 90), image), name
        finally:
            reader.close()
    assert isinstance(open_image(tmp_path / "array.npy")._array, np.memmap)  # memory-mapped, not loaded
    level1 = open_image(tmp_path / "pyramid.tif", level=1)
    assert level1.shape == (35, 45, 3) and np.array_equal(level1.read(0, 0, 35, 45), image[::2, ::2])
    gray = ArrayReader(image[..., 0])
    assert gray.shape == (70, 90, 1) and gray.read(5, 5, 2, 2).shape == (2, 2, 1)
    with pytest.raises(ImageReadError, match="not inside the image"):
        gray.read(60, 0, 20, 5)


def test_readers_name_the_file_for_missing_and_unreadable_inputs(tmp_path) -> None:
    with pytest.raises(ImageReadError, match=r"missing\.tif: image file not found"):
        open_image(tmp_path / "missing.tif")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(ImageReadError, match=r"junk\.tif: not a readable TIFF"):
        open_image(tmp_path / "junk.tif")
    with pytest.raises(ImageReadError, match="cannot tell the axes"):
        readers.ZarrReader(zarr.zeros((10, 20, 30)))


# ---------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", ["tif", "zarr"])
def test_valid_unet_streamed_from_disk_equals_one_whole_forward(tmp_path, kind) -> None:
    torch.manual_seed(0)
    net = DenseNet(3, padding="valid", width=2, depth=2).eval()
    image = picture(150, 130)
    source = write_input(tmp_path / "in", image, kind)
    result = predict_large(
        net, source, tmp_path / "mask.tif", tile_size=32, batch_size=3, mean=MEAN, std=STD,
        probabilities=tmp_path / "probs.zarr", probability_dtype="float32", progress=False, output_tile=32,
    )  # fmt: skip
    tiler = TiledPredictor(net, tile_size=32)
    assert result.tiles == tiler.num_tiles(150, 130) >= 16 and (result.height, result.width) == (150, 130)
    x = normalised(image)
    with torch.no_grad():
        whole = net(mirror_pad(x, *tiler.whole_image_padding(150, 130))[None])[0][:, :150, :130]
    probs = zarr.open_array(str(tmp_path / "probs.zarr"), mode="r")[:]
    assert probs.shape == (150, 130, 3)
    diff = np.abs(probs - whole.softmax(0).permute(1, 2, 0).numpy()).max()
    assert diff < 1e-5, diff  # float rounding only
    mask = tifffile.imread(tmp_path / "mask.tif")
    assert mask.dtype == np.uint8 and np.array_equal(mask, whole.argmax(0).numpy())
    with tifffile.TiffFile(tmp_path / "mask.tif") as tif:  # a tiled, deflate-compressed, palette TIFF
        page = tif.pages[0]
        assert page.is_tiled and page.compression == 8 and page.photometric == 3
    assert leftovers(tmp_path) == []


def test_blended_streamed_tiles_equal_the_in_memory_tiled_path(tmp_path) -> None:
    torch.manual_seed(0)
    net = DenseNet(4, width=4, depth=2, norm="batch").eval()
    image = picture(128, 172, seed=1)  # sides the whole-image forward takes (multiples of 4)
    source = write_input(tmp_path, image, "tif")
    predict_large(
        net, source, tmp_path / "mask.zarr", tile_size=64, overlap=32, batch_size=5, mean=MEAN, std=STD,
        probabilities=tmp_path / "probs.tif", probability_dtype="float32", progress=False, output_tile=32,
    )  # fmt: skip
    tiled = TiledPredictor(net, tile_size=64, overlap=32).predict(normalised(image))
    probs = tifffile.imread(tmp_path / "probs.tif")
    assert np.abs(probs - tiled.softmax(0).permute(1, 2, 0).numpy()).max() < 1e-5
    mask = zarr.open_array(str(tmp_path / "mask.zarr"), mode="r")[:]
    assert np.array_equal(mask, tiled.argmax(0).numpy())
    # ... and so today's blending error (tests/test_tiling.py: the same tiles, the same bound) is kept
    with torch.no_grad():
        whole = net(normalised(image)[None])[0]
    interior = (tiled - whole)[:, 8:-8, 8:-8].abs() / whole.std()
    assert float(interior.mean()) < 0.01


def test_a_tile_larger_than_the_image_predicts_it_as_one_tile(tmp_path) -> None:
    torch.manual_seed(0)
    net = DenseNet(3, padding="valid", width=2, depth=2).eval()
    image = picture(40, 30)
    source = write_input(tmp_path, image, "tif")
    result = predict_large(
        net, source, tmp_path / "mask.tif", tile_size=256, mean=MEAN, std=STD, progress=False
    )
    assert result.tiles == 1
    tiler = TiledPredictor(net, tile_size=256)
    with torch.no_grad():
        whole = net(mirror_pad(normalised(image), *tiler.whole_image_padding(40, 30))[None])[0][:, :40, :30]
    assert np.array_equal(tifffile.imread(tmp_path / "mask.tif"), whole.argmax(0).numpy())
    same = DenseNet(3, width=2, depth=2).eval()  # blended: mirrored up to the tile
    predict_large(same, source, tmp_path / "blend.tif", tile_size=64, mean=MEAN, std=STD, progress=False)
    assert tifffile.imread(tmp_path / "blend.tif").shape == (40, 30)


# ------------------------------------------------------------------------------------------- memory
class CountingReader(ArrayReader):
    """An in-memory image that records every window it is asked for."""

    def __init__(self, image: np.ndarray) -> None:
        super().__init__(image, path="counted")
        self.reads = []


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_the_reader_is_asked_for_tile_windows_and_the_writer_holds_a_few_bands(
    tmp_path, padding, monkeypatch
):
    torch.manual_seed(0)
    net = DenseNet(2, padding=padding, width=2, depth=2).eval()
    reader = CountingReader(picture(400, 160))
    held: list[int] = []
    write = TiffTileSink.write

    def spy(self, y, x, values):
        write(self, y, x, values)
        held.append(len(self._bands) * self.tile * self._columns * self.tile)

    monkeypatch.setattr(TiffTileSink, "write", spy)
    predictor = LargeImagePredictor(
        net, tile_size=32, batch_size=2, mean=MEAN, std=STD, progress=False, output_tile=16
    )
    result = predictor.predict(reader, tmp_path / "mask.tif")
    window = predictor.tiler.tile_in
    assert len(reader.reads) == result.tiles == predictor.tiler.num_tiles(400, 160) > 30
    assert max(h * w for _, _, h, w in reader.reads) <= window * window < 400 * 160 / 10
    # at most the bands of two output tile rows (plus two partial bands) are held, never the whole mask
    assert max(held) <= (2 * predictor.tiler.tile_out + 2 * 16) * 160 < 400 * 160 / 3
    assert tifffile.imread(tmp_path / "mask.tif").shape == (400, 160)


# ---------------------------------------------------------------------------------------- bad input
def test_a_truncated_tiff_is_named_and_leaves_no_output(tmp_path) -> None:
    source = write_input(tmp_path, picture(120, 100), "tif")
    data = source.read_bytes()
    source.write_bytes(data[: len(data) // 2])
    net = DenseNet(2, width=2, depth=2).eval()
    with pytest.raises(ImageReadError, match=r"slide\.tif: truncated TIFF"):
        predict_large(net, source, tmp_path / "mask.tif", tile_size=32, progress=False)
    assert not (tmp_path / "mask.tif").exists() and leftovers(tmp_path) == []


def test_an_image_with_other_channels_than_the_network_is_refused_by_name(tmp_path) -> None:
    net = DenseNet(2, width=2, depth=2).eval()
    tifffile.imwrite(tmp_path / "rgba.tif", picture(40, 40, channels=4), photometric="rgb", extrasamples=[2])
    with pytest.raises(
        ValueError, match=r"rgba\.tif: the image has 4 channels; the network's first convolution takes 3"
    ):
        predict_large(net, tmp_path / "rgba.tif", tmp_path / "mask.tif", tile_size=32, progress=False)
    assert not (tmp_path / "mask.tif").exists()
    # a grayscale image is repeated to the 3 channels, as the data modules do
    tifffile.imwrite(tmp_path / "gray.tif", picture(40, 40, channels=1)[..., 0])
    predict_large(net, tmp_path / "gray.tif", tmp_path / "gray_mask.tif", tile_size=32, progress=False)
    assert tifffile.imread(tmp_path / "gray_mask.tif").shape == (40, 40)
    with pytest.raises(ValueError, match=r"must end in \.tif, \.tiff or \.zarr"):
        predict_large(net, tmp_path / "gray.tif", tmp_path / "mask.png", tile_size=32, progress=False)


def test_a_disk_that_fills_up_leaves_no_file_under_the_final_name(tmp_path, monkeypatch) -> None:
    write = tifffile.TiffWriter.write

    def full_disk(self, data, *args, **kwargs):
        def some_tiles():
            for k, tile in enumerate(data):
                if k == 3:
                    raise OSError(errno.ENOSPC, "No space left on device")
                yield tile

        return write(self, some_tiles(), *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffWriter, "write", full_disk)
    source = write_input(tmp_path / "in", picture(150, 140), "zarr")
    net = DenseNet(2, width=2, depth=2).eval()
    with pytest.raises(OSError, match=r"mask\.tif: writing the output failed: .*No space left on device"):
        predict_large(net, source, tmp_path / "mask.tif", tile_size=32, progress=False, output_tile=16)
    assert not (tmp_path / "mask.tif").exists() and leftovers(tmp_path) == []
    # a network that fails half-way leaves nothing either (the old output is kept untouched)
    monkeypatch.setattr(tifffile.TiffWriter, "write", write)
    (tmp_path / "old.tif").write_bytes(b"previous result")
    calls = []

    def failing(x):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return net(x)

    with pytest.raises(RuntimeError, match="out of memory"):
        predict_large(failing, source, tmp_path / "old.tif", tile_size=32, batch_size=1, progress=False,
                      geometry=large.network_geometry(net))  # fmt: skip
    assert (tmp_path / "old.tif").read_bytes() == b"previous result" and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------- python
def test_predict_large_with_a_task_uses_its_mask_rule(tmp_path) -> None:
    torch.manual_seed(0)
    model = SemanticSegmenter(
        "unet", num_classes=2, binary=True, backbone_kwargs={"width": 4, "depth": 2}, threshold=0.3
    )
    model.eval()
    image = picture(100, 90)
    source = write_input(tmp_path, image, "tif")
    predict_large(
        model, source, tmp_path / "mask.tif", tile_size=32, overlap=8, mean=MEAN, std=STD, progress=False
    )
    options = TilingOptions(tile_size=32, tile_overlap=8)
    with torch.no_grad():
        expected = model.to_mask(segmentation_logits(model, normalised(image)[None], options))[0]
    assert np.array_equal(tifffile.imread(tmp_path / "mask.tif"), expected.numpy())
    assert model.training is False


# ---------------------------------------------------------------------------------------------- CLI
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "segmentation" / "shapes_unet.yaml"
MODEL = ["--model.init_args.backbone_kwargs={width: 4, depth: 2, norm: batch}"]


def _common(tmp: Path) -> list[str]:
    return [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32",
        "--trainer.callbacks=[]",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp / 'logs'}",
        "--model.init_args.figure_every_n_epochs=0",
        *MODEL,
    ]


@pytest.fixture
def slides(tmp_path, monkeypatch):
    """A folder as a user has it: a tiled TIFF, a Zarr store and a PNG (loaded as today)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIGHTNING_CONVNETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "slides"
    image = picture(150, 120, seed=3)
    write_input(folder, image, "tif")
    zarr_image = picture(100, 90, seed=4)
    z = zarr.create_array(
        str(folder / "stack.zarr"), shape=zarr_image.shape, chunks=(32, 32, 3), dtype="uint8"
    )
    z[:] = zarr_image
    Image.fromarray(image).save(folder / "copy.png")  # the TIFF's pixels, through the in-memory path
    return folder


def _record_reads_and_examples(monkeypatch) -> tuple[list, list]:
    reads, examples = [], []
    read = readers._WindowedArray.read

    def spy_read(self, y0, x0, h, w):
        reads.append((self.path, h * w))
        return read(self, y0, x0, h, w)

    fused = SemanticSegmenter.fused_for_predict

    def spy_fused(self, images):
        examples.append(tuple(images.shape))
        return fused(self, images)

    monkeypatch.setattr(readers._WindowedArray, "read", spy_read)
    monkeypatch.setattr(SemanticSegmenter, "fused_for_predict", spy_fused)
    return reads, examples


def _check_masks(cli: ConvNetsCLI, slides: Path) -> None:
    masks = Path(cli.trainer.log_dir) / "predictions" / "masks"
    assert sorted(p.name for p in masks.iterdir()) == ["copy.png", "slide.tif", "stack.tif"]
    slide = tifffile.imread(masks / "slide.tif")
    assert slide.shape == (150, 120) and slide.dtype == np.uint8 and slide.max() < 5
    assert tifffile.imread(masks / "stack.tif").shape == (100, 90)
    # the streamed path and the in-memory tiled path agree on the same pixels
    agree = (slide == np.array(Image.open(masks / "copy.png"))).mean()
    assert agree > 0.999, agree
    assert leftovers(masks) == []


def test_cli_predict_dir_streams_tiff_and_zarr_with_ckpt_path(slides, tmp_path, monkeypatch) -> None:
    tiny = ["--data.init_args.num_train=8", "--data.init_args.num_val=4", "--data.init_args.num_test=4"]
    fit = ConvNetsCLI(args=["fit", "--config", str(CONFIG), *_common(tmp_path), *tiny, "--trainer.fast_dev_run=1",
                            "--data.init_args.batch_size=4"])  # fmt: skip
    ckpt = tmp_path / "seg.ckpt"
    fit.trainer.save_checkpoint(ckpt)
    reads, examples = _record_reads_and_examples(monkeypatch)
    cli = ConvNetsCLI(
        args=[
            "predict",
            "--config",
            str(CONFIG),
            *_common(tmp_path),
            "--ckpt_path",
            str(ckpt),
            "--data.init_args.predict_dir",
            str(slides),
            "--model.init_args.tile_size",
            "32",
            "--model.init_args.tile_overlap",
            "8",
        ]
    )
    _check_masks(cli, slides)
    window = 32 * 32
    assert reads and max(area for _, area in reads) <= window  # windows only, never a whole image
    # fast_predict built and checked its folded copy on one tile window (the PNG's batch: its first window)
    assert examples[0] == (1, 3, 32, 32) and all(shape[-2:] == (32, 32) for shape in examples)


def test_cli_predict_dir_streams_without_a_checkpoint(slides, tmp_path) -> None:
    cli = ConvNetsCLI(
        args=[
            "predict",
            "--config",
            str(CONFIG),
            *_common(tmp_path),
            "--data.init_args.predict_dir",
            str(slides),
            "--model.init_args.tile_size",
            "32",
            "--data.init_args.num_train=4",
        ]
    )
    _check_masks(cli, slides)


def test_cli_streams_with_tta_as_the_in_memory_tiled_path_does(slides, tmp_path) -> None:
    cli = ConvNetsCLI(
        args=[
            "predict",
            "--config",
            str(CONFIG),
            *_common(tmp_path),
            "--data.init_args.predict_dir",
            str(slides),
            "--model.init_args.tile_size",
            "32",
            "--model.init_args.tta",
            "flip+vflip",
        ]
    )
    _check_masks(cli, slides)  # the streamed TIFF's mask agrees with the PNG's (in memory, tiled + TTA)


@pytest.mark.parametrize(
    ("padding", "tta"), [("same", "flip"), ("same", "flip+vflip+scales=0.5,1"), ("valid", "flip+vflip")]
)
def test_streamed_tta_equals_the_in_memory_tiled_tta(tmp_path, padding, tta) -> None:
    torch.manual_seed(0)
    model = DenseNet(3, width=4, depth=2, padding=padding).eval()
    image = picture(100, 84, seed=5)
    source = write_input(tmp_path, image, "tif")
    options = TilingOptions(tile_size=32, tile_overlap=8, tile_batch_size=3, tta=tta)
    with torch.no_grad():
        expected = segmentation_logits(model, normalised(image)[None], options)[0].argmax(0)
        plain = segmentation_logits(model, normalised(image)[None], TilingOptions(32, 8, 3))[0].argmax(0)
    result = predict_large(model, source, tmp_path / "mask.tif", tile_size=32, overlap=8, batch_size=3,
                           mean=MEAN, std=STD, tta=tta, progress=False)  # fmt: skip
    mask = torch.from_numpy(tifffile.imread(result.output).astype(np.int64))
    assert (mask == expected).float().mean() > 0.999
    assert not torch.equal(expected, plain)  # the views changed the prediction: TTA did run


def test_rescaled_tta_views_on_a_valid_padding_network_are_refused_on_tiles(tmp_path) -> None:
    model = DenseNet(3, width=4, depth=2, padding="valid").eval()
    with pytest.raises(ValueError, match=r"tta scales \[0\.75, 1\.0, 1\.25\] rescale the image"):
        LargeImagePredictor(model, tile_size=32, tta="flip+scales", progress=False)
    # in memory, the whole image is rescaled around the exact tiles instead
    logits = segmentation_logits(model, torch.rand(1, 3, 70, 60), TilingOptions(32, tta="flip+scales"))
    assert logits.shape == (1, 3, 70, 60)


def test_16_bit_pixels_get_one_scale_in_the_streamed_and_the_loaded_path(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for peak in (200, 4095, 65535):  # a dark image, a 12-bit camera's, the full range
        deep = rng.integers(0, peak + 1, (20, 30), dtype=np.uint16)
        Image.fromarray(deep).save(tmp_path / "deep.png")
        tifffile.imwrite(tmp_path / "deep.tif", deep)
        loaded = load_image(tmp_path / "deep.png", in_channels=1)[..., 0] / 255.0
        streamed = pixels_to_unit(open_image(tmp_path / "deep.tif").read(0, 0, 20, 30))[..., 0]
        assert np.abs(loaded - streamed).max() <= 0.5 / 255 + 1e-6, peak
        assert np.allclose(streamed, deep / 65535.0)  # the dtype's range, never the image's peak
    floats = np.linspace(-0.5, 1.5, 12, dtype=np.float32).reshape(3, 4)
    assert pixels_to_unit(floats).min() == 0.0 and pixels_to_unit(floats).max() == 1.0
