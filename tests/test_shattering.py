"""Shattered gradients: ``shattering_profile`` (the paper's Figure 1 numbers, exactness, no side effects)
and ``GradientShatteringMonitor`` in real Lightning fits."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning_convnets.callbacks.core import MonitorCallback
from lightning_convnets.callbacks.shattering import (
    GradientShatteringMonitor,
    ShatteringProfile,
    autocorrelation,
    shattering_profile,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@pytest.fixture(autouse=True)
def one_thread():
    # the tiny problems here run several times faster single-threaded on a shared 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------
# The paper's setting: 1-D input on [-2, 2], 256 points, 200 hidden units, BN over the 256 points
# ----------------------------------------------------------------------------------------------------


class _Block(nn.Module):
    """h <- W ReLU(BN(h)) + b, plus h itself when residual."""

    def __init__(self, width: int, residual: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(width)
        self.linear = nn.Linear(width, width)
        self.residual = residual

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        branch = self.linear(torch.relu(self.bn(h)))
        return h + branch if self.residual else branch


def _paper_net(depth: int, residual: bool, seed: int, width: int = 200) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(1, width), *[_Block(width, residual) for _ in range(depth)], nn.Linear(width, 1)
    )
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # He init
            nn.init.normal_(m.bias, 0.0, 0.1)
    return net


def _mean_lag1(depth: int, residual: bool) -> float:
    lags = []
    for seed in range(5):
        net = _paper_net(depth, residual, seed)
        p = shattering_profile(
            net, torch.tensor([-2.0]), torch.tensor([2.0]), num_points=256, bn_mode="batch"
        )
        lags.append(p.lag1)
    return float(np.mean(lags))


def test_paper_figure1_shallow_feedforward_is_brown_noise():
    assert _mean_lag1(1, residual=False) >= 0.9


def test_paper_figure1_deep_feedforward_is_white_noise():
    assert abs(_mean_lag1(24, residual=False)) <= 0.3


def test_paper_figure1_resnet_lies_between():
    lag1 = _mean_lag1(50, residual=True)
    assert 0.4 <= lag1 <= 0.8, lag1


# ----------------------------------------------------------------------------------------------------
# Exactness
# ----------------------------------------------------------------------------------------------------


def test_autocorrelation_matches_the_definition():
    s = torch.randn(50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    c = s.numpy() - s.numpy().mean()
    expected = [np.sum(c[: len(c) - k] * c[k:]) / np.sum(c * c) for k in range(len(c))]
    np.testing.assert_allclose(autocorrelation(s).numpy(), expected, atol=1e-12)
    assert autocorrelation(torch.ones(10)).isnan().all()
    with pytest.raises(ValueError, match="1-D series"):
        autocorrelation(torch.ones(2, 3))


class _Sine(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(3.0 * x).sum(dim=1)


def test_s_is_the_directional_derivative():
    a, b = torch.tensor([-1.0, 0.5]), torch.tensor([2.0, -0.5])
    p = shattering_profile(_Sine(), a, b, num_points=101, chunk_size=16)
    x = a + p.t.float()[:, None] * (b - a)
    expected = (3.0 * torch.cos(3.0 * x) * (b - a)).sum(dim=1)
    torch.testing.assert_close(p.s.float(), expected, atol=1e-5, rtol=1e-5)
    assert p.num_points == 101 and p.white_noise_band == pytest.approx(1.96 / math.sqrt(101))
    assert p.autocorrelation[0] == pytest.approx(1.0)
    assert p.lag1 > 0.9 and p.neighbour_cosine > 0.9 and not p.shattered
    assert set(p.summary()) == {"lag1", "correlation_length", "neighbour_cosine", "white_noise_band"}


def _conv_net(num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(6, 6, 3, padding=1, stride=2),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, num_classes),
    )


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_eval_mode_does_not_depend_on_chunking():
    net, (a, b) = _conv_net(), _images()
    net.train()
    with torch.no_grad():  # non-trivial running statistics
        net(torch.randn(8, 3, 16, 16) * 2 + 1)
    p1 = shattering_profile(net, a, b, num_points=40, chunk_size=40)
    p2 = shattering_profile(net, a, b, num_points=40, chunk_size=7)
    torch.testing.assert_close(p1.s, p2.s, rtol=1e-5, atol=1e-7)
    assert p1.neighbour_cosine == pytest.approx(p2.neighbour_cosine, rel=1e-5)


def test_batch_mode_is_one_training_mode_batch_of_all_points():
    net, (a, b) = _conv_net(), _images()
    p = shattering_profile(net, a, b, num_points=32, bn_mode="batch", chunk_size=4)
    # reference: the points as ONE batch through BN in training mode (dropout off), gradient of the sum
    ref = copy.deepcopy(net).eval()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    t = torch.linspace(0, 1, 32)
    x = (a + t[:, None, None, None] * (b - a)).requires_grad_(True)
    cls = int(ref(x).detach()[0].argmax())
    (g,) = torch.autograd.grad(ref(x)[:, cls].sum(), x)
    torch.testing.assert_close(p.s.float(), (g * (b - a)).flatten(1).sum(1), rtol=1e-4, atol=1e-6)
    assert p.target_class == cls and p.bn_mode == "batch"
    assert not torch.allclose(p.s, shattering_profile(net, a, b, num_points=32, bn_mode="eval").s)


# ----------------------------------------------------------------------------------------------------
# The probe is an observer
# ----------------------------------------------------------------------------------------------------


class _Noisy(nn.Module):
    """Draws from the global RNG in every forward, train or eval (so a missing RNG restore shows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.0 * torch.rand_like(x)


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    state.update({f"{k}.grad": p.grad.clone() for k, p in net.named_parameters() if p.grad is not None})
    return state


@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
def test_probe_leaves_parameters_grads_buffers_rng_and_modes_untouched(bn_mode):
    net, (a, b) = nn.Sequential(_Noisy(), _conv_net()), _images()
    net.train()
    net(torch.randn(4, 3, 16, 16)).sum().backward()  # existing .grad and running stats
    net[1][5].eval()  # a frozen BN the probe must leave frozen
    before = _state(net)
    modes = [m.training for m in net.modules()]
    rng = torch.get_rng_state()
    shattering_profile(net, a, b, num_points=16, bn_mode=bn_mode)
    shattering_profile(net, a, None, num_points=16, bn_mode=bn_mode)  # random direction
    after = _state(net)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert [m.training for m in net.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_probe_is_invisible_to_other_monitors():
    net, (a, b) = _conv_net(), _images()

    class _Counting(MonitorCallback):
        seen = 0

        def count(self, module, args, output):
            if self.is_recording(module):
                self.seen += 1

    other = _Counting()
    other.add_hook(net[1], other.count)
    other._recording = True  # mid-step, as during a training forward
    net.train()
    net(a[None].expand(2, -1, -1, -1))
    assert other.seen == 1  # the hook does record training forwards...
    shattering_profile(net, a, b, num_points=8, bn_mode="batch")  # ...but not the probe's (BN in train mode)
    assert other.seen == 1
    other.remove_hooks()


def test_random_direction_is_seeded_and_has_the_data_scale():
    net, (a, _) = _conv_net(), _images()
    p1 = shattering_profile(net, a, None, num_points=8, seed=5)
    p2 = shattering_profile(net, a, None, num_points=8, seed=5)
    p3 = shattering_profile(net, a, None, num_points=8, seed=6)
    assert torch.equal(p1.s, p2.s) and not torch.equal(p1.s, p3.s)
    # on f(x) = sum(x), s = sum(d): a sum of D normals with variance rms(a)^2 (a sanity bound)
    summed = shattering_profile(_Summer(), a, None, num_points=4, seed=5)
    assert abs(float(summed.s[0])) < 6 * math.sqrt(a.numel()) * float(a.pow(2).mean().sqrt())


class _Summer(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1)


def test_sync_batchnorm_runs_locally_in_batch_mode_and_is_restored():
    net, (a, b) = _conv_net(), _images()
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net))
    p = shattering_profile(net, a, b, num_points=16, bn_mode="batch")
    q = shattering_profile(sync, a, b, num_points=16, bn_mode="batch")
    torch.testing.assert_close(p.s, q.s)
    assert type(sync[1]) is nn.SyncBatchNorm


def test_ddp_wrapper_is_never_entered(tmp_path, monkeypatch):
    import torch.distributed as dist

    net, (a, b) = _conv_net(), _images()
    expected = shattering_profile(net, a, b, num_points=8, bn_mode="batch").s
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(net)

        def forbidden(*args, **kwargs):
            raise AssertionError("the probe entered the DDP wrapper's forward")

        monkeypatch.setattr(nn.parallel.DistributedDataParallel, "forward", forbidden)
        torch.testing.assert_close(shattering_profile(ddp, a, b, num_points=8, bn_mode="batch").s, expected)
    finally:
        dist.destroy_process_group()


def test_compiled_model_is_probed_eagerly():
    net, (a, b) = _conv_net(), _images()
    compiled = torch.compile(net, backend="aot_eager")
    p = shattering_profile(compiled, a, b, num_points=16)
    torch.testing.assert_close(p.s, shattering_profile(net, a, b, num_points=16).s)


# ----------------------------------------------------------------------------------------------------
# f: the predicted-class logit, a dense output, or a loss via output_fn
# ----------------------------------------------------------------------------------------------------


def test_default_objective_is_the_class_predicted_at_start():
    net, (a, b) = _conv_net(num_classes=5), _images()
    net.eval()
    p = shattering_profile(net, a, b, num_points=8)
    assert p.target_class == int(net(a[None]).argmax())


def test_dense_output_and_loss_objective():
    torch.manual_seed(0)
    seg = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))
    a, b = _images()
    p = shattering_profile(seg, a, b, num_points=12)
    assert p.s.shape == (12,) and torch.isfinite(p.autocorrelation).all()

    net = _conv_net()
    target = torch.tensor(2)

    def loss(out: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, target.expand(out.shape[0]), reduction="none")

    q = shattering_profile(net, a, b, num_points=12, output_fn=loss)
    assert q.target_class is None and torch.isfinite(q.s).all()


class _TwoStacks(nn.Module):
    """Returns one output per stack, as a task with intermediate supervision does."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.zeros_like(self.net(x)), self.net(x)]


def test_list_output_is_probed_on_its_last_element():
    net, (a, b) = _conv_net(num_classes=5), _images()
    net.eval()
    single = shattering_profile(net, a, b, num_points=16)
    stacked = shattering_profile(_TwoStacks(net), a, b, num_points=16)
    assert stacked.target_class == single.target_class
    torch.testing.assert_close(stacked.s, single.s)


def test_bad_arguments_are_named():
    net, (a, b) = _conv_net(), _images()
    with pytest.raises(ValueError, match="bn_mode"):
        shattering_profile(net, a, b, bn_mode="train")
    with pytest.raises(ValueError, match="num_points"):
        shattering_profile(net, a, b, num_points=2)
    with pytest.raises(ValueError, match="end must be a tensor shaped like start"):
        shattering_profile(net, a, b[:, :8])
    with pytest.raises(ValueError, match="one value per input point"):
        shattering_profile(net, a, b, num_points=8, output_fn=lambda out: out.sum())
    with pytest.raises(TypeError, match="output_key"):
        shattering_profile(_DictNet(), a, b, num_points=8)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        shattering_profile(net, a, b, num_points=8)


class _DictNet(nn.Module):  # a structured output with no prediction the probe can find
    def forward(self, x: torch.Tensor) -> dict[str, object]:
        return {"score": x.mean(dim=(1, 2, 3)).long(), "note": "no float tensor here"}


def test_profile_dataclass_is_public():
    p = shattering_profile(_Sine(), torch.tensor([0.0]), torch.tensor([1.0]), num_points=5)
    assert isinstance(p, ShatteringProfile) and p.correlation_length >= 1


# ----------------------------------------------------------------------------------------------------
# GradientShatteringMonitor in Lightning fits
# ----------------------------------------------------------------------------------------------------


class _TinyClassifier(LightningModule):
    """A user's LightningModule: nothing from this project, BN and dropout inside."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int = 32, size: int = 16, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=True)


def _trainer(tmp_path, callbacks, **kw) -> Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path, name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
    )
    defaults.update(kw)
    return Trainer(callbacks=callbacks, **defaults)


KEYS = [f"shattering/{k}" for k in ("lag1", "correlation_length", "neighbour_cosine", "white_noise_band")]


def test_monitor_logs_plots_and_diagnoses_in_a_fit(tmp_path):
    monitor = GradientShatteringMonitor(every_n_steps=2, num_points=16, bn_mode="batch")
    trainer = _trainer(tmp_path, [monitor], max_steps=6)
    trainer.fit(_TinyClassifier(), _loader())
    # first probe before the first update (step 0), then every 2 optimizer steps
    assert [h["step"] for h in monitor.history] == [0, 2, 4, 6]
    assert monitor.start is not None and monitor.start.shape == (3, 16, 16) and monitor.end is not None
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("shattering/lag1")]
    assert [int(r["step"]) for r in logged] == [0, 2, 4, 6]
    for key in [*KEYS, "shattering/probe_seconds"]:
        assert all(math.isfinite(float(r[key])) for r in logged), key
    assert float(logged[0]["shattering/white_noise_band"]) == pytest.approx(1.96 / 4)
    figures = list((tmp_path / "logs").rglob("monitors__shattering__profile_step*.png"))
    assert len(figures) == 1
    report = next((tmp_path / "logs").rglob("diagnosis.md")).read_text()
    assert "shattering" in report and "rho(1)" in report


def test_monitor_does_not_change_training(tmp_path):
    def run(callbacks) -> dict[str, torch.Tensor]:
        seed_everything(7, workers=True)
        model = _TinyClassifier()
        _trainer(tmp_path, callbacks, max_steps=5, logger=False).fit(model, _loader())
        return {k: v.clone() for k, v in model.state_dict().items()}

    plain = run([])
    watched = run([GradientShatteringMonitor(every_n_steps=1, num_points=8, bn_mode="batch")])
    assert plain.keys() == watched.keys()
    for key in plain:
        assert torch.equal(plain[key], watched[key]), key


def test_resume_restores_history_and_probe(tmp_path):
    # two monitors of this kind share the checkpoint under distinct state keys
    first = GradientShatteringMonitor(every_n_steps=2, num_points=8)
    first_batch = GradientShatteringMonitor(every_n_steps=2, num_points=8, bn_mode="batch")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path, [first, first_batch, ckpt], max_steps=4, enable_checkpointing=True)
    trainer.fit(_TinyClassifier(), _loader())
    assert [h["step"] for h in first.history] == [0, 2, 4]
    assert first.state_key != first_batch.state_key

    resumed = GradientShatteringMonitor(every_n_steps=2, num_points=8)
    resumed_batch = GradientShatteringMonitor(every_n_steps=2, num_points=8, bn_mode="batch")
    trainer = _trainer(tmp_path, [resumed, resumed_batch], max_steps=8)
    trainer.fit(_TinyClassifier(), _loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [h["step"] for h in resumed.history] == [0, 2, 4, 6, 8]
    assert resumed.history[:3] == first.history and resumed_batch.history[:3] == first_batch.history
    assert resumed.history[:3] != resumed_batch.history[:3]
    assert torch.equal(resumed.start, first.start) and torch.equal(resumed.end, first.end)
    assert resumed.first_profile["step"] == 0 and resumed.last_profile["step"] == 8


def test_history_is_bounded():
    monitor = GradientShatteringMonitor(max_history=4)
    for step in range(10):
        monitor.append_history({"step": float(step)})
    assert len(monitor.history) <= 4 and monitor.history[-1]["step"] == 9


def test_torchvision_model_bf16_and_accumulation(tmp_path):
    torchvision = pytest.importorskip("torchvision")

    class _Plain(LightningModule):  # takes dict batches and keeps its network in an attribute
        def __init__(self) -> None:
            super().__init__()
            self.model = torchvision.models.resnet18(num_classes=3)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.model(batch["image"]), batch["label"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    samples = [{"image": torch.randn(3, 32, 32), "label": torch.tensor(i % 3)} for i in range(8)]
    data = DataLoader(samples, batch_size=2)
    monitor = GradientShatteringMonitor(every_n_steps=1, num_points=8, probe_module="model", line="random")
    trainer = _trainer(tmp_path, [monitor], max_steps=2, precision="bf16-mixed", accumulate_grad_batches=2)
    trainer.fit(_Plain(), data)
    # one probe per optimizer step although two micro-batches share each global_step
    assert [h["step"] for h in monitor.history] == [0, 1, 2]
    assert monitor.end is None  # line="random": a random direction from the first input
    assert all(math.isfinite(h["shattering/lag1"]) for h in monitor.history)


def test_compiled_module_is_probed(tmp_path):
    monitor = GradientShatteringMonitor(every_n_steps=1, num_points=8)
    model = torch.compile(_TinyClassifier(), backend="aot_eager")
    trainer = _trainer(tmp_path, [monitor], max_steps=2)
    trainer.fit(model, _loader())
    assert trainer.lightning_module._compiler_ctx is not None  # the fit really ran the compiled forward
    assert [h["step"] for h in monitor.history] == [0, 1, 2]
    assert all(math.isfinite(h["shattering/lag1"]) for h in monitor.history)


def test_diagnosis_flags_shattered_gradients():
    line = (torch.tensor([-2.0]), torch.tensor([2.0]))

    class _Stub:
        global_step = 0
        loggers = ()
        is_global_zero = True

    def probe_at(monitor, step, net):
        _Stub.global_step = step
        monitor.record(_Stub(), monitor.probe(net))

    shallow = _paper_net(1, False, seed=0)
    monitor = GradientShatteringMonitor(probe=line, bn_mode="batch")
    probe_at(monitor, 0, shallow)
    probe_at(monitor, 3, _paper_net(24, False, seed=0))
    # one white-noise probe after a smooth one is not yet a verdict (the mean of the recent probes is)
    assert monitor.diagnose(_Stub(), shallow)[0].severity == "info"
    for step, seed in ((6, 1), (9, 2)):
        probe_at(monitor, step, _paper_net(24, False, seed=seed))
    findings = monitor.diagnose(_Stub(), shallow)
    assert findings[0].severity == "warning" and "shattered" in findings[0].message
    assert "skip connections" in findings[0].suggestion and findings[0].step == 9
    assert abs(findings[0].values["lag1_recent_mean"]) <= 1.96 / 16
    assert any("fell from" in f.message for f in findings[1:])

    healthy = GradientShatteringMonitor(probe=line, bn_mode="batch")
    probe_at(healthy, 0, shallow)
    (finding,) = healthy.diagnose(_Stub(), shallow)
    assert finding.severity == "info" and "smooth" in finding.message
    assert GradientShatteringMonitor().diagnose(_Stub(), shallow) == []  # never probed: nothing to say

    class _Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sqrt(x - 10.0).sum(1)  # NaN everywhere on the line

    broken = GradientShatteringMonitor(probe=line)
    probe_at(broken, 0, _Broken())
    (finding,) = broken.diagnose(_Stub(), shallow)
    assert finding.severity == "error" and "not finite" in finding.message
    dead_net = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
    nn.init.constant_(dead_net[0].bias, -10.0)  # every ReLU is off on [-2, 2]: s(t) = 0
    dead = GradientShatteringMonitor(probe=line)
    probe_at(dead, 0, dead_net)
    (finding,) = dead.diagnose(_Stub(), dead_net)
    assert finding.severity == "warning" and "constant" in finding.message


def test_probe_is_taken_from_a_detection_style_batch():
    """(list of images, list of targets): the probe line joins the first two images of one shape."""
    monitor = GradientShatteringMonitor()
    images = [torch.full((3, 8, 8), 1.0), torch.full((3, 6, 6), 5.0), torch.full((3, 8, 8), 2.0)]
    monitor.capture_probe((images, [{}, {}, {}]))
    torch.testing.assert_close(monitor.start, images[0])
    torch.testing.assert_close(monitor.end, images[2])


def test_monitor_bad_arguments_are_named():
    with pytest.raises(ValueError, match="every_n_steps"):
        GradientShatteringMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="bn_mode"):
        GradientShatteringMonitor(bn_mode="train")
    with pytest.raises(ValueError, match="line"):
        GradientShatteringMonitor(line="diagonal")
    with pytest.raises(ValueError, match="probe must be"):
        GradientShatteringMonitor(probe=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="module='nope'"):
        GradientShatteringMonitor(probe=torch.zeros(2, 3), probe_module="nope").probe(_TinyClassifier())


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
def test_ddp_two_processes_do_not_deadlock(tmp_path, bn_mode):
    # rank zero probes while rank one runs ahead into the next step's collectives: it must simply wait.
    # (SyncBatchNorm needs GPU modules under DDP; its local run is checked by a unit test above.)
    monitor = GradientShatteringMonitor(every_n_steps=1, num_points=16, bn_mode=bn_mode)
    trainer = _trainer(tmp_path, [monitor], max_steps=3, strategy="ddp_spawn", devices=2)
    trainer.fit(_TinyClassifier(), _loader())
    with open(next((tmp_path / "logs").rglob("metrics.csv"))) as f:
        logged = [r for r in csv.DictReader(f) if r.get("shattering/lag1")]
    assert [int(r["step"]) for r in logged] == [0, 1, 2, 3]  # once per step: from rank zero only
