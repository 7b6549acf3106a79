"""Reliability: non-finite training stops with a name (or skips), checkpoints are atomic and load
weights-only, the data module's identity travels in the checkpoint, long runs stay flat.

The kill/resume test of the quickstart is in ``test_resume.py``; bad input in ``test_bad_input.py``.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning_convnets.callbacks import ActivationVarianceMonitor
from lightning_convnets.datamodules import ImageFolderDataModule, ShapesDataModule
from lightning_convnets.datamodules.io import DataValidationError
from PIL import Image

from lightning_convnets.checkpointing import AtomicCheckpointIO, AtomicModelCheckpoint, atomic_torch_save
from lightning_convnets.tasks import ImageClassifier, NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]


def _data(tmp_path: Path, **kwargs) -> ShapesDataModule:
    options = dict(num_train=128, num_val=16, num_test=8, batch_size=16, root=str(tmp_path / "shapes"))
    options.update(kwargs)
    return ShapesDataModule(task="classification", **options)


def _model(lr: float, nonfinite: str = "stop", **kwargs) -> ImageClassifier:
    # No normalisation layers: with BatchNorm a huge learning rate gives huge but finite losses.
    return ImageClassifier(
        "preact_resnet18",
        backbone_kwargs={"stem": "cifar", "width": 4, "norm": "none"},
        num_classes=4,
        lr_scheduler=None,
        optimizer=lambda params: torch.optim.SGD(params, lr=lr),
        nonfinite=nonfinite,
        **kwargs,
    )


def _trainer(tmp_path: Path, callbacks=(), **kwargs) -> Trainer:
    options = dict(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=2,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        enable_checkpointing=any(isinstance(c, AtomicModelCheckpoint) for c in callbacks),
    )
    options.update(kwargs)
    return Trainer(callbacks=list(callbacks), **options)


# ------------------------------------------------------------------------------------------- nonfinite
def test_diverging_run_stops_naming_step_loss_and_module_and_keeps_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    monitor = ActivationVarianceMonitor(sample_every_n_steps=1)
    last = AtomicModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1
    )
    trainer = _trainer(tmp_path, [monitor, last])
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(_model(lr=1e4), _data(tmp_path))
    message = str(info.value)
    step = int(re.search(r"at optimizer step (\d+)", message).group(1))
    assert "loss nan" in message or "loss inf" in message, message
    # The monitor's own detection names the same step, and the error quotes its module.
    assert monitor.nonfinite is not None and monitor.nonfinite["step"] == step, (monitor.nonfinite, message)
    assert repr(monitor.nonfinite["layer"]) in message
    # The checkpoint of the step before is intact and finite: the save after the bad step was refused.
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == step
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_stop_reads_the_flag_only_at_the_logging_interval(tmp_path):
    # The error surfaces at the first logging step after the bad one: no per-step host sync.
    torch.manual_seed(0)
    seen = []

    class Steps(Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(trainer.global_step)

    with pytest.raises(NonFiniteLossError, match=r"at optimizer step 1\b"):
        _trainer(tmp_path, [Steps()], log_every_n_steps=4).fit(_model(lr=1e4), _data(tmp_path))
    assert seen[-1] == 4  # steps 1..3 ran on; the check at step 4 stopped the fit


def test_skip_drops_nonfinite_steps_and_stops_after_k_in_a_row(tmp_path):
    torch.manual_seed(0)
    model = _model(lr=1e4, nonfinite="skip", max_skipped_steps=3)
    with (
        pytest.warns(UserWarning, match="skipped"),
        pytest.raises(NonFiniteLossError, match="3 optimizer steps"),
    ):
        _trainer(tmp_path).fit(model, _data(tmp_path))
    assert model.nonfinite_guard.skipped == 3


class _PoisonOneStep(Callback):
    """Make the loss of one optimizer step NaN (a bad batch), and keep the weights around it."""

    def __init__(self, step: int) -> None:
        self.step, self.before, self.after = step, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.before = {k: v.clone() for k, v in pl_module.state_dict().items()}
            batch[0].fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.step + 1:
            self.after = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_skip_leaves_weights_untouched_on_a_bad_step_and_goes_on(tmp_path):
    torch.manual_seed(0)
    model = _model(lr=0.01, nonfinite="skip")
    poison = _PoisonOneStep(step=3)
    trainer = _trainer(tmp_path, [poison])
    with pytest.warns(UserWarning, match="optimizer step 3 skipped"):
        trainer.fit(model, _data(tmp_path))
    assert trainer.global_step == 8 and model.nonfinite_guard.skipped == 1  # the run finished its 8 steps
    for key, value in poison.before.items():  # no update, no NaN: parameters as before the bad step
        if value.is_floating_point() and "running" not in key and "num_batches" not in key:
            assert torch.equal(value, poison.after[key]), key
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_warn_warns_once_and_trains_on(tmp_path):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"non-finite training loss at optimizer step 1.*nonfinite='warn'"):
        trainer = _trainer(tmp_path)
        trainer.fit(_model(lr=1e4, nonfinite="warn"), _data(tmp_path))
    assert trainer.global_step == 8


def test_nonfinite_option_is_checked():
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        _model(lr=0.1, nonfinite="ignore")
    with pytest.raises(ValueError, match="max_skipped_steps"):
        _model(lr=0.1, max_skipped_steps=0)


# ------------------------------------------------------------------------------------------ safe loading
class Payload:
    """A class the loader does not know: unpickling it would run its ``__reduce__``."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _checkpoint_with_payload(tmp_path: Path) -> Path:
    model = ImageClassifier("resnet18", backbone_kwargs={"width": 4}, num_classes=3)
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": "2.6.0",
        "lightning_convnets": {"num_classes": 3, "extra": Payload()},
    }
    path = tmp_path / "evil.ckpt"
    torch.save(checkpoint, path)
    return path


def test_a_checkpoint_with_a_pickled_object_is_refused_by_our_loading_paths(tmp_path):
    path = _checkpoint_with_payload(tmp_path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ImageClassifier.load_from_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(path)
    # fit(ckpt_path=...) loads through the strategy's CheckpointIO, which AtomicModelCheckpoint installs.
    trainer = _trainer(tmp_path, [AtomicModelCheckpoint(dirpath=tmp_path / "c")], max_steps=1)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        trainer.fit(ImageClassifier("resnet18", backbone_kwargs={"width": 4}, num_classes=3), ckpt_path=path)


def test_our_own_checkpoints_load_weights_only(tmp_path):
    torch.manual_seed(0)
    last = AtomicModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=2
    )
    _trainer(tmp_path, [last], max_steps=4).fit(_model(lr=0.01), _data(tmp_path))
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)  # plain data only
    assert checkpoint["ShapesDataModule"]["class_names"] == ["circle", "square", "triangle", "cross"]
    assert ImageClassifier.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt").num_classes == 4


def test_every_torch_load_of_the_package_is_weights_only():
    offenders = []
    for folder in ("lightning_convnets", "datamodules", "callbacks"):
        for path in (ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"torch\.load\(", line) and "weights_only=True" not in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert offenders == []


# ------------------------------------------------------------------------------------------ atomic writes
_WRITER = """
import sys, torch
from lightning_convnets.checkpointing import AtomicCheckpointIO
AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(int(sys.argv[2]))}}, sys.argv[1])
"""


def test_a_writer_killed_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(8)}, "step": 1}, path)
    before = path.read_bytes()
    # 400 MB of float32: long enough a write to be caught in the middle.
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(100_000_000)], env=dict(os.environ)
    )
    temp = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and writer.poll() is None:
            temps = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
            if temps and temps[0].stat().st_size > 1_000_000:
                temp = temps[0]
                break
            time.sleep(0.005)
        assert temp is not None, "the writer finished before it could be caught writing"
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert temp.stat().st_size < 400_000_000  # it really was killed mid-write
    assert path.read_bytes() == before
    loaded = AtomicCheckpointIO().load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.zeros(8))
    # A later save in that folder succeeds and replaces the file whole; no *.ckpt besides it.
    atomic_torch_save({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 2}
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["last.ckpt"]


def test_atomic_model_checkpoint_installs_the_atomic_io(tmp_path):
    last = AtomicModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=2
    )
    trainer = _trainer(tmp_path, [last], max_steps=2)
    trainer.fit(_model(lr=0.01), _data(tmp_path))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()


# ------------------------------------------------------------------------------------ data module state
def _folder(root: Path, classes: list[str]) -> Path:
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / name / f"{i}.png")
    return root


def test_datamodule_state_restores_the_split_seed_and_refuses_changed_classes(tmp_path):
    root = _folder(tmp_path / "pets", ["cat", "dog"])
    first = ImageFolderDataModule(str(root), image_size=8, seed=3, val_fraction=0.25, test_fraction=0.0)
    first.setup("fit")
    state = first.state_dict()
    assert state["seed"] == 3 and state["class_names"] == ["cat", "dog"]

    again = ImageFolderDataModule(str(root), image_size=8, seed=0, val_fraction=0.25, test_fraction=0.0)
    again.setup("fit")
    with pytest.warns(UserWarning, match="split seed is 3"):
        again.load_state_dict(state)
    assert again.seed == 3
    assert again.val_dataset.samples == first.val_dataset.samples  # the trained model's split

    _folder(root, ["fox"])
    changed = ImageFolderDataModule(str(root), image_size=8, seed=3)
    with pytest.raises(DataValidationError, match=r"class_names \['cat', 'dog'\].*added \['fox'\]"):
        changed.load_state_dict(state)
    reordered = ImageFolderDataModule(str(root / "x"), class_names=["dog", "cat"], seed=3)
    with pytest.raises(DataValidationError, match="same entries, reordered"):
        reordered.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- long run
def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc")
def test_long_run_memory_flat_history_capped_file_descriptors_steady(tmp_path):
    from lightning.pytorch import LightningModule
    from lightning_convnets.callbacks import BatchNormDriftMonitor, GradientShatteringMonitor
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(3, 4, 3, padding=1),
                nn.BatchNorm2d(4),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(4, 2),
            )

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    samples = []

    class Probe(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step % 100 == 0:
                samples.append((trainer.global_step, _rss_bytes(), _open_fds()))

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 8, 8), torch.randint(0, 2, (64,)))
    loader = DataLoader(data, batch_size=2, shuffle=True, num_workers=2, persistent_workers=True)
    cap = 50
    monitors = [
        ActivationVarianceMonitor(log_every_n_steps=5, max_history=cap),
        BatchNormDriftMonitor(log_every_n_steps=5, max_history=cap),
        GradientShatteringMonitor(every_n_steps=50, max_history=cap),
    ]
    steps = 3000
    trainer = Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        callbacks=[*monitors, Probe()],
        log_every_n_steps=5,
    )
    trainer.fit(Tiny(), loader)
    assert trainer.global_step == steps
    for monitor in monitors[:2]:  # 600 flushes each: at the cap (halved past it, then refilled)
        assert len(monitor.history) == cap, (type(monitor).__name__, len(monitor.history))
    assert 0 < len(monitors[2].history) <= cap  # 60 probes: halved once past the cap
    warm = [s for s in samples if s[0] >= 600]  # after warm-up (allocator pools, first epochs of workers)
    x = np.array([s[0] for s in warm], float)
    rss = np.array([s[1] for s in warm], float) / 2**20
    slope = np.polyfit(x, rss, 1)[0] * 1000  # MiB per 1000 steps
    print(
        f"RSS after warm-up: {rss[0]:.1f} -> {rss[-1]:.1f} MiB, slope {slope:.3f} MiB per 1000 steps; "
        f"fds {[s[2] for s in warm][:3]} ... {[s[2] for s in warm][-3:]}"
    )
    assert abs(slope) < 2.0, slope  # a leak of 1 KiB per step would be ~1 MiB per 1000 steps
    assert rss[-1] - rss[0] < 8.0
    fds = [s[2] for s in warm]
    assert max(fds) - min(fds) <= 2, fds


def test_the_fused_nonfinite_check_sees_nan_and_inf_and_leaves_the_gradients_as_they_are():
    from lightning_convnets.tasks.nonfinite import any_nonfinite as _any_nonfinite

    torch.manual_seed(0)
    grads = [torch.randn(3, 4) * 1e30, torch.randn(5), torch.randn(2, 2, 3)]
    before = [g.clone() for g in grads]
    assert not bool(_any_nonfinite(grads))  # huge but finite: no overflow of a norm or a sum
    assert all(torch.equal(a, b) for a, b in zip(grads, before))
    for bad in (float("nan"), float("inf"), -float("inf")):
        grads[2][1, 0, 2] = bad
        assert bool(_any_nonfinite(grads))
        grads[2][1, 0, 2] = 0.0
    mixed = [torch.randn(3, dtype=torch.float64), torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)]
    assert bool(_any_nonfinite(mixed)) and not bool(_any_nonfinite(mixed[:1]))
