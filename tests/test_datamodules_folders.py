"""ImageFolderDataModule and SegmentationFolderDataModule on generated files: formats, splits, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lightning_convnets.datamodules import (
    CIFAR10DataModule,
    DataValidationError,
    ImageFolderDataModule,
    SegmentationFolderDataModule,
    VOCSegmentationDataModule,
)
from PIL import Image


def _save(path: Path, mode: str = "RGB", size: tuple[int, int] = (20, 16), value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    array = rng.integers(0, 255, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode=mode).save(path)
    return path


def _class_tree(root: Path, classes=("cat", "dog", "fox"), per_class: int = 10) -> None:
    for c, name in enumerate(classes):
        for i in range(per_class):
            _save(root / name / f"{i}.png", value=c * 100 + i)


def _kw(**kw):
    return dict(image_size=16, batch_size=4, **kw)


# ------------------------------------------------------------------------------ image folders
def test_image_folder_flat_layout_split_by_fraction(tmp_path):
    _class_tree(tmp_path)
    (tmp_path / "README.txt").parent.mkdir(exist_ok=True)
    (tmp_path / "cat" / "notes.txt").write_text("not an image: ignored")
    dm = ImageFolderDataModule(str(tmp_path), val_fraction=0.2, test_fraction=0.2, **_kw())
    assert dm.class_names == ["cat", "dog", "fox"] and dm.num_classes == 3  # before setup: folder scan
    dm.setup()
    assert dm.num_train_examples == 18 and len(dm.val_dataset) == 6 and len(dm.test_dataset) == 6
    # Stratified: each class keeps its share in every split.
    assert sorted(dm.val_dataset.targets) == [0, 0, 1, 1, 2, 2]
    train_files = {p for p, _ in dm.train_dataset.samples}
    assert not train_files & {p for p, _ in dm.val_dataset.samples}
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (4,) and labels.dtype == torch.int64
    # Seeded: the same seed gives the same split, another seed another one.
    again = ImageFolderDataModule(str(tmp_path), val_fraction=0.2, test_fraction=0.2, **_kw())
    again.setup("fit")
    assert again.val_dataset.samples == dm.val_dataset.samples
    other = ImageFolderDataModule(str(tmp_path), val_fraction=0.2, test_fraction=0.2, seed=1, **_kw())
    other.setup("fit")
    assert other.val_dataset.samples != dm.val_dataset.samples


def test_image_folder_split_subfolders(tmp_path):
    _class_tree(tmp_path / "train", per_class=4)
    _class_tree(tmp_path / "val", classes=("cat", "fox"), per_class=2)  # a class may be absent in val
    _class_tree(tmp_path / "test", per_class=1)
    dm = ImageFolderDataModule(str(tmp_path), **_kw())
    dm.setup()
    assert len(dm.train_dataset) == 12 and len(dm.val_dataset) == 4 and len(dm.test_dataset) == 3
    assert sorted(set(dm.val_dataset.targets)) == [0, 2]  # labels follow the training class order
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (3, 3, 16, 16) and labels.tolist() == [0, 1, 2]


def test_grayscale_rgba_and_mixed_sizes(tmp_path):
    _save(tmp_path / "a" / "gray.png", mode="L", size=(10, 30))
    _save(tmp_path / "a" / "rgba.png", mode="RGBA", size=(40, 12))
    _save(tmp_path / "b" / "la.png", mode="LA", size=(17, 17))
    _save(tmp_path / "b" / "rgb.jpg", size=(64, 48))
    for in_channels in (3, 1):
        dm = ImageFolderDataModule(
            str(tmp_path), val_fraction=0, test_fraction=0, in_channels=in_channels, **_kw()
        )
        dm.setup("fit")
        assert len(dm.mean) == in_channels
        images, _ = next(iter(dm.train_dataloader()))
        assert images.shape == (4, in_channels, 16, 16)
        assert torch.isfinite(images).all()


def test_rgba_is_composited_on_black(tmp_path):
    from lightning_convnets.datamodules.io import load_image

    array = np.zeros((4, 4, 4), np.uint8)
    array[..., :3] = 200
    array[:, :2, 3] = 255  # left half opaque, right half transparent
    Image.fromarray(array, mode="RGBA").save(tmp_path / "x.png")
    rgb = load_image(tmp_path / "x.png", 3)
    assert rgb.shape == (4, 4, 3) and (rgb[:, :2] == 200).all() and (rgb[:, 2:] == 0).all()
    assert load_image(tmp_path / "x.png", 1).shape == (4, 4, 1)


def test_image_folder_bad_inputs_name_the_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataValidationError, match=r"empty.*empty folder"):
        ImageFolderDataModule(str(empty), **_kw()).setup("fit")
    with pytest.raises(DataValidationError, match="not found"):
        ImageFolderDataModule(str(tmp_path / "nowhere"), **_kw()).setup("fit")

    root = tmp_path / "data"
    _class_tree(root, per_class=3)
    (root / "emu").mkdir()
    with pytest.raises(DataValidationError, match=r"emu: empty class folder"):
        ImageFolderDataModule(str(root), **_kw()).setup("fit")
    (root / "emu").rmdir()

    # Truncated PNG: caught in setup by the cheap header check, the file named.
    good = (root / "dog" / "1.png").read_bytes()
    (root / "dog" / "1.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataValidationError, match=r"dog/1\.png: unreadable or truncated"):
        ImageFolderDataModule(str(root), **_kw()).setup("fit")
    # With verification off, the same error surfaces when the example is loaded.
    dm = ImageFolderDataModule(str(root), verify_images=False, val_fraction=0, test_fraction=0, **_kw())
    dm.setup("fit")
    index = [str(p) for p, _ in dm.train_dataset.samples].index(str(root / "dog" / "1.png"))
    with pytest.raises(DataValidationError, match=r"dog/1\.png: unreadable or truncated"):
        dm.train_dataset[index]
    (root / "dog" / "1.png").write_bytes(b"this is not a png at all")
    with pytest.raises(DataValidationError, match=r"dog/1\.png: unreadable"):
        ImageFolderDataModule(str(root), **_kw()).setup("fit")
    (root / "dog" / "1.png").write_bytes(good)

    # Validation classes must be training classes.
    split = tmp_path / "split"
    _class_tree(split / "train", classes=("a", "b"), per_class=2)
    _class_tree(split / "val", classes=("a", "zebra"), per_class=1)
    with pytest.raises(DataValidationError, match=r"\['zebra'\] are not among the classes"):
        ImageFolderDataModule(str(split), **_kw()).setup("fit")


def test_check_num_classes_and_bad_arguments(tmp_path, class_count_error):
    _class_tree(tmp_path, per_class=2)
    dm = ImageFolderDataModule(str(tmp_path), **_kw())
    from lightning_convnets import ImageClassifier

    wrong = ImageClassifier("preact_resnet18", num_classes=10, backbone_kwargs={"stem": "cifar", "width": 4})
    message = class_count_error(wrong, dm)
    assert "built for 10 classes" in message and "data has 3 (cat, dog, fox)" in message
    with pytest.raises(ValueError, match="in_channels must be 1 or 3"):
        ImageFolderDataModule(str(tmp_path), in_channels=4)
    with pytest.raises(ValueError, match="mean has 2 values"):
        ImageFolderDataModule(str(tmp_path), mean=[0.5, 0.5])


# ------------------------------------------------------------------------ segmentation folders
def _seg_pair(root: Path, stem: str, mask: np.ndarray, palette: bool = True, value: int = 0) -> None:
    height, width = mask.shape
    _save(root / "images" / f"{stem}.jpg", size=(width, height), value=value)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(mask.astype(np.uint8), mode="L")
    if palette:
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i * 7 % 256, i * 13 % 256, i * 29 % 256)])
    image.save(root / "masks" / f"{stem}.png")


def _mask(value: int, size=(12, 16)) -> np.ndarray:
    mask = np.zeros(size, np.uint8)
    mask[2:8, 3:10] = value
    mask[0, :] = 255  # ignore border, as in VOC
    return mask


def test_segmentation_folder_palette_and_gray_masks(tmp_path):
    for i in range(6):
        _seg_pair(tmp_path, f"p{i}", _mask(1 + i % 2), palette=True, value=i)
    for i in range(4):
        _seg_pair(tmp_path, f"g{i}", _mask(2, size=(20, 10)), palette=False, value=10 + i)  # mixed sizes
    dm = SegmentationFolderDataModule(str(tmp_path), class_names=["bg", "road", "car"], **_kw())
    assert dm.num_classes == 3
    dm.setup()
    assert len(dm.train_dataset) + len(dm.val_dataset) + len(dm.test_dataset) == 10
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert masks.shape == (4, 16, 16) and masks.dtype == torch.int64
    assert set(masks.unique().tolist()) <= {0, 1, 2, 255}
    # Palette PNGs are read as their indices, not their colours.
    from lightning_convnets.datamodules.io import load_mask

    assert set(np.unique(load_mask(tmp_path / "masks" / "p1.png")).tolist()) == {0, 2, 255}
    # Evaluation resizes masks with nearest neighbour: no invented in-between classes.
    _, val_masks = next(iter(dm.val_dataloader()))
    assert set(val_masks.unique().tolist()) <= {0, 1, 2, 255}


def test_segmentation_infers_classes_and_split_folders(tmp_path):
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            _seg_pair(tmp_path / split, f"{i}", _mask(4), value=i)
    dm = SegmentationFolderDataModule(str(tmp_path), **_kw())
    assert dm.num_classes == 5  # 0..max value (4), the ignore value excluded
    dm.setup("fit")
    assert len(dm.train_dataset) == 4 and len(dm.val_dataset) == 2


def test_segmentation_bad_inputs_name_the_file(tmp_path):
    root = tmp_path / "seg"
    for i in range(3):
        _seg_pair(root, f"{i}", _mask(1), value=i)
    kw = _kw(class_names=["bg", "fg"], val_fraction=0, test_fraction=0)

    _save(root / "images" / "lonely.png")
    with pytest.raises(DataValidationError, match=r"lonely\.png: missing mask"):
        SegmentationFolderDataModule(str(root), **kw).setup("fit")
    (root / "images" / "lonely.png").unlink()

    _seg_pair(root, "bad", _mask(7))
    with pytest.raises(
        DataValidationError, match=r"bad\.png: mask values \[7\] are outside the classes 0\.\.1"
    ):
        SegmentationFolderDataModule(str(root), **kw).setup("fit")
    # Without up-front verification, loading the example raises the same error.
    dm = SegmentationFolderDataModule(str(root), verify_images=False, **kw)
    dm.setup("fit")
    index = [p.stem for p, _ in dm.train_dataset.pairs].index("bad")
    with pytest.raises(DataValidationError, match=r"bad\.png: mask values \[7\]"):
        dm.train_dataset[index]
    # A different ignore value makes 255 a bad value too.
    _seg_pair(root, "bad", _mask(1))
    with pytest.raises(DataValidationError, match=r"mask values \[255\].*ignore value 0"):
        SegmentationFolderDataModule(str(root), ignore_index=0, **kw).setup("fit")

    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "masks" / "bad.png")
    with pytest.raises(DataValidationError, match=r"bad\.png: mask size 5x5 differs from image"):
        SegmentationFolderDataModule(str(root), **kw).setup("fit")

    rgb = np.zeros((12, 16, 3), np.uint8)
    rgb[..., 0] = 1
    Image.fromarray(rgb).save(root / "masks" / "bad.png")
    with pytest.raises(DataValidationError, match=r"bad\.png: mask is a colour \(RGB\) image"):
        SegmentationFolderDataModule(str(root), **kw).setup("fit")

    (root / "masks" / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataValidationError, match=r"bad\.png: unreadable or truncated mask"):
        SegmentationFolderDataModule(str(root), **kw).setup("fit")

    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    with pytest.raises(DataValidationError, match=r"images: empty folder"):
        SegmentationFolderDataModule(str(empty), **kw).setup("fit")
    (empty / "masks").rmdir()
    with pytest.raises(DataValidationError, match=r"empty/masks: masks folder not found"):
        SegmentationFolderDataModule(str(empty), **kw).setup("fit")
    with pytest.raises(DataValidationError, match=r"nowhere: dataset root not found"):
        SegmentationFolderDataModule(str(tmp_path / "nowhere"), **kw).setup("fit")


# -------------------------------------------------------------------- torchvision (offline path)
def test_torchvision_wrappers_name_the_missing_root(tmp_path):
    cifar = CIFAR10DataModule(str(tmp_path / "cifar"))
    assert cifar.num_classes == 10 and cifar.class_names[0] == "airplane"
    cifar.prepare_data()  # download=False: must not touch the network
    with pytest.raises(DataValidationError, match=r"cifar: CIFAR-10 not found.*download=True"):
        cifar.setup("fit")
    voc = VOCSegmentationDataModule(str(tmp_path / "voc"))
    assert voc.num_classes == 21 and voc.class_names[0] == "background"
    voc.prepare_data()
    with pytest.raises(DataValidationError, match=r"voc: VOC2012 not found.*VOCdevkit"):
        voc.setup("fit")


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")
def test_loader_settings_reach_the_dataloaders(tmp_path):
    _class_tree(tmp_path, per_class=4)
    dm = ImageFolderDataModule(
        str(tmp_path), num_workers=2, pin_memory=True, persistent_workers=True, drop_last=True, **_kw()
    )
    dm.setup()
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert train.batch_size == 4 and train.num_workers == 2 and train.pin_memory and train.persistent_workers
    assert train.drop_last and not val.drop_last  # evaluation never drops examples
    images, labels = next(iter(train))  # worker processes load and augment
    assert images.shape == (4, 3, 16, 16) and labels.dtype == torch.int64
    # persistent_workers is meaningless (and refused by torch) without workers: quietly off.
    single = ImageFolderDataModule(str(tmp_path), num_workers=0, persistent_workers=True, **_kw())
    single.setup("fit")
    assert not single.train_dataloader().persistent_workers


def test_voc_wrapper_batches_on_a_tiny_fake_devkit(tmp_path):
    voc = tmp_path / "voc" / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split, stems in (("train", ["a", "b", "c"]), ("val", ["d", "e"])):
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(stems) + "\n")
        for stem in stems:
            _save(voc / "JPEGImages" / f"{stem}.jpg", size=(30, 20))
            _seg_pair(voc / "tmp", stem, _mask(15, size=(20, 30)))
            (voc / "SegmentationClass").mkdir(exist_ok=True)
            (voc / "tmp" / "masks" / f"{stem}.png").rename(voc / "SegmentationClass" / f"{stem}.png")
    dm = VOCSegmentationDataModule(str(tmp_path / "voc"), image_size=16, batch_size=2)
    dm.setup()
    assert len(dm.train_dataset) == 3 and len(dm.val_dataset) == 2 and len(dm.test_dataset) == 2
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert masks.shape == (2, 16, 16) and masks.dtype == torch.int64
    assert set(masks.unique().tolist()) <= {0, 15, 255}  # palette indices; 255 = ignore border



def test_auto_num_workers_rule_and_its_override(monkeypatch):
    from lightning_convnets.datamodules import auto_num_workers

    # a worker takes one of two cores from the step: none up to 2 CPUs per process, then cpus - 1, at most 8
    assert [auto_num_workers(cpus=c) for c in (1, 2, 3, 4, 9, 64)] == [0, 0, 2, 3, 8, 8]
    assert auto_num_workers(cpus=16, processes=4) == 3 and auto_num_workers(cpus=8, processes=4) == 0
    monkeypatch.setenv("LIGHTNING_CONVNETS_NUM_WORKERS", "3")
    assert auto_num_workers() == 3
    monkeypatch.setenv("LIGHTNING_CONVNETS_NUM_WORKERS", "many")
    with pytest.raises(ValueError, match="LIGHTNING_CONVNETS_NUM_WORKERS must be an int >= 0, got 'many'"):
        auto_num_workers()


def test_num_workers_auto_is_the_default_and_resolves_in_the_loaders(tmp_path, monkeypatch):
    _class_tree(tmp_path, per_class=4)
    monkeypatch.setenv("LIGHTNING_CONVNETS_NUM_WORKERS", "1")
    dm = ImageFolderDataModule(str(tmp_path), **_kw())
    assert dm.num_workers == "auto" and dm.hparams.num_workers == "auto"
    dm.setup("fit")
    train = dm.train_dataloader()
    assert train.num_workers == 1 and train.persistent_workers  # persistent whenever there are workers
    images, _ = next(iter(train))
    assert images.shape[0] == 4
    monkeypatch.setenv("LIGHTNING_CONVNETS_NUM_WORKERS", "0")
    assert dm.val_dataloader().num_workers == 0 and not dm.val_dataloader().persistent_workers
    no_keep = ImageFolderDataModule(str(tmp_path), num_workers=1, persistent_workers=False, **_kw())
    no_keep.setup("fit")
    assert not no_keep.train_dataloader().persistent_workers
    for bad in (-1, "four", 1.5, True):
        with pytest.raises(ValueError, match=r"num_workers must be an int >= 0 or 'auto', got"):
            ImageFolderDataModule(str(tmp_path), num_workers=bad, **_kw())
