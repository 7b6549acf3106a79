"""Structure: every shared argument declared once and still visible on the CLI, default monitors logged.

The tasks forward the arguments they share to :class:`ConvNetTask` with ``**kwargs`` and the data modules
theirs to :class:`ConvDataModule`; LightningCLI (jsonargparse) must still list each one with its type and
default, and each class must accept each of them.
"""

from __future__ import annotations

import contextlib
import inspect
import io
from functools import partial

import pytest
import torch
import yaml
from lightning.pytorch import LightningDataModule, Trainer
from lightning_convnets.datamodules import (
    CIFAR10DataModule,
    CocoDetectionDataModule,
    ConvDataModule,
    ImageFolderDataModule,
    SegmentationFolderDataModule,
    ShapesDataModule,
    VOCSegmentationDataModule,
)
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_convnets.cli import ConvNetsCLI
from lightning_convnets.tasks import ConvNetTask, ImageClassifier, ObjectDetector, SemanticSegmenter

TASKS = [ImageClassifier, SemanticSegmenter, ObjectDetector]
# Required arguments of each data module (constructors only store them: nothing is read here).
DATAMODULES = {
    ImageFolderDataModule: {"root": "nowhere"},
    SegmentationFolderDataModule: {"root": "nowhere"},
    CocoDetectionDataModule: {"images": "nowhere", "annotations": "nowhere.json"},
    CIFAR10DataModule: {},
    VOCSegmentationDataModule: {},
    ShapesDataModule: {},
}
# Base arguments whose default is not a plain YAML scalar (callables, class paths).
NOT_SCALAR = {"optimizer", "lr_scheduler"}


def _own_parameters(cls: type) -> dict[str, inspect.Parameter]:
    return {
        name: p
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def _expected_defaults(cls: type, base: type) -> dict[str, object]:
    """What the CLI should show: the base's defaults, overridden by the subclass's own."""
    merged = {n: p.default for n, p in _own_parameters(base).items()}
    merged.update({n: p.default for n, p in _own_parameters(cls).items()})
    return merged


def _cli_output(args: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        ConvNetsCLI(args=args)
    assert exit_info.value.code == 0, out.getvalue()[-2000:]
    return out.getvalue()


def _scalar(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("task", TASKS, ids=lambda c: c.__name__)
def test_cli_lists_every_task_argument_with_type_and_default(task):
    expected = _expected_defaults(task, ConvNetTask)
    help_text = _cli_output(["fit", "--model.help", task.__name__])
    for name in expected:
        assert f"--model.{name} " in help_text, f"{task.__name__} --help lacks {name}"
    config = yaml.safe_load(_cli_output(["fit", "--model", task.__name__, "--print_config"]))
    shown = config["model"]["init_args"]
    assert set(expected) <= set(shown), set(expected) - set(shown)
    for name, default in expected.items():
        if name not in NOT_SCALAR and not isinstance(default, nn.Module):
            assert shown[name] == _scalar(default), (task.__name__, name, shown[name], default)


@pytest.mark.parametrize("datamodule", list(DATAMODULES), ids=lambda c: c.__name__)
def test_cli_lists_every_datamodule_argument_with_type_and_default(datamodule):
    expected = _expected_defaults(datamodule, ConvDataModule)
    help_text = _cli_output(["fit", "--data.help", datamodule.__name__])
    for name in expected:
        assert f"--data.{name} " in help_text, f"{datamodule.__name__} --help lacks {name}"
    required = [f"--data.{k}={v}" for k, v in DATAMODULES[datamodule].items()]
    config = yaml.safe_load(
        _cli_output(
            ["fit", "--data", datamodule.__name__, *required, "--model", "ImageClassifier", "--print_config"]
        )
    )
    shown = config["data"]["init_args"]
    for name, default in expected.items():
        if name in DATAMODULES[datamodule]:
            continue
        assert name in shown, f"{datamodule.__name__} print_config lacks {name}"
        assert shown[name] == _scalar(default), (datamodule.__name__, name, shown[name], default)


@pytest.mark.parametrize("task", TASKS, ids=lambda c: c.__name__)
def test_every_task_accepts_every_convnet_task_argument(task):
    base = _own_parameters(ConvNetTask)
    given = {name: p.default for name, p in base.items()}
    given.update(
        backbone="resnet18",
        backbone_kwargs={"width": 4},
        num_classes=3 if task is not SemanticSegmenter else 4,
        channels_last=True,  # the argument the detector used to lack
        monitor="val/custom",
        num_sample_figures=2,
    )
    model = task(**given)
    for name in set(base) - NOT_SCALAR:  # Python callables are not hyperparameters (not YAML)
        assert name in model.hparams, f"{task.__name__} did not record {name}"
    assert model.hparams.channels_last is True and model.hparams.num_sample_figures == 2
    assert model.monitored_metric == "val/custom"
    assert model.num_classes == given["num_classes"]


@pytest.mark.parametrize("datamodule", list(DATAMODULES), ids=lambda c: c.__name__)
def test_every_datamodule_accepts_every_convdatamodule_argument(datamodule):
    given = {name: p.default for name, p in _own_parameters(ConvDataModule).items()}
    given.update(DATAMODULES[datamodule], batch_size=5, drop_last=True, seed=7)
    dm = datamodule(**given)
    assert (dm.batch_size, dm.drop_last, dm.seed) == (5, True, 7)
    assert dm.hparams.batch_size == 5


def test_task_base_builds_through_the_abstract_hook_and_rejects_bad_counts():
    with pytest.raises(TypeError, match="abstract"):
        ConvNetTask(backbone="resnet18", backbone_kwargs={"width": 4}, num_classes=3)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        ImageClassifier("resnet18", num_classes=0, backbone_kwargs={"width": 4})
    calls = []

    class Counting(ImageClassifier):
        def build_task(self, num_classes: int) -> None:
            calls.append(num_classes)
            super().build_task(num_classes)

    Counting("resnet18", num_classes=3, backbone_kwargs={"width": 4})
    Counting("resnet18", backbone_kwargs={"width": 4})  # no count yet: built at setup
    assert calls == [3]


# ------------------------------------------------------------------------------ default monitors
class _Detection(Dataset):
    def __init__(self, n: int = 4, size: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 36.0]]), "labels": torch.tensor([i % 2])}
        return self.images[i], target


class _Data(LightningDataModule):
    def __init__(self, dataset: Dataset, num_classes: int, collate=None) -> None:
        super().__init__()
        self.dataset, self.num_classes, self.collate = dataset, num_classes, collate

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=2, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=2, collate_fn=self.collate)


def _lists(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


def _case(name: str):
    g = torch.Generator().manual_seed(0)
    if name == "classifier":
        data = TensorDataset(torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 0]))
        return ImageClassifier("resnet18", backbone_kwargs={"width": 4}), _Data(data, 3)
    if name == "segmenter":
        masks = torch.randint(0, 3, (4, 32, 32), generator=g)
        data = TensorDataset(torch.randn(4, 3, 32, 32, generator=g), masks)
        model = SemanticSegmenter("unet", backbone_kwargs={"width": 4, "depth": 2})
        return model, _Data(data, 3)
    tiny_tv = {"min_size": 64, "max_size": 64, "anchor_size": 8, "fpn_channels": 32}
    extra = {"head_channels": 4, "neck_channels": 4} if name == "centernet" else tiny_tv
    model = ObjectDetector("resnet18", family=name, backbone_kwargs={"width": 4}, **extra)
    return model, _Data(_Detection(), 2, collate=_lists)


@pytest.mark.parametrize("name", ["classifier", "segmenter", "centernet", "fasterrcnn", "retinanet", "fcos"])
def test_default_monitor_is_logged_and_drives_reduce_on_plateau(name, tmp_path):
    torch.manual_seed(0)
    model, data = _case(name)
    mode = "min" if model.default_monitor.endswith("loss") else "max"
    model.lr_scheduler_factory = partial(ReduceLROnPlateau, mode=mode)
    model.hparams.lr_scheduler_interval = "epoch"
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # Lightning raises when a ReduceLROnPlateau monitor is missing from the logged metrics.
    trainer.fit(model, data)
    assert model.monitored_metric == model.default_monitor
    assert model.default_monitor in trainer.callback_metrics
    expected = "val/loss" if name in ("classifier", "segmenter", "centernet") else "val/map"
    assert model.default_monitor == expected
