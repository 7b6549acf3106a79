"""Detection on images larger than memory: tiles read from TIFF / Zarr, detections streamed to COCO json
and GeoJSON as tile rows finish.

A toy detector (a box around each bright square a tile holds, plus a weaker shifted duplicate, so that the
merge has work within and across tiles) on generated scenes of 200-300 px stands for a network: what is
checked is that the streamed result equals the in-memory ``TiledDetector`` (NMS and WBF; objects across
tile borders found once), that records are written before the last tile is read, the output formats, the
bad inputs (a failing write, wrong channels), and the CLI (``predict_dir`` of TIFF/Zarr files for an
``ObjectDetector``, with and without ``--ckpt_path``) and Python (``predict_large_detections``) entry points.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from PIL import Image

from lightning_convnets.cli import ConvNetsCLI
from lightning_convnets.predict import large
from lightning_convnets.predict.large import LargeImageDetector, predict_large_detections
from lightning_convnets.predict.readers import ArrayReader
from lightning_convnets.predict.tiling import TiledDetector


def scene(size: tuple[int, int] = (230, 270), count: int = 40, seed: int = 0) -> np.ndarray:
    """Dark uint8 image with ``count`` bright 7x7 squares (two brightness levels: two classes)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((*size, 3), np.uint8)
    taken = np.zeros(size, bool)
    placed = 0
    while placed < count:
        y, x = int(rng.integers(1, size[0] - 8)), int(rng.integers(1, size[1] - 8))
        if taken[y - 1 : y + 8, x - 1 : x + 8].any():
            continue
        taken[y - 1 : y + 8, x - 1 : x + 8] = True
        image[y : y + 7, x : x + 7] = 200 if placed % 2 else 250
        placed += 1
    return image


def toy_detector(tiles: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """A box per bright square (its top-left corner's runs right and down), its label from the brightness,
    a score from its position; plus a duplicate shifted by one pixel with a lower score."""
    out = []
    for tile in tiles:
        lit = tile[0] > 0.5
        up = torch.zeros_like(lit)
        up[1:] = lit[:-1]
        left = torch.zeros_like(lit)
        left[:, 1:] = lit[:, :-1]
        boxes, scores, labels = [], [], []
        for y, x in (lit & ~up & ~left).nonzero().tolist():
            w = int(lit[y, x:].int().cumprod(0).sum())
            h = int(lit[y:, x].int().cumprod(0).sum())
            label = int(tile[0, y, x] > 0.9)
            score = 0.5 + 0.4 * ((x * 7 + y * 3) % 11) / 11
            boxes += [[x, y, x + w, y + h], [x + 1, y, x + w + 1, y + h]]
            scores += [score, score - 0.2]
            labels += [label, label]
        out.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor(scores, dtype=torch.float32),
                "labels": torch.tensor(labels, dtype=torch.long),
            }
        )
    return out


def records(detections: dict[str, torch.Tensor]) -> list[tuple]:
    return sorted(
        (int(label), *(round(float(v), 2) for v in box), round(float(score), 4))
        for box, score, label in zip(detections["boxes"], detections["scores"], detections["labels"])
    )


def coco_records(path: Path) -> list[tuple]:
    return sorted(
        (r["category_id"], *(round(v, 2) for v in (r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2],
                                                    r["bbox"][1] + r["bbox"][3])), round(r["score"], 4))
        for r in json.loads(path.read_text())
    )  # fmt: skip


def close(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(np.allclose(x, y, atol=0.02) for x, y in zip(a, b))


@pytest.mark.parametrize("merge", ["nms", "wbf"])
def test_streamed_detections_equal_the_in_memory_tiled_detector(tmp_path, merge) -> None:
    image = scene()
    tifffile.imwrite(tmp_path / "scene.tif", image, tile=(32, 32), compression="zlib", photometric="rgb")
    options = {"tile_size": 64, "overlap": 24, "batch_size": 3, "merge": merge}
    whole = TiledDetector(toy_detector, **options)(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    result = LargeImageDetector(toy_detector, **options, progress=False).predict(
        tmp_path / "scene.tif", coco=tmp_path / "scene.json", geojson=tmp_path / "scene.geojson"
    )
    streamed = coco_records(tmp_path / "scene.json")
    assert close(streamed, records(whole)), (len(streamed), len(records(whole)))
    # every square found once (squares across tile borders included), with its class
    assert result.detections == len(streamed) == 40 and result.tiles == len(
        TiledDetector(toy_detector, 64, 24).tiles(230, 270)
    )
    assert sorted(r[0] for r in streamed) == [0] * 20 + [1] * 20


def test_records_are_written_as_tile_rows_finish(tmp_path, monkeypatch) -> None:
    image = scene((260, 200), count=50, seed=1)
    reader = ArrayReader(image, path="scene")
    reader.reads = []
    written: list[tuple[int, int]] = []  # (windows read so far, records written)
    write = large.DetectionRecords.write

    def spy(self, detections):
        written.append((len(reader.reads), len(detections["boxes"])))
        return write(self, detections)

    monkeypatch.setattr(large.DetectionRecords, "write", spy)
    pending: list[int] = []
    pop = large._PendingBoxes.pop_final

    def spy_pop(self, limit):
        out = pop(self, limit)
        pending.append(len(self))
        return out

    monkeypatch.setattr(large._PendingBoxes, "pop_final", spy_pop)
    detector = LargeImageDetector(
        toy_detector, tile_size=64, overlap=24, batch_size=2, prefetch=False, progress=False
    )
    result = detector.predict(reader, coco=tmp_path / "a.json")
    total = len(reader.reads)
    assert result.detections == 50 and sum(n for _, n in written) == 50
    # several writes, the first long before the last tile was read; only boxes near a row border wait
    assert len(written) >= 4 and written[0][0] <= total // 2
    assert max(pending) < 50 / 2 and pending[-1] == 0
    assert all(h <= 64 and w <= 64 for _, _, h, w in reader.reads)  # tile windows only


def test_the_geojson_holds_box_polygons_in_pixels_with_their_class(tmp_path) -> None:
    image = scene((120, 100), count=6, seed=2)
    result = predict_large_detections(
        toy_detector, image, geojson=tmp_path / "s.geojson", coco=tmp_path / "s.json", tile_size=64,
        overlap=24, class_names=["dim", "bright"], category_ids=[3, 7], image_id=12, progress=False,
    )  # fmt: skip
    collection = json.loads(result.geojson.read_text())
    assert collection["type"] == "FeatureCollection"
    assert collection["properties"]["width"] == 100 and collection["properties"]["height"] == 120
    features = collection["features"]
    assert len(features) == 6
    for feature, record in zip(features, json.loads(result.coco.read_text())):
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
        x, y, w, h = record["bbox"]
        assert ring[0] == [x, y] and ring[2] == [pytest.approx(x + w), pytest.approx(y + h)]
        props = feature["properties"]
        assert props["class_name"] == ["dim", "bright"][props["label"]]
        assert props["category_id"] == record["category_id"] == [3, 7][props["label"]]
        assert props["score"] == record["score"] and record["image_id"] == 12
        assert image[int(y) + 3, int(x) + 3, 0] > 0  # the box holds its square


def test_a_failing_write_leaves_no_file_and_bad_channels_are_named(tmp_path, monkeypatch) -> None:
    image = scene((200, 150), count=20, seed=3)
    original = large._JsonArrayFile.__init__

    class FullDisk:  # a file that fills up after a few records
        def __init__(self, file):
            self.file, self.writes = file, 0

        def write(self, text):
            self.writes += 1
            if self.writes > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(text)

        def close(self):
            self.file.close()

    def init(self, *args):
        original(self, *args)
        self._file = FullDisk(self._file)

    monkeypatch.setattr(large._JsonArrayFile, "__init__", init)
    out = tmp_path / "out"
    with pytest.raises(OSError, match=r"out/s\.(json|geojson): writing the output failed: .*No space left"):
        predict_large_detections(
            toy_detector, image, out / "s.json", out / "s.geojson", tile_size=64, progress=False
        )
    assert sorted(p.name for p in out.iterdir()) == []
    monkeypatch.undo()
    runner = LargeImageDetector(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), tile_size=64, progress=False)
    np.save(tmp_path / "two.npy", np.zeros((80, 80, 2), np.uint8))
    with pytest.raises(
        ValueError, match=r"two\.npy: the image has 2 channels; the network's first convolution takes 3"
    ):
        runner.predict(tmp_path / "two.npy", coco=tmp_path / "two.json")
    assert not (tmp_path / "two.json").exists()
    with pytest.raises(ValueError, match=r"x\.csv: coco output must end in \.json"):
        predict_large_detections(toy_detector, image, tmp_path / "x.csv", tile_size=64, progress=False)


def test_tta_runs_per_tile_in_both_paths(tmp_path) -> None:
    image = scene((150, 140), count=12, seed=4)
    options = {"tile_size": 64, "overlap": 24, "merge": "nms", "tta": "flip+vflip"}
    whole = TiledDetector(toy_detector, **options)(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    predict_large_detections(toy_detector, image, tmp_path / "t.json", progress=False, **options)
    streamed = coco_records(tmp_path / "t.json")
    assert close(streamed, records(whole)) and len(streamed) == 12


# ---------------------------------------------------------------------------------------------- CLI
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "detection" / "centernet_resnet18_shapes.yaml"
MODEL = [
    "--model.init_args.backbone_kwargs={width: 4}",
    "--model.init_args.neck_channels=4",
    "--model.init_args.head_channels=4",
    "--model.init_args.score_threshold=0.0",  # an untrained detector: keep every peak
    "--model.init_args.top_k=20",
]


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
def scenes(tmp_path, monkeypatch):
    """A folder as a user has it: a tiled TIFF, a Zarr store and a PNG (loaded as today)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIGHTNING_CONVNETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "scenes"
    folder.mkdir()
    image = scene((160, 130), count=10, seed=5)
    tifffile.imwrite(folder / "slide.tif", image, tile=(32, 32), compression="zlib", photometric="rgb")
    other = scene((100, 120), count=6, seed=6)
    z = zarr.create_array(str(folder / "stack.zarr"), shape=other.shape, chunks=(32, 32, 3), dtype="uint8")
    z[:] = other
    Image.fromarray(image).save(folder / "copy.png")
    return folder


def _check_outputs(cli: ConvNetsCLI) -> None:
    predictions = Path(cli.trainer.log_dir) / "predictions"
    found = predictions / "detections"
    names = sorted(p.name for p in found.iterdir())
    assert names == ["slide.geojson", "slide.json", "stack.geojson", "stack.json"]
    slide = json.loads((found / "slide.json").read_text())
    features = json.loads((found / "slide.geojson").read_text())["features"]
    assert len(slide) == len(features) > 0
    index = {"copy.png": 0, "slide.tif": 1, "stack.zarr": 2}
    assert {r["image_id"] for r in slide} == {index["slide.tif"]}
    assert {f["properties"]["class_name"] for f in features} <= {"circle", "square", "triangle", "cross"}
    # the PNG (the TIFF's pixels) went through the in-memory tiled path into coco_results.json: the same
    # merged boxes, of which the in-memory path keeps the top_k best of the image (streamed: per tile)
    loaded = [r for r in json.loads((predictions / "coco_results.json").read_text()) if r["image_id"] == 0]
    best = sorted(slide, key=lambda r: -r["score"])[: len(loaded)]
    assert 0 < len(loaded) <= 20 <= len(slide)
    key = lambda r: (r["category_id"], *r["bbox"])  # noqa: E731
    assert np.allclose(sorted(map(key, loaded)), sorted(map(key, best)), atol=0.05)


def test_cli_predict_dir_streams_detections_without_a_checkpoint(scenes, tmp_path) -> None:
    cli = ConvNetsCLI(
        args=[
            "predict",
            "--config",
            str(CONFIG),
            *_common(tmp_path),
            "--data.init_args.predict_dir",
            str(scenes),
            "--model.init_args.tile_size",
            "64",
            "--model.init_args.tile_overlap",
            "16",
        ]
    )
    _check_outputs(cli)


def test_cli_predict_dir_streams_detections_with_ckpt_path(scenes, tmp_path) -> None:
    tiny = ["--data.init_args.num_train=4", "--data.init_args.num_val=2", "--data.init_args.num_test=2"]
    fit = ConvNetsCLI(args=["fit", "--config", str(CONFIG), *_common(tmp_path), *tiny, "--trainer.fast_dev_run=1",
                            "--data.init_args.batch_size=2"])  # fmt: skip
    ckpt = tmp_path / "det.ckpt"
    fit.trainer.save_checkpoint(ckpt)
    cli = ConvNetsCLI(
        args=[
            "predict",
            "--config",
            str(CONFIG),
            *_common(tmp_path),
            "--ckpt_path",
            str(ckpt),
            "--data.init_args.predict_dir",
            str(scenes),
            "--model.init_args.tile_size",
            "64",
            "--model.init_args.tile_overlap",
            "16",
        ]
    )
    _check_outputs(cli)
