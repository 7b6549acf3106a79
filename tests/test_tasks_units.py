"""Task building blocks: losses, valid-padding alignment, fine-tuning controls, checkpoints, writers."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, Trainer
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_convnets.backbones import register_backbone
from lightning_convnets.nn import ClassificationHead, CrossEntropyDiceLoss, DiceLoss, center_crop
from lightning_convnets.tasks import (
    ClassProbabilitiesWriter,
    ImageClassifier,
    SemanticSegmenter,
    WarmupCosineLR,
    resolve_backbone,
)


class TinyNet(nn.Module):
    """A two-map pyramid backbone honouring the contract (fine to coarse)."""

    def __init__(self, in_channels: int = 3, width: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.out_channels = [width, 2 * width]
        self.reductions = [1, 2]

    def forward(self, x):
        a = self.stem(x)
        return [a, self.down(a)]


register_backbone("_test_tinynet")(TinyNet)


@pytest.fixture(autouse=True)
def _single_thread():
    # Test runs share a couple of cores: OpenMP threads spin-waiting on each other under load make tiny
    # models 10x slower, so these tests use one thread and restore the setting afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ValidShift(nn.Module):
    """A dense valid-padding stand-in: two unpadded 3x3 identity convolutions, so output pixel (i, j) is
    input pixel (i + 2, j + 2) (channel 0), exactly what a centred valid network does."""

    dense = True

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(1, 1, 3, bias=False), nn.Conv2d(1, 1, 3, bias=False))
        with torch.no_grad():
            for conv in self.convs:
                conv.weight.zero_()
                conv.weight[0, 0, 1, 1] = 1.0
        self.out_channels = [1]
        self.reductions = [1]
        self.border = 2

    def forward(self, x):
        return [self.convs(x)]


class TensorDataModule(LightningDataModule):
    def __init__(self, images, targets, num_classes, batch_size=8, class_names=None):
        super().__init__()
        self.dataset = TensorDataset(images, targets)
        self.num_classes = num_classes
        self.in_channels = images.shape[1]
        self.class_names = class_names or [f"c{i}" for i in range(num_classes)]
        self.batch_size = batch_size

    def _loader(self, shuffle=False):
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self):
        return self._loader(shuffle=True)

    def val_dataloader(self):
        return self._loader()

    def test_dataloader(self):
        return self._loader()

    def predict_dataloader(self):
        return self._loader()


def _classification_data(n=24, num_classes=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    images = torch.randn(n, 3, size, size, generator=g) * 0.2
    images[torch.arange(n), labels % 3] += 1.0
    return images, labels


def _trainer(tmp_path, **kw):
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kw)
    return Trainer(**defaults)


# --------------------------------------------------------------------------------------------- losses
def test_dice_is_zero_for_perfect_logits_and_ignores_void_pixels():
    target = torch.tensor([[[0, 1, 2], [2, 255, 1]]])
    perfect = F.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 30
    loss = DiceLoss(ignore_index=255)
    assert float(loss(perfect, target)) < 1e-3
    # Whatever the network says at an ignored pixel changes nothing.
    changed = perfect.clone()
    changed[0, :, 1, 1] = torch.tensor([50.0, -50.0, 0.0])
    assert torch.isclose(loss(changed, target), loss(perfect, target))
    # A wrong prediction at a labelled pixel does cost something.
    wrong = perfect.clone()
    wrong[0, :, 0, 0] = torch.tensor([-30.0, 30.0, 0.0])
    assert float(loss(wrong, target)) > 0.05


def test_ce_term_matches_torch_with_ignore_index_and_class_weights():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 5, 6, generator=g)
    target = torch.randint(0, 4, (2, 5, 6), generator=g)
    target[0, :2] = 255
    weights = [1.0, 2.0, 0.5, 3.0]
    ce_only = CrossEntropyDiceLoss(ignore_index=255, dice_weight=0.0, class_weights=weights)
    expected = F.cross_entropy(logits, target, weight=torch.tensor(weights), ignore_index=255)
    assert torch.allclose(ce_only(logits, target), expected, atol=1e-6)
    both = CrossEntropyDiceLoss(ignore_index=255, class_weights=weights)
    dice = DiceLoss(ignore_index=255, class_weights=weights)(logits, target)
    assert torch.allclose(both(logits, target), expected + dice, atol=1e-6)


def test_all_ignored_batch_gives_zero_not_nan_and_binary_mode_masks_void():
    logits = torch.randn(1, 3, 4, 4)
    target = torch.full((1, 4, 4), 255)
    assert float(CrossEntropyDiceLoss(ignore_index=255)(logits, target)) == 0.0
    binary_logits = torch.randn(1, 1, 4, 4)
    target = torch.randint(0, 2, (1, 4, 4))
    target[0, 0] = 255
    loss = CrossEntropyDiceLoss(binary=True, ignore_index=255, dice_weight=0.0)(binary_logits, target)
    valid = target != 255
    expected = F.binary_cross_entropy_with_logits(binary_logits[0, 0][valid[0]], target[valid].float())
    assert torch.allclose(loss, expected, atol=1e-6)


def test_loss_argument_errors_name_the_problem():
    with pytest.raises(ValueError, match="not both 0"):
        CrossEntropyDiceLoss(ce_weight=0, dice_weight=0)
    with pytest.raises(ValueError, match="binary mode takes two class_weights"):
        CrossEntropyDiceLoss(binary=True, class_weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="disagree"):
        DiceLoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 5, 4, dtype=torch.long))


def test_classification_head_pools_any_size():
    head = ClassificationHead(6, 5, dropout=0.2)
    assert head(torch.randn(2, 6, 3, 7)).shape == (2, 5)


# ------------------------------------------------------------------------------ backbone resolution
def test_backbone_from_name_class_path_and_module():
    by_name = resolve_backbone("_test_tinynet", width=2)
    assert by_name.out_channels == [2, 4]
    by_path = resolve_backbone({"class_path": f"{__name__}.TinyNet", "init_args": {"width": 3}})
    assert by_path.out_channels == [3, 6]
    module = TinyNet()
    assert resolve_backbone(module) is module
    with pytest.raises(TypeError, match="backbone must be"):
        resolve_backbone(42)
    with pytest.raises(TypeError, match="out_channels"):
        resolve_backbone(nn.Conv2d(3, 3, 1))


# ------------------------------------------------------------------------ valid-padding alignment
def test_valid_padding_mask_is_cropped_with_the_network_rule():
    model = SemanticSegmenter(ValidShift(), num_classes=3, in_channels=1)
    with torch.no_grad():  # head = identity on channel 0 -> logits of class k are (k == value)
        model.heads[0].weight.zero_()
        model.heads[0].bias.zero_()
    mask = torch.randint(0, 3, (2, 12, 12))
    mask[0, 0, 0] = 255
    images = mask.float()[:, None]
    features = model.backbone(images)[0]
    logits, cropped = model.align(features, mask, (12, 12))
    assert logits.shape[-2:] == cropped.shape[-2:] == (8, 8)
    # Every output pixel is scored against the mask pixel it actually sees.
    assert torch.equal(features[:, 0].long(), cropped)
    assert torch.equal(cropped, center_crop(mask, 8, 8))
    # predict_step puts the prediction back at the same place, the unseen rim being "ignore".
    pred = model.predict_step(images, 0)
    assert pred.shape == (2, 12, 12)
    assert (pred[:, :2] == 255).all() and (pred[:, -2:] == 255).all()


def test_same_padding_logits_are_resized_to_the_mask():
    model = SemanticSegmenter("_test_tinynet", num_classes=4)
    logits, mask = model.align(torch.randn(1, 4, 5, 5), torch.zeros(1, 10, 10, dtype=torch.long), (10, 10))
    assert logits.shape[-2:] == (10, 10) and mask.shape == (1, 10, 10)


def test_real_valid_unet_border_matches_the_crop_rule():
    from lightning_convnets.backbones import create_backbone
    from lightning_convnets.nn import crop_offsets

    net = create_backbone("unet", in_channels=1, width=2, depth=2, padding="valid")
    out = net(torch.zeros(1, 1, 44, 44))[0]
    assert crop_offsets(44, out.shape[-1])[0] == net.border
    model = SemanticSegmenter(net, num_classes=2, in_channels=1)
    images = torch.zeros(2, 1, 44, 44)
    _, preds, target, cropped = model.shared_step((images, torch.zeros(2, 44, 44, dtype=torch.long)), "val")
    assert preds.shape == target.shape == cropped.shape[:1] + cropped.shape[2:] == (2, *out.shape[-2:])


# ------------------------------------------------------------------------------ fine-tuning controls
def _fit(model, tmp_path, epochs=1, data=None, **kw):
    images, labels = data or _classification_data()
    dm = TensorDataModule(images, labels, num_classes=3)
    trainer = _trainer(tmp_path, max_epochs=epochs, num_sanity_val_steps=0, limit_val_batches=0, **kw)
    trainer.fit(model, dm)
    return trainer


def test_freeze_backbone_always_leaves_it_out_of_the_optimizer(tmp_path):
    model = ImageClassifier(TinyNet(), num_classes=3, freeze_backbone=True)
    before = [p.clone() for p in model.backbone.parameters()]
    trainer = _fit(model, tmp_path)
    names = [g["name"] for g in trainer.optimizers[0].param_groups]
    assert names == ["head"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.backbone.parameters()))
    # Frozen means eval mode too: BatchNorm statistics did not move.
    assert torch.equal(model.backbone.stem[1].running_mean, torch.zeros(4))


def test_freeze_backbone_for_one_epoch_then_train_it(tmp_path):
    model = ImageClassifier(TinyNet(), num_classes=3, freeze_backbone=1, lr_scheduler=None)
    start = model.backbone.stem[0].weight.clone()
    _fit(model, tmp_path, epochs=1)
    assert torch.equal(start, model.backbone.stem[0].weight)
    model2 = ImageClassifier(TinyNet(), num_classes=3, freeze_backbone=1, lr_scheduler=None)
    model2.load_state_dict(model.state_dict())
    _fit(model2, tmp_path, epochs=2)
    assert not torch.equal(start, model2.backbone.stem[0].weight)
    assert all(p.requires_grad for p in model2.backbone.parameters())


def test_freeze_bn_keeps_running_stats_but_trains_weights(tmp_path):
    model = ImageClassifier(TinyNet(), num_classes=3, freeze_bn=True, lr_scheduler=None)
    bn = model.backbone.stem[1]
    stats, weight = bn.running_mean.clone(), bn.weight.clone()
    _fit(model, tmp_path)
    assert torch.equal(stats, bn.running_mean)
    assert not torch.equal(weight, bn.weight)


def test_backbone_lr_multiplier_makes_its_own_group_and_survives_the_scheduler(tmp_path):
    model = ImageClassifier(
        TinyNet(),
        num_classes=3,
        backbone_lr_mult=0.1,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9),
    )
    trainer = _fit(model, tmp_path)
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert set(groups) == {"head", "backbone"}
    assert groups["backbone"]["initial_lr"] == pytest.approx(0.05)
    assert groups["head"]["initial_lr"] == pytest.approx(0.5)
    # The default WarmupCosineLR got the run length from the trainer (3 batches) and keeps the ratio.
    scheduler = trainer.lr_scheduler_configs[0]
    assert scheduler.interval == "step" and scheduler.scheduler.total_steps == 3
    assert groups["backbone"]["lr"] == pytest.approx(0.1 * groups["head"]["lr"])


def test_one_cycle_from_the_cli_gets_total_steps(tmp_path):
    from functools import partial

    model = ImageClassifier(
        TinyNet(),
        num_classes=3,
        lr_scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1, total_steps=None),
    )
    trainer = _fit(model, tmp_path, epochs=2)
    config = trainer.lr_scheduler_configs[0]
    assert config.interval == "step" and config.scheduler.total_steps == 6


def test_one_cycle_too_short_for_its_warmup_is_a_clear_error(tmp_path):
    from functools import partial

    # 3 steps with pct_start=1/3: the warm-up phase would end at step 0 (torch divides by zero).
    model = ImageClassifier(
        TinyNet(),
        num_classes=3,
        lr_scheduler=partial(
            torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1, pct_start=1 / 3, total_steps=None
        ),
    )
    with pytest.raises(ValueError, match="pct_start"):
        _fit(model, tmp_path, epochs=1)


def test_warmup_cosine_shape():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = WarmupCosineLR(opt, total_steps=100, warmup=10, min_lr_ratio=0.1)
    assert sched.lr_lambda(0) < sched.lr_lambda(5) < sched.lr_lambda(10) == pytest.approx(1.0)
    assert sched.lr_lambda(100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosineLR(opt)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="freeze_backbone"):
        ImageClassifier(TinyNet(), num_classes=3, freeze_backbone=-1)
    with pytest.raises(ValueError, match="backbone_lr_mult"):
        ImageClassifier(TinyNet(), num_classes=3, backbone_lr_mult=-0.5)
    with pytest.raises(ValueError, match="class_weights"):
        ImageClassifier(TinyNet(), num_classes=3, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="binary"):
        SemanticSegmenter(TinyNet(), num_classes=5, binary=True)


def test_class_count_mismatch_fails_before_training(tmp_path):
    images, labels = _classification_data()
    model = ImageClassifier(TinyNet(), num_classes=5)
    with pytest.raises(ValueError, match="num_classes is 3 but the model was built for 5"):
        _trainer(tmp_path, max_epochs=1).fit(model, TensorDataModule(images, labels, num_classes=3))
    gray = ImageClassifier(TinyNet(in_channels=1), num_classes=3)
    with pytest.raises(ValueError, match="in_channels is 3"):
        _trainer(tmp_path, max_epochs=1).fit(gray, TensorDataModule(images, labels, num_classes=3))


# --------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_with_registry_name_and_inferred_classes(tmp_path):
    model = ImageClassifier("_test_tinynet", backbone_kwargs={"width": 3}, num_classes=None)
    trainer = _fit(model, tmp_path)
    assert model.num_classes == 3 and model.hparams.num_classes == 3  # taken from the datamodule and recorded
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = ImageClassifier.load_from_checkpoint(path)  # no datamodule: the count comes from the file
    assert restored.num_classes == 3
    x = torch.randn(2, 3, 8, 8)
    model.eval(), restored.eval()
    assert torch.allclose(model(x), restored(x))


def test_checkpoint_with_module_backbone_needs_it_again(tmp_path):
    model = SemanticSegmenter(TinyNet(), num_classes=3)
    assert "backbone" not in model.hparams
    images = torch.randn(8, 3, 8, 8)
    masks = torch.randint(0, 3, (8, 8, 8))
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(model, TensorDataModule(images, masks, num_classes=3))
    path = tmp_path / "seg.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(RuntimeError):  # default backbone name does not match the saved weights
        SemanticSegmenter.load_from_checkpoint(path)
    restored = SemanticSegmenter.load_from_checkpoint(path, backbone=TinyNet())
    model.eval(), restored.eval()
    assert torch.allclose(model(images)[-1], restored(images)[-1])


# ------------------------------------------------------------------------------------------ writers
def test_probabilities_csv_has_one_row_per_image(tmp_path):
    images, labels = _classification_data(n=10)
    dm = TensorDataModule(images, labels, num_classes=3, batch_size=4, class_names=["red", "green", "blue"])
    model = ImageClassifier(TinyNet(), num_classes=3)
    trainer = _trainer(tmp_path, callbacks=[ClassProbabilitiesWriter(str(tmp_path / "out"))])
    predictions = trainer.predict(model, dm)
    with open(tmp_path / "out" / "probabilities.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and [r["index"] for r in rows] == [str(i) for i in range(10)]
    probs = torch.cat(predictions)
    for row, p in zip(rows, probs):
        values = [float(row[f"p_{n}"]) for n in ("red", "green", "blue")]
        assert sum(values) == pytest.approx(1.0, abs=1e-4)
        assert row["predicted"] == ["red", "green", "blue"][int(p.argmax())]


def test_mask_pngs_read_back_as_the_predicted_indices(tmp_path):
    images = torch.randn(5, 3, 8, 8)
    masks = torch.randint(0, 3, (5, 8, 8))
    model = SemanticSegmenter(TinyNet(), num_classes=3)
    # No writer configured: predict attaches MaskPNGWriter under the trainer's log dir by itself.
    trainer = _trainer(tmp_path)
    predictions = torch.cat(
        trainer.predict(model, TensorDataModule(images, masks, num_classes=3, batch_size=2))
    )
    files = sorted((tmp_path / "predictions" / "masks").glob("*.png"))
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(5)]
    for path, pred in zip(files, predictions):
        image = Image.open(path)
        assert image.mode == "P"
        assert np.array_equal(np.array(image), pred.numpy())


def test_import_is_light_and_exports_are_lazy():
    code = (
        "import sys, lightning_convnets; assert 'lightning' not in sys.modules and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    import lightning_convnets

    assert lightning_convnets.ImageClassifier is ImageClassifier
    assert lightning_convnets.SemanticSegmenter is SemanticSegmenter
    with pytest.raises(AttributeError, match="no attribute"):
        lightning_convnets.NoSuchThing  # noqa: B018


# ------------------------------------------------------------------------------------------- modes
def test_multilabel_mode_uses_sigmoid_bce_and_multilabel_metrics(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 8, 8, generator=g)
    targets = (torch.rand(16, 3, generator=g) > 0.5).long()
    model = ImageClassifier(TinyNet(), num_classes=3, multilabel=True, class_weights=[1.0, 2.0, 1.0])
    loss, logits, _, _ = model.shared_step((images, targets), "val")
    expected = F.binary_cross_entropy_with_logits(
        logits, targets.float(), pos_weight=torch.tensor([1.0, 2.0, 1.0])
    )
    assert torch.allclose(loss, expected)
    probs = model.predict_step(images, 0)
    assert probs.shape == (16, 3) and not torch.allclose(probs.sum(1), torch.ones(16))  # independent labels
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(model, TensorDataModule(images, targets, num_classes=3))
    assert {"val/acc", "val/f1", "train/acc"} <= set(trainer.callback_metrics)
    with pytest.raises(ValueError, match="multilabel targets"):
        model.shared_step((images, targets[:, :2]), "val")


def test_binary_segmentation_has_one_channel_and_two_class_metrics(tmp_path):
    images = torch.randn(8, 3, 8, 8)
    masks = (images[:, 0] > 0).long()
    masks[:, 0, 0] = 255
    model = SemanticSegmenter(TinyNet(), binary=True, num_classes=2)
    assert model(images)[-1].shape == (8, 1, 8, 8)
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(model, TensorDataModule(images, masks, num_classes=2, class_names=["bg", "fg"]))
    metrics = trainer.callback_metrics
    assert {"val/miou", "val/iou/bg", "val/iou/fg", "val/dice", "val/pixel_acc"} <= set(metrics)
    assert set(model.predict_step(images, 0).unique().tolist()) <= {0, 1}


# ------------------------------------------------------------------------- pretrained weights, offline
VOC_UNET = Path(__file__).resolve().parents[1] / "configs" / "segmentation" / "voc_unet.yaml"
WEIGHTS_NULL = "--model.init_args.backbone_kwargs.encoder_kwargs.weights"


def _voc_unet(tmp_path, *extra: str):
    from lightning_convnets.cli import ConvNetsCLI

    return ConvNetsCLI(
        args=["--config", str(VOC_UNET), f"--data.init_args.root={tmp_path}", "--trainer.logger=false", *extra],
        run=False,
    )


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No cached weights, and every download fails as it does without a network."""
    import urllib.error

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def unreachable(url, *args, **kwargs):
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)


def test_voc_unet_as_shipped_offline_says_in_one_line_that_the_weights_could_not_be_downloaded(tmp_path, offline):
    from lightning_convnets.backbones.weights import WeightsDownloadError

    with pytest.raises((ValueError, WeightsDownloadError)) as caught:  # (jsonargparse wraps it: ValueError)
        _voc_unet(tmp_path)
    error = caught.value
    while not isinstance(error, WeightsDownloadError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, WeightsDownloadError), caught.value
    message = str(error)
    assert "\n" not in message and "could not be downloaded" in message and "Network is unreachable" in message
    assert f"{WEIGHTS_NULL}=null" in message  # how to train from scratch
    assert error.__cause__ is None and error.__suppress_context__  # no urllib traceback chained under it
    # and the option it names works, offline
    cli = _voc_unet(tmp_path, f"{WEIGHTS_NULL}=null")
    assert cli.model.backbone.encoder.weights is None


@pytest.mark.parametrize("form", ["dotted", "dict"])
def test_weights_null_on_the_command_line_trains_from_scratch(tmp_path, offline, form):
    # the config's comment: "null trains from scratch"
    extra = [WEIGHTS_NULL, "null"] if form == "dotted" else ["--model.init_args.backbone_kwargs.encoder_kwargs", "{weights: null}"]
    cli = _voc_unet(tmp_path, *extra)
    assert cli.model.backbone.encoder.weights is None and cli.model.backbone.encoder.mean is None


def test_jsonargparse_still_turns_a_nested_null_into_the_string_none():
    # ConvNetTask maps backbone_kwargs' "None" strings back to None (backbones.registry.none_strings_to_none) because of
    # this; when it fails, jsonargparse keeps the None and the adapter can go
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(_KwargsHolder, "model")
    parsed = parser.parse_args(
        [f"--model={__name__}._KwargsHolder", "--model.options={a: {w: x}}", "--model.options.a.w", "null"]
    )
    assert parsed.model.init_args.options == {"a": {"w": "None"}}


class _KwargsHolder:
    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = options


# ---------------------------------------------------------------- training metrics without host reads
def test_classification_metrics_equal_torchmetrics():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

    from lightning_convnets.metrics import ClassificationMetrics

    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        k = int(torch.randint(2, 12, (1,), generator=g))
        ours = ClassificationMetrics(k, top_k=5 if k > 5 else None)
        acc, f1 = MulticlassAccuracy(k, average="micro"), MulticlassF1Score(k, average="macro")
        top5 = MulticlassAccuracy(k, top_k=5, average="micro") if k > 5 else None
        for _ in range(3):
            n = int(torch.randint(1, 20, (1,), generator=g))
            scores, target = torch.randn(n, k, generator=g), torch.randint(0, max(1, k - 2), (n,), generator=g)
            for metric in (ours, acc, f1, *([top5] if top5 else [])):
                metric.update(scores, target)
        got = ours.compute()
        torch.testing.assert_close(got["acc"], acc.compute())
        torch.testing.assert_close(got["f1"], f1.compute())  # classes absent from both left out of the mean
        if top5 is not None:
            torch.testing.assert_close(got["acc_top5"], top5.compute())
        else:
            assert "acc_top5" not in got
    with pytest.raises(ValueError, match=r"expected scores \(N, 3\) and targets \(N,\)"):
        ClassificationMetrics(3).update(torch.zeros(2, 4), torch.zeros(2))


def test_batch_mean_weights_batches_and_leaves_nan_out_as_mean_metric_did():
    from torchmetrics import MeanMetric

    from lightning_convnets.metrics import BatchMean

    ours, theirs = BatchMean(), MeanMetric()
    for value, n in ((1.0, 4), (float("nan"), 8), (3.0, 2)):
        ours.update(torch.tensor(value), n)
    for value, n in ((1.0, 4), (3.0, 2)):
        theirs.update(torch.tensor(value), n)
    assert float(ours.compute()) == pytest.approx(float(theirs.compute())) == pytest.approx(5 / 3)


def test_classifier_training_metrics_skip_the_input_checks_and_evaluation_keeps_them():
    from lightning_convnets.metrics import ClassificationMetrics

    model = ImageClassifier(TinyNet(), num_classes=7)
    assert isinstance(model.metrics["train_"], ClassificationMetrics) and model.metrics["train_"].top_k == 5
    assert all(m.validate_args for m in model.metrics["val_"].values())
    multilabel = ImageClassifier(TinyNet(), num_classes=3, multilabel=True)
    assert not any(m.validate_args for m in multilabel.metrics["train_"].values())


def test_the_console_command_offline_prints_one_line_and_exits_1(tmp_path, offline, capsys):
    from lightning_convnets.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["fit", "--config", str(VOC_UNET), f"--data.init_args.root={tmp_path}", "--trainer.logger=false"])
    assert exited.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "could not be downloaded" in err[0], err
    assert f"{WEIGHTS_NULL}=null" in err[0]
