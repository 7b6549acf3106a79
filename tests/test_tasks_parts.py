"""The concepts around the task core, each on its own: fine-tuning (tasks/finetuning.py), the sample figures
(tasks/samples.py), the fast-predict copy (tasks/fused_predict.py), and the task contract (tasks/base.py:
configure_models / configure_losses / configure_metrics)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torchmetrics import MetricCollection

from lightning_convnets import ImageClassifier, ObjectDetector, SemanticSegmenter
from lightning_convnets.tasks import ConvNetTask
from lightning_convnets.tasks.finetuning import (
    BackboneFreezer,
    check_freeze_options,
    parameter_groups,
    parameter_report,
)
from lightning_convnets.tasks.fused_predict import FusedPredictCopy, swapped_children
from lightning_convnets.tasks.samples import figures_due, first_samples

TINY = {"stem": "cifar", "width": 4}


# ------------------------------------------------------------------------------------ fine-tuning
def test_a_freeze_for_n_epochs_freezes_then_unfreezes_once_each():
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    freezer = BackboneFreezer(2)
    assert [freezer.update(backbone, e) for e in range(4)] == [True, False, True, False]
    assert all(p.requires_grad for p in backbone.parameters()) and not freezer.frozen
    with pytest.raises(ValueError, match="freeze_backbone must be a bool or an epoch count"):
        check_freeze_options(-1, 1.0)
    with pytest.raises(ValueError, match="backbone_lr_mult must be >= 0"):
        check_freeze_options(False, -0.5)


def test_eval_rules_keep_a_frozen_backbone_or_its_batchnorm_in_eval_mode():
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout())
    freezer = BackboneFreezer(freeze_bn=True)
    backbone.train()
    freezer.apply_eval_rules(backbone)
    assert not backbone[1].training and backbone[2].training  # only the BatchNorm
    freezer.set_frozen(backbone, True)
    freezer.apply_eval_rules(backbone)
    assert not backbone[2].training  # the whole frozen backbone
    model = ImageClassifier("preact_resnet18", num_classes=3, backbone_kwargs=TINY, freeze_bn=True).train()
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms) and model.head.training


def test_parameter_groups_and_the_parameter_report():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    groups = parameter_groups(model, model[0], freeze_backbone=False, backbone_lr_mult=0.1)
    assert [(g["name"], len(g["params"]), g["lr_mult"]) for g in groups] == [
        ("head", 2, 1.0),
        ("backbone", 2, 0.1),
    ]
    assert [g["name"] for g in parameter_groups(model, model[0], True, 0.1)] == ["head"]
    stats, line = parameter_report(model)
    assert stats == {"model/params": 13.0, "model/trainable_params": 13.0} and "per training" not in line


# ---------------------------------------------------------------------------------- sample figures
def test_figures_are_due_with_a_logger_every_n_validation_epochs_and_at_every_test():
    class WithLogger:
        loggers = [object()]

    class WithoutLogger:
        loggers: list = []

    assert [figures_due(WithLogger(), "val", 3, e) for e in range(6)] == [
        False,
        False,
        True,
        False,
        False,
        True,
    ]
    assert not figures_due(WithLogger(), "val", 0, 0) and figures_due(WithLogger(), "test", 0, 5)
    assert not figures_due(WithoutLogger(), "test", 1, 0) and not figures_due(None, "test", 1, 0)


def test_first_samples_keeps_tensors_and_detection_lists_on_the_cpu():
    images = [torch.rand(3, 8, 8, dtype=torch.float64) for _ in range(3)]
    preds = [{"boxes": torch.zeros(1, 4, requires_grad=True), "labels": torch.tensor([1])} for _ in range(3)]
    kept_images, kept_preds, kept_target = first_samples(images, preds, None, 2)
    assert len(kept_images) == 2 and kept_images[0].dtype == torch.float32 and kept_target is None
    assert len(kept_preds) == 2 and not kept_preds[0]["boxes"].requires_grad
    masks = torch.zeros(4, 8, 8, dtype=torch.long)
    assert first_samples(torch.rand(4, 1, 8, 8), masks, masks, 3)[2].shape == (3, 8, 8)


# ------------------------------------------------------------------------------------ fast predict
def test_swapped_children_come_back_after_an_exception():
    model = nn.Sequential()
    model.body = nn.Linear(2, 2)
    original = model.body
    with pytest.raises(RuntimeError), swapped_children(model, {"body": nn.Identity()}):
        assert isinstance(model.body, nn.Identity)
        raise RuntimeError("inside")
    assert model.body is original


def test_the_fused_copy_is_built_once_per_run_and_dropped_by_reset():
    model = nn.Sequential()
    model.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    copy = FusedPredictCopy()
    images = torch.rand(2, 3, 8, 8)
    with copy.swapped_in(model, images):
        first = copy.networks
    with copy.swapped_in(model, images):
        assert copy.networks is first and first  # the same copy for the rest of the run
    copy.reset()
    assert copy.networks is None


# ------------------------------------------------------------------------------------ the contract
class _HookTask(ConvNetTask):
    """A task written against the three hooks only."""

    calls: list[str]

    def configure_models(self, num_classes: int) -> None:
        self.calls = ["models"]
        self.head = nn.Linear(self.backbone.out_channels[-1], num_classes)

    def configure_losses(self) -> None:
        self.calls.append("losses")
        self.criterion = nn.CrossEntropyLoss()

    def configure_metrics(self, num_classes: int) -> None:
        self.calls.append("metrics")
        super().configure_metrics(num_classes)  # no metrics: an empty ModuleDict per stage

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images)[-1].mean(dim=(2, 3)))

    def shared_step(self, batch: Any, stage: str):
        images, target = self.unpack_batch(batch)
        logits = self(images)
        return self.criterion(logits, target), None, target, images

    def evaluate_batch(self, batch: Any, batch_idx: int, stage: str) -> None:
        loss, _, _, images = self.shared_step(batch, stage)
        self.stage_loss[f"{stage}_"].update(loss.detach(), images.shape[0])

    def compute_metrics(self, stage: str) -> dict:
        return {}


class _LegacyTask(_HookTask):
    """A task written before the three hooks: build_task alone."""

    def build_task(self, num_classes: int) -> None:
        self.calls = ["build_task"]
        self.head = nn.Linear(self.backbone.out_channels[-1], num_classes)
        self.criterion = nn.CrossEntropyLoss()
        self.metrics = nn.ModuleDict({f"{s}_": MetricCollection({}) for s in ("train", "val", "test")})


@pytest.mark.parametrize("cls", [_HookTask, _LegacyTask])
def test_a_task_of_the_three_hooks_or_of_build_task_trains(cls, tmp_path):
    task = cls("preact_resnet18", num_classes=3, backbone_kwargs=TINY, lr_scheduler=None)
    assert task.calls == (["models", "losses", "metrics"] if cls is _HookTask else ["build_task"])
    data = torch.utils.data.TensorDataset(torch.rand(8, 3, 16, 16), torch.randint(0, 3, (8,)))
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1)  # fmt: skip
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    trainer.fit(task, loader, loader)
    assert trainer.global_step == 2 and "val/loss" in trainer.callback_metrics


def test_a_task_without_configure_models_says_what_to_implement():
    class Bare(ConvNetTask):
        def shared_step(self, batch, stage):  # pragma: no cover - never reached
            raise AssertionError

    with pytest.raises(NotImplementedError, match="Bare must implement configure_models"):
        Bare("preact_resnet18", num_classes=2, backbone_kwargs=TINY)


# --------------------------------------------------------------------------- figures end to end
@pytest.mark.parametrize(
    ("task", "make", "files"),
    [
        (
            "classification",
            lambda: ImageClassifier("preact_resnet18", backbone_kwargs=TINY, num_sample_figures=3),
            ["val__samples", "val__confusion_matrix"],
        ),
        (
            "segmentation",
            lambda: SemanticSegmenter("unet", backbone_kwargs={"width": 4, "depth": 2}, num_sample_figures=2),
            ["val__samples", "masks_overlay"],
        ),
        (
            "detection",
            lambda: ObjectDetector(
                "hourglass",
                backbone_kwargs={"num_stacks": 1, "order": 2, "width": 8},
                head_channels=8,
                num_sample_figures=2,
            ),
            ["val__samples", "boxes_overlay"],
        ),
    ],
)
def test_every_task_draws_its_sample_figure_and_its_writer_overlay(task, make, files, tmp_path):
    from lightning.pytorch.loggers import CSVLogger
    from lightning_convnets.datamodules import ShapesDataModule

    dm = ShapesDataModule(
        task=task,
        root=str(tmp_path / "data"),
        image_size=64,
        num_train=8,
        num_val=4,
        num_test=4,
        batch_size=4,
    )
    model = make()
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0, logger=CSVLogger(tmp_path, name="run"),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, dm)
    trainer.predict(model, dm, return_predictions=False)
    written = {p.stem.split("_step")[0] for p in tmp_path.rglob("*.png")}
    for name in files:
        assert name in written, f"{name} not among {sorted(written)}"
