"""The data modules' extension points: a user's ConvDataModule subclass written the new way
(``resolve_class_names``, ``build_datasets``) and the old way (``_resolve_class_names``,
``_build_datasets``: still called for one release, with one DeprecationWarning)."""

from __future__ import annotations

import importlib
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning_convnets.datamodules import ConvDataModule, DataValidationError, ImageFolderDataModule
from PIL import Image

# A data module as a user writes it (docs/data.md, "Write your own data module"): generated colour
# squares, split with carve_splits, one dataset per split through assign_datasets. {resolve} and {build}
# are the two method names.
USER_MODULE = """
from typing import Any, Sequence

import numpy as np
from torch.utils.data import Dataset

from lightning_convnets.datamodules import ConvDataModule
from lightning_convnets.datamodules.base import carve_splits

COLOURS = {{"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}}


class Squares(Dataset):
    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        seed, label = self.samples[index]
        rng = np.random.default_rng(seed)
        image = rng.integers(0, 40, size=(24, 24, 3), dtype=np.uint8)
        image[6:18, 6:18] = list(COLOURS.values())[label]
        return self.transform(image=image)["image"], label


class ColourSquares(ConvDataModule):
    task = "classification"

    def __init__(self, count: int = 24, image_size: int | None = 16, **kwargs: Any) -> None:
        super().__init__(image_size=image_size, **kwargs)
        self.count = count
        self.built: list[list[str]] = []

    def {resolve}(self) -> Sequence[str]:
        return list(COLOURS)

    def {build}(self, splits: Sequence[str]) -> None:
        self.built.append(list(splits))
        samples = {{"train": [(i, i % self.num_classes) for i in range(self.count)]}}
        carve_splits(samples, {{"val": 0.25, "test": 0.25}}, self.seed, label=lambda s: s[1])
        self.assign_datasets(
            splits, samples, lambda split, items: Squares(items, self.pipeline(split == "train")), "squares"
        )
"""


def _import_user_module(tmp_path: Path, monkeypatch, name: str, *, old: bool):
    resolve, build = (
        ("_resolve_class_names", "_build_datasets") if old else ("resolve_class_names", "build_datasets")
    )
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE.format(resolve=resolve, build=build)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module(name)


def _check_batches(dm: ConvDataModule) -> None:
    assert dm.class_names == ["red", "green", "blue"] and dm.num_classes == 3
    dm.setup("fit")
    assert dm.built == [["train", "val"]]
    assert dm.num_train_examples == 12 and len(dm.val_dataset) == 6 and dm.test_dataset is None
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32 and labels.dtype == torch.int64
    dm.setup("test")
    assert dm.built == [["train", "val"], ["test"]] and len(dm.test_dataset) == 6


def test_a_user_data_module_written_the_new_way_trains_through_the_cli(tmp_path, monkeypatch):
    from lightning_convnets.cli import ConvNetsCLI

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        user = _import_user_module(tmp_path, monkeypatch, "user_squares_new", old=False)
    _check_batches(user.ColourSquares(batch_size=4))
    cli = ConvNetsCLI(
        args=[
            "fit",
            "--model=ImageClassifier",
            "--model.backbone=preact_resnet18",
            "--model.backbone_kwargs={stem: cifar, width: 4}",
            "--model.figure_every_n_epochs=0",
            "--data=user_squares_new.ColourSquares",
            "--data.batch_size=4",
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert type(cli.datamodule).__name__ == "ColourSquares"
    assert cli.model.num_classes == 3  # read from the user's resolve_class_names
    assert cli.datamodule.built == [["train", "val"]]
    assert cli.trainer.state.finished and cli.trainer.global_step == 1  # one training batch (fast_dev_run)


def test_a_user_data_module_written_the_old_way_still_works_with_one_deprecation_warning(
    tmp_path, monkeypatch
):
    with pytest.warns(DeprecationWarning) as caught:
        user = _import_user_module(tmp_path, monkeypatch, "user_squares_old", old=True)
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(deprecations) == 1, [str(w.message) for w in deprecations]
    message = str(deprecations[0].message)
    assert "ColourSquares" in message and "_build_datasets -> build_datasets" in message
    assert "_resolve_class_names -> resolve_class_names" in message
    assert Path(deprecations[0].filename).name == "user_squares_old.py"  # points at the user's class
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no further warning when used
        _check_batches(user.ColourSquares(batch_size=4))


def _image_folder(root: Path, per_class: int = 6) -> None:
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((20, 20, 3), 40 * c + i, np.uint8)).save(root / name / f"{i}.png")


def test_an_old_style_subclass_of_a_built_in_module_reaches_it_through_super(tmp_path):
    _image_folder(tmp_path)
    with pytest.warns(DeprecationWarning, match="rename them"):

        class Upper(ImageFolderDataModule):
            def _resolve_class_names(self):
                self.resolved = True
                return super()._resolve_class_names()

            def _build_datasets(self, splits):
                super()._build_datasets(splits)
                self.extra = "built"

    dm = Upper(str(tmp_path), image_size=16, batch_size=4, val_fraction=0.25, test_fraction=0.0)
    assert dm.class_names == ["cat", "dog"] and dm.resolved
    dm.setup("fit")
    assert dm.extra == "built" and dm.num_train_examples == 9 and len(dm.val_dataset) == 3


def test_a_new_style_subclass_of_an_old_style_one_and_a_class_defining_both_names(tmp_path):
    _image_folder(tmp_path)
    with pytest.warns(DeprecationWarning):

        class Old(ImageFolderDataModule):
            def _resolve_class_names(self):
                return ["x", "y"]

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)

        class New(Old):
            def resolve_class_names(self):
                return [*super().resolve_class_names(), "z"]

    assert New(str(tmp_path)).class_names == ["x", "y", "z"]
    with pytest.warns(DeprecationWarning, match="both defined: _resolve_class_names is not called"):

        class Both(ImageFolderDataModule):
            def resolve_class_names(self):
                return ["new"]

            def _resolve_class_names(self):
                return ["old"]

    assert Both(str(tmp_path)).class_names == ["new"]


def test_a_subclass_missing_an_extension_point_names_it():
    class Empty(ConvDataModule):
        pass

    with pytest.raises(NotImplementedError, match=r"Empty must implement resolve_class_names\(\)"):
        _ = Empty().class_names
    with pytest.raises(NotImplementedError, match=r"Empty must implement build_datasets\(splits\)"):
        Empty().setup("fit")


def test_assign_datasets_refuses_an_empty_split():
    class Tiny(ConvDataModule):
        def resolve_class_names(self):
            return ["a"]

        def build_datasets(self, splits):
            self.assign_datasets(splits, {"train": [1], "val": []}, lambda split, items: items, "tiny.csv")

    with pytest.raises(DataValidationError, match=r"tiny\.csv: the val split is empty"):
        Tiny().setup("fit")


def test_a_split_the_module_does_not_build_is_refused_by_its_loader(tmp_path, monkeypatch):
    user = _import_user_module(tmp_path, monkeypatch, "user_squares_split", old=False)
    dm = user.ColourSquares(batch_size=4)
    with pytest.raises(RuntimeError, match="ColourSquares has no test split: call setup"):
        dm.test_dataloader()
