"""Training steps that do not log make no host synchronisation in the tasks' code.

A ``TorchDispatchMode`` counts the operators that make the host wait for the device (a scalar read:
``.item()``, ``float(t)``, ``bool(t)``, ``if t:``; ops whose output size depends on the data:
``nonzero``, boolean indexing, ``unique``, ``bincount``) from the start of each training batch to the start
of the next, in fits whose ``log_every_n_steps`` is longer than the run (no step logs). On a CPU these
reads cost nothing, but the same code on an accelerator waits for the device at each one. The optimizer
is plain SGD (Adam reads its CPU step counter on the host, which the bare baseline would count too).

``torch.nn.functional.one_hot`` is left out of the count: PyTorch reads the indices' min and max on the
host on a CPU only (on CUDA it relies on a device assert), so it is no sync where one would matter.
"""

from __future__ import annotations

import collections
import math
import traceback
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from lightning_convnets import ImageClassifier, ObjectDetector, SemanticSegmenter

aten = torch.ops.aten
SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), float(t), int(t), bool(t), if t
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,  # boolean indexing, torch.where(cond)
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.bincount.default,  # sizes its output from the largest value
}
STEPS = 6


def _caller(frames: list[traceback.FrameSummary]) -> str:
    """The innermost frame outside torch itself: the line that asked for the op (``lightning_convnets/...``,
    ``torchvision/...``, this file for the bare model)."""
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path:
            tail = path.split("site-packages/")[-1]
            tail = "lightning_convnets/" + tail.split("lightning_convnets/")[-1] if "lightning_convnets/" in tail else tail
            return f"{tail}:{frame.lineno}"
    return "torch"


class SyncCounter(TorchDispatchMode):
    """Counts :data:`SYNC_OPS`, each under the line that asked for it (:func:`_caller`)."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = 0
        self.where: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS and not self.paused:
            self.where[f"{func.__name__} in {_caller(traceback.extract_stack()[:-1])}"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.where.values())


class CountQuietSteps(pl.Callback):
    """Counts from each training batch's start to the next one's (every hook, the backward and the
    optimizer step of a batch included), in a fit where no step logs."""

    def __init__(self) -> None:
        self.mode = SyncCounter()
        self.active = False
        self.steps = 0
        self.module_at_epoch_end: dict[str, Any] = {}

    def _stop(self) -> None:
        if self.active:
            self.mode.__exit__(None, None, None)
            self.active = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._stop()
        self.mode.__enter__()
        self.active = True
        self.steps += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop()
        if not hasattr(pl_module, "stage_loss"):  # the bare model
            return
        # (callbacks run before the task's own hook, which computes and resets the metrics)
        self.module_at_epoch_end = {
            "loss_weight": float(pl_module.stage_loss["train_"].weight),
            "loss": float(pl_module.stage_loss["train_"].compute()),
            "metrics": {k: v.clone() for k, v in pl_module.metrics["train_"].metric_state.items()}
            if isinstance(pl_module.metrics["train_"], torchmetrics.Metric)
            else None,
        }

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop()


@pytest.fixture
def one_hot_not_counted(monkeypatch):
    """``F.one_hot`` runs outside the count (its min/max reads happen on a CPU only)."""
    counters: list[SyncCounter] = []
    original = torch.nn.functional.one_hot

    def one_hot(*args: Any, **kwargs: Any):
        for counter in counters:
            counter.paused += 1
        try:
            return original(*args, **kwargs)
        finally:
            for counter in counters:
                counter.paused -= 1

    monkeypatch.setattr(torch.nn.functional, "one_hot", one_hot)
    return counters


def _quiet_fit(model: pl.LightningModule, loader: DataLoader, counters: list, tmp_path) -> CountQuietSteps:
    counter = CountQuietSteps()
    counters.append(counter.mode)
    trainer = pl.Trainer(
        max_steps=STEPS, log_every_n_steps=10_000, logger=pl.loggers.CSVLogger(tmp_path), callbacks=[counter],
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=True,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, loader)
    assert counter.steps == STEPS and trainer.global_step == STEPS < trainer.log_every_n_steps
    return counter


def _sgd(params):
    return torch.optim.SGD(params, lr=0.01)


def _detection_loader(count: int = 2 * STEPS, empty_box: bool = True) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(count):
        boxes = torch.tensor([[4.0, 4.0, 30.0, 30.0], [20.0, 10.0, 50.0, 60.0], [9.0, 9.0, 9.0, 20.0]])
        n = 3 if empty_box else 2  # the third box has no width (CenterNet's encoding leaves it out)
        items.append((torch.randn(3, 64, 64, generator=g), {"boxes": boxes[:n], "labels": torch.tensor([0, 1, 1])[:n]}))
    return DataLoader(items, batch_size=2, collate_fn=lambda b: ([x for x, _ in b], [t for _, t in b]))


def test_classifier_quiet_steps_make_no_sync(tmp_path, one_hot_not_counted):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4 * STEPS, 3, 32, 32, generator=g), torch.randint(0, 10, (4 * STEPS,), generator=g))
    model = ImageClassifier(
        "preact_resnet18", num_classes=10, backbone_kwargs={"stem": "cifar", "width": 4}, optimizer=_sgd
    )
    run = _quiet_fit(model, DataLoader(data, batch_size=4), one_hot_not_counted, tmp_path)
    assert run.mode.where == {}, run.mode.where
    # the loss and the metrics still counted every example of the epoch
    seen = run.module_at_epoch_end
    assert seen["loss_weight"] == 4 * STEPS and 0 < seen["loss"] < 10
    assert float(model.trainer.callback_metrics["train/loss"]) == pytest.approx(seen["loss"])
    assert 0 <= float(model.trainer.callback_metrics["train/acc_top5"]) <= 1


def test_segmenter_quiet_steps_make_no_sync(tmp_path, one_hot_not_counted):
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 3, (2 * STEPS, 32, 32), generator=g)
    masks[:, :2] = 255  # ignored pixels
    data = TensorDataset(torch.randn(2 * STEPS, 3, 32, 32, generator=g), masks)
    model = SemanticSegmenter("unet", num_classes=3, backbone_kwargs={"width": 4, "depth": 2}, optimizer=_sgd)
    run = _quiet_fit(model, DataLoader(data, batch_size=2), one_hot_not_counted, tmp_path)
    assert run.mode.where == {}, run.mode.where
    confmat = run.module_at_epoch_end["metrics"]["confmat"]
    assert int(confmat.sum()) == 2 * STEPS * 30 * 32  # every pixel but the ignored rows
    assert run.module_at_epoch_end["loss_weight"] == 2 * STEPS


def test_centernet_quiet_steps_make_no_sync(tmp_path, one_hot_not_counted):
    model = ObjectDetector(
        "hourglass", num_classes=2, backbone_kwargs={"num_stacks": 1, "order": 2, "width": 8},
        head_channels=4, optimizer=_sgd,
    )  # fmt: skip
    run = _quiet_fit(model, _detection_loader(), one_hot_not_counted, tmp_path)
    assert run.mode.where == {}, run.mode.where


class _BareDetector(pl.LightningModule):
    """The task's torchvision network in a minimal LightningModule: its loss summed, ``train/loss``
    logged, the targets' labels shifted as the task does (Faster R-CNN's background class)."""

    def __init__(self, detector: torch.nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def training_step(self, batch, batch_idx):
        images, targets = batch
        targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
        loss = sum(self.detector(images, targets).values())
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return _sgd(self.parameters())


def test_fasterrcnn_quiet_steps_sync_only_inside_torchvision(tmp_path, one_hot_not_counted):
    # torchvision's Faster R-CNN syncs by itself (the degenerate-box check, NMS and box sampling in the
    # RPN, the pooler's scale inference): the task adds none on top of the bare network's
    options = {"min_size": 64, "max_size": 64, "fpn_channels": 16, "optimizer": _sgd}
    torch.manual_seed(0)
    model = ObjectDetector("resnet18", family="fasterrcnn", num_classes=2, backbone_kwargs={"width": 8}, **options)
    counted = _quiet_fit(model, _detection_loader(empty_box=False), one_hot_not_counted, tmp_path / "task").mode
    ours = {k: v for k, v in counted.where.items() if "torchvision/" not in k}
    assert ours == {}, ours

    torch.manual_seed(0)
    twin = ObjectDetector("resnet18", family="fasterrcnn", num_classes=2, backbone_kwargs={"width": 8}, **options)
    bare_loader = _detection_loader(empty_box=False)
    bare = _quiet_fit(_BareDetector(twin.detector), bare_loader, one_hot_not_counted, tmp_path / "bare").mode
    assert bare.total > 0, "torchvision's own syncs: the comparison would be vacuous"
    assert counted.total == bare.total, (counted.where, bare.where)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("family", ["centernet", "fasterrcnn"])
def test_training_targets_keep_zero_area_boxes_and_lose_nothing(family):
    # training does not drop zero-area boxes up front (a host read per image): CenterNet's encoding leaves
    # them out, and a torchvision detector that refuses them gets the batch again without them
    torch.manual_seed(0)
    backbone = "hourglass" if family == "centernet" else "resnet18"
    kwargs = {"num_stacks": 1, "order": 2, "width": 8} if family == "centernet" else {"width": 8}
    model = ObjectDetector(
        backbone, family=family, num_classes=2, backbone_kwargs=kwargs, head_channels=4,
        min_size=64, max_size=64, fpn_channels=16,
    ).eval()  # fmt: skip  (eval: the same forward twice; the losses are still computed, below in train)
    images = [torch.randn(3, 64, 64) for _ in range(2)]
    valid = torch.tensor([[4.0, 4.0, 30.0, 30.0], [20.0, 10.0, 50.0, 60.0]])
    empty = torch.tensor([[9.0, 9.0, 9.0, 20.0]])
    with_empty = [{"boxes": torch.cat([valid, empty]), "labels": torch.tensor([0, 1, 1])} for _ in images]
    without = [{"boxes": valid, "labels": torch.tensor([0, 1])} for _ in images]
    calls: list[list[int]] = []
    model.detector.register_forward_pre_hook(
        lambda _m, args: calls.append([len(t["boxes"]) for t in args[1]]) if len(args) > 1 else None
    )
    losses = []
    for targets in (with_empty, without):
        model.train()
        for m in model.modules():  # no batch statistics: the two passes see the same network
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        torch.manual_seed(1)
        loss, *_ = model.shared_step((images, targets), "train")
        losses.append(float(loss))
    if family == "centernet":
        assert losses[0] == pytest.approx(losses[1], rel=1e-6) and losses[0] > 0
    else:  # refused with the empty box, then run without it (proposals are sampled at random: no equality)
        assert calls == [[3, 3], [2, 2], [2, 2]] and math.isfinite(losses[0]) and losses[0] > 0
