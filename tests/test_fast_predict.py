"""fast_predict: trainer.predict runs a BatchNorm-folded copy of the networks, with the unfused results."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from lightning_convnets import ImageClassifier, ObjectDetector, SemanticSegmenter
from lightning_convnets.tasks import fused_predict


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
    original_build = fused_predict.build_fused_networks
    monkeypatch.setattr(
        fused_predict,
        "build_fused_networks",
        lambda task, x: built.append(original_build(task, x)) or built[-1],
    )
    networks_before = {n: m for n, m in fast.named_children()}
    expected, got = _predict(slow, images), _predict(fast, images)
    assert len(built) == 1 and built[0], "the fused copy is built once, at the first batch"
    assert sum(_bn_count(m) for m in built[0].values()) < sum(_bn_count(networks_before[n]) for n in built[0])
    assert dict(fast.named_children()) == networks_before  # the task keeps its own (unfused) networks
    assert fast.fused_predict_copy.networks is None
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
    monkeypatch.setattr(fused_predict, "outputs_agree", lambda a, b, eps: False)
    monkeypatch.setattr(fused_predict, "rank_zero_info", said.append)
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
        assert task.fused_predict_copy.networks is None


def _shift_batchnorm(task, seed: int = 0):
    """BatchNorm statistics and affine parameters far from the identity (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in task.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.normal_(0, 1, generator=g)
                m.running_var.uniform_(0.05, 3, generator=g)
                m.weight.uniform_(0.5, 2, generator=g)
                m.bias.normal_(0, 0.5, generator=g)
    return task


def _built(monkeypatch) -> list:
    built = []
    original_build = fused_predict.build_fused_networks
    monkeypatch.setattr(
        fused_predict, "build_fused_networks", lambda task, x: built.append((x, original_build(task, x))) or built[-1][1]
    )
    return built


def test_quickstart_network_folds_except_where_a_convolution_output_has_two_readers(monkeypatch):
    # the quickstart's pre-activation ResNet: the stem's output feeds the first block's BatchNorm and its
    # identity shortcut; folding that BN into the stem would change what the shortcut reads (by percents),
    # which turned fast_predict off for the whole network
    torch.manual_seed(0)
    kw = {"num_classes": 4, "backbone_kwargs": {"stem": "cifar", "width": 8}}
    slow = _shift_batchnorm(ImageClassifier("preact_resnet18", fast_predict=False, **kw))
    fast = ImageClassifier("preact_resnet18", **kw)
    fast.load_state_dict(slow.state_dict())
    said = []
    monkeypatch.setattr(fused_predict, "rank_zero_info", said.append)
    built = _built(monkeypatch)
    images = torch.randn(6, 3, 32, 32)
    expected, got = torch.cat(_predict(slow, images)), torch.cat(_predict(fast, images))
    assert not [m for m in said if "fast_predict off" in m], said
    ((_, fused),) = built
    assert isinstance(fused["backbone"].layer1[0].bn1, _BatchNorm)  # the two-reader pair stays unfused
    assert _bn_count(fused["backbone"]) == _bn_count(slow.backbone) - 8  # each of the 8 blocks' conv1 -> bn2
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    fast.eval()
    pairs = fused_predict.runtime_conv_bn_pairs(fast, images[:1])
    assert ("backbone.conv1", "backbone.layer1.0.bn1") in pairs
    readers = fused_predict.conv_output_readers(fast, images[:1])
    assert readers["backbone.conv1"] == 2 and readers["backbone.layer1.0.conv1"] == 1


def test_the_check_runs_on_a_tile_under_tiled_prediction(monkeypatch):
    # a U-Net of depth 5 takes sides that are multiples of 32: the whole 100 x 72 image is not, its tiles are
    torch.manual_seed(0)
    task = _shift_batchnorm(
        SemanticSegmenter("unet", num_classes=3, backbone_kwargs={"width": 4, "depth": 5, "norm": "batch"}, tile_size=64)
    )
    slow = SemanticSegmenter(
        "unet", num_classes=3, backbone_kwargs={"width": 4, "depth": 5, "norm": "batch"}, tile_size=64, fast_predict=False
    )
    slow.load_state_dict(task.state_dict())
    said = []
    monkeypatch.setattr(fused_predict, "rank_zero_info", said.append)
    built = _built(monkeypatch)
    images = torch.randn(2, 3, 100, 72)
    masks, expected = torch.cat(_predict(task, images)), torch.cat(_predict(slow, images))
    assert not [m for m in said if "fast_predict off" in m], said
    ((example, fused),) = built
    assert example.shape == (1, 3, 64, 64) and fused  # one tile window, and the copy was made
    assert masks.shape == (2, 100, 72) and (masks == expected).float().mean() > 0.999


def test_the_tolerance_follows_the_dtype_and_the_outputs_scale():
    eps32, eps64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
    y = torch.linspace(-3, 3, 50)
    assert fused_predict.outputs_agree(y + 3 * 64 * eps32, y, eps32)  # 64 epsilons of the largest value (3)
    assert not fused_predict.outputs_agree(y + 3e-3, y, eps32)  # a wrong fold: 1e-3 of the scale
    y64 = y.double()
    assert not fused_predict.outputs_agree(y64 + 3 * 64 * eps32, y64, eps64)  # float32 rounding is too much in float64
    small = y * 1e-6  # relative to the outputs' own scale (no floor at 1)
    assert not fused_predict.outputs_agree(small + 1e-8, small, eps32) and fused_predict.outputs_agree(small * (1 + 1e-6), small, eps32)
    assert not fused_predict.outputs_agree([y.long()], [y.long() + 1], eps32)  # integers: exact
    assert fused_predict.outputs_agree({"a": [y]}, {"a": [y]}, eps32) and not fused_predict.outputs_agree([y], [y, y], eps32)
