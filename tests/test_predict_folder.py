"""Predicting a folder of new images with a trained checkpoint (every data module's ``predict_dir``).

Through the CLI in-process, as a user runs it: a tiny model is fitted on the generated shapes with the
task's config, then ``predict --config <same config> --ckpt_path <ckpt> --data.init_args.predict_dir new/``
must cover every image of the folder (count, file names, output sizes). Also: switching to a folder data
module at predict time, the hyperparameter merge that used to refuse it (``num_classes`` None against 5),
every data module's ``predict_dir`` and the errors for a missing, empty or broken folder.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning_convnets.datamodules import (
    CIFAR10DataModule,
    CocoDetectionDataModule,
    DataValidationError,
    ImageFolderDataModule,
    SegmentationFolderDataModule,
    ShapesDataModule,
    VOCSegmentationDataModule,
)
from PIL import Image

from lightning_convnets.cli import ConvNetsCLI
from lightning_convnets.tasks import SemanticSegmenter

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# (config, tiny model overrides) per task: the configs users train with
TASKS = {
    "classification": (
        CONFIGS / "quickstart.yaml",
        ["--model.init_args.backbone_kwargs={stem: cifar, width: 4}"],
    ),
    "segmentation": (
        CONFIGS / "segmentation" / "shapes_unet.yaml",
        ["--model.init_args.backbone_kwargs={width: 4, depth: 2, norm: batch}"],
    ),
    "detection": (
        CONFIGS / "detection" / "centernet_resnet18_shapes.yaml",
        [
            "--model.init_args.backbone_kwargs={width: 4}",
            "--model.init_args.neck_channels=4",
            "--model.init_args.head_channels=4",
            "--model.init_args.score_threshold=0.0",  # an untrained detector: keep every peak
        ],
    ),
}
# (height, width) of the new images: sizes the training data never had, one grayscale
NEW_IMAGES = {"b_wide": (40, 72), "a_square": (48, 48), "c_tall": (56, 36), "d_gray": (48, 48)}


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs write lightning_logs/ relative to the working directory
    monkeypatch.setenv("LIGHTNING_CONVNETS_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _new_images(folder: Path) -> list[Path]:
    """The folder a user predicts: images of other sizes, a non-image file and a subfolder (skipped)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name, (h, w) in NEW_IMAGES.items():
        if name.endswith("gray"):
            Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8), mode="L").save(
                folder / f"{name}.jpg"
            )
        else:
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "older").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "older" / "skipped.png")
    return sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg"))


def _common(tmp: Path) -> list[str]:
    return [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32",
        f"--trainer.logger.init_args.save_dir={tmp / 'logs'}",
        "--model.init_args.figure_every_n_epochs=0",
    ]


def _fit_checkpoint(tmp: Path, task: str) -> Path:
    """Fit one step of the task's config on a few generated shapes; return the checkpoint."""
    config, model_args = TASKS[task]
    tiny_data = [f"--data.init_args.{k}={v}" for k, v in (("num_train", 8), ("num_val", 4), ("num_test", 4))]
    args = [*_common(tmp), *model_args, *tiny_data, "--data.init_args.batch_size=4"]
    fit = ConvNetsCLI(args=["fit", "--config", str(config), *args, "--trainer.fast_dev_run=1"])
    ckpt = tmp / f"{task}.ckpt"
    fit.trainer.save_checkpoint(ckpt)
    return ckpt


def _predict(tmp: Path, task: str, ckpt: Path, *data_args: str) -> ConvNetsCLI:
    """The documented command: the training config, the checkpoint, the folder."""
    config, model_args = TASKS[task]
    args = ["predict", "--config", str(config), *_common(tmp), *model_args, "--ckpt_path", str(ckpt)]
    return ConvNetsCLI(args=[*args, *data_args])


def _predicted_paths(cli: ConvNetsCLI) -> list[Path]:
    return list(cli.trainer.predict_dataloaders.dataset.paths)


def _shapes_cache_generated(tmp: Path) -> bool:
    cache = tmp / "cache" / "shapes"
    return cache.is_dir() and any(
        p.name.startswith(("classification-", "segmentation-")) for p in cache.iterdir()
    )


# ------------------------------------------------------------------------------ through the CLI
def test_classifier_from_the_quickstart_predicts_every_image_of_a_folder(in_tmp):
    ckpt = _fit_checkpoint(in_tmp, "classification")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert saved["num_classes"] == 4  # the count taken from the data, recorded (it was None)
    files = _new_images(in_tmp / "new")
    cache = in_tmp / "cache" / "shapes"
    before = sorted(cache.iterdir()) if cache.is_dir() else []
    cli = _predict(in_tmp, "classification", ckpt, "--data.init_args.predict_dir=new")
    assert sorted(cache.iterdir()) == before  # predicting a folder generates no shapes
    assert _predicted_paths(cli) == [Path("new") / p.name for p in files]
    with open(Path(cli.trainer.log_dir) / "predictions" / "probabilities.csv") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["source"]).name for r in rows] == [p.name for p in files]  # one row per image, in order
    columns = ["p_circle", "p_square", "p_triangle", "p_cross"]
    for row in rows:
        probabilities = [float(row[c]) for c in columns]
        assert (
            abs(sum(probabilities) - 1) < 1e-4 and row["predicted"] == columns[np.argmax(probabilities)][2:]
        )
    # resized to the training size (32) like the test split, so the four images share batches of 4
    assert len(cli.trainer.predict_dataloaders) == 1
    batch = next(iter(cli.trainer.predict_dataloaders))
    assert batch.shape == (4, 3, 32, 32)


def test_segmenter_predicts_full_size_masks_named_after_each_image(in_tmp):
    ckpt = _fit_checkpoint(in_tmp, "segmentation")
    files = _new_images(in_tmp / "new")
    cli = _predict(in_tmp, "segmentation", ckpt, f"--data.init_args.predict_dir={in_tmp / 'new'}")
    assert _predicted_paths(cli) == files
    masks = sorted((Path(cli.trainer.log_dir) / "predictions" / "masks").glob("*.png"))
    assert [m.stem for m in masks] == [p.stem for p in files]  # every image, none of the skipped files
    for mask_path in masks:
        mask = np.array(Image.open(mask_path))
        assert mask.shape == NEW_IMAGES[mask_path.stem]  # the file's own size (no resize by default)
        assert mask.max() < 5  # background + 4 shapes
    assert len(cli.trainer.predict_dataloaders) == len(files)  # sizes differ: one image per batch


def test_segmenter_predicts_with_the_folder_module_instead_of_the_shapes(in_tmp):
    # What the user did: switch to SegmentationFolderDataModule at predict time. No dataset root is
    # needed; the shapes' normalisation is given so the model sees what it was trained on.
    ckpt = _fit_checkpoint(in_tmp, "segmentation")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    # a checkpoint written before the count was recorded (num_classes: None) must predict too
    saved["hyper_parameters"]["num_classes"] = None
    old = in_tmp / "old.ckpt"
    torch.save(saved, old)
    files = _new_images(in_tmp / "new")
    for checkpoint in (ckpt, old):
        cli = _predict(
            in_tmp,
            "segmentation",
            checkpoint,
            "--data=SegmentationFolderDataModule",
            "--data.predict_dir=new",
            "--data.num_classes=5",
            "--data.mean=[0.5, 0.5, 0.5]",
            "--data.std=[0.23, 0.23, 0.23]",
        )
        assert type(cli.datamodule).__name__ == "SegmentationFolderDataModule"
        assert cli.model.num_classes == 5 and cli.model.hparams.num_classes == 5
        masks = sorted((Path(cli.trainer.log_dir) / "predictions" / "masks").glob("*.png"))
        assert [m.stem for m in masks] == [p.stem for p in files]
        assert all(np.array(Image.open(m)).shape == NEW_IMAGES[m.stem] for m in masks)


def test_detector_predicts_boxes_for_every_image_in_file_pixels(in_tmp):
    ckpt = _fit_checkpoint(in_tmp, "detection")
    files = _new_images(in_tmp / "new")
    # at the file's size, resized to the training size, and in tiles (detection on large images)
    tiles = ["--model.init_args.tile_size=32", "--model.init_args.tile_overlap=8"]
    for resize, extra in (("false", []), ("true", []), ("false", tiles)):
        cli = _predict(
            in_tmp,
            "detection",
            ckpt,
            "--data.init_args.predict_dir=new",
            f"--data.init_args.predict_resize={resize}",
            *extra,
        )
        assert cli.model.hparams.tile_size == (32 if extra else None)
        paths = _predicted_paths(cli)
        assert [p.name for p in paths] == [p.name for p in files]
        results = json.loads((Path(cli.trainer.log_dir) / "predictions" / "coco_results.json").read_text())
        # image_id i is the i-th file of the folder; every image has detections (score_threshold 0)
        assert {r["image_id"] for r in results} == set(range(len(files)))
        for r in results:
            h, w = NEW_IMAGES[paths[r["image_id"]].stem]
            x, y, bw, bh = r["bbox"]
            assert x >= -0.5 and y >= -0.5 and x + bw <= w + 0.5 and y + bh <= h + 0.5, (r, (h, w))
        if resize == "true":  # boxes found on the 64-px input, mapped back to the file's pixels
            widest = max(
                r["bbox"][0] + r["bbox"][2] for r in results if paths[r["image_id"]].stem == "b_wide"
            )
            assert widest > 64
        images, targets = next(iter(cli.trainer.predict_dataloaders))
        sizes = [tuple(i.shape[-2:]) for i in images]
        first = [NEW_IMAGES[p.stem] for p in paths[: len(images)]]
        assert sizes == ([(64, 64)] * len(images) if resize == "true" else first)
        assert [t["orig_size"].tolist() for t in targets] == [list(s) for s in first]


def test_predict_folder_errors_name_the_folder_or_the_file(in_tmp):
    ckpt = _fit_checkpoint(in_tmp, "classification")
    with pytest.raises(DataValidationError, match=r"missing.*predict_dir not found"):
        _predict(in_tmp, "classification", ckpt, "--data.init_args.predict_dir=missing")
    (in_tmp / "empty" / "by_class").mkdir(parents=True)
    (in_tmp / "empty" / "notes.txt").write_text("no image here")
    with pytest.raises(DataValidationError, match=r"empty: predict_dir holds no images.*\['by_class'\]"):
        _predict(in_tmp, "classification", ckpt, "--data.init_args.predict_dir=empty")
    _new_images(in_tmp / "broken")
    (in_tmp / "broken" / "e_truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataValidationError, match=r"e_truncated\.png: unreadable"):
        _predict(in_tmp, "classification", ckpt, "--data.init_args.predict_dir=broken")


# ------------------------------------------------------------------------------ every data module
def _write_coco(root: Path) -> tuple[Path, Path]:
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (32, 24)).save(root / "images" / "x.png")
    data = {
        "images": [{"id": 1, "file_name": "x.png", "width": 32, "height": 24}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 2, 10, 10], "iscrowd": 0}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }
    (root / "train.json").write_text(json.dumps(data))
    return root / "images", root / "train.json"


def _every_datamodule(tmp: Path, predict_dir: Path) -> list:
    images, annotations = _write_coco(tmp / "coco")
    common = {"predict_dir": str(predict_dir), "batch_size": 2}
    return [
        ShapesDataModule(task="classification", root=str(tmp / "shapes"), **common),
        ShapesDataModule(task="segmentation", root=str(tmp / "shapes"), **common),
        ShapesDataModule(task="detection", root=str(tmp / "shapes"), **common),
        ImageFolderDataModule(class_names=["cat", "dog"], image_size=16, **common),
        SegmentationFolderDataModule(num_classes=3, **common),
        CocoDetectionDataModule(str(images), str(annotations), image_size=32, **common),
        CIFAR10DataModule(str(tmp / "no_cifar"), **common),  # nothing downloaded: not needed
        VOCSegmentationDataModule(str(tmp / "no_voc"), **common),
    ]


def test_every_datamodule_reads_predict_dir_without_its_training_data(tmp_path):
    files = _new_images(tmp_path / "new")
    for dm in _every_datamodule(tmp_path, tmp_path / "new"):
        name = f"{type(dm).__name__}({dm.task})"
        dm.setup("predict")
        loader = dm.predict_dataloader()
        assert loader.dataset.paths == files, name
        seen = 0
        for batch in loader:
            if dm.task == "detection":
                images, targets = batch
                assert [t["boxes"].shape for t in targets] == [(0, 4)] * len(images), name
                assert [int(t["image_id"]) for t in targets] == list(range(seen, seen + len(images))), name
            else:
                images = batch
                assert isinstance(images, torch.Tensor) and images.ndim == 4, name
            assert all(i.shape[-3] == 3 for i in images), name  # the grayscale file converted to RGB
            seen += len(images)
        assert seen == len(files), name
        assert dm.test_dataset is None and dm.train_dataset is None, name  # no training data read
    assert not (tmp_path / "shapes").exists()  # no shapes generated


def test_predict_images_get_the_test_split_normalisation_and_size(tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(folder / "grey.png")
    dm = ShapesDataModule(task="classification", root=str(tmp_path / "shapes"), predict_dir=str(folder))
    (image,) = next(iter(dm.predict_dataloader()))
    assert image.shape == (3, 32, 32)  # classification: resized to image_size
    assert torch.allclose(image, torch.full_like(image, (200 / 255 - 0.5) / 0.23), atol=1e-5)  # shapes stats
    kept = ShapesDataModule(
        task="classification", root=str(tmp_path / "shapes"), predict_dir=str(folder), predict_resize=False
    )
    assert next(iter(kept.predict_dataloader())).shape == (1, 3, 20, 30)
    letterbox = ImageFolderDataModule(
        class_names=["a", "b"],
        predict_dir=str(folder),
        image_size=30,
        resize="letterbox",
        mean=[0] * 3,
        std=[1] * 3,
    )
    (boxed,) = next(iter(letterbox.predict_dataloader()))
    assert boxed.shape == (3, 30, 30) and float(boxed[:, -1].abs().max()) == 0.0  # padded below, like test


def test_segmentation_predict_dir_refuses_two_images_with_one_stem(tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "scan.png")
    Image.new("RGB", (8, 8)).save(folder / "scan.jpg")
    with pytest.raises(
        DataValidationError, match=r"scan\.png: predict_dir holds two images with the stem 'scan'"
    ):
        SegmentationFolderDataModule(num_classes=2, predict_dir=str(folder)).setup("predict")
    # classification rows are named by full path: no clash there
    assert (
        len(ImageFolderDataModule(class_names=["a", "b"], predict_dir=str(folder)).predict_dataloader()) == 1
    )


def test_folder_modules_without_root_say_what_they_need(tmp_path):
    with pytest.raises(DataValidationError, match="root is not set"):
        ImageFolderDataModule().setup("fit")
    with pytest.raises(DataValidationError, match=r"root is not set.*class names unless given"):
        SegmentationFolderDataModule(predict_dir=str(tmp_path)).num_classes  # noqa: B018
    with pytest.raises(DataValidationError, match="predict_dir is not set"):
        ImageFolderDataModule(class_names=["a"]).build_predict_dataset()


# ------------------------------------------------------------------------------ hparams merge
@pytest.mark.parametrize(("data_count", "model_count"), [(2, None), (None, 2), (None, None), (2, 2)])
def test_num_classes_in_model_and_datamodule_hparams_never_conflict(tmp_path, data_count, model_count):
    # Lightning refuses to log module and datamodule hparams sharing a key with different values; both sides
    # record the count they resolved, so a count given on one side only is no conflict (it was: None vs 2).
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    for k in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
            tmp_path / f"data/images/{k}.png"
        )
        Image.fromarray((np.arange(256).reshape(16, 16) % 2).astype(np.uint8)).save(
            tmp_path / f"data/masks/{k}.png"
        )
    dm = SegmentationFolderDataModule(
        str(tmp_path / "data"),
        num_classes=data_count,
        image_size=16,
        batch_size=2,
        val_fraction=0.5,
        test_fraction=0,
    )
    model = SemanticSegmenter("unet", num_classes=model_count, backbone_kwargs={"width": 2, "depth": 2})
    trainer = pl.Trainer(
        max_steps=1, logger=CSVLogger(tmp_path / "logs"), limit_val_batches=1, num_sanity_val_steps=0,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, dm)
    assert model.hparams.num_classes == 2 and dm.hparams.num_classes == 2
    assert model.hparams_initial["num_classes"] == 2 and dm.hparams_initial["num_classes"] == 2
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    saved = torch.load(tmp_path / "m.ckpt", map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["num_classes"] == 2
