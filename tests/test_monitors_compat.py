"""The three monitors in other people's projects: a compatibility matrix, run strict.

Every row is a LightningModule written the way someone else would write it (none of this project's
tasks or backbones), trained a few steps twice: without the monitors and with all three at their
defaults (``strict=True``: the suite's environment makes every monitor strict). The weights after
training must be bit-identical, and each monitor must have logged its metrics (or, where the model gives
it nothing to measure, said so in one ``info`` row). Then the guard itself: a monitor that breaks is
switched off with one warning and an ``error`` row, and training still ends bit-identical.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from lightning_convnets.callbacks import (
    ActivationVarianceMonitor,
    BatchNormDriftMonitor,
    GradientShatteringMonitor,
    MonitorCallback,
)
from lightning_convnets.callbacks.diagnosis import diagnosis_for
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from ddp_utils import CPU_DDP, QUIET, ddp_hygiene, dump, load_ranks, logged, rank

ddp_env = pytest.importorskip("ddp_utils").ddp_env  # the fixture, for the DDP row


class MemoryLogger(Logger):
    """Keeps every logged key (any logger would do; this one needs no files)."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: set[str] = set()
        self.values: dict[str, list[float]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.keys.add(key)
            self.values.setdefault(key, []).append(float(value))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def monitors() -> list[MonitorCallback]:
    """All three at their defaults (strict through the suite's environment)."""
    return [ActivationVarianceMonitor(), BatchNormDriftMonitor(), GradientShatteringMonitor()]


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@dataclass
class Outcome:
    state: dict[str, Tensor]
    logger: MemoryLogger
    callbacks: list[MonitorCallback]


def fit(make_model, make_data, callbacks, tmp_path: Path, compile_backend: str | None = None, **trainer_kw):
    if compile_backend:
        # dynamo does not guard on module hooks: a graph traced in an earlier fit of this process (without
        # the monitors' hooks) would be reused. A fresh process starts empty; so does this.
        torch._dynamo.reset()
    pl.seed_everything(0, verbose=False)
    model = make_model()
    fitted = torch.compile(model, backend=compile_backend) if compile_backend else model
    logger = MemoryLogger()
    options = dict(max_steps=4, log_every_n_steps=2, accelerator="cpu", devices=1, **QUIET)
    options.update(trainer_kw)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        logger=logger,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=callbacks,
        **options,
    )
    trainer.fit(fitted, make_data())
    return Outcome(_state(model), logger, callbacks)


def assert_same_training_and_logged(make_model, make_data, tmp_path, expect_bn=True, **kw) -> Outcome:
    """The matrix's assertion: bit-identical weights with and without the monitors, and metrics logged."""
    bare = fit(make_model, make_data, [], tmp_path / "bare", **kw)
    watched = fit(make_model, make_data, monitors(), tmp_path / "watched", **kw)
    assert bare.state.keys() == watched.state.keys()
    for key, value in bare.state.items():
        assert torch.equal(value, watched.state[key]), f"{key} differs with the monitors attached"
    keys = watched.logger.keys
    bn = watched.callbacks[1]
    assert all(cb.failure is None for cb in watched.callbacks), [cb.failure for cb in watched.callbacks]
    assert any(k.startswith("activation_variance/") and k.endswith("/var") for k in keys), sorted(keys)
    assert math.isfinite(watched.logger.values["shattering/lag1"][0]), watched.logger.values
    if expect_bn:
        assert any(k.startswith("batchnorm/") and k.endswith("/z_shift") for k in keys), sorted(keys)
    else:
        assert not bn.active and not any(k.startswith("batchnorm/") for k in keys)
        assert [n.severity for n in bn.notes] == ["info"] and "no BatchNorm" in bn.notes[0].message
        assert not bn._handles  # no work per step
    return watched


# --------------------------------------------------------------------------------------------------
# Networks written the usual ways
# --------------------------------------------------------------------------------------------------


class UserBlock(nn.Module):
    """A residual block that adds with ``+`` (no ResidualAdd), BN inside."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


def user_cnn(num_classes: int = 3, channels: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        UserBlock(channels),
        UserBlock(channels),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, num_classes),
    )


def images(n: int = 16, size: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, y


def tuple_loader(batch_size: int = 4) -> DataLoader:
    x, y = images()
    return DataLoader(list(zip(x, y)), batch_size=batch_size)


class NoForward(pl.LightningModule):
    """The network lives in ``self.net``; ``training_step`` calls it; no ``forward()``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = user_cnn()
        self.loss = nn.CrossEntropyLoss()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


@dataclass
class ModelOutput:  # what HF-style models return
    logits: Tensor
    hidden: Tensor


class DictIO(pl.LightningModule):
    """Dict batches (``pixel_values``/``labels``) in, a dict out."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = user_cnn(num_classes=8)
        self.head = nn.Linear(8, 3)

    def forward(self, pixel_values: Tensor) -> dict[str, Tensor]:
        features = self.backbone(pixel_values)
        return {"features": features, "logits": self.head(F.relu(features))}

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["pixel_values"])["logits"], batch["labels"])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def dict_loader() -> DataLoader:
    x, y = images()
    return DataLoader([{"pixel_values": a, "labels": b, "id": i} for i, (a, b) in enumerate(zip(x, y))], 4)


class DataclassOutput(NoForward):
    """A forward that returns an object with ``.logits`` (HF's ModelOutput style)."""

    def forward(self, x: Tensor) -> ModelOutput:
        return ModelOutput(logits=self.net(x), hidden=x.mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss(self(x).logits, y)


class TinyGAN(pl.LightningModule):
    """Manual optimization with two optimizers; ``forward(z)`` samples images; batches are real images."""

    def __init__(self, latent: int = 8) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.latent = latent
        self.generator = nn.Sequential(nn.Linear(latent, 3 * 16 * 16), nn.Tanh(), nn.Unflatten(1, (3, 16, 16)))
        self.discriminator = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.LeakyReLU(0.2),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 1),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.generator(z)

    def training_step(self, batch, batch_idx):
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], self.latent, generator=None)
        fake = self(z)
        ones = torch.ones(real.shape[0], 1)
        zeros = torch.zeros(real.shape[0], 1)
        d_loss = F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
        d_loss = d_loss + F.binary_cross_entropy_with_logits(self.discriminator(fake.detach()), zeros)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def configure_optimizers(self):
        return (
            torch.optim.Adam(self.generator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
            torch.optim.Adam(self.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
        )


class TimmTransformer(pl.LightningModule):
    """A small ViT from timm: LayerNorm only, no BatchNorm, no conv blocks."""

    def __init__(self) -> None:
        super().__init__()
        timm = pytest.importorskip("timm")
        self.model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=16,
            patch_size=4,
            embed_dim=16,
            depth=2,
            num_heads=2,
            num_classes=3,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class TorchvisionDetector(pl.LightningModule):
    """A torchvision FCOS with a small BN backbone: list batches, a loss dict in training, detections in
    eval."""

    def __init__(self) -> None:
        super().__init__()
        detection = pytest.importorskip("torchvision.models.detection")
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        backbone.out_channels = 16
        backbone.out_channels = 32  # FCOS's head uses GroupNorm(32)
        backbone.append(nn.Conv2d(16, 32, 1))
        anchors = AnchorGenerator(sizes=((8,),), aspect_ratios=((1.0,),))
        self.model = detection.FCOS(
            backbone, num_classes=3, min_size=32, max_size=32, anchor_generator=anchors, score_thresh=0.0
        )

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        return self.model(images, targets)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        losses = self(images, targets)
        return sum(losses.values())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def detection_loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(8):
        image = torch.rand(3, 32, 32, generator=gen)
        box = torch.tensor([[4.0, 4.0, 20.0, 20.0]])
        samples.append((image, {"boxes": box, "labels": torch.tensor([1])}))
    return DataLoader(samples, batch_size=2, collate_fn=lambda b: tuple(map(list, zip(*b))))


class Plain(NoForward):
    """With a forward, for precision/accumulation/compile rows."""

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# --------------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------------


def test_no_forward_module_is_probed_through_its_network(tmp_path):
    watched = assert_same_training_and_logged(NoForward, tuple_loader, tmp_path)
    assert watched.callbacks[2].network_name == "net"
    # blocks that add with "+" and declare no residual_branch: per-layer statistics of the conv layers
    assert [t.name for t in watched.callbacks[0].targets][:2] == ["net.0", "net.3.conv1"]


def test_dict_batches_and_dict_outputs(tmp_path):
    watched = assert_same_training_and_logged(DictIO, dict_loader, tmp_path)
    assert watched.callbacks[2].network_name == ""  # its own forward takes pixel_values
    assert watched.callbacks[2].start.shape == (3, 16, 16)


def test_dataclass_outputs_with_logits(tmp_path):
    assert_same_training_and_logged(DataclassOutput, tuple_loader, tmp_path)


def test_manual_optimization_with_two_optimizers(tmp_path):
    watched = assert_same_training_and_logged(TinyGAN, tuple_loader, tmp_path)
    # forward(z) does not take images, the generator neither: the discriminator is the network probed
    assert watched.callbacks[2].network_name == "discriminator"


def test_timm_transformer_without_batchnorm(tmp_path):
    watched = assert_same_training_and_logged(TimmTransformer, tuple_loader, tmp_path, expect_bn=False)
    assert {t.kind for t in watched.callbacks[0].targets} == {"layer"}  # per-layer statistics


class FunctionalActivations(pl.LightningModule):
    """Activations written as ``F.relu`` calls, no activation module anywhere: the usual tutorial style."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.conv1(x)))
        return self.head(F.relu(self.conv2(x)).mean((2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_functional_activations_get_one_row_saying_units_are_not_counted(tmp_path):
    # four steps logged every two: the hooks are attached on several recorded steps, the row is said once
    watched = assert_same_training_and_logged(FunctionalActivations, tuple_loader, tmp_path)
    activation = watched.callbacks[0]
    assert activation.active and activation.failure is None
    (note,) = activation.notes
    assert note.severity == "info" and "F.relu" in note.message and "FunctionalActivations" in note.message
    assert "nn.ReLU(inplace=True)" in note.suggestion
    # a network with activation modules counts its units and gets no such row
    modules = fit(Plain, tuple_loader, monitors(), tmp_path / "modules")
    assert modules.callbacks[0].notes == []
    assert any(k.endswith("/dead_fraction") for k in modules.logger.keys), sorted(modules.logger.keys)


def test_torchvision_detector_with_list_batches(tmp_path):
    watched = assert_same_training_and_logged(TorchvisionDetector, detection_loader, tmp_path, max_steps=2)
    assert watched.callbacks[2].start.shape == (3, 32, 32)


def test_bf16_mixed_with_gradient_accumulation(tmp_path):
    assert_same_training_and_logged(
        Plain, tuple_loader, tmp_path, precision="bf16-mixed", accumulate_grad_batches=2
    )


def test_compiled_module(tmp_path):
    assert_same_training_and_logged(Plain, tuple_loader, tmp_path, compile_backend="aot_eager")


# --------------------------------------------------------------------------------------------------
# Two DDP ranks
# --------------------------------------------------------------------------------------------------


class FinalState(pl.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        dump(self.folder, "state", _state(pl_module))


def test_two_ddp_ranks(tmp_path, ddp_env):
    from lightning.pytorch.loggers import CSVLogger

    def run(folder: Path, callbacks: list) -> None:
        with ddp_hygiene():
            pl.seed_everything(0, verbose=False)
            trainer = pl.Trainer(
                default_root_dir=folder,
                logger=CSVLogger(folder, name="logs"),
                enable_checkpointing=False,
                limit_val_batches=0,
                max_steps=4,
                log_every_n_steps=2,
                callbacks=[*callbacks, FinalState(folder)],
                **CPU_DDP,
                **QUIET,
            )
            trainer.fit(NoForward(), tuple_loader())

    run(tmp_path / "bare", [])
    run(tmp_path / "watched", monitors())
    bare, watched = load_ranks(tmp_path / "bare", "state"), load_ranks(tmp_path / "watched", "state")
    for r in range(2):
        for key, value in bare[r].items():
            assert torch.equal(value, watched[r][key]), f"rank {r}: {key} differs with the monitors"
    assert logged(tmp_path / "watched", "shattering/lag1")
    assert logged(tmp_path / "watched", "activation_variance/net.0/var")
    assert logged(tmp_path / "watched", "batchnorm/net.1/z_shift")
    assert rank() == 0  # the parent is no rank of its own


# --------------------------------------------------------------------------------------------------
# A user's own LightningCLI script
# --------------------------------------------------------------------------------------------------


class UserData(pl.LightningDataModule):
    """A user's data module (tuple batches)."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return tuple_loader(self.batch_size)


class UserModel(NoForward):
    """A user's model for the CLI (a constructor argument, so the CLI has something to parse)."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr


def test_user_lightning_cli_with_the_three_monitors(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    args = [
        "fit",
        "--trainer.max_steps=4",
        "--trainer.log_every_n_steps=2",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.callbacks+=lightning_convnets.callbacks.ActivationVarianceMonitor",
        "--trainer.callbacks+=lightning_convnets.callbacks.BatchNormDriftMonitor",
        "--trainer.callbacks+=lightning_convnets.callbacks.GradientShatteringMonitor",
        "--trainer.callbacks.every_n_steps=2",
    ]
    cli = LightningCLI(UserModel, UserData, args=args, save_config_kwargs={"overwrite": True})
    used = [cb for cb in cli.trainer.callbacks if isinstance(cb, MonitorCallback)]
    assert sorted(type(cb).__name__ for cb in used) == [
        "ActivationVarianceMonitor",
        "BatchNormDriftMonitor",
        "GradientShatteringMonitor",
    ]
    assert all(cb.history and cb.failure is None for cb in used)
    assert next(cb for cb in used if isinstance(cb, GradientShatteringMonitor)).every_n_steps == 2
    assert (Path(cli.trainer.log_dir) / "diagnosis.md").exists()


# --------------------------------------------------------------------------------------------------
# The guard
# --------------------------------------------------------------------------------------------------


class Exploding(ActivationVarianceMonitor):
    """A monitor with a bug in its per-batch code (raises at the second training batch)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:
            raise RuntimeError("boom")
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class _RaisingCounts(list):
    def __getitem__(self, index):
        raise ValueError("bad hook")


class BadHook(BatchNormDriftMonitor):
    """A monitor whose forward hook raises inside the user's forward: its per-layer bookkeeping breaks in
    the hook's own body (which guards itself: it is registered unwrapped, being on every BN forward)."""

    def _start_batch(self):
        super()._start_batch()
        self._calls = _RaisingCounts(self._calls)


def test_the_guard_switches_a_broken_monitor_off_and_training_goes_on(tmp_path):
    bare = fit(NoForward, tuple_loader, [], tmp_path / "bare")
    broken = [Exploding(strict=False), BadHook(strict=False), GradientShatteringMonitor(strict=False)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = fit(NoForward, tuple_loader, broken, tmp_path / "watched")
    for key, value in bare.state.items():
        assert torch.equal(value, watched.state[key]), key
    exploding, bad_hook, shattering = broken
    assert not exploding.active and not bad_hook.active and shattering.active
    assert "on_train_batch_end raised RuntimeError: boom" in exploding.failure.message
    assert "raised ValueError: bad hook" in bad_hook.failure.message
    assert exploding.failure.severity == "error" and exploding.failure.kind == "monitor_error"
    assert not exploding._handles and not bad_hook._handles  # hooks removed: no work from now on
    mine = [str(w.message) for w in caught if "switched itself off" in str(w.message)]
    assert len(mine) == 2, mine  # once per monitor
    assert any("Exploding" in m and "strict=True" in m for m in mine)
    written = [p.read_text() for p in (tmp_path / "watched").rglob("diagnosis.md")]
    assert len(written) == 1 and written[0].count("switched itself off") == 2


def test_strict_monitors_raise(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        fit(NoForward, tuple_loader, [Exploding(strict=True)], tmp_path)


def test_config_mistakes_raise_in_setup_even_when_not_strict(tmp_path):
    with pytest.raises(ValueError, match=r"module='nope' is not a submodule of NoForward \(children: \['net'"):
        fit(NoForward, tuple_loader, [GradientShatteringMonitor(module="nope", strict=False)], tmp_path)
    with pytest.raises(ValueError, match="no module of NoForward matches"):
        fit(NoForward, tuple_loader, [ActivationVarianceMonitor(names="^nope$", strict=False)], tmp_path)


class TwoNets(NoForward):
    """Two networks that both take the images (e.g. a model and its EMA copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.ema = user_cnn()


def test_ambiguous_network_warns_once_names_the_option_and_steps_aside(tmp_path):
    monitor = GradientShatteringMonitor(strict=False)
    with pytest.warns(UserWarning, match=r"module='net'"):
        fit(TwoNets, tuple_loader, [monitor], tmp_path)
    assert not monitor.active and not monitor.history
    with pytest.raises(ValueError, match=r"2 networks of TwoNets take the batch's inputs \(\['net', 'ema'\]\)"):
        fit(TwoNets, tuple_loader, [GradientShatteringMonitor(strict=True)], tmp_path / "strict")


def test_error_rows_reach_the_diagnosis(tmp_path):
    monitor = Exploding(strict=False)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        callbacks=[monitor, BatchNormDriftMonitor()],
        **QUIET,
    )
    report = diagnosis_for(trainer)
    with pytest.warns(UserWarning, match="switched itself off"):
        trainer.fit(NoForward(), tuple_loader())
    rows = [f for f in report.findings if f.kind == "monitor_error"]
    # raised in on_train_batch_end of the second batch, after its optimizer step: global step 2
    assert len(rows) == 1 and rows[0].monitor == "activation_variance" and rows[0].step == 2
    written = (tmp_path / "diagnosis.md").read_text()
    assert "switched itself off" in written
