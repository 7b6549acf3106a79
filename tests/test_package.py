"""The package skeleton: version, namespace layout, registry errors, the figure helper."""

import importlib

import matplotlib.pyplot as plt
import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import lightning_convnets
from lightning_convnets.backbones import create_backbone, list_backbones
from lightning_convnets.figures import log_figure
from lightning_convnets.nn import center_crop, crop_offsets


def test_version_and_namespaces():
    assert lightning_convnets.__version__.count(".") == 2
    for sub in ("datamodules", "callbacks"):
        mod = importlib.import_module(f"lightning_convnets.{sub}")
        assert mod.__file__ is not None and sub in mod.__file__


def test_unknown_backbone_lists_closest_names():
    names = list_backbones()
    for family in ("resnet50", "preact_resnet18", "unet", "hourglass", "timm:<name>", "smp:<name>"):
        assert family in names
    with pytest.raises(KeyError, match="resnet18"):
        create_backbone("resnet81")
    with pytest.raises(KeyError, match="prefix"):
        create_backbone("timmm:resnet18")


def test_crop_rule_cuts_odd_pixel_from_bottom_right():
    assert crop_offsets(9, 6) == (1, 2)
    assert crop_offsets(8, 6) == (1, 1)
    import torch

    x = torch.arange(9 * 9).reshape(1, 1, 9, 9)
    y = center_crop(x, 6, 6)
    assert y.shape[-2:] == (6, 6) and y[0, 0, 0, 0].item() == 10
    with pytest.raises(ValueError, match="larger"):
        crop_offsets(4, 6)


@pytest.mark.parametrize("logger_cls", [CSVLogger, TensorBoardLogger])
def test_log_figure_writes_png_for_any_logger(tmp_path, logger_cls):
    trainer = Trainer(logger=logger_cls(tmp_path), accelerator="cpu", enable_progress_bar=False)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = log_figure(trainer, "monitors/test figure", fig, step=3)
    assert path is not None and path.exists() and path.stat().st_size > 0
    assert path.name == "monitors__test_figure_step0000003.png"
    if logger_cls is TensorBoardLogger:
        trainer.loggers[0].experiment.flush()
        assert any(p.name.startswith("events.out") for p in (tmp_path / "lightning_logs").rglob("*"))
