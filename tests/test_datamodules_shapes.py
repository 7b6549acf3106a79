"""ShapesDataModule: batch formats per task, determinism, caching, and that it is not linearly solvable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning_convnets.datamodules import ShapesDataModule
from lightning_convnets.datamodules.shapes import ensure_shapes


def _small(tmp_path, task, **kw):
    kw.setdefault("num_train", 24)
    kw.setdefault("num_val", 8)
    kw.setdefault("num_test", 8)
    return ShapesDataModule(task=task, root=str(tmp_path), batch_size=4, **kw)


def test_classification_batches_and_metadata(tmp_path, class_count_error):
    dm = _small(tmp_path, "classification")
    # Known before setup: the tasks size their heads from it.
    assert dm.num_classes == 4 and dm.class_names == ["circle", "square", "triangle", "cross"]
    assert dm.in_channels == 3 and len(dm.mean) == 3 and len(dm.std) == 3
    assert dm.num_train_examples == 24
    dm.prepare_data()
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (4,) and labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() < 4
    # Normalised: roughly zero-centred, not 0..255 nor 0..1.
    assert -1.5 < images.mean().item() < 1.5 and images.min() < 0
    assert len(dm.train_dataset) == 24 and len(dm.val_dataset) == 8
    # The real on-disk format: one folder per class.
    assert sorted(p.name for p in (dm.data_dir / "train").iterdir()) == sorted(dm.class_names)
    from lightning_convnets import ImageClassifier

    wrong = ImageClassifier("preact_resnet18", num_classes=5, backbone_kwargs={"stem": "cifar", "width": 4})
    message = class_count_error(wrong, dm)
    assert "num_classes is 4 but the model was built for 5 classes" in message


def test_segmentation_batches(tmp_path):
    dm = _small(tmp_path, "segmentation", image_size=32)
    assert dm.num_classes == 5 and dm.class_names[0] == "background"
    dm.setup("fit")
    images, masks = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert masks.shape == (4, 32, 32) and masks.dtype == torch.int64
    values = set(masks.unique().tolist())
    assert 0 in values and values - {0} and values <= set(range(5))
    # The train pipeline pads with the ignore value, so ignore may appear only there.
    _, train_masks = next(iter(dm.train_dataloader()))
    assert set(train_masks.unique().tolist()) <= set(range(5)) | {255}


def test_detection_batches_and_coco_files(tmp_path):
    dm = _small(tmp_path, "detection")
    assert dm.num_classes == 4 and dm.category_ids == [1, 2, 3, 4]
    dm.setup("fit")
    images, targets = next(iter(dm.val_dataloader()))
    assert isinstance(images, list) and len(images) == 4
    assert images[0].shape == (3, 64, 64) and images[0].dtype == torch.float32
    for target in targets:
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.dtype == torch.float32 and boxes.shape[1] == 4 and 1 <= len(boxes) <= 4
        assert labels.dtype == torch.int64 and labels.shape == (len(boxes),)
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert boxes.min() >= 0 and boxes.max() <= 64
    coco = json.loads((dm.data_dir / "val" / "annotations.json").read_text())
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4]
    # Boxes are tight: the image differs from its background colour right inside each box edge.
    assert all(a["bbox"][2] > 0 and a["bbox"][3] > 0 for a in coco["annotations"])


def test_detection_boxes_tight_around_shapes(tmp_path):
    """Every box equals the extent of its shape's pixels, read back from a segmentation render."""
    from lightning_convnets.datamodules.shapes import render_scene

    rng = np.random.default_rng(3)
    _, mask, instances = render_scene(
        rng, 64, 4, 3, (0.09, 0.2), ["circle", "square", "triangle", "cross"], 180.0
    )
    assert instances
    for cls, (x0, y0, x1, y1), area in instances:
        inside = mask[y0:y1, x0:x1] == cls + 1
        assert inside.sum() == area  # all its pixels lie in the box (no overlaps by construction)
        # Tight: each edge row/column of the box touches the shape.
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


def test_same_seed_same_bytes_and_cache(tmp_path):
    params = dict(_small(tmp_path, "classification").generation_params)
    first = ensure_shapes(tmp_path / "a", params)
    second = ensure_shapes(tmp_path / "b", params)
    files_a = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    files_b = sorted(p.relative_to(second) for p in second.rglob("*.png"))
    assert files_a == files_b and len(files_a) == 40
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files_a)

    # Cached: a second call reuses the folder without rewriting files.
    stamp = (first / files_a[0]).stat().st_mtime_ns
    assert ensure_shapes(tmp_path / "a", params) == first
    assert (first / files_a[0]).stat().st_mtime_ns == stamp

    # Another seed: a different folder with different images; the manifest records the parameters.
    other = ensure_shapes(tmp_path / "a", {**params, "seed": 1})
    assert other != first
    assert json.loads((other / "manifest.json").read_text())["params"]["seed"] == 1
    files_other = sorted(p.relative_to(other) for p in other.rglob("*.png"))
    assert [(f, (other / f).read_bytes()) for f in files_other] != [
        (f, (first / f).read_bytes()) for f in files_a
    ]

    # An interrupted generation (no manifest) is regenerated.
    (first / "manifest.json").unlink()
    (first / files_a[0]).write_bytes(b"junk")
    assert ensure_shapes(tmp_path / "a", params) == first
    assert (first / files_a[0]).read_bytes() == (second / files_a[0]).read_bytes()


def test_val_images_do_not_depend_on_num_train(tmp_path):
    a = ensure_shapes(tmp_path, _small(tmp_path, "classification", num_train=10).generation_params)
    b = ensure_shapes(tmp_path, _small(tmp_path, "classification", num_train=20).generation_params)
    val_a = sorted(p.relative_to(a) for p in (a / "val").rglob("*.png"))
    assert val_a == sorted(p.relative_to(b) for p in (b / "val").rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in val_a)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        ShapesDataModule(task="depth", root=str(tmp_path))
    with pytest.raises(ValueError, match="shapes must be"):
        ShapesDataModule(shapes=["circle", "blob"], root=str(tmp_path))


def test_linear_classifier_does_not_solve_shapes(tmp_path):
    """Logistic regression on raw pixels stays near chance (4 classes), far below what a CNN gets (>90%)."""
    torch.manual_seed(0)
    dm = ShapesDataModule(
        root=str(tmp_path), num_train=800, num_val=200, num_test=1, train_transforms="none", batch_size=4
    )
    dm.setup("fit")

    def stack(dataset):
        images, labels = zip(*(dataset[i] for i in range(len(dataset))))
        return torch.stack(images).flatten(1), torch.tensor(labels)

    x_train, y_train = stack(dm.train_dataset)
    x_val, y_val = stack(dm.val_dataset)
    model = torch.nn.Linear(x_train.shape[1], dm.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(20):
        for idx in torch.randperm(len(x_train)).split(100):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        train_acc = (model(x_train).argmax(1) == y_train).float().mean().item()
        val_acc = (model(x_val).argmax(1) == y_val).float().mean().item()
    assert train_acc > 0.4  # it did fit something (memorised the training set)...
    assert val_acc < 0.45  # ...but nothing that generalises: chance is 0.25


@pytest.mark.slow
def test_small_cnn_learns_shapes(tmp_path):
    """The easy side of the band: a tiny CNN gets >= 90% val (measured 0.99) in 4 epochs of 2000 images."""
    torch.manual_seed(0)
    dm = ShapesDataModule(
        root=str(tmp_path), num_train=2000, num_val=500, num_test=1, train_transforms="none"
    )
    dm.setup("fit")

    def stack(dataset):
        images, labels = zip(*(dataset[i] for i in range(len(dataset))))
        return torch.stack(images), torch.tensor(labels)

    x_train, y_train = stack(dm.train_dataset)
    x_val, y_val = stack(dm.val_dataset)

    def block(cin: int, cout: int) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False), torch.nn.BatchNorm2d(cout), torch.nn.ReLU()
        )

    net = torch.nn.Sequential(
        block(3, 16), block(16, 16), torch.nn.MaxPool2d(2),
        block(16, 32), block(32, 32), torch.nn.MaxPool2d(2),
        block(32, 64), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, dm.num_classes),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.01)
    epochs, steps = 4, (len(x_train) + 63) // 64
    # A decaying rate: the final accuracy then reflects what was learnt, not the last step's noise.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=5e-3, total_steps=epochs * steps)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x_train)).split(64):
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    net.eval()
    with torch.no_grad():
        val_acc = (net(x_val).argmax(1) == y_val).float().mean().item()
    assert val_acc >= 0.9, f"val accuracy {val_acc:.3f}"

