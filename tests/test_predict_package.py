"""The prediction package (lightning_convnets/predict/): its modules' old homes still import (with a
DeprecationWarning, the very same objects), the tiling functions take explicit options (no task
hyperparameters), and the export subcommand lives in the CLI."""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_convnets.backbones import import_object
from lightning_convnets.predict import export, tiling, tta, writers
from lightning_convnets.predict.tiling import TilingOptions

ALIASES = {
    "lightning_convnets.tiling": tiling,
    "lightning_convnets.tta": tta,
    "lightning_convnets.writers": writers,
    "lightning_convnets.detection_writers": writers,
    "lightning_convnets.export": export,
}


@pytest.mark.parametrize("old", sorted(ALIASES))
def test_an_old_module_path_warns_and_gives_the_same_objects(old, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert [w.category for w in caught] == [DeprecationWarning]
    assert ALIASES[old].__name__ in str(caught[0].message)
    new = ALIASES[old]
    for name in new.__all__:
        assert getattr(module, name) is getattr(new, name)
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


@pytest.mark.parametrize(
    "class_path",
    [
        "lightning_convnets.writers.MaskPNGWriter",
        "lightning_convnets.writers.ClassProbabilitiesWriter",
        "lightning_convnets.detection_writers.CocoResultsWriter",
        "lightning_convnets.predict.writers.CocoResultsWriter",
    ],
)
def test_config_class_paths_of_the_writers_keep_working(class_path):
    assert import_object(class_path) is getattr(writers, class_path.rsplit(".", 1)[1])


def test_tiling_options_are_checked_and_say_when_they_are_active():
    assert (
        not TilingOptions().active and TilingOptions(tta="flip").active and TilingOptions(tile_size=32).active
    )
    with pytest.raises(ValueError, match="tile_overlap \\(32\\) must be smaller than tile_size \\(32\\)"):
        TilingOptions(tile_size=32, tile_overlap=32)
    with pytest.raises(ValueError, match="unknown part 'mirror'"):
        TilingOptions(tta="mirror")


def test_tiled_prediction_takes_any_network_and_explicit_options():
    torch.manual_seed(0)
    net = nn.Conv2d(3, 2, 1).eval()  # no hparams, no task (a 1x1 convolution: tiles blend back exactly)
    images = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        whole = net(images)
        tiled = tiling.segmentation_logits(net, images, TilingOptions(tile_size=32, tile_overlap=16))
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)

    def lit(ims):  # a 3x3 box around each lit pixel
        out = []
        for im in ims:
            ys, xs = im[0].nonzero(as_tuple=True)
            xy = torch.stack([xs, ys, xs, ys], 1).float()
            out.append({"boxes": xy + torch.tensor([-1.0, -1, 2, 2]), "scores": torch.ones(len(xs)),
                        "labels": torch.zeros(len(xs), dtype=torch.long)})  # fmt: skip
        return out

    image = torch.zeros(1, 64, 64)
    image[0, 30, 40] = 1
    found = tiling.detect(lit, [image], TilingOptions(tile_size=32, tile_overlap=12, tta="flip"))
    assert found[0]["boxes"].tolist() == [[39.0, 29.0, 42.0, 32.0]]


def test_the_tiling_and_tta_modules_read_no_hyperparameters():
    for module in (tiling, tta):
        assert "hparams" not in Path(module.__file__).read_text()


def test_the_export_subcommand_is_part_of_the_cli():
    from lightning_convnets.cli import export_cli, main

    assert callable(export_cli) and callable(main)
    with pytest.raises(SystemExit):
        main(["export", "--help"])
