"""BatchNormDriftMonitor: batch statistics recovered from the running-stat update (momentum and cumulative,
1d/2d/3d), the z-shift spike at a distribution shift, frozen layers, cross-rank disagreement and sync on
simulated ranks, the Lightning hook order the sync relies on, logging, resume, and that observing changes
nothing."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning_convnets.callbacks import bn_ring
from lightning_convnets.callbacks.batchnorm import BatchNormDriftMonitor
from lightning_convnets.callbacks.bn_ring import BatchNormRing
from lightning_convnets.callbacks.packing import StatsPacker
from lightning_convnets.callbacks.precise_bn import pool_running_stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def _exact_discrepancy(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> dict[str, float]:
    """z-shift / log variance ratio / KL of one batch against the layer's current running statistics,
    computed directly from the input (what the monitor must recover from the update alone)."""
    x = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
    mean_b, var_b = x.mean(1), x.var(1, unbiased=False)
    mean_r, var_r = bn.running_mean.double(), bn.running_var.double()
    z = (mean_b - mean_r) / (var_r + bn.eps).sqrt()
    r = (var_b + bn.eps) / (var_r + bn.eps)
    return {
        "z2": float((z * z).mean()),
        "zmax": float(z.abs().max()),
        "lvr": float(r.log().mean()),
        "kl": float((0.5 * (r - 1 - r.log() + z * z)).mean()),
    }


@pytest.mark.parametrize(
    ("bn", "shape"),
    [
        (nn.BatchNorm1d(3), (16, 3)),
        (nn.BatchNorm1d(3, momentum=None), (8, 3, 5)),
        (nn.BatchNorm2d(3), (4, 3, 6, 6)),
        (nn.BatchNorm2d(3, momentum=None), (4, 3, 6, 6)),
        (nn.BatchNorm3d(3, momentum=0.3), (2, 3, 3, 4, 4)),
        (nn.SyncBatchNorm(3), (4, 3, 6, 6)),  # single process: updates like BatchNorm2d
    ],
    ids=["1d", "1d-cumulative-3d-input", "2d", "2d-cumulative", "3d", "sync"],
)
def test_batch_statistics_recovered_from_the_update_match_the_input(bn, shape):
    gen = torch.Generator().manual_seed(0)
    batches = [2.0 + 3.0 * torch.randn(*shape, generator=gen) + k for k in range(5)]
    reference = copy.deepcopy(bn)
    expected = []
    for x in batches:  # the same forwards on a twin, measured directly
        expected.append(_exact_discrepancy(reference, x))
        reference.train()(x)
    metrics = BatchNormDriftMonitor().measure(nn.Sequential(bn).train(), batches)
    rms_z = math.sqrt(sum(e["z2"] for e in expected) / len(expected))
    assert metrics["0/z_shift"] == pytest.approx(rms_z, rel=1e-4)
    assert metrics["0/z_shift_max"] == pytest.approx(max(e["zmax"] for e in expected), rel=1e-4)
    assert metrics["0/log_var_ratio"] == pytest.approx(
        sum(e["lvr"] for e in expected) / 5, rel=1e-4, abs=1e-6
    )
    assert metrics["0/kl"] == pytest.approx(sum(e["kl"] for e in expected) / 5, rel=1e-4)
    # the running stats the monitor saw are the twin's: nothing was perturbed
    torch.testing.assert_close(bn.running_mean, reference.running_mean)


def test_cumulative_average_stays_accurate_after_many_batches():
    bn = nn.BatchNorm2d(2, momentum=None)
    gen = torch.Generator().manual_seed(1)
    warmup = [torch.randn(4, 2, 4, 4, generator=gen) for _ in range(200)]
    with torch.no_grad():
        for x in warmup:
            bn(x)
    x = 5.0 + torch.randn(4, 2, 4, 4, generator=gen)
    expected = _exact_discrepancy(bn, x)
    metrics = BatchNormDriftMonitor().measure(nn.Sequential(bn), [x])
    # m = 1/201: float32 rounding of the running mean is amplified 201x, still far below what matters
    assert metrics["0/z_shift"] == pytest.approx(math.sqrt(expected["z2"]), rel=1e-3)
    assert metrics["0/log_var_ratio"] == pytest.approx(expected["lvr"], rel=1e-2)


def test_frozen_layers_are_skipped_and_drift_is_measured():
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).train()
    net[3].eval()  # frozen BN inside a training model: no update, nothing to recover
    before = net[1].running_mean.clone(), net[1].running_var.clone()
    gen = torch.Generator().manual_seed(2)
    metrics = BatchNormDriftMonitor().measure(net, [4 + torch.randn(8, 2, 5, 5, generator=gen)] * 3)
    assert "1/z_shift" in metrics and "3/z_shift" not in metrics
    assert metrics["3/mean_drift"] == 0.0 and metrics["3/var_drift"] == 0.0
    mean, var = net[1].running_mean, net[1].running_var
    drift = ((mean - before[0]) ** 2 / (before[1] + 1e-5)).mean().sqrt()
    assert metrics["1/mean_drift"] == pytest.approx(float(drift), rel=1e-5)
    lvr = (((var + 1e-5) / (before[1] + 1e-5)).log() ** 2).mean().sqrt()
    assert metrics["1/var_drift"] == pytest.approx(float(lvr), rel=1e-5)


# ------------------------------------------------------------------------------------------- ranks
def _rank_model(data: torch.Tensor) -> nn.Sequential:
    """A BN whose running statistics are exactly one shard's mean and unbiased variance (momentum 1)."""
    bn = nn.BatchNorm2d(data.shape[1], momentum=1.0)
    bn.train()(data)
    return nn.Sequential(bn)


def _shards(sizes=(6, 10), seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [float(k) + (1 + k) * torch.randn(n, 3, 4, 4, generator=gen) for k, n in enumerate(sizes)]


def test_pooled_variance_equals_the_variance_of_the_union():
    shards = _shards()
    per_channel = [s.transpose(0, 1).reshape(3, -1).double() for s in shards]
    means = torch.stack([p.mean(1) for p in per_channel])
    variances = torch.stack([p.var(1) for p in per_channel])
    counts = torch.tensor([float(p.shape[1]) for p in per_channel])
    union = torch.cat(per_channel, 1)
    mean, var = pool_running_stats(means, variances, counts)
    torch.testing.assert_close(mean, union.mean(1))
    torch.testing.assert_close(var, union.var(1))  # unbiased: the n-1 correction is exact
    # without counts: mean(var_k) + var_pop(mean_k), the large-n limit
    _, limit = pool_running_stats(means, variances)
    torch.testing.assert_close(limit, variances.mean(0) + means.var(0, unbiased=False))
    with pytest.raises(ValueError, match="ranks, channels"):
        pool_running_stats(means[0], variances[0])


class FakeStrategy:
    def __init__(self, others: list[torch.Tensor]):
        self.others = others
        self.calls = 0

    def all_gather(self, tensor):
        self.calls += 1
        return torch.stack([tensor, *self.others])


def _fake_trainer(others, world=2):
    return SimpleNamespace(
        world_size=world, global_step=7, strategy=FakeStrategy(others), is_global_zero=False
    )


@pytest.mark.parametrize("mode", ["pooled", "broadcast"])
def test_sync_on_simulated_ranks(mode):
    shards = _shards()
    models = [_rank_model(s) for s in shards]
    monitors = [BatchNormDriftMonitor(sync=mode) for _ in models]
    for monitor, model, shard in zip(monitors, models, shards):
        monitor.attach(None, model)
        monitor._allocate()
        monitor._elements = [shard.numel() // 3]  # what the pre-hook records on a training forward
    payloads = [m.sync_payload() for m in monitors]
    spread_before = [m.apply_sync(torch.stack(payloads), step=7) for m in monitors]
    stats = [(m[0].running_mean.clone(), m[0].running_var.clone()) for m in models]
    torch.testing.assert_close(stats[0], stats[1], rtol=0, atol=0)  # identical on every rank
    union = torch.cat([s.transpose(0, 1).reshape(3, -1) for s in shards], 1).double()
    if mode == "pooled":
        torch.testing.assert_close(stats[0][0].double(), union.mean(1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stats[0][1].double(), union.var(1), rtol=1e-6, atol=1e-6)
    else:
        first = shards[0].transpose(0, 1).reshape(3, -1)
        torch.testing.assert_close(stats[0][0], first.mean(1))
        torch.testing.assert_close(stats[0][1], first.var(1))
    # the spread before the sync: shard means 0 and 1, so the worst channel is well above zero
    assert spread_before[0] == spread_before[1] > 0.2
    assert monitors[0].syncs == [{"step": 7.0, "rank_spread_before": spread_before[0]}]


def test_sync_through_the_trainer_hooks_and_into_the_checkpoint():
    shards = _shards()
    models = [_rank_model(s) for s in shards]
    other = BatchNormDriftMonitor(sync="pooled")
    other.attach(None, models[1])
    other._allocate()
    monitor = BatchNormDriftMonitor(sync="pooled")
    monitor.attach(None, models[0])
    monitor._allocate()
    trainer = _fake_trainer([other.sync_payload()])
    checkpoint = {"state_dict": {k: v.clone() for k, v in models[0].state_dict().items()}}
    monitor.on_save_checkpoint(trainer, None, checkpoint)
    assert trainer.strategy.calls == 0  # nothing trained since the last sync: no collective
    monitor._dirty = True
    monitor.on_save_checkpoint(trainer, None, checkpoint)
    assert trainer.strategy.calls == 1 and not monitor._dirty
    # no batch elements recorded (no training forward): equal weights, the large-n limit
    _, limit = pool_running_stats(
        torch.stack([s.mean((0, 2, 3)) for s in shards]),
        torch.stack([s.transpose(0, 1).reshape(3, -1).var(1) for s in shards]),
    )
    torch.testing.assert_close(models[0][0].running_var.double(), limit, rtol=1e-6, atol=1e-6)
    # Lightning collected the state dict before on_save_checkpoint: the synced values must be written in
    torch.testing.assert_close(checkpoint["state_dict"]["0.running_var"], models[0][0].running_var)
    monitor._dirty = True
    monitor.on_save_checkpoint(_fake_trainer([], world=1), None, checkpoint)
    assert monitor._dirty  # single process: nothing to sync


def test_cross_rank_disagreement_on_simulated_ranks():
    gen = torch.Generator().manual_seed(4)
    models, monitors = [], []
    for rank in range(3):
        bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(4, generator=gen) * (rank + 1) * 0.1)
            bn.running_var.uniform_(0.5, 2.0, generator=gen)
        models.append(nn.Sequential(bn))
        monitor = BatchNormDriftMonitor(cross_rank=True)
        monitor.attach(None, models[-1])
        monitor._allocate()
        monitor._elements = [64]
        monitors.append(monitor)
    rows = []
    for monitor, model in zip(monitors, models):
        packer = StatsPacker()
        monitor.pack(None, model, packer)
        rows.append(packer.flat())
    stats = packer.unpack(torch.stack(rows))
    metrics = monitors[0].compute_metrics(None, models[0], stats)
    means = torch.stack([m[0].running_mean for m in models]).double()
    variances = torch.stack([m[0].running_var for m in models]).double()
    var_r = variances.mean(0) + 1e-5
    across = means.var(0)  # unbiased over the 3 ranks
    assert metrics["0/rank_spread"] == pytest.approx(float((across / var_r).mean().sqrt()), rel=1e-6)
    floor = var_r * (0.1 / 1.9) / 64  # EMA with m = 0.1 over batches of 64 elements per channel
    assert metrics["0/rank_noise_ratio"] == pytest.approx(float((across / floor).mean()), rel=1e-6)
    # the pre-forward snapshots were never written (no forward): identical on all ranks, zero spread
    assert metrics["0/rank_spread_pre"] == 0.0
    assert metrics["rank_spread"] == metrics["0/rank_spread"]
    (finding,) = [f for f in _diagnose_once(monitors[0], metrics) if "ranks disagree" in f.message]
    assert finding.layers == ["0"] and "sync='pooled'" in finding.suggestion


def _diagnose_once(monitor, metrics):
    monitor.history = [{"step": 1.0, **{f"batchnorm/{k}": v for k, v in metrics.items()}}]
    return monitor.diagnose(None, None)


# ------------------------------------------------------------------------------------------- Lightning
class ShiftModule(pl.LightningModule):
    """conv-BN-ReLU-conv-BN on 8x8 inputs with a validation loss (for a monitored checkpoint)."""

    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
        )
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.net(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _shift_loader(n=64, shift_at=32, batch_size=4):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 8, 8, generator=gen)
    images[shift_at:] = 3.0 + 2.0 * images[shift_at:]
    return DataLoader(TensorDataset(images, torch.zeros(n)), batch_size=batch_size)


def _trainer(tmp_path, callbacks, **kw):
    options = dict(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    options.update(kw)
    return pl.Trainer(**options)


def test_z_shift_spikes_at_the_distribution_shift_and_logs_once_per_interval(tmp_path):
    torch.manual_seed(0)
    monitor = BatchNormDriftMonitor(log_every_n_steps=2)
    logger = CSVLogger(tmp_path, name="run", version=0)
    _trainer(tmp_path, [monitor], logger=logger).fit(ShiftModule(lr=0.0), _shift_loader())
    steps = [int(e["step"]) for e in monitor.history]
    assert steps == list(range(2, 17, 2))
    z = [e["batchnorm/net.1/z_shift"] for e in monitor.history]
    # batches 0-7 are N(0, 1), batch 8 on are N(3, 4): the interval holding steps 9-10 spikes
    spike = steps.index(10)
    assert z[spike] > 5 * max(z[1:spike]), z
    assert z[-1] < 0.5 * z[spike]  # the running stats catch up (momentum 0.1)
    assert (
        monitor.history[spike]["batchnorm/net.1/mean_drift"]
        > 5 * monitor.history[1]["batchnorm/net.1/mean_drift"]
    )
    (spiked,) = [f for f in monitor.diagnose(None, None) if "spiked" in f.message]
    assert spiked.step == 10 and spiked.layers[0] == "net.1"
    lines = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()
    column = lines[0].split(",").index("batchnorm/net.1/z_shift")
    logged = [line.split(",") for line in lines[1:] if line.split(",")[column]]
    assert len(logged) == len(steps)  # one row per interval
    assert float(logged[spike][column]) == pytest.approx(z[spike])
    assert list((tmp_path / "run" / "version_0" / "figures").glob("monitors__batchnorm__discrepancy*.png"))


class HookOrder(Callback):
    def __init__(self):
        self.events: list[str] = []

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.events.append("validation_start")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.events.append("save_checkpoint")

    def on_train_epoch_end(self, trainer, pl_module):
        self.events.append("train_epoch_end")


@pytest.mark.parametrize(
    ("interval", "expected"),
    [
        # one validation per epoch: ModelCheckpoint saves in its own on_train_epoch_end, which Lightning
        # calls after the other callbacks' (monitoring callbacks last), so a plain callback's epoch end
        # precedes the save but follows validation
        (1.0, ["validation_start", "train_epoch_end", "save_checkpoint"]),
        # validation inside the epoch: the save happens in on_validation_end
        (
            0.5,
            ["validation_start", "save_checkpoint", "validation_start", "save_checkpoint", "train_epoch_end"],
        ),
    ],
)
def test_lightning_runs_validation_start_before_the_validation_checkpoint(tmp_path, interval, expected):
    # the order the sync relies on (Lightning 2.6): validation start (sync) comes before the validation's
    # checkpoint; on_save_checkpoint (sync again if needed) comes before any file is written
    order = HookOrder()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss")
    loader = _shift_loader(n=16)
    _trainer(tmp_path, [order, checkpoint], enable_checkpointing=True, val_check_interval=interval).fit(
        ShiftModule(), loader, loader
    )
    assert order.events == expected


def test_resume_restores_history(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    first = BatchNormDriftMonitor(log_every_n_steps=4)
    _trainer(tmp_path, [first, checkpoint], max_steps=8, enable_checkpointing=True).fit(
        ShiftModule(), _shift_loader()
    )
    assert [e["step"] for e in first.history] == [4.0, 8.0]
    resumed = BatchNormDriftMonitor(log_every_n_steps=4)
    _trainer(tmp_path, [resumed], max_steps=16).fit(
        ShiftModule(), _shift_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert [e["step"] for e in resumed.history] == [4.0, 8.0, 12.0, 16.0]
    assert resumed.history[:2] == first.history


def test_observing_does_not_change_training(tmp_path):
    def train(callbacks):
        torch.manual_seed(0)
        module = ShiftModule()
        _trainer(tmp_path, callbacks, max_steps=6).fit(module, _shift_loader(n=24))
        return module.state_dict()

    without = train([])
    with_monitor = train([BatchNormDriftMonitor(log_every_n_steps=2, cross_rank=True)])
    assert without.keys() == with_monitor.keys()
    for key, value in without.items():
        assert torch.equal(value, with_monitor[key]), key


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="sync must be"):
        BatchNormDriftMonitor(sync="mean")
    with pytest.raises(ValueError, match="recalibrate_batches"):
        BatchNormDriftMonitor(recalibrate_batches=0)
    with pytest.raises(ValueError, match="var_ratio_threshold"):
        BatchNormDriftMonitor(var_ratio_threshold=1.0)
    with pytest.raises(ValueError, match="no BatchNorm layer"):  # standalone: nothing to return
        BatchNormDriftMonitor().measure(nn.Sequential(nn.Linear(2, 2)), [torch.zeros(1, 2)])


class Tiny(pl.LightningModule):
    """conv-BN-ReLU-conv-BN with a forward (for torch.compile) and a fixed learning rate."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3),
            nn.BatchNorm2d(4, momentum=None),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_bf16_mixed_with_gradient_accumulation(tmp_path):
    module = Tiny()
    inputs = []
    module.net[1].register_forward_pre_hook(
        lambda m, a: inputs.append((a[0].detach().double(), m.running_mean.clone(), m.running_var.clone()))
    )
    monitor = BatchNormDriftMonitor(log_every_n_steps=2)
    trainer = _trainer(tmp_path, [monitor], max_steps=4, precision="bf16-mixed", accumulate_grad_batches=2)
    trainer.fit(module, _shift_loader(n=32))
    assert [e["step"] for e in monitor.history] == [2.0, 4.0]
    assert float(monitor.last_stats["forwards"][0]) == 4  # 2 optimizer steps x 2 micro-batches
    z2 = []
    for x, mean_r, var_r in inputs[4:]:  # BN runs in fp32 under autocast; its input is what the update saw
        mean_b = x.transpose(0, 1).reshape(4, -1).mean(1)
        z2.append(float((((mean_b - mean_r.double()) / (var_r.double() + 1e-5).sqrt()) ** 2).mean()))
    assert monitor.history[-1]["batchnorm/net.1/z_shift"] == pytest.approx(math.sqrt(sum(z2) / 4), rel=1e-4)


def test_compiled_model_aot_eager_matches_eager(tmp_path):
    def history(compile_backend):
        torch._dynamo.reset()
        module = Tiny()
        model = torch.compile(module, backend=compile_backend) if compile_backend else module
        monitor = BatchNormDriftMonitor(log_every_n_steps=1)
        _trainer(tmp_path, [monitor], max_steps=3).fit(model, _shift_loader(n=12))
        return monitor.history

    from torch._dynamo.utils import counters

    compiled = history("aot_eager")
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo traced the forward, pre-hooks included
    eager = history(None)
    assert len(compiled) == len(eager) == 3
    for got, want in zip(compiled, eager):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key


@pytest.mark.parametrize(("shift", "low", "high"), [(0.0, 0.75, 1.3), (0.5, 100.0, math.inf)])
def test_noise_floor_matches_independent_ranks_and_flags_different_data(shift, low, high):
    # ranks averaging i.i.d. batches of 32 elements per channel disagree exactly as much as the floor
    # var_R m / ((2 - m) n) predicts (ratio ~1 once the EMA is stationary); ranks fed shifted data do not
    gen = torch.Generator().manual_seed(5)
    rows, monitors = [], []
    for rank in range(3):
        model = nn.Sequential(nn.BatchNorm1d(128)).train()
        # 50 batches: the EMA's memory of its init has decayed to 0.9^100 (stationary)
        batches = [rank * shift + torch.randn(32, 128, generator=gen) for _ in range(50)]
        monitor = BatchNormDriftMonitor(cross_rank=True)
        monitor.measure(model, batches)
        packer = StatsPacker()
        monitor.pack(None, model, packer)
        rows.append(packer.flat())
        monitors.append(monitor)
    metrics = monitors[0].compute_metrics(None, None, packer.unpack(torch.stack(rows)))
    assert low < metrics["0/rank_noise_ratio"] < high


def test_variance_lag_is_reported_with_advice():
    # running variance still near its init 1 while batches have variance 9: eval would under-normalise 3x
    gen = torch.Generator().manual_seed(6)
    model = nn.Sequential(nn.BatchNorm2d(4, momentum=0.01)).train()
    monitor = BatchNormDriftMonitor()
    metrics = monitor.measure(model, [3 * torch.randn(16, 4, 4, 4, generator=gen) for _ in range(2)])
    assert math.exp(metrics["0/log_var_ratio"]) == pytest.approx(9.0, rel=0.15)
    (lag,) = [f for f in _diagnose_once(monitor, metrics) if "lags" in f.message]
    assert lag.layers == ["0"] and lag.values["variance_factor"] == pytest.approx(9.0, rel=0.15)
    assert "recalibrate" in lag.suggestion


def test_batch_start_snapshot_logs_exactly_what_the_per_layer_copies_log(tmp_path):
    """The fast path (every single-call layer's old statistics copied by the batch's first BN forward,
    in one _foreach_copy_) against the two copies in each layer's pre-hook, on a ResNet-50 whose stem BN
    is called twice per forward (that layer keeps its hook copy): every logged number bit-identical."""
    from lightning_convnets.backbones import create_backbone

    class Twice(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = create_backbone("resnet50", stem="cifar", width=4)
            self.extra = nn.BatchNorm2d(3)
            self.head = nn.Linear(self.net.out_channels[-1], 3)

        def training_step(self, batch, batch_idx):
            x, y = batch
            x = self.extra(self.extra(x))  # a layer called twice per forward
            return nn.functional.cross_entropy(self.head(self.net(x)[-1].mean((2, 3))), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def history(fast: bool) -> tuple[list[dict[str, float]], list[bool]]:
        pl.seed_everything(0, verbose=False)
        monitor = BatchNormDriftMonitor(log_every_n_steps=2)
        if not fast:
            monitor._plan_snapshot = lambda: None  # every layer keeps its pre-hook copy
        x, y = torch.randn(24, 3, 16, 16) * 2 + 1, torch.randint(0, 3, (24,))
        trainer = pl.Trainer(
            max_steps=5, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
            callbacks=[monitor],
        )  # fmt: skip
        trainer.fit(Twice(), DataLoader(list(zip(x, y)), batch_size=2))
        return monitor.history, list(monitor._copy_in_hook)

    (fast, hooked), (slow, _) = history(True), history(False)
    assert hooked[-1] and not any(hooked[:-1])  # the twice-called layer (defined last) keeps its hook copy
    assert len(fast) == len(slow) == 3 and len(fast[0]) > 100
    assert fast == slow


class _ReferenceRing(BatchNormRing):
    """The per-batch arithmetic as it was before the depth-cost work (issue 16): each recorded batch's
    statistics cast to float64, the five quantities stacked per channel and summed per layer with
    ``index_add_``, batch by batch. The ring's fast path must log exactly what this logs."""

    def flush(self) -> None:
        idx = self.layer_index
        for k in range(self.filled):
            old_mean, old_var, new_mean, new_var = self.buffer[k].double()
            called, elements = self.metas[k]
            m = self.momentum_channel
            if self.any_cumulative:
                m = torch.where(self.cumulative_channel, (1.0 / self.nbt[k].clamp_min(1))[idx], m)
            mask = torch.tensor(called, dtype=torch.float64)
            batch_mean = (new_mean - (1 - m) * old_mean) / m
            batch_var_unbiased = ((new_var - (1 - m) * old_var) / m).clamp_min(0)
            factors = [(n - 1) / n if n > 1 else 1.0 for n in elements]
            batch_var = batch_var_unbiased * torch.tensor(factors, dtype=torch.float64)[idx]
            scale = old_var + self.eps
            z = (batch_mean - old_mean) / scale.sqrt()
            ratio = (batch_var + self.eps) / scale
            log_ratio = ratio.log()
            kl = 0.5 * (ratio - 1 - log_ratio + z * z)
            per_channel = torch.stack([z.abs(), z * z, log_ratio, log_ratio.abs(), kl], dim=1)
            per_layer = torch.zeros_like(self.sums).index_add_(0, idx, per_channel) / self.channels[:, None]
            zmax = torch.zeros_like(self.zmax).scatter_reduce_(0, idx, z.abs(), "amax", include_self=True)
            self.sums.add_(per_layer.nan_to_num(nan=0.0) * mask[:, None])
            self.zmax.copy_(torch.maximum(self.zmax, zmax.nan_to_num(nan=0.0) * mask))
            self.forwards.add_(mask)
        self.filled = 0


class _IndexAddRing(BatchNormRing):
    """The per-layer sums as on a GPU (``index_add_``, no ``segment_reduce``)."""

    def __init__(self, modules, size=1):
        super().__init__(modules, size, segment_reduce=False)


class _Reference(BatchNormDriftMonitor):
    ring_class = _ReferenceRing


class _IndexAddPath(BatchNormDriftMonitor):
    ring_class = _IndexAddRing


@pytest.mark.parametrize(
    ("monitor_cls", "ring"),
    [(BatchNormDriftMonitor, 1), (BatchNormDriftMonitor, 3), (BatchNormDriftMonitor, 8), (_IndexAddPath, 3)],
    ids=["segments-ring1", "segments-ring3", "segments-ring8", "index_add-ring3"],
)
def test_per_batch_arithmetic_logs_exactly_what_the_reference_logs_on_a_deep_net(
    tmp_path, monkeypatch, monitor_cls, ring
):
    """Issue 16: the per-batch path (flat buffers, batches recorded into a ring and processed together, one
    segment reduction per quantity on the CPU, index_add_ elsewhere) against the plain per-batch reference
    on a preact ResNet-50 with mixed momenta (one cumulative layer) and a layer left out of some batches:
    every logged number bit-identical. Ring sizes 1, 3 and 8 over 12 steps logged every 5: full rings,
    rings cut short by the logging interval, and batches with different layers run in one ring."""
    from lightning_convnets.backbones import create_backbone

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = create_backbone("preact_resnet50", stem="cifar", width=4)
            self.net.layer2[1].bn1.momentum = None  # cumulative average
            self.net.layer3[0].bn2.momentum = 0.5
            self.side = nn.BatchNorm2d(3)  # runs on even batches only
            self.head = nn.Linear(self.net.out_channels[-1], 3)

        def training_step(self, batch, batch_idx):
            x, y = batch
            if batch_idx % 2 == 0:
                x = self.side(x)
            return nn.functional.cross_entropy(self.head(self.net(x)[-1].mean((2, 3))), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def history(cls: type[BatchNormDriftMonitor]) -> tuple[list[dict[str, float]], int]:
        pl.seed_everything(0, verbose=False)
        monitor = cls(log_every_n_steps=5)
        monitor.ring_cap = ring  # this ring size, whatever the planner would pick for such small inputs
        x, y = torch.randn(48, 3, 16, 16) * 2 + 1, torch.randint(0, 3, (48,))
        x[:4, 0] = 5.0  # a constant channel in the first batch: zero batch variance
        trainer = pl.Trainer(
            max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path, callbacks=[monitor],
        )  # fmt: skip
        trainer.fit(Net(), DataLoader(list(zip(x, y)), batch_size=4))
        return monitor.history, monitor.ring.size

    monkeypatch.setattr(bn_ring, "RING_SHARE", 1e9)
    (fast, size), (reference, _) = history(monitor_cls), history(_Reference)
    assert size == ring
    assert len(fast) == len(reference) == 3 and len(fast[0]) > 100  # steps 5, 10 and the end (12)
    assert fast == reference


def test_stochastic_weight_averaging_replacing_the_buffers_is_followed(tmp_path):
    """Lightning's StochasticWeightAveraging replaces every BN layer's running-statistic tensors and sets
    momentum=None for its extra BN-update epoch: the monitor rebinds to the new tensors and momenta, so the
    z-shift it recovers there matches the z-shift measured directly on the layer's inputs."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)
            self.head = nn.Linear(3, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.head(self.bn(x)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    expected: list[tuple[int, float]] = []  # (epoch, z^2 mean) of every training batch, measured directly

    class Direct(Callback):
        def on_train_start(self, trainer, pl_module):
            def measure(module, args):
                if module.training:
                    expected.append((trainer.current_epoch, _exact_discrepancy(module, args[0])["z2"]))

            pl_module.bn.register_forward_pre_hook(measure)

    pl.seed_everything(0, verbose=False)
    x = torch.randn(32, 3) * 2 + torch.tensor([1.0, -3.0, 5.0])
    y = torch.randint(0, 2, (32,))
    monitor = BatchNormDriftMonitor(log_every_n_steps=4)  # 4 batches per epoch: one interval per epoch
    trainer = pl.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[Direct(), monitor, StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)],
    )  # fmt: skip
    trainer.fit(Net(), DataLoader(TensorDataset(x, y), batch_size=8))
    last_epoch = max(epoch for epoch, _ in expected)
    assert last_epoch == 2  # SWA's extra epoch, with fresh buffers and momentum=None
    assert trainer.lightning_module.bn.momentum is not None  # SWA restored the momentum at the end
    swa_epoch = [z2 for epoch, z2 in expected if epoch == last_epoch]
    assert len(swa_epoch) == 4
    logged = monitor.history[-1]
    assert logged["step"] == trainer.global_step
    assert logged["batchnorm/bn/z_shift"] == pytest.approx(math.sqrt(sum(swa_epoch) / 4), rel=1e-4)


def test_ring_state_resumes_an_open_interval_exactly():
    """BatchNormRing.state_dict mid-interval (a batch still held in the ring), loaded into a fresh ring on a
    copy of the layers: the continued interval's sums, maxima, forwards and drift reference are bit for bit
    those of the uninterrupted ring; a state saved for other layers is refused and changes nothing."""
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 3, 4, 4, generator=gen) * (1 + i) + i for i in range(5)]

    def run(bn, ring, xs):
        for x in xs:
            ring.capture_old()
            bn(x)
            ring.record((True,), (x.numel() // 3,))

    bn = nn.BatchNorm2d(3).train()
    ring = BatchNormRing([bn], size=2)
    ring.start(bn.running_mean.double(), bn.running_var.double())
    run(bn, ring, batches[:3])  # the third batch is still held in the ring
    state = ring.state_dict()
    assert list(state) == ["channels", "sums", "zmax", "forwards", "start_mean", "start_var", "old"]
    assert all(v.device.type == "cpu" for k, v in state.items() if k != "channels") and ring.filled == 0
    twin = copy.deepcopy(bn)
    resumed = BatchNormRing([twin], size=2)
    assert resumed.load_state_dict(state)
    run(bn, ring, batches[3:])
    run(twin, resumed, batches[3:])
    ring.flush(), resumed.flush()
    for name in ("sums", "zmax", "forwards", "start_mean", "start_var"):
        assert torch.equal(getattr(ring, name), getattr(resumed, name)), name
    assert float(resumed.forwards[0]) == 5.0
    other = BatchNormRing([nn.BatchNorm2d(4)])
    assert (
        not other.load_state_dict(state) and float(other.forwards.sum()) == 0.0 and other.start_mean is None
    )
