"""Transform specs from YAML (presets, albumentations dicts/files, class_path lists), mask fill, seeding."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
import yaml
from lightning_convnets.datamodules import ShapesDataModule, build_pipeline
from lightning_convnets.datamodules.datasets import ClassificationDataset
from lightning_convnets.datamodules.transforms import PRESETS, augmentations_from_spec
from PIL import Image

STATS = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def _names(spec, **kw) -> list[str]:
    kw.setdefault("image_size", 32)
    return [type(t).__name__ for t in augmentations_from_spec(spec, **kw)]


def test_presets():
    assert _names("none") == [] and _names(None) == []
    assert _names("light") == ["HorizontalFlip"]
    assert _names("default") == ["Resize", "PadIfNeeded", "RandomCrop", "HorizontalFlip"]
    assert "Affine" in _names("strong") and "ColorJitter" in _names("strong")
    for preset in PRESETS:  # evaluation never augments
        assert _names(preset, train=False) == []
    assert _names("default", image_size=None) == ["HorizontalFlip"]
    with pytest.raises(ValueError, match=r"unknown transform preset 'heavy'; expected one of \['none'"):
        _names("heavy")


def test_full_pipeline_shapes_and_normalisation():
    pipe = build_pipeline("default", kind="classification", train=True, image_size=24, **STATS)
    image = np.full((50, 30, 3), 255, np.uint8)
    out = pipe(image=image)["image"]
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert torch.isclose(out.max(), torch.tensor(2.0))  # (1 - 0.5) / 0.25 where not padded
    letterbox = build_pipeline(
        None, kind="classification", train=False, image_size=20, resize="letterbox", **STATS
    )
    out = letterbox(image=image)["image"]
    assert out.shape == (3, 20, 20)
    assert torch.isclose(out[:, :, -1], torch.tensor(-2.0)).all()  # padded columns hold black


def test_albumentations_dict_and_file_round_trip(tmp_path):
    original = A.Compose([A.HorizontalFlip(p=0.3), A.RandomBrightnessContrast(p=0.2)])
    as_dict = A.to_dict(original)
    from_yaml = yaml.safe_load(yaml.safe_dump(as_dict))  # what a YAML config would hold
    steps = augmentations_from_spec(from_yaml)
    assert [type(t).__name__ for t in steps] == ["HorizontalFlip", "RandomBrightnessContrast"]
    assert steps[0].p == pytest.approx(0.3)
    A.save(original, str(tmp_path / "aug.yaml"), data_format="yaml")
    assert _names(str(tmp_path / "aug.yaml")) == ["HorizontalFlip", "RandomBrightnessContrast"]
    with pytest.raises(ValueError, match=r"transform file .*missing\.yaml not found"):
        _names(str(tmp_path / "missing.yaml"))


def test_class_path_list_with_nesting():
    spec = yaml.safe_load(
        """
        - class_path: HorizontalFlip
          init_args: {p: 1.0}
        - class_path: albumentations.OneOf
          init_args:
            p: 1.0
            transforms:
              - {class_path: Blur, init_args: {blur_limit: 3}}
              - {class_path: albumentations.augmentations.pixel.transforms.ToGray}
        """
    )
    steps = augmentations_from_spec(spec)
    assert [type(t).__name__ for t in steps] == ["HorizontalFlip", "OneOf"]
    assert [type(t).__name__ for t in steps[1].transforms] == ["Blur", "ToGray"]
    with pytest.raises(ValueError, match=r"unknown albumentations transform 'Flipp'"):
        augmentations_from_spec([{"class_path": "Flipp"}])
    with pytest.raises(ValueError, match=r"cannot import transform class_path 'nope\.Thing'"):
        augmentations_from_spec([{"class_path": "nope.Thing"}])
    with pytest.raises(ValueError, match=r"cannot build transform Blur"):
        augmentations_from_spec([{"class_path": "Blur", "init_args": {"wrong": 1}}])
    with pytest.raises(ValueError, match=r"unknown keys \['args'\]"):
        augmentations_from_spec([{"class_path": "Blur", "args": {}}])
    with pytest.raises(ValueError, match="neither an albumentations dict"):
        augmentations_from_spec({"flip": True})


def test_segmentation_padding_uses_the_ignore_value():
    pipe = build_pipeline(
        "default", kind="segmentation", train=True, image_size=16, ignore_index=255, **STATS
    )
    pipe.set_random_seed(0)
    seen: set[int] = set()
    for _ in range(20):
        out = pipe(image=np.zeros((16, 16, 3), np.uint8), mask=np.ones((16, 16), np.uint8))
        seen |= set(np.unique(np.asarray(out["mask"])).tolist())
    assert seen == {1, 255}  # shifted crops expose padding, filled with ignore, never class 0


def test_augmentations_follow_torch_seed(tmp_path):
    """albumentations keeps its own RNG; datasets reseed it from torch so seed_everything reproduces runs."""
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    samples = [(tmp_path / f"{i}.png", 0) for i in range(4)]

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        pipe = build_pipeline("strong", kind="classification", train=True, image_size=16, **STATS)
        dataset = ClassificationDataset(samples, pipe)
        return torch.stack([dataset[i][0] for i in range(4)])

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_transform_specs_parse_from_a_cli_config(tmp_path):
    """The signature types let jsonargparse (LightningCLI) pass YAML transform specs through untouched."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ShapesDataModule, "data")
    config = yaml.safe_load(
        f"""
        data:
          root: {tmp_path}
          train_transforms:
            - {{class_path: HorizontalFlip, init_args: {{p: 0.5}}}}
            - {{class_path: Affine, init_args: {{rotate: [-10, 10], p: 0.5}}}}
          eval_transforms: none
        """
    )
    parsed = parser.parse_object(config)
    dm = parser.instantiate(parsed).data
    names = [type(t).__name__ for t in dm.pipeline(train=True).transforms]
    assert names == ["HorizontalFlip", "Affine", "Resize", "Normalize", "ToTensorV2"]
    assert [type(t).__name__ for t in dm.pipeline(train=False).transforms] == [
        "Resize",
        "Normalize",
        "ToTensorV2",
    ]
