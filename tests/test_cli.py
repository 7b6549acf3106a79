"""Every config end to end through the CLI (in-process, tiny overrides) and the console script (the demo:
test_demo.py)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lightning_convnets.cli import ConvNetsCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def _single_thread():
    # Test runs share a couple of cores: OpenMP threads spin-waiting on each other under load make tiny
    # models 10x slower, so these tests use one thread and restore the setting afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(tmp_path: Path, *, shapes: bool = True) -> list[str]:
    """Overrides that shrink any of our configs to a few seconds on a CPU."""
    args = [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
        "--trainer.limit_predict_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.precision=32",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--data.init_args.batch_size=4",
    ]
    if shapes:
        args += [
            f"--data.init_args.root={tmp_path / 'shapes'}",
            "--data.init_args.num_train=8",
            "--data.init_args.num_val=4",
            "--data.init_args.num_test=4",
        ]
    return args


def _fit_then_test(config: Path, args: list[str], metric: str) -> ConvNetsCLI:
    args = [*args, "--model.init_args.figure_every_n_epochs=0"]  # figures are the demo test's business
    fit = ConvNetsCLI(args=["fit", "--config", str(config), *args])
    best = fit.trainer.checkpoint_callback.best_model_path
    assert best and Path(best).is_file(), "fit saved no checkpoint"
    test = ConvNetsCLI(args=["test", "--config", str(config), *args, "--ckpt_path", best])
    assert metric in test.trainer.callback_metrics, sorted(test.trainer.callback_metrics)
    assert 0.0 <= float(test.trainer.callback_metrics[metric]) <= 1.0
    return test


def test_quickstart_config_has_the_promised_pieces():
    config = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())
    assert isinstance(config["seed_everything"], int)
    assert config["trainer"]["logger"]["class_path"].endswith("TensorBoardLogger")
    callbacks = {
        c["class_path"].rsplit(".", 1)[-1]: c.get("init_args", {}) for c in config["trainer"]["callbacks"]
    }
    checkpoints = [
        c.get("init_args", {})
        for c in config["trainer"]["callbacks"]
        if c["class_path"].endswith("ModelCheckpoint")
    ]
    assert any(c.get("monitor") == "val/acc" and c.get("mode") == "max" for c in checkpoints)
    assert any(c.get("save_last") and c.get("every_n_train_steps") for c in checkpoints)  # resumable
    assert "LearningRateMonitor" in callbacks and "RichProgressBar" in callbacks
    model = config["model"]["init_args"]
    assert model["backbone"].startswith("preact_resnet") and model["backbone_kwargs"]["stem"] == "cifar"
    assert config["data"]["class_path"].endswith("ShapesDataModule")


def test_shapes_classification_config(tmp_path):
    _fit_then_test(
        CONFIGS / "classification" / "shapes.yaml",
        [*_tiny(tmp_path), "--model.init_args.backbone_kwargs={stem: cifar, width: 4}"],
        "test/acc",
    )


def test_shapes_unet_config_then_predict_writes_masks(tmp_path):
    config = CONFIGS / "segmentation" / "shapes_unet.yaml"
    args = [
        *_tiny(tmp_path),
        "--model.init_args.backbone_kwargs={width: 4, depth: 2, norm: batch}",
        "--data.init_args.image_size=32",
    ]
    test = _fit_then_test(config, args, "test/miou")
    assert "test/iou/background" in test.trainer.callback_metrics
    best = test.trainer.ckpt_path
    predict = ConvNetsCLI(args=["predict", "--config", str(config), *args, "--ckpt_path", best])
    masks = list((Path(predict.trainer.log_dir) / "predictions" / "masks").glob("*.png"))
    assert len(masks) == 4  # one predict batch of 4 images
    assert np.array(Image.open(masks[0])).shape == (32, 32)


def test_command_line_model_selection_by_short_names(tmp_path):
    cli = ConvNetsCLI(
        args=[
            "fit",
            "--model=ImageClassifier",
            "--model.backbone=preact_resnet18",
            "--model.backbone_kwargs={stem: cifar, width: 4}",
            "--data=ShapesDataModule",
            f"--data.root={tmp_path / 'shapes'}",
            "--data.num_train=8",
            "--data.num_val=4",
            "--data.num_test=4",
            "--data.batch_size=4",
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert type(cli.model).__name__ == "ImageClassifier"
    assert type(cli.model.backbone).__name__ == "ResNet" and cli.model.backbone.preact
    assert cli.model.num_classes == 4  # taken from the data module


def _write_image_folder(root: Path, classes=("cat", "dog"), per_class=6, size=24) -> None:
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            pixels[..., k] += 150
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")


@pytest.mark.slow
def test_image_folder_recipe_then_predict_writes_csv(tmp_path):
    _write_image_folder(tmp_path / "images")
    config = CONFIGS / "classification" / "image_folder.yaml"
    args = [
        *_tiny(tmp_path, shapes=False),
        f"--data.init_args.root={tmp_path / 'images'}",
        "--data.init_args.image_size=32",
        "--data.init_args.val_fraction=0.25",
        "--data.init_args.test_fraction=0.25",
        "--model.init_args.backbone_kwargs={width: 4}",  # no pretrained download in tests
    ]
    test = _fit_then_test(config, args, "test/acc")
    predict = ConvNetsCLI(
        args=["predict", "--config", str(config), *args, "--ckpt_path", test.trainer.ckpt_path]
    )
    with open(Path(predict.trainer.log_dir) / "predictions" / "probabilities.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and {"p_cat", "p_dog"} <= set(rows[0])
    assert rows[0]["source"].endswith(".png")


def _write_voc_like(root: Path, count=8, size=32) -> None:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i in range(count):
        mask = np.zeros((size, size), dtype=np.uint8)
        cls = 1 + i % 20
        mask[8:24, 8:24] = cls
        mask[7, 7:25] = 255  # a void border, as in VOC
        pixels = rng.integers(0, 50, (size, size, 3), dtype=np.uint8)
        pixels[mask == cls] += 120
        Image.fromarray(pixels).save(root / "images" / f"img{i}.jpg")
        Image.fromarray(mask).save(root / "masks" / f"img{i}.png")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "backbone_args"),
    [
        ("voc_unet.yaml", ["--model.init_args.backbone_kwargs={encoder: resnet18, width: 4, norm: batch}"]),
        (
            "voc_smp_unet.yaml",
            [
                "--model.init_args.backbone=smp:Unet/resnet18",
                "--model.init_args.backbone_kwargs={decoder_channels: [8, 8, 8, 8, 8]}",
            ],
        ),
    ],
)
def test_voc_style_recipes(tmp_path, name, backbone_args):
    _write_voc_like(tmp_path / "voc")
    args = [
        *_tiny(tmp_path, shapes=False),
        f"--data.init_args.root={tmp_path / 'voc'}",
        "--data.init_args.image_size=32",
        "--data.init_args.val_fraction=0.25",
        "--data.init_args.test_fraction=0.25",
        *backbone_args,
    ]
    _fit_then_test(CONFIGS / "segmentation" / name, args, "test/miou")


def test_cifar10_recipe_parses(capsys):
    # CIFAR-10 needs a download, so only the config itself is checked here (the data module's offline
    # path is tested with the data modules).
    with pytest.raises(SystemExit) as exit_info:
        ConvNetsCLI(
            args=[
                "fit",
                "--config",
                str(CONFIGS / "classification" / "cifar10_preact_resnet18.yaml"),
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["backbone"] == "preact_resnet18"
    assert printed["model"]["init_args"]["lr_scheduler"]["class_path"].endswith("OneCycleLR")


def test_console_script_points_at_main():
    from importlib.metadata import entry_points

    from lightning_convnets.cli import main

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "lightning-convnets"]
    assert script.load() is main
    assert (Path(sys.executable).parent / "lightning-convnets").is_file()


@pytest.mark.slow  # a fresh interpreter imports the whole stack (~10 s, much more on a loaded machine)
def test_console_script_runs_a_tiny_fit_and_exits_zero(tmp_path):
    script = Path(sys.executable).parent / "lightning-convnets"
    args = [str(script), "fit", "--config", str(CONFIGS / "quickstart.yaml"), *_tiny(tmp_path)]
    args += ["--trainer.fast_dev_run=true", "--model.init_args.backbone_kwargs={stem: cifar, width: 4}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parameters" in result.stdout + result.stderr  # the #params / #examples line
