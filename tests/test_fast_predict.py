"""fast_predict: trainer.predict runs a BatchNorm-folded copy of the networks, with the unfused results."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from lightning_convnets import ImageClassifier, ObjectDetector, SemanticSegmenter
from lightning_convnets.tasks import base


def _task(kind: str, **kw):
    torch.manual_seed(0)
    if kind == "classifier":
        return ImageClassifier("resnet18", num_classes=3, backbone_kwargs={"stem": "cifar", "width": 4}, **kw)
    if kind == "segmenter":
        return SemanticSegmenter("unet", num_classes=3, backbone_kwargs={"width": 4, "depth": 2, "norm": "batch"}, **kw)
    return ObjectDetector("hourglass", num_classes=2, backbone_kwargs={"width": 8, "num_stacks": 1, "order": 2}, **kw)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the tasks' prediction writers write under the trainer's root


def _predict(task, images):
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir="."
    )
    return trainer.predict(task, DataLoader(images, batch_size=3))


def _bn_count(module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in module.modules())


@pytest.mark.parametrize("kind", ["classifier", "segmenter", "detector"])
def test_predict_runs_the_folded_copy_and_returns_the_unfused_results(kind, monkeypatch):
    images = torch.randn(6, 3, 32, 32)
    slow, fast = _task(kind, fast_predict=False), _task(kind)
    fast.load_state_dict(slow.state_dict())
    for task in (slow, fast):  # BatchNorm statistics that are not the identity
        task.train()
        with torch.no_grad():
            task(list(images) if kind == "detector" else images)
    fast.load_state_dict(slow.state_dict())
    built = []
    original_build = base.ConvNetTask._build_predict_fused
    monkeypatch.setattr(
        base.ConvNetTask,
        "_build_predict_fused",
        lambda self, x: built.append(original_build(self, x)) or built[-1],
    )
    networks_before = {n: m for n, m in fast.named_children()}
    expected, got = _predict(slow, images), _predict(fast, images)
    assert len(built) == 1 and built[0], "the fused copy is built once, at the first batch"
    assert sum(_bn_count(m) for m in built[0].values()) < sum(_bn_count(networks_before[n]) for n in built[0])
    assert dict(fast.named_children()) == networks_before  # the task keeps its own (unfused) networks
    assert fast._predict_fused is None
    for want, have in zip(expected, got):
        if kind == "detector":
            for a, b in zip(want, have):
                assert torch.equal(a["labels"], b["labels"])
                torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=1e-3)
                torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=1e-5)
        elif kind == "segmenter":
            assert (want == have).float().mean() > 0.999  # argmax: only exact ties could flip
        else:
            torch.testing.assert_close(have, want, rtol=0, atol=1e-5)


def test_outputs_that_move_turn_fast_predict_off_with_one_message(monkeypatch):
    images = torch.randn(4, 3, 32, 32)
    task = _task("classifier")
    said = []
    monkeypatch.setattr(base, "same_outputs", lambda a, b, tol: False)
    monkeypatch.setattr(base, "rank_zero_info", said.append)
    probabilities = torch.cat(_predict(task, images))
    messages = [m for m in said if "fast_predict off" in m]
    assert len(messages) == 1 and "changed the outputs of ['backbone'" in messages[0]
    task.eval()
    with torch.no_grad():
        torch.testing.assert_close(probabilities, torch.softmax(task(images), 1))


def test_training_and_manual_calls_never_use_the_copy():
    task = _task("classifier")
    task.eval()
    with task.fused_for_predict(torch.randn(2, 3, 32, 32)):  # outside trainer.predict: a no-op
        assert getattr(task, "_predict_fused", None) is None
