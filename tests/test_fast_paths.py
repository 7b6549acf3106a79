"""Fast paths on every task: ``compile`` (in place, checkpoints without ``_orig_mod.``, monitors still
observing), ``channels_last`` on the detector, bf16-mixed on CPU, and fp32 losses under half precision."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_convnets import ImageClassifier, ObjectDetector, SemanticSegmenter
from lightning_convnets.nn.centernet import focal_loss
from lightning_convnets.nn.losses import CrossEntropyDiceLoss, DiceLoss


class _Data(LightningDataModule):
    def __init__(self, kind: str, n: int = 8, size: int = 32) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, size, size, generator=gen)
        self.kind = kind
        if kind == "classification":
            self.targets = torch.randint(0, 3, (n,), generator=gen)
        elif kind == "segmentation":
            self.targets = torch.randint(0, 3, (n, size, size), generator=gen)

    def _loader(self) -> DataLoader:
        if self.kind == "detection":
            boxes = [torch.tensor([[4.0, 4.0, 20.0, 24.0]]) for _ in range(len(self.images))]
            items = [(im, {"boxes": b, "labels": torch.tensor([1])}) for im, b in zip(self.images, boxes)]
            return DataLoader(items, batch_size=4, collate_fn=lambda b: tuple(zip(*b)))
        return DataLoader(TensorDataset(self.images, self.targets), batch_size=4)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()


def _trainer(tmp_path, **kwargs) -> Trainer:
    options = dict(
        accelerator="cpu",
        max_steps=2,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,  # each train/eval switch of a compiled task is one more compilation
    )
    options.update(kwargs)
    return Trainer(**options)


def _classifier(**kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(
        "resnet18",
        num_classes=3,
        backbone_kwargs={"stem": "cifar", "width": 4},
        figure_every_n_epochs=0,
        **kwargs,
    )


def _segmenter(**kwargs) -> SemanticSegmenter:
    torch.manual_seed(0)
    return SemanticSegmenter(
        "unet", num_classes=3, backbone_kwargs={"width": 4, "depth": 2}, figure_every_n_epochs=0, **kwargs
    )


def _detector(**kwargs) -> ObjectDetector:
    torch.manual_seed(0)
    return ObjectDetector(
        "hourglass",
        num_classes=3,
        backbone_kwargs={"num_stacks": 1, "order": 2, "width": 8},
        head_channels=8,
        figure_every_n_epochs=0,
        **kwargs,
    )


AOT = {"backend": "aot_eager"}
EAGER = {"backend": "eager"}  # dynamo capture only: the cheapest real compilation, for the checkpoint tests


def test_compiled_checkpoint_loads_uncompiled_and_back(tmp_path):
    torch._dynamo.reset()
    compiled = _classifier(compile=EAGER)
    trainer = _trainer(tmp_path)
    trainer.fit(compiled, _Data("classification"))
    assert compiled._compiled_call_impl is not None, "compile=... must compile the task in place"
    ckpt = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert not [k for k in state if "_orig_mod" in k]
    plain = ImageClassifier.load_from_checkpoint(ckpt, compile=False).eval()
    compiled.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), compiled(x), rtol=1e-5, atol=1e-5)
    # and the reverse: an uncompiled run's checkpoint into a compiled task
    trainer2 = _trainer(tmp_path)
    trainer2.fit(plain_run := _classifier(), _Data("classification"))
    ckpt2 = tmp_path / "plain.ckpt"
    trainer2.save_checkpoint(ckpt2)
    again = ImageClassifier.load_from_checkpoint(ckpt2, compile=EAGER)
    _trainer(tmp_path, limit_val_batches=1).validate(again, _Data("classification"), verbose=False)
    assert again._compiled_call_impl is not None
    again.eval()
    plain_run.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), plain_run(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make, kind",
    [(_segmenter, "segmentation"), pytest.param(_detector, "detection", marks=pytest.mark.slow)],  # 21 s
)
def test_compile_on_segmenter_and_detector(tmp_path, make, kind):
    torch._dynamo.reset()
    model = make(compile=AOT)
    _trainer(tmp_path).fit(model, _Data(kind))
    target = model.detector if kind == "detection" else model
    assert target._compiled_call_impl is not None
    assert not [k for k in model.state_dict() if "_orig_mod" in k]


def test_monitors_observe_a_compiled_task(tmp_path):
    from lightning_convnets.callbacks import ActivationVarianceMonitor

    torch._dynamo.reset()
    monitor = ActivationVarianceMonitor()
    model = _classifier(compile=AOT)
    _trainer(tmp_path, max_steps=2, callbacks=[monitor]).fit(model, _Data("classification"))
    assert monitor.history, "the monitor recorded nothing under compile"
    values = [v for entry in monitor.history for k, v in entry.items() if k.endswith("/var")]
    assert values and all(torch.isfinite(torch.as_tensor(v)) for v in values)


@pytest.mark.slow
def test_inductor_compile_trains(tmp_path):
    torch._dynamo.reset()
    model = _classifier(compile=True)
    _trainer(tmp_path).fit(model, _Data("classification"))
    assert model._compiled_call_impl is not None


def test_compile_option_is_checked():
    with pytest.raises(TypeError, match="compile must be a bool or a dict"):
        _classifier(compile="yes")
    with pytest.raises(ValueError, match=r"unknown torch.compile arguments \['modee'\]"):
        _classifier(compile={"modee": "max-autotune"})


def test_detector_channels_last(tmp_path):
    model = _detector(channels_last=True)
    _trainer(tmp_path, max_steps=1).fit(model, _Data("detection"))
    convs = [
        m for m in model.detector.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
    ]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)


@pytest.mark.parametrize(
    "make, kind",
    [(_classifier, "classification"), (_segmenter, "segmentation"), (_detector, "detection")],
)
def test_bf16_mixed_trains_every_task_on_cpu(tmp_path, make, kind):
    model = make()
    trainer = _trainer(tmp_path, precision="bf16-mixed")
    trainer.fit(model, _Data(kind))
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss) and loss.dtype == torch.float32


# ------------------------------------------------------------------------- losses in half precision
def test_dice_losses_stay_finite_when_fp16_sums_overflow():
    # 4 x 256 x 256 pixels: each class's probability and one-hot sums reach ~130,000 > 65,504 (fp16 max)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 2, 256, 256, generator=gen)
    target = torch.randint(0, 2, (4, 256, 256), generator=gen)
    for loss in (DiceLoss(), CrossEntropyDiceLoss(), DiceLoss(binary=True)):
        x = logits[:, :1] if loss is not None and getattr(loss, "binary", False) else logits
        assert float(torch.softmax(x.float(), 1).sum((0, 2, 3)).max()) > 65504 or x.shape[1] == 1
        half = loss(x.half(), target)
        full = loss(x, target)
        assert half.dtype == torch.float32
        assert torch.isfinite(half)
        torch.testing.assert_close(half, full, rtol=1e-3, atol=1e-3)


def test_focal_loss_stays_finite_when_fp16_sums_overflow():
    # 4 x 10 x 128 x 128 cells of background loss ~0.17 each: the sum (~110,000) overflows fp16
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, 128, 128, generator=gen) * 0.1
    target = torch.zeros_like(logits)
    target[:, 0, 64, 64] = 1
    half = focal_loss(logits.half(), target.half())
    full = focal_loss(logits, target)
    assert torch.isfinite(half)
    assert float(full) * 4 > 65504  # the un-normalised sum is far beyond fp16's range
    torch.testing.assert_close(half, full, rtol=1e-3, atol=1e-3)
