"""Detection configs through the CLI in-process: ``fit --trainer.fast_dev_run 1`` then ``test`` on a saved
checkpoint, with tiny widths and a few generated images; plus the slow quickstart accuracy check."""

import json
import time
from pathlib import Path

import pytest
import torch

from lightning_convnets.cli import ConvNetsCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detection"

TINY_DATA = [
    "--data.init_args.num_train",
    "8",
    "--data.init_args.num_val",
    "4",
    "--data.init_args.num_test",
    "4",
    "--data.init_args.batch_size",
    "4",
]
OFFLINE = {
    "centernet_hourglass_shapes.yaml": [
        "--model.init_args.backbone_kwargs",
        '{"num_stacks": 2, "order": 2, "width": 8}',
        "--model.init_args.head_channels",
        "4",
    ],
    "centernet_resnet18_shapes.yaml": [
        "--model.init_args.backbone_kwargs",
        '{"width": 4}',
        "--model.init_args.neck_channels",
        "4",
        "--model.init_args.head_channels",
        "4",
    ],
    "fasterrcnn_resnet18_shapes.yaml": [
        "--model.init_args.backbone_kwargs",
        '{"width": 4}',
        "--model.init_args.fpn_channels",
        "8",
    ],
}


def _run(args: list[str]) -> ConvNetsCLI:
    return ConvNetsCLI(args=args)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a config writes relative to the working directory lands here
    monkeypatch.setenv("LIGHTNING_CONVNETS_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.mark.parametrize("name", sorted(OFFLINE))
def test_offline_config_fits_and_tests_from_a_checkpoint(in_tmp, name):
    config = str(CONFIGS / name)
    common = [
        "--config",
        config,
        "--trainer.default_root_dir",
        str(in_tmp),
        "--trainer.logger.init_args.save_dir",
        str(in_tmp / "logs"),
        *TINY_DATA,
        *OFFLINE[name],
    ]
    fit = _run(["fit", *common, "--trainer.fast_dev_run", "1"])
    losses = {k: float(v) for k, v in fit.trainer.callback_metrics.items() if k.startswith("train/loss")}
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    ckpt = in_tmp / "tiny.ckpt"
    fit.trainer.save_checkpoint(ckpt)
    hparams = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["label_category_ids"] == [1, 2, 3, 4]  # the shapes' COCO ids, kept in the checkpoint
    assert hparams["class_names"] == ["circle", "square", "triangle", "cross"]

    tested = _run(["test", *common, "--ckpt_path", str(ckpt)])
    assert tested.model.num_classes == 4 and tested.model.category_ids == [1, 2, 3, 4]
    metrics = tested.trainer.callback_metrics
    for key in ("test/map", "test/map_50", "test/map_75", "test/map_small"):
        assert key in metrics and -1.0 <= float(metrics[key]) <= 1.0
    assert ("test/loss" in metrics) == ("centernet" in name)  # torchvision detectors have no eval loss
    fitted = fit.model.state_dict()
    for key, value in tested.model.state_dict().items():
        assert torch.equal(value, fitted[key]), f"{key} was not restored from the checkpoint"


def test_coco_recipe_loads_user_paths_and_predict_writes_coco_results(in_tmp):
    """The COCO recipe pointed at the generated shapes' real COCO json; predict writes results json."""
    from lightning_convnets.datamodules import ShapesDataModule
    from pycocotools.coco import COCO

    shapes = ShapesDataModule(
        task="detection", root=str(in_tmp / "shapes"), num_train=6, num_val=3, num_test=3
    )
    shapes.prepare_data()
    root = Path(shapes.data_dir)
    paths = [
        "--data.init_args.images",
        str(root / "train" / "images"),
        "--data.init_args.annotations",
        str(root / "train" / "annotations.json"),
        "--data.init_args.val_images",
        str(root / "val" / "images"),
        "--data.init_args.val_annotations",
        str(root / "val" / "annotations.json"),
        "--data.init_args.test_images",  # predict reads the test split
        str(root / "val" / "images"),
        "--data.init_args.test_annotations",
        str(root / "val" / "annotations.json"),
        "--data.init_args.image_size",
        "64",
        "--data.init_args.batch_size",
        "3",
        "--data.init_args.num_workers",
        "0",
    ]
    tiny = [
        "--model.init_args.backbone_kwargs",
        '{"num_stacks": 1, "order": 2, "width": 8}',
        "--model.init_args.head_channels",
        "4",
        "--trainer.precision",
        "32",
        "--trainer.devices",
        "1",
    ]
    common = [
        "--config",
        str(CONFIGS / "centernet_hourglass_coco.yaml"),
        "--trainer.default_root_dir",
        str(in_tmp),
        "--trainer.logger.init_args.save_dir",
        str(in_tmp / "logs"),
        *paths,
        *tiny,
    ]
    fit = _run(["fit", *common, "--trainer.fast_dev_run", "1"])
    ckpt = in_tmp / "coco.ckpt"
    fit.trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"][
        "label_category_ids"
    ] == [1, 2, 3, 4]

    results = in_tmp / "results.json"
    _run(
        [
            "predict",
            *common,
            "--ckpt_path",
            str(ckpt),
            "--trainer.callbacks+=lightning_convnets.detection_writers.CocoResultsWriter",
            "--trainer.callbacks.output",
            str(results),
            "--model.init_args.score_threshold",
            "0.0",
        ]
    )
    entries = json.loads(results.read_text())
    val = json.loads((root / "val" / "annotations.json").read_text())
    assert entries and {e["image_id"] for e in entries} <= {im["id"] for im in val["images"]}
    assert {e["category_id"] for e in entries} <= {1, 2, 3, 4}
    loaded = COCO(str(root / "val" / "annotations.json")).loadRes(str(results))
    assert len(loaded.getAnnIds()) == len(entries)


@pytest.mark.slow
def test_detection_quickstart_reaches_map50_of_half(in_tmp):
    """The detection quickstart as shipped (tiny hourglass) reaches mAP@50 >= 0.5 on the shapes test split
    within 3 minutes of a 2-core CPU. The budget is checked on process CPU time (all threads), which a
    machine shared with other jobs does not inflate the way it inflates wall time."""
    config = str(CONFIGS / "centernet_hourglass_shapes.yaml")
    common = [
        "--config",
        config,
        "--trainer.default_root_dir",
        str(in_tmp),
        "--trainer.logger.init_args.save_dir",
        str(in_tmp / "logs"),
        "--trainer.enable_progress_bar",
        "false",
    ]
    from lightning_convnets.datamodules import ShapesDataModule

    ShapesDataModule(task="detection").prepare_data()  # generate the images before the clock starts
    wall, cpu = time.perf_counter(), time.process_time()
    fit = _run(["fit", *common])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result = fit.trainer.test(fit.model, datamodule=fit.datamodule)[0]
    print(
        f"quickstart: fit {wall:.0f} s wall, {cpu:.0f} s CPU; test mAP@50 {result['test/map_50']:.3f}, "
        f"mAP {result['test/map']:.3f}"
    )
    assert cpu <= 2 * 180, f"training used {cpu:.0f} CPU-seconds, more than 3 minutes of 2 cores"
    assert result["test/map_50"] >= 0.5
