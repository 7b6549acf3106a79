"""OptimizationMonitor: update/weight ratios per layer and parameter group, gradient norms, loss spikes.

The ratio is checked against a hand computation (plain SGD: ``||lr * g|| / ||W||``), the rules on
synthetic numbers, the monitor on plain LightningModules written the usual ways (automatic and manual
optimization, two optimizers, gradient accumulation, frozen layers, a parameter no optimizer holds), its
cost (no host read on a quiet step), its guard (training bit-identical), its checkpointed state, the CLI
and two DDP ranks.
"""

from __future__ import annotations

import math
import tempfile

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from ddp_utils import ddp_env  # noqa: F401  (a fixture)
from lightning.pytorch.callbacks import Callback
from lightning_convnets.callbacks.core import MonitorConfigError
from lightning_convnets.callbacks.loss_spikes import (
    KIND_LOSS_SPIKE,
    SpikeTail,
    StepRing,
    find_spikes,
    first_jump,
    loss_spike_finding,
    robust_band,
)
from lightning_convnets.callbacks.optimization import (
    KIND_NOT_OPTIMIZED,
    KIND_UPDATE_RATIO_HIGH,
    KIND_UPDATE_RATIO_LOW,
    KIND_UPDATE_RATIO_OK,
    LayerTally,
    OptimizationMonitor,
    update_ratio_findings,
)
from lightning_convnets.callbacks.param_updates import ParamLayout, UpdateMeter
from lightning_convnets.callbacks.update_ratio import lr_rising, ratio_rows
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

QUIET = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}


class Net(pl.LightningModule):
    """A manual ``nn.Sequential`` convnet (no ``forward``), two parameter groups (features, head)."""

    def __init__(self, features_lr: float = 0.02, head_lr: float = 0.02, momentum: float = 0.9) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(4, 3)
        self.lrs, self.momentum = (features_lr, head_lr), momentum

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.head(self.net(x).mean((2, 3))), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        groups = [
            {"params": self.net.parameters(), "lr": self.lrs[0], "name": "features"},
            {"params": self.head.parameters(), "lr": self.lrs[1]},
        ]
        return torch.optim.SGD(groups, lr=0.1, momentum=self.momentum)


def data(n: int = 256, seed: int = 0, size: int = 8, noise: float = 1.0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7))
    labels = torch.randint(0, 3, (n,), generator=gen)
    return TensorDataset(patterns[labels] + noise * torch.randn(n, 3, size, size, generator=gen), labels)


def fit(model, monitor, steps=30, loader=None, tmp_path=None, **kw) -> pl.Trainer:
    torch.manual_seed(0)
    options = {**QUIET, "max_steps": steps, "log_every_n_steps": 10, **kw}
    # never the working directory: the end-of-fit report is written into the run's log folder
    options["default_root_dir"] = tmp_path if tmp_path is not None else tempfile.mkdtemp(prefix="optimization-")
    trainer = pl.Trainer(callbacks=[monitor] if monitor is not None else [], **options)
    trainer.fit(model, loader or DataLoader(data(), batch_size=8))
    return trainer


# --------------------------------------------------------------------------------------------------
# The rules on plain numbers
# --------------------------------------------------------------------------------------------------


def test_robust_band_ignores_one_outlier_and_non_finite_values():
    median, sigma = robust_band([1.0, 1.2, 0.8, 1.0, 1.1, 0.9, 100.0, math.nan, math.inf])
    assert median == pytest.approx(1.0) and sigma == pytest.approx(1.4826 * 0.1, rel=1e-6)
    assert all(math.isnan(v) for v in robust_band([math.nan]))


def test_ratio_rules_flag_only_layers_that_stay_out_and_name_the_group():
    tallies = {
        "conv": LayerTally(20, 20, 0, -7.0 * 20),  # 1e-7 on every judged step
        "fc": LayerTally(20, 0, 19, -0.5 * 20),  # 0.3, 19 of 20 steps above
        "ok": LayerTally(20, 0, 0, -3.0 * 20),
        "outlier": LayerTally(20, 0, 2, -2.0 * 20),  # above on 2 steps only: not "stays"
    }
    found = update_ratio_findings(
        tallies,
        {"features": ["conv", "ok"], "head": ["fc", "outlier"]},
        {"features": 1e-6, "head": 2.0},
        "m",
        10,
    )
    kinds = {f.kind: f for f in found}
    assert set(kinds) == {KIND_UPDATE_RATIO_LOW, KIND_UPDATE_RATIO_HIGH}
    low, high = kinds[KIND_UPDATE_RATIO_LOW], kinds[KIND_UPDATE_RATIO_HIGH]
    assert low.layers == ["conv"] and "features" in low.message and "1e-06" in low.message
    assert "raise" in low.suggestion and "freeze" in low.suggestion
    assert high.layers == ["fc"] and "lower" in high.suggestion and "warmup" in high.suggestion
    assert low.values["ratio"] == pytest.approx(1e-7) and high.severity == "warning"
    quiet = update_ratio_findings({"ok": tallies["ok"]}, {"g": ["ok"]}, {"g": 0.1}, "m", 10)
    assert [f.kind for f in quiet] == [KIND_UPDATE_RATIO_OK] and quiet[0].severity == "info"
    # too few judged steps: nothing said
    assert update_ratio_findings({"conv": LayerTally(2, 2, 0, -14.0)}, {"g": ["conv"]}, {}, "m", 10) == []


def test_the_rules_and_the_arithmetic_keep_their_names_in_the_monitor_module():
    from lightning_convnets.callbacks import optimization, param_updates, update_ratio

    assert all(hasattr(optimization, name) for name in optimization.__all__)
    for name in update_ratio.__all__:
        if hasattr(optimization, name):
            assert getattr(optimization, name) is getattr(update_ratio, name), name
    assert optimization.RATIO_FLOOR == param_updates.RATIO_FLOOR == 1e-12


def test_a_learning_rate_counts_as_rising_only_against_the_same_groups():
    assert lr_rising({0: [0.1, 0.2]}, {0: [0.1, 0.1]}) and not lr_rising({0: [0.1]}, {0: [0.1]})
    assert not lr_rising({0: [0.2]}, {0: [0.1, 0.1]})  # a group added: nothing to compare
    assert not lr_rising({0: [torch.tensor(0.2)]}, {0: [torch.tensor(0.1)]})  # not a float
    assert not lr_rising({1: [0.2]}, {0: [0.1]})  # an optimizer seen for the first time


def test_update_meter_measures_one_sgd_step_per_layer_and_group_and_masks_frozen_parameters():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    net[1].bias.requires_grad_(False)
    opt = torch.optim.SGD(
        [{"params": net[0].parameters(), "lr": 0.1}, {"params": net[1].parameters()}], lr=0.01
    )
    layout = ParamLayout.build([opt], net, torch.device("cpu"))
    assert layout.layer_names == ["0", "1"] and layout.group_names == ["group0", "group1"]
    assert layout.judged_layers() == {"group0": ["0"], "group1": ["1"]} and layout.stray(net) == []
    net(torch.randn(5, 4)).square().sum().backward()
    w = {n: p.detach().clone() for n, p in net.named_parameters()}
    g = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}
    meter = UpdateMeter(layout)
    meter.snapshot(0, step=12)
    opt.step()
    meter.measure(judged=True, low=1e-5, high=1e-1)
    assert meter.pending == {} and meter.step == 12
    tallies: dict[str, LayerTally] = {}
    metrics = meter.read(meter.acc.flatten(), tallies)

    def ratio(names, lr):
        update = math.sqrt(sum(float((lr * g[n]).square().sum()) for n in names))
        return update / math.sqrt(sum(float(w[n].square().sum()) for n in names))

    assert metrics["0/update_ratio"] == pytest.approx(ratio(["0.weight", "0.bias"], 0.1), rel=1e-5)
    assert metrics["1/update_ratio"] == pytest.approx(ratio(["1.weight"], 0.01), rel=1e-5)  # frozen bias out
    assert metrics["param_group/group0/update_ratio"] == pytest.approx(metrics["0/update_ratio"])
    assert tallies["0"].steps == 1 and tallies["0"].above == float(metrics["0/update_ratio"] > 1e-1)
    rows = ratio_rows(layout.layer_names, layout.group_names, layout.judged, tallies, {"0": 2.0})
    norms = [r["grad norm (last interval)"] for r in rows]
    assert norms[0] == 2.0 and math.isnan(norms[1])
    meter.reset()
    assert not meter.acc.any()


def test_spike_found_at_its_step_with_its_size_and_the_layer_that_jumped_first():
    steps = list(range(100, 140))
    losses = [1.0 + 0.05 * math.sin(i) for i in range(40)]
    grads = torch.ones(40, 3) + 0.01 * torch.rand(40, 3, generator=torch.Generator().manual_seed(0))
    grads[27:, 2] *= 30.0  # the head's gradient grows two steps before the loss does
    grads[29:, 0] *= 50.0
    losses[29] = 4.0
    (spike,) = find_spikes(steps, losses, grads, ["conv1", "conv2", "head"], first_new=0)
    assert spike.step == 129 and spike.ratio == pytest.approx(4.0, rel=0.1) and spike.sigmas > 6
    assert spike.jump is not None and (spike.jump.layer, spike.jump.step) == ("head", 127)
    finding = loss_spike_finding(spike, "optimization")
    assert finding.kind == KIND_LOSS_SPIKE and finding.step == 129 and finding.layers == ["head"]
    assert (
        "step 129" in finding.message and "head" in finding.message and "2 step(s) before" in finding.message
    )
    # a non-finite loss is a spike (an error) and the first non-finite gradient is named
    grads[35, 1] = math.inf
    losses[35] = math.nan
    spikes = find_spikes(steps, losses, grads, ["conv1", "conv2", "head"], first_new=30)
    assert [s.step for s in spikes] == [135]
    assert spikes[0].jump.nonfinite and spikes[0].jump.layer == "conv2"
    assert loss_spike_finding(spikes[0], "m").severity == "error"


def test_no_spike_in_noise_a_falling_loss_or_the_first_steps():
    gen = torch.Generator().manual_seed(1)
    noisy = (1 + 0.1 * torch.randn(200, generator=gen)).tolist()
    falling = [2.0 * 0.97**i for i in range(200)]
    for losses in (noisy, falling):
        assert find_spikes(list(range(200)), losses, torch.ones(200, 1), ["a"], 0) == []
    early = [1.0] * 5 + [10.0]  # fewer steps than MIN_BAND before it: not judged
    assert find_spikes(list(range(6)), early, torch.ones(6, 1), ["a"], 0) == []
    assert first_jump(list(range(6)), torch.ones(6, 1), ["a"], at=0) is None


def test_step_ring_keeps_one_row_per_optimizer_step_and_the_tail_its_window():
    ring = StepRing(capacity=3, params=2, device=torch.device("cpu"))
    for step in (0, 0, 1, 2, 3):  # step 0 has two micro-batches; step 3 pushes step 0 out
        ring.begin(step)
        ring.add_loss(torch.tensor(1.0))
    ring.put_grads(0, 0, 2, [torch.tensor(3.0), torch.tensor(4.0)])
    assert [(s, parts) for s, _, parts, _ in ring.rows()] == [(1, 1), (2, 1), (3, 1)]
    assert ring.grads[ring.rows()[-1][1]].tolist() == [3.0, 4.0]
    tail = SpikeTail(keep=2)
    tail.extend([1, 2, 3], [1.0, None, 2.0], torch.ones(3, 4))
    restored = SpikeTail(keep=2)
    restored.load(tail.state())
    assert restored.steps == [2, 3] and restored.losses == [None, 2.0] and restored.grads.shape == (2, 4)


def test_bad_configuration_is_named():
    for kwargs, word in (
        ({"low": 1e-1, "high": 1e-2}, "low"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"spike_sigmas": 0}, "spike_sigmas"),
        ({"spike_window": 3}, "spike_window"),
        ({"sample_every_n_steps": 0}, "sample_every_n_steps"),
    ):
        with pytest.raises(MonitorConfigError, match=word):
            OptimizationMonitor(**kwargs)


# --------------------------------------------------------------------------------------------------
# The monitor in a fit
# --------------------------------------------------------------------------------------------------


class Before(Callback):
    """The weights and gradients of the first optimizer step (plain SGD: ΔW = lr * g)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}


def test_update_ratio_matches_the_hand_computation_per_layer_and_group(tmp_path):
    before, monitor = Before(), OptimizationMonitor(log_every_n_steps=1)
    model = Net(features_lr=0.05, head_lr=0.2, momentum=0.0)
    torch.manual_seed(0)
    trainer = pl.Trainer(
        callbacks=[before, monitor], max_steps=1, log_every_n_steps=1, default_root_dir=tmp_path, **QUIET
    )
    trainer.fit(model, DataLoader(data(), batch_size=8))
    (entry,) = monitor.history
    w, g = before.weights, before.grads

    def ratio(names, lr):
        update = math.sqrt(sum(float((lr * g[n]).square().sum()) for n in names))
        return update / math.sqrt(sum(float(w[n].square().sum()) for n in names))

    assert entry["optimization/net.0/update_ratio"] == pytest.approx(
        ratio(["net.0.weight", "net.0.bias"], 0.05), rel=1e-4
    )
    assert entry["optimization/head/update_ratio"] == pytest.approx(
        ratio(["head.weight", "head.bias"], 0.2), rel=1e-4
    )
    features = [n for n in w if n.startswith("net.")]
    assert entry["optimization/param_group/features/update_ratio"] == pytest.approx(
        ratio(features, 0.05), rel=1e-4
    )
    assert entry["optimization/param_group/group1/lr"] == 0.2
    grad_norm = math.sqrt(float(g["head.weight"].square().sum() + g["head.bias"].square().sum()))
    assert entry["optimization/head/grad_norm"] == pytest.approx(grad_norm, rel=1e-5)


def test_learning_rate_too_low_on_one_group_is_named_and_the_healthy_run_is_quiet():
    low = OptimizationMonitor(log_every_n_steps=10)
    fit(Net(features_lr=1e-7), low)
    loud = [f for f in low.diagnose(None, None) if f.severity != "info"]
    assert [f.kind for f in loud] == [KIND_UPDATE_RATIO_LOW]
    assert set(loud[0].layers) == {"net.0", "net.3"} and "features" in loud[0].message
    healthy = OptimizationMonitor(log_every_n_steps=10)
    fit(Net(), healthy)
    assert [f.kind for f in healthy.diagnose(None, None) if f.severity != "info"] == []
    assert len(healthy.history) == 3 and healthy.tallies["head"].steps == 20  # steps 10..29 judged


def test_frozen_layers_are_skipped_not_reported_as_learning_nothing():
    model = Net()
    model.net[0].requires_grad_(False)
    monitor = OptimizationMonitor(log_every_n_steps=10)
    fit(model, monitor)
    findings = monitor.diagnose(None, None)
    assert all(f.kind != KIND_UPDATE_RATIO_LOW for f in findings)
    assert "net.0" not in monitor.tallies and "net.3" in monitor.tallies
    assert any("frozen" in f.message and "net.0" in f.message for f in findings if f.severity == "info")


def test_a_trainable_parameter_in_no_optimizer_is_a_warning():
    class Forgetful(Net):
        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.02)

    monitor = OptimizationMonitor(log_every_n_steps=10)
    fit(Forgetful(), monitor, steps=12)
    (stray,) = [f for f in monitor.diagnose(None, None) if f.kind == KIND_NOT_OPTIMIZED]
    assert stray.layers == ["head.weight", "head.bias"] and stray.severity == "warning"


class Corrupted(Dataset):
    def __init__(self, bad_batch: int, batch_size: int = 8) -> None:
        self.data, self.bad = data(noise=0.2), range(bad_batch * batch_size, (bad_batch + 1) * batch_size)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return (x, (y + 1) % 3) if i in self.bad else (x, y)  # mislabelled


class FlatNet(Net):
    """Learns the patterns within a few steps (no pooling): a mislabelled batch then spikes the loss."""

    def __init__(self) -> None:
        super().__init__(0.05, 0.05)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 8 * 8, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.net(x)), y)


def test_a_corrupted_batch_is_found_as_a_loss_spike_at_its_step():
    monitor = OptimizationMonitor(log_every_n_steps=10)
    fit(FlatNet(), monitor, loader=DataLoader(Corrupted(bad_batch=22), batch_size=8))
    spikes = [f for f in monitor.diagnose(None, None) if f.kind == KIND_LOSS_SPIKE]
    assert [f.step for f in spikes] == [22]  # one episode: the bad batch, and the steps that recover from it
    assert spikes[0].values["ratio"] > 2 and spikes[0].layers  # a layer is named
    assert monitor.history[2]["optimization/loss_spikes"] >= 1.0 and monitor.spikes[0].step == 22


def test_gradient_accumulation_records_whole_optimizer_steps():
    monitor = OptimizationMonitor(log_every_n_steps=5)
    fit(Net(), monitor, steps=15, accumulate_grad_batches=3)
    assert len(monitor.history) == 3 and monitor.tallies["head"].steps == 5  # steps 10..14
    # the loss of a step is the sum of its micro-batches' (already divided by 3) losses: the mean
    assert 0.2 < monitor.history[0]["optimization/loss_median"] < 2.0


class ManualGAN(pl.LightningModule):
    """Manual optimization, two optimizers, ``training_step`` returning ``returns``."""

    def __init__(self, returns: str = "nothing") -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        self.disc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.returns = returns

    def training_step(self, batch, batch_idx):
        (x,) = batch
        g_opt, d_opt = self.optimizers()
        fake = self.gen(torch.randn_like(x))
        d_loss = F.softplus(self.disc(fake.detach())).mean() + F.softplus(-self.disc(x)).mean()
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        g_loss = F.softplus(-self.disc(self.gen(torch.randn_like(x)))).mean()
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()
        if self.returns == "loss":
            return g_loss + d_loss
        return {"g": g_loss.detach()} if self.returns == "dict" else None

    def configure_optimizers(self):
        return torch.optim.Adam(self.gen.parameters(), 1e-3), torch.optim.Adam(self.disc.parameters(), 1e-3)


@pytest.mark.parametrize("returns", ["nothing", "dict", "loss"])
def test_manual_optimization_with_two_optimizers(returns):
    monitor = OptimizationMonitor(log_every_n_steps=10)
    loader = DataLoader(TensorDataset(torch.randn(128, 4)), batch_size=8)
    fit(ManualGAN(returns), monitor, steps=40, loader=loader)  # 2 optimizer steps per batch
    last = monitor.history[-1]
    assert {
        "optimization/param_group/opt0.group0/update_ratio",
        "optimization/param_group/opt1.group0/update_ratio",
    } <= set(last)
    assert "optimization/disc.2/grad_norm" in last and monitor.failure is None
    spikes_off = [n for n in monitor.notes if "no loss" in n.message]
    assert bool(spikes_off) == (returns != "loss")
    assert ("optimization/loss_median" in last) == (returns == "loss")


def test_observing_does_not_change_training_and_a_failure_steps_aside(tmp_path):
    def weights(monitor):
        torch.manual_seed(0)
        model = Net()
        fit(model, monitor, steps=15)
        return [p.detach().clone() for p in model.parameters()]

    bare = weights(None)
    assert all(torch.equal(a, b) for a, b in zip(bare, weights(OptimizationMonitor(log_every_n_steps=5))))

    class Broken(OptimizationMonitor):
        def _measure_updates(self, trainer):
            raise RuntimeError("boom")

    broken = Broken(log_every_n_steps=5, strict=False)
    with pytest.warns(UserWarning, match="switched itself off"):
        after = weights(broken)
    assert all(torch.equal(a, b) for a, b in zip(bare, after))
    assert broken.failure is not None and broken.failure.kind == "monitor_error"


def test_checkpoint_restores_tallies_spikes_and_the_band(tmp_path):
    monitor = OptimizationMonitor(log_every_n_steps=10)
    fit(FlatNet(), monitor, loader=DataLoader(Corrupted(bad_batch=22), batch_size=8))
    fresh = OptimizationMonitor(log_every_n_steps=10)
    state = monitor.state_dict()
    torch.save(state, tmp_path / "state.pt")
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert fresh.tallies == monitor.tallies and fresh.spikes == monitor.spikes and fresh.spikes[0].step == 22
    assert fresh._tail.steps == monitor._tail.steps and fresh.judged_from == 10


def test_resumed_fit_goes_on_with_its_history(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=20, save_top_k=-1)
    first = OptimizationMonitor(log_every_n_steps=10)
    torch.manual_seed(0)
    options = {**QUIET, "enable_checkpointing": True, "log_every_n_steps": 10, "default_root_dir": tmp_path}
    pl.Trainer(callbacks=[first, ckpt], max_steps=20, **options).fit(Net(), DataLoader(data(), batch_size=8))
    second = OptimizationMonitor(log_every_n_steps=10)
    trainer = pl.Trainer(callbacks=[second], max_steps=30, **{**options, "enable_checkpointing": False})
    trainer.fit(Net(), DataLoader(data(), batch_size=8), ckpt_path=str(tmp_path / "epoch=0-step=20.ckpt"))
    assert [e["step"] for e in second.history] == [10.0, 20.0, 30.0]
    assert second.tallies["head"].steps == first.tallies["head"].steps + 10


def resume_inside_an_interval(tmp_path, strip=()):
    """A: 30 steps (two epochs of 15 batches), the monitor flushing every 10, a checkpoint at step 15 (the
    end of epoch 0: a plain loader resumes exactly there), inside the interval 10..20; C: a fresh monitor
    resumed from that checkpoint (``strip``: keys of its extra state removed first, as an older checkpoint
    lacks them). Returns A's and C's monitors."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    options = {**QUIET, "enable_checkpointing": True, "log_every_n_steps": 10, "max_steps": 30}
    loader = DataLoader(data(n=120), batch_size=8)  # 15 batches per epoch
    straight = OptimizationMonitor(log_every_n_steps=10, strict=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=15, save_top_k=-1)
    torch.manual_seed(0)
    pl.Trainer(callbacks=[straight, ckpt], default_root_dir=tmp_path, **options).fit(Net(), loader)
    path = tmp_path / "epoch=0-step=15.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("OptimizationMonitor")]
    extra = checkpoint["callbacks"][key]["extra"]
    assert extra["interval"]["ring"]["rows"], "the checkpoint is not inside an interval"
    if strip:
        for name in strip:
            extra.pop(name)
        path = tmp_path / "older.ckpt"
        torch.save(checkpoint, path)
    resumed = OptimizationMonitor(log_every_n_steps=10, strict=True)
    torch.manual_seed(0)
    again = ModelCheckpoint(dirpath=tmp_path / "c", every_n_train_steps=15, save_top_k=-1)
    trainer = pl.Trainer(callbacks=[resumed, again], default_root_dir=tmp_path / "c", **options)
    trainer.fit(Net(), loader, ckpt_path=str(path))
    return straight, resumed


def test_a_checkpoint_inside_an_interval_resumes_it_exactly(tmp_path):
    from ddp_utils import state_differences

    straight, resumed = resume_inside_an_interval(tmp_path)
    # the next flush (step 20: steps 10-14 before the checkpoint, 15-19 after) and the one after it are
    # the uninterrupted run's, bit for bit, and so is the whole checkpointed state at the end
    assert [e["step"] for e in resumed.history] == [10.0, 20.0, 30.0]
    assert state_differences(resumed.history, straight.history, "history") == []
    assert state_differences(resumed.state_dict(), straight.state_dict(), "state") == []
    assert resumed.tallies == straight.tallies and resumed._tail.steps == straight._tail.steps


def test_an_older_checkpoint_without_the_interval_still_loads_and_starts_a_fresh_interval(tmp_path):
    straight, resumed = resume_inside_an_interval(tmp_path, strip=("interval", "lrs"))
    assert [e["step"] for e in resumed.history] == [10.0, 20.0, 30.0]
    assert resumed.history[0] == straight.history[0] and resumed.history[2] == straight.history[2]
    # steps 10-14 are lost: the flush at step 20 counts 5 steps, not 10 (what the interval's state is for)
    assert resumed.history[1] != straight.history[1]
    assert resumed.tallies["head"].steps == straight.tallies["head"].steps - 5


def test_a_ring_or_accumulators_of_other_layers_are_not_put_back():
    def layout_of(net: nn.Module) -> ParamLayout:
        return ParamLayout.build([torch.optim.SGD(net.parameters(), lr=0.1)], net, torch.device("cpu"))

    layout = layout_of(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))
    meter = UpdateMeter(layout)
    meter.acc += 1.0
    # the same parameter count, other layer names ("2", not "1"): not these accumulators
    elsewhere = UpdateMeter(layout_of(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))))
    assert not elsewhere.load(meter.state()) and float(elsewhere.acc.abs().sum()) == 0.0
    ring = StepRing(capacity=4, params=layout.total, device=torch.device("cpu"))
    for step in range(6):  # wraps around: rows of steps 2..5 in slots 2, 3, 0, 1
        ring.begin(step)
        ring.add_loss(torch.tensor(float(step)))
        ring.put_grads(0, 0, layout.total, [torch.tensor(float(step))] * layout.total)
    assert not StepRing(4, layout.total + 1, torch.device("cpu")).load(ring.state())
    same = StepRing(4, layout.total, torch.device("cpu"))
    assert same.load(ring.state()) and same.rows() == ring.rows() and torch.equal(same.grads, ring.grads)
    smaller = StepRing(3, layout.total, torch.device("cpu"))  # another interval: the newest rows that fit
    assert smaller.load(ring.state())
    assert [(step, slot) for step, slot, _, _ in smaller.rows()] == [(3, 0), (4, 1), (5, 2)]
    assert smaller.loss.tolist() == [3.0, 4.0, 5.0] and smaller.grads[:, 0].tolist() == [3.0, 4.0, 5.0]
    smaller.begin(6)  # the next row takes the oldest slot
    assert smaller.rows()[-1][:2] == (6, 0)


# --------------------------------------------------------------------------------------------------
# Cost: no host read on quiet steps
# --------------------------------------------------------------------------------------------------


def test_no_host_read_on_quiet_steps(tmp_path):
    from test_sync_free_monitors import _quiet, _reads

    monitor = OptimizationMonitor()
    reads = _reads(tmp_path, [monitor])
    quiet = {step: n for step, n in reads.items() if _quiet(step)}
    assert len(quiet) > 50
    assert sum(quiet.values()) == 0, {step: n for step, n in quiet.items() if n}
    assert sum(n for step, n in reads.items() if not _quiet(step)) > 0
    assert len(monitor.history) == 8 and monitor.failure is None


# --------------------------------------------------------------------------------------------------
# The CLI and DDP
# --------------------------------------------------------------------------------------------------


def test_cli_takes_the_monitor_and_its_options(tmp_path):
    from lightning_convnets.cli import ConvNetsCLI

    args = [
        "fit",
        "--model=ImageClassifier",
        "--model.backbone=resnet18",
        "--data=ShapesDataModule",
        "--data.num_train=32",
        "--data.num_val=8",
        "--data.image_size=32",
        "--data.batch_size=8",
        "--trainer.max_steps=4",
        "--trainer.log_every_n_steps=2",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--trainer.callbacks+=lightning_convnets.callbacks.optimization.OptimizationMonitor",
        "--trainer.callbacks.warmup_steps=0",
        "--trainer.callbacks.high=0.5",
    ]
    cli = ConvNetsCLI(args=args, run=True)
    (monitor,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, OptimizationMonitor)]
    assert monitor.warmup_steps == 0 and monitor.high == 0.5 and len(monitor.history) == 2
    assert monitor.judged_from == 0 and monitor.failure is None


class RankRecord(Callback):
    """Per rank: the monitor's history and spikes at the end (``optimization-rank<r>.pt``)."""

    def __init__(self, folder, monitor) -> None:
        self.folder, self.monitor = folder, monitor

    def on_train_end(self, trainer, pl_module) -> None:
        from ddp_utils import dump

        dump(
            self.folder,
            "optimization",
            {"history": self.monitor.history, "losses": self.monitor._tail.losses},
        )


@pytest.mark.slow
@pytest.mark.usefixtures("ddp_env")
def test_two_ddp_ranks_agree_and_issue_one_collective_per_interval(tmp_path):
    from ddp_utils import CPU_DDP, CollectiveCounter, ShardedTinyData, TinyResNet, load_ranks

    monitor = OptimizationMonitor(log_every_n_steps=2)
    counter = CollectiveCounter(tmp_path / "records", [monitor])
    trainer = pl.Trainer(
        callbacks=[monitor, RankRecord(tmp_path / "records", monitor), counter], max_steps=4,
        log_every_n_steps=2, default_root_dir=tmp_path, **{**QUIET, **CPU_DDP},
    )  # fmt: skip
    trainer.fit(TinyResNet(), ShardedTinyData())
    ranks = load_ranks(tmp_path / "records", "optimization")
    assert ranks[0] == ranks[1]  # the same merged numbers (and the same averaged losses) on both ranks
    assert [e["step"] for e in ranks[0]["history"]] == [2.0, 4.0]
    assert "optimization/head/update_ratio" in ranks[0]["history"][-1]
    assert all(isinstance(v, float) for v in ranks[0]["losses"])
    for calls in load_ranks(tmp_path / "records", "collectives"):
        mine = [c for c in calls if c["owner"] == "OptimizationMonitor"]
        assert [c["step"] for c in mine] == [2, 4] and all(c["op"] == "all_gather" for c in mine)
