"""ActivationVarianceMonitor: the seed's "variance doubles at each layer" acceptance, any LightningModule,
bf16 + accumulation, torch.compile, resume, non-finite detection, and that observing changes nothing; its
parts directly: the unit counts (``UnitCounts``), the metrics along the depth (``target_metrics``), the
findings assembly (``activation_findings``)."""

from __future__ import annotations

import itertools
import math

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning_convnets.callbacks import ActivationVarianceMonitor, activation_variance, units
from lightning_convnets.callbacks.activation_variance import activation_findings, measured_targets
from lightning_convnets.callbacks.depth_metrics import geomean_growth, target_metrics
from lightning_convnets.callbacks.moments import merge_moments
from lightning_convnets.callbacks.packing import StatsPacker
from lightning_convnets.callbacks.targets import Target
from lightning_convnets.callbacks.units import UnitCounts
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_convnets.backbones import create_backbone
from lightning_convnets.backbones.resnet import PreActBasicBlock, ResNet

SEEDS = (0, 1, 2)


def _block_vars(metrics: dict[str, float]) -> list[float]:
    """Block output variances in depth order (our ResNets name their blocks layer<stage>.<index>)."""
    names = [k[: -len("/var")] for k in metrics if k.startswith("layer") and k.endswith("/var")]
    return [metrics[f"{n}/var"] for n in names]


def _profile(arch: str, norm: str, skip: bool, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    net = create_backbone(arch, stem="cifar", width=64, norm=norm, skip=skip)  # He init by construction
    return ActivationVarianceMonitor().measure(net, torch.randn(4, 3, 16, 16))


# ---------------------------------------------------------------------------------------- acceptance
def test_acceptance_no_norm_variance_doubles_per_block():
    growths = []
    for seed in SEEDS:
        metrics = _profile("preact_resnet34", "none", True, seed)
        variances = _block_vars(metrics)
        assert len(variances) == 16
        growths.append((variances[-1] / variances[0]) ** (1 / (len(variances) - 1)))
        assert metrics["growth_per_block"] == pytest.approx(growths[-1])
    mean_growth = sum(growths) / len(growths)
    # ~2 in theory; zero padding at 2x2-4x4 resolutions pulls it to ~1.6 on 16x16 inputs
    assert 1.4 <= mean_growth <= 2.6, growths


def test_acceptance_batchnorm_growth_is_at_most_linear():
    ratios = []
    for seed in SEEDS:
        variances = _block_vars(_profile("preact_resnet18", "batch", True, seed))
        ratios.append(variances[-1] / variances[0])
    blocks = 8
    assert sum(ratios) / len(ratios) <= 2 * (blocks + 1), ratios


def test_acceptance_skip_free_twin_stays_near_constant():
    spreads = []
    for seed in SEEDS:
        variances = _block_vars(_profile("preact_resnet18", "batch", False, seed))
        assert len(variances) == 8  # plain blocks are found through their `add = None`
        spreads.append(max(variances) / min(variances))
    # "within a factor of 2 of a constant" c = sqrt(max * min): every block in [c / 2, 2 c]
    assert sum(spreads) / len(spreads) <= 4.0, spreads


# ---------------------------------------------------------------------------------------- Lightning
class Wrapper(pl.LightningModule):
    """A plain LightningModule around any image model (not one of our tasks)."""

    def __init__(self, net: nn.Module, lr: float = 0.05):
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x):
        out = self.net(x)
        return out[-1] if isinstance(out, (list, tuple)) else out

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        if out.dim() > 2:
            out = out.mean(dim=(2, 3))
        return nn.functional.cross_entropy(out[:, :4], y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _data(n=16, size=16, batch_size=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=gen)
    return DataLoader(TensorDataset(images, torch.randint(0, 4, (n,), generator=gen)), batch_size=batch_size)


def _trainer(tmp_path, callbacks, **kw):
    options = dict(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    options.update(kw)
    return pl.Trainer(**options)


def _tiny(norm="batch", seed=0):
    """A pre-activation ResNet with one block per stage and 4 channels: four blocks, 16x16 inputs."""
    torch.manual_seed(seed)
    return ResNet(PreActBasicBlock, [1, 1, 1, 1], stem="cifar", width=4, norm=norm)


def test_lightning_run_logs_explosion_plot_and_diagnosis(tmp_path):
    torch.manual_seed(0)
    net = create_backbone("preact_resnet18", stem="cifar", width=8, norm="none")
    images = torch.randn(4, 3, 16, 16)
    expected = ActivationVarianceMonitor().measure(net, images)
    monitor = ActivationVarianceMonitor(log_every_n_steps=1)
    loader = DataLoader(TensorDataset(images, torch.zeros(4, dtype=torch.long)), batch_size=4)
    logger = CSVLogger(tmp_path, name="run", version=0)
    _trainer(tmp_path, [monitor], max_steps=1, logger=logger).fit(Wrapper(net, lr=0.0), loader)
    (entry,) = monitor.history
    # the Lightning path and the standalone measure agree on the same forward
    assert entry["activation_variance/growth_per_block"] == pytest.approx(
        expected["growth_per_block"], rel=1e-9
    )
    assert entry["activation_variance/net.layer4.1/var"] == pytest.approx(expected["layer4.1/var"], rel=1e-9)
    run_dir = tmp_path / "run" / "version_0"
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "activation_variance/net.layer1.0/branch_ratio" in header
    assert list((run_dir / "figures").glob("monitors__activation_variance__variance_vs_depth*.png"))
    report = (run_dir / "diagnosis.md").read_text()
    assert "variance grows" in report and "net.layer1.0" in report and "BatchNorm" in report


def test_torchvision_model_in_a_plain_module_matches_direct_computation(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=4)
    captured = {}

    def keep(name):
        def hook(module, args, output):
            if module.training and name not in captured:
                captured[name] = (args[0].detach().double(), output.detach().double())

        return hook

    block = net.layer1[0]
    block.register_forward_hook(keep("block"))
    block.bn2.register_forward_hook(keep("bn2"))
    monitor = ActivationVarianceMonitor(log_every_n_steps=1)
    _trainer(tmp_path, [monitor], max_steps=1).fit(Wrapper(net), _data(n=4, size=32))
    names = [t.name for t in monitor.targets]
    assert names[0] == "net.maxpool" and len(names) == 9 and names[1:3] == ["net.layer1.0", "net.layer1.1"]
    metrics = monitor.history[0]
    block_in, block_out = captured["block"]
    branch = captured["bn2"][1]
    assert metrics["activation_variance/net.layer1.0/var"] == pytest.approx(
        float(block_out.var(unbiased=False)), rel=1e-5
    )
    assert metrics["activation_variance/net.layer1.0/branch_ratio"] == pytest.approx(
        float(branch.var(unbiased=False) / block_in.var(unbiased=False)), rel=1e-5
    )
    assert metrics["activation_variance/net.layer1.0/mean"] == pytest.approx(
        float(block_out.mean()), rel=1e-5
    )
    # block outputs are ReLU outputs: a dead channel would show here; at init none is dead
    assert metrics["activation_variance/net.layer1.0/dead_fraction"] == 0.0


def test_timm_and_user_blocks_follow_the_protocol():
    timm = pytest.importorskip("timm")
    x = torch.randn(2, 3, 32, 32)
    # timm zero-initialises each branch's last BN scale: the monitor must see blocks that start as identity
    metrics = ActivationVarianceMonitor().measure(timm.create_model("resnet18", num_classes=4), x)
    ratios = [metrics[k] for k in metrics if k.endswith("/branch_ratio")]
    assert len(ratios) == 8 and all(r == 0.0 for r in ratios)
    assert metrics["layer1.1/shortcut_var"] == pytest.approx(metrics["layer1.0/shortcut_var"])
    net = timm.create_model("resnet18", num_classes=4, zero_init_last=False)
    metrics = ActivationVarianceMonitor().measure(net, x)
    ratios = [metrics[k] for k in metrics if k.endswith("/branch_ratio")]
    assert len(ratios) == 8 and all(math.isfinite(r) and r > 0 for r in ratios)

    class UserBlock(nn.Module):
        residual_branch = "conv"

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    torch.manual_seed(0)
    user = nn.Sequential(UserBlock(), UserBlock())
    x = torch.randn(3, 2, 8, 8)
    metrics = ActivationVarianceMonitor().measure(user, x)
    branch = user[0].conv(x)
    assert metrics["0/branch_ratio"] == pytest.approx(
        float(branch.detach().var(unbiased=False) / x.var(unbiased=False)), rel=1e-5
    )
    assert metrics["1/growth"] == pytest.approx(metrics["1/var"] / metrics["0/var"])


def test_bf16_mixed_with_gradient_accumulation(tmp_path):
    net = _tiny()
    outputs = []
    net.layer3[0].register_forward_hook(
        lambda m, a, out: outputs.append(out.detach().double()) if m.training else None
    )
    monitor = ActivationVarianceMonitor(log_every_n_steps=2, sample_every_n_steps=2)
    trainer = _trainer(tmp_path, [monitor], max_steps=4, precision="bf16-mixed", accumulate_grad_batches=2)
    trainer.fit(Wrapper(net), _data(n=32))
    assert [e["step"] for e in monitor.history] == [2.0, 4.0]
    assert monitor.collectives == 2  # one per logging interval, none on the 6 other micro-batches
    assert outputs[0].dtype == torch.float64 and len(outputs) == 8
    # second interval = steps 2 and 3; one step in two is recorded: step 2's two micro-batches
    last = torch.cat(outputs[4:6])
    index = [t.name for t in monitor.targets].index("net.layer3.0")
    moments = monitor.last_stats[f"{index}/out"]
    assert float(moments.count[0]) == last.numel() / last.shape[1]
    assert monitor.history[-1]["activation_variance/net.layer3.0/var"] == pytest.approx(
        float(last.var(unbiased=False)), rel=1e-5
    )


def _compiled_history(tmp_path, backend):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    monitor = ActivationVarianceMonitor(log_every_n_steps=1, sample_every_n_steps=2)
    model = torch.compile(Wrapper(_tiny()), backend=backend)
    _trainer(tmp_path, [monitor], max_steps=3).fit(model, _data(n=12))
    return monitor.history


def _eager_history(tmp_path):
    monitor = ActivationVarianceMonitor(log_every_n_steps=1, sample_every_n_steps=2)
    _trainer(tmp_path, [monitor], max_steps=3).fit(Wrapper(_tiny()), _data(n=12))
    return monitor.history


def test_compiled_model_aot_eager_matches_eager(tmp_path):
    from torch._dynamo.utils import counters

    compiled = _compiled_history(tmp_path, "aot_eager")
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did trace (hooks inside the graph)
    eager = _eager_history(tmp_path)
    assert len(compiled) == len(eager) == 3
    # steps 0 and 2 recorded, step 1 not (sampling): both graph variants ran
    recorded = ["activation_variance/net.layer1.0/var" in entry for entry in compiled]
    assert recorded == [True, False, True]
    for got, want in zip(compiled, eager):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key


@pytest.mark.slow
def test_compiled_model_inductor_matches_eager(tmp_path):
    compiled = _compiled_history(tmp_path, "inductor")
    eager = _eager_history(tmp_path)
    for got, want in zip(compiled, eager):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-3, abs=1e-8), key


def test_resume_from_checkpoint_restores_history(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    first = ActivationVarianceMonitor(log_every_n_steps=2)
    _trainer(tmp_path, [first, checkpoint], max_steps=4, enable_checkpointing=True).fit(
        Wrapper(_tiny()), _data(n=32)
    )
    assert [e["step"] for e in first.history] == [2.0, 4.0]
    resumed = ActivationVarianceMonitor(log_every_n_steps=2)
    trainer = _trainer(tmp_path, [resumed], max_steps=8)
    trainer.fit(Wrapper(_tiny(seed=5)), _data(n=32), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [e["step"] for e in resumed.history] == [2.0, 4.0, 6.0, 8.0]
    assert resumed.history[:2] == first.history


class BlowUp(nn.Module):
    """Wraps a layer; from its ``start``-th training call on it returns inf."""

    def __init__(self, inner: nn.Module, start: int):
        super().__init__()
        self.inner, self.start, self.calls = inner, start, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls > self.start:
                out = out * float("inf")
        return out


def test_first_nonfinite_module_is_named(tmp_path):
    net = _tiny()
    # third training forward = step 2, a recorded step with the default sampling (every other step)
    net.layer2[0].conv1 = BlowUp(net.layer2[0].conv1, start=2)
    monitor = ActivationVarianceMonitor(log_every_n_steps=3)
    with pytest.warns(UserWarning, match=r"net\.layer2\.0.*step 2"):
        _trainer(tmp_path, [monitor], max_steps=6).fit(Wrapper(net), _data(n=32))
    assert monitor.nonfinite == {"step": 2, "layer": "net.layer2.0"}
    assert monitor.history[0]["activation_variance/nonfinite_step"] == 2.0
    (error,) = [f for f in monitor.diagnose(None, None) if f.severity == "error"]
    assert error.layers == ["net.layer2.0"] and "step 2" in error.message


def test_observing_does_not_change_training(tmp_path):
    def train(callbacks):
        torch.manual_seed(0)
        module = Wrapper(_tiny())
        _trainer(tmp_path, callbacks, max_steps=3).fit(module, _data(n=16))
        return module.state_dict()

    without = train([])
    with_monitor = train([ActivationVarianceMonitor(log_every_n_steps=1, types=("conv", "relu"))])
    assert without.keys() == with_monitor.keys()
    for key, value in without.items():
        assert torch.equal(value, with_monitor[key]), key


def test_diagnosis_reports_vanishing_and_dead_channels():
    torch.manual_seed(0)
    plain = ResNet(PreActBasicBlock, [2, 2, 2, 2], stem="cifar", width=8, norm="none", skip=False)
    dead = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    with torch.no_grad():
        for module in plain.modules():  # half the He scale: each conv quarters the variance
            if isinstance(module, nn.Conv2d):
                module.weight.mul_(0.5)
        dead[0].bias[:3] = -100.0  # three of four channels never fire

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.plain, self.head = plain, dead

        def forward(self, x):
            return self.plain(x), self.head(x)

    monitor = ActivationVarianceMonitor(types=("relu",))
    metrics = monitor.measure(Both(), torch.randn(4, 3, 16, 16))
    assert metrics["head.1/dead_fraction"] == 0.75
    assert metrics["growth_per_block"] < 0.2
    monitor.append_history({"step": 0.0, **{f"activation_variance/{k}": v for k, v in metrics.items()}})
    vanishing = next(f for f in monitor.diagnose(None, None) if "shrinks" in f.message)
    assert vanishing.severity == "warning" and vanishing.layers == ["plain.layer1.0", "plain.layer4.1"]
    dead_finding = next(f for f in monitor.diagnose(None, None) if "dead" in f.message)
    assert dead_finding.layers == ["head.1"] and "75%" in dead_finding.message


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="types entry 'convolution'"):
        ActivationVarianceMonitor(types=("convolution",)).measure(nn.Conv2d(1, 1, 1), torch.zeros(1, 1, 2, 2))
    # no block and no stem: the conv layers are the depth axis
    conv_net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
    assert sorted(ActivationVarianceMonitor().measure(conv_net, torch.randn(2, 1, 8, 8))) == [
        "0/dead_fraction", "0/mean", "0/var", "0/var_ch_max", "0/var_ch_min", "1/dead_fraction",
        "2/dead_fraction", "2/growth", "2/mean", "2/var", "2/var_ch_max", "2/var_ch_min", "nonfinite_step",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="nothing to measure in Linear"):
        ActivationVarianceMonitor().measure(nn.Linear(2, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"no module of Sequential matches types=\['bn'\]"):
        ActivationVarianceMonitor(types=("bn",)).measure(conv_net, torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="names is not a valid regex"):
        ActivationVarianceMonitor(names="(")
    with pytest.raises(ValueError, match="explode_growth"):
        ActivationVarianceMonitor(explode_growth=0.9)


def test_flat_bank_logs_exactly_what_the_per_tensor_path_logs_on_a_deep_net(tmp_path):
    """The fast path (all moments in one flat buffer, one fold per batch) against the per-tensor updates,
    on a 50-layer pre-activation ResNet with accumulation and a block that runs on odd batches only (its
    slots sit out some folds, whose scratch must then add zeros): every logged number bit-identical."""
    from lightning_convnets.backbones import create_backbone

    class Deep(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.side = PreActBasicBlock(3, 3)
            self.net = create_backbone("preact_resnet50", stem="cifar", width=4)
            self.head = nn.Linear(self.net.out_channels[-1], 3)

        def training_step(self, batch, batch_idx):
            x, y = batch
            if batch_idx % 2:
                x = self.side(x)
            features = self.net(x)[-1].mean((2, 3))
            return nn.functional.cross_entropy(self.head(features), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def history(fast: bool) -> list[dict[str, float]]:
        pl.seed_everything(0, verbose=False)
        x, y = torch.randn(24, 3, 16, 16) * 3 + 1, torch.randint(0, 3, (24,))
        return _bank_history(Deep, x, y, 2, fast, tmp_path, max_steps=5, accumulate_grad_batches=2).history

    fast, slow = history(True), history(False)
    assert len(fast) == len(slow) == 3 and len(fast[0]) > 100
    assert fast == slow


def _bank_history(module_cls, x, y, batch_size, fast, root, spy=None, **trainer_args):
    """A fit of ``module_cls()`` on ``(x, y)`` with an activation monitor recording every step and logging
    every two, through the flat bank (``fast``) or the per-tensor path; ``spy(monitor)`` runs after attach.
    Returns the monitor."""
    monitor = ActivationVarianceMonitor(log_every_n_steps=2, sample_every_n_steps=1)
    attach = monitor.attach

    def attach_then(trainer, pl_module):
        attach(trainer, pl_module)
        if not fast:
            monitor._bank_allowed = False
        if spy is not None:
            spy(monitor)

    monitor.attach = attach_then
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, **trainer_args,
    )  # fmt: skip
    trainer.callbacks.append(monitor)
    trainer.fit(module_cls(), DataLoader(list(zip(x, y)), batch_size=batch_size))
    assert monitor._bank.ready is fast
    return monitor


class _TwoHooksPerBlock(ActivationVarianceMonitor):
    """The hooks as they were before issue 16: a pre-activation block's output measured in a hook of its own
    next to its ResidualAdd's hook."""

    def _hook_sum_output(self, index, block, add, measure_shortcut):
        self._hook(block, [(f"{index}/out", lambda a, o: o)])
        selects = [(f"{index}/branch", lambda a, o: a[1])]
        if measure_shortcut:
            selects.append((f"{index}/shortcut", lambda a, o: a[0]))
        self._hook(add, selects)


class _ScaledPreAct(PreActBasicBlock):
    """A user's pre-activation block (``preact = True``, a ResidualAdd) that does not return the sum."""

    def forward(self, x):
        return 0.5 * super().forward(x)


class _TwoSumsPreAct(PreActBasicBlock):
    """A pre-activation block that calls its ResidualAdd twice and returns the second sum: the first sum
    is not the block's output, so measuring "the add's output" would count it too."""

    def forward(self, x):
        once = super().forward(x)
        return self.add(once, self.conv2(self.relu(self.bn2(self.conv1(self.relu(self.bn1(once)))))))


def test_one_hook_per_preact_block_logs_exactly_what_two_hooks_log(tmp_path):
    """Issue 16: a pre-activation block's output is measured in its ResidualAdd's hook once the first
    recorded forward showed the block returns the sum (one forward hook per block instead of two); a
    block that returns something else keeps its own hook. Every logged number bit-identical to the two
    hooks per block, on a preact ResNet-50 followed by a block that scales its sum and one that calls its
    add twice."""

    class Deep(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = create_backbone("preact_resnet50", stem="cifar", width=4)
            width = self.net.out_channels[-1]
            self.tail = _ScaledPreAct(width, width)
            self.twice = _TwoSumsPreAct(width, width)
            self.head = nn.Linear(self.net.out_channels[-1], 3)

        def training_step(self, batch, batch_idx):
            x, y = batch
            features = self.twice(self.tail(self.net(x)[-1])).mean((2, 3))
            return nn.functional.cross_entropy(self.head(features), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def run(cls):
        pl.seed_everything(0, verbose=False)
        monitor = cls(log_every_n_steps=2)
        x, y = torch.randn(24, 3, 16, 16) * 3 + 1, torch.randint(0, 3, (24,))
        trainer = pl.Trainer(
            max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path, callbacks=[monitor],
        )  # fmt: skip
        model = Deep()
        trainer.fit(model, DataLoader(list(zip(x, y)), batch_size=4))
        return monitor, model

    (merged, model), (two, _) = run(ActivationVarianceMonitor), run(_TwoHooksPerBlock)
    assert len(merged.history) == len(two.history) == 3 and len(merged.history[0]) > 100
    assert merged.history == two.history
    assert "activation_variance/tail/var" in merged.history[-1]
    assert "activation_variance/twice/var" in merged.history[-1]
    # after the fit (hooks removed at teardown), count what a second fit would dispatch: re-attach
    merged.attach(None, model)
    blocks = [t for t in merged.targets if t.sum_is_output]
    assert len(blocks) == 18  # 16 bottlenecks, the tail, the block with two sums
    with torch.no_grad():
        merged._recording = True
        model.train()
        model.twice(model.tail(model.net(torch.randn(4, 3, 16, 16))[-1]))
    hooked = [m for m in model.modules() if m._forward_hooks and not isinstance(m, nn.ReLU)]
    assert len(hooked) == 18 + 1 + 2  # one per preact block, the stem, and the two blocks' own hooks
    # and one per ReLU module for the dead units (units=True, the default)
    assert all(m._forward_hooks for m in model.modules() if isinstance(m, nn.ReLU))
    merged.remove_hooks()


def test_activations_reuse_one_difference_buffer_per_size_class_and_log_exactly_the_same(tmp_path):
    """Issue 16: on the CPU the bank writes ``x - K`` into one flat buffer, reused while the sizes stay
    within a factor of two (a fresh tensor per take costs page faults and cold cache lines: more than the
    arithmetic on 8 MiB); a smaller stage gets a smaller buffer (the old one freed first). Stages at
    128x128, batch 8: every logged number equals the per-tensor path's, each stage allocates once per
    forward, and no buffer is left once the forward is over."""

    class Wide(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = ResNet(PreActBasicBlock, [2, 2, 1, 1], stem="cifar", width=16)
            self.head = nn.Linear(self.net.out_channels[-1], 3)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.head(self.net(x)[-1].mean((2, 3))), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    takes: list[
        tuple[int, torch.Tensor, int]
    ] = []  # (elements taken, the buffer (kept: no address reuse), its size)

    def spy_on_takes(monitor):
        bank, take = monitor._bank, monitor._bank.take

        def spy(slot, t):
            taken = take(slot, t)
            if taken:
                takes.append((t.numel(), bank._buffer, bank._buffer.numel()))
            return taken

        bank.take = spy

    def history(fast: bool) -> list[dict[str, float]]:
        pl.seed_everything(0, verbose=False)
        x, y = torch.randn(24, 3, 128, 128) * 2 + 1, torch.randint(0, 3, (24,))
        spy = spy_on_takes if fast else None
        monitor = _bank_history(Wide, x, y, 8, fast, tmp_path, spy=spy, max_steps=3)
        assert monitor._bank._buffer is None
        return monitor.history

    fast, slow = history(True), history(False)
    assert len(fast) == len(slow) == 2 and len(fast[0]) > 20
    assert fast == slow
    # the last forward's takes: one buffer per size class, as large as the class's largest tensor
    last = takes[len(takes) // 2 :]  # two bank forwards (the first batch builds the bank)
    assert len(takes) % 2 == 0 and [n for n, _, _ in last] == [n for n, _, _ in takes[: len(takes) // 2]]
    classes = sorted({n for n, _, _ in last}, reverse=True)
    assert len(classes) >= 3 and classes[0] >= 2**20  # 4 MiB tensors at stage 1
    for n, _, size in last:
        assert n <= size < 2 * n
    buffers = [buffer for _, buffer, _ in last]
    changes = sum(a is not b for a, b in itertools.pairwise(buffers))
    assert changes == len({size for _, _, size in last}) - 1  # one allocation per class, in stage order


class _Stage(nn.Module):
    """A user's residual block written with ResidualAdd: an optional learned 1x1 projection shortcut."""

    def __init__(self, channels: int, project: bool, branch_scale: float = 1.0, shortcut_scale: float = 1.0):
        super().__init__()
        from lightning_convnets.nn import ResidualAdd

        self.branch = nn.Conv2d(channels, channels, 3, padding=1)
        self.downsample = nn.Conv2d(channels, channels, 1) if project else None
        self.add = ResidualAdd()
        with torch.no_grad():
            self.branch.weight.mul_(branch_scale)
            if self.downsample is not None:
                self.downsample.weight.mul_(shortcut_scale)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.add(shortcut, self.branch(x))


def _branch_findings(tmp_path, net) -> list:
    monitor = ActivationVarianceMonitor(log_every_n_steps=1)
    _trainer(tmp_path, [monitor], max_steps=1).fit(Wrapper(net, lr=0.0), _data())
    return [f for f in monitor.diagnose(None, None) if f.kind == "branch_dominates"]


def test_a_projection_shortcut_is_no_branch_dominates_alarm_an_identity_one_is(tmp_path):
    torch.manual_seed(0)
    stem = nn.Conv2d(3, 8, 3, padding=1)
    # the projection's output is 100x smaller than the branch's: ratio >> 4, yet the block is fine
    projected = nn.Sequential(stem, _Stage(8, project=True, shortcut_scale=0.01), _Stage(8, project=False))
    assert _branch_findings(tmp_path, projected) == []
    # an identity shortcut with a branch 30x too loud is flagged, and only that block
    loud = nn.Sequential(
        stem, _Stage(8, project=True, shortcut_scale=0.01), _Stage(8, False, branch_scale=30.0)
    )
    (finding,) = _branch_findings(tmp_path, loud)
    assert finding.layers == ["net.2"] and finding.values["max_branch_ratio"] > 4
    assert "zero_init_residual" in finding.suggestion


def test_saturated_tanh_and_sigmoid_channels_are_counted_and_named():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 1), nn.Sigmoid(), nn.Conv2d(4, 2, 1), nn.ReLU()
    )
    with torch.no_grad():
        net[0].bias[:2] = 20.0  # two of four tanh channels sit at +1
        net[2].bias[:1] = -30.0  # one of four sigmoid channels sits at 0
        net[4].bias[:] = -1e3  # every ReLU channel is dead
    monitor = ActivationVarianceMonitor()
    metrics = monitor.measure(net, torch.randn(4, 3, 8, 8))
    assert metrics["1/saturated_fraction"] == 0.5
    assert metrics["3/saturated_fraction"] == 0.25
    assert metrics["5/dead_fraction"] == 1.0
    monitor.append_history({"step": 3.0, **{f"activation_variance/{k}": v for k, v in metrics.items()}})
    findings = {f.kind: f for f in monitor.diagnose(None, None)}
    assert (
        findings["saturated_units"].layers == ["1", "3"]
        and "50% of the channels of 1" in findings["saturated_units"].message
    )
    assert findings["dead_relu"].layers == ["5"]
    # the healthy twin: default initialisation saturates nothing; units=False counts nothing
    quiet = ActivationVarianceMonitor().measure(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh()), torch.randn(4, 3, 8, 8)
    )
    assert quiet["1/saturated_fraction"] == 0.0
    assert not any(
        "saturated" in k for k in ActivationVarianceMonitor(units=False).measure(net, torch.randn(2, 3, 8, 8))
    )
    with pytest.raises(ValueError, match="saturated_threshold must be in"):
        ActivationVarianceMonitor(saturated_threshold=0.0)


def test_units_on_a_module_reused_at_two_widths_keep_the_first_width():
    relu = nn.ReLU()

    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.relu = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 6, 1), relu

        def forward(self, x):
            return self.relu(self.b(self.relu(self.a(x))))

    metrics = ActivationVarianceMonitor(types=("conv",)).measure(Reuse(), torch.randn(2, 3, 4, 4))
    assert 0.0 <= metrics["relu/dead_fraction"] <= 1.0


# ---------------------------------------------------------------------------------------- the parts
def test_unit_counts_count_alive_channels_merge_ranks_reset_and_resume():
    counts = UnitCounts()
    counts.add("relu", "relu")
    counts.add("tanh", "tanh")
    counts.add("sig", "sigmoid")
    assert counts.names() == ["relu", "tanh", "sig"] and counts.names("sigmoid", "tanh") == ["tanh", "sig"]
    assert counts.alive("relu") is None  # nothing allocated before the first output
    counts.update("relu", torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]]))
    counts.update("relu", torch.ones(2, 5))  # another width: the first width only
    counts.update("relu", torch.ones(3, dtype=torch.long))  # not a floating batch: ignored
    counts.update("tanh", torch.tensor([[[0.995, 0.0]], [[-1.0, 0.2]]]))  # (2, 1, 2): one channel
    counts.update("sig", (torch.ones(2, 2),))  # not a tensor: ignored
    assert counts.alive("relu").tolist() == [0.0, 2.0, 0.0] and counts.seen("relu").item() == 2.0
    assert counts.alive("tanh").tolist() == [2.0] and counts.seen("tanh").item() == 4.0
    assert counts.alive("sig") is None
    # two ranks: the counts are summed, then a channel is dead where no rank saw it alive
    packer = StatsPacker()
    counts.pack(packer)
    other = packer.flat().clone()
    other[:3] = torch.tensor([1.0, 0.0, 0.0])  # rank 1's relu: channel 0 alive once
    metrics = counts.metrics(packer.unpack(torch.stack([packer.flat(), other])))
    assert metrics == {"relu/dead_fraction": 1 / 3, "tanh/saturated_fraction": 0.0}
    saved = counts.state_dict()
    assert sorted(saved) == ["relu", "tanh"] and saved["relu"]["alive"].tolist() == [0.0, 2.0, 0.0]
    counts.reset()
    assert counts.alive("relu").tolist() == [0.0, 0.0, 0.0] and counts.seen("tanh").item() == 0.0
    assert counts.metrics(StatsPacker().unpack(torch.zeros(1, 0))) == {}
    # a resumed run: the saved counts go back where nothing was counted yet, on the given device
    fresh = UnitCounts()
    fresh.add("relu", "relu")
    fresh.add("tanh", "tanh")
    fresh.update("tanh", torch.zeros(1, 1, 3))
    fresh.load_state_dict({**saved, "gone": saved["relu"]}, "cpu")
    assert fresh.alive("relu").tolist() == [0.0, 2.0, 0.0] and fresh.seen("relu").item() == 2.0
    assert fresh.seen("tanh").item() == 3.0  # already counted in this run: kept
    with pytest.raises(ValueError, match="kind must be 'relu', 'sigmoid' or 'tanh', got 'gelu'"):
        counts.add("x", "gelu")
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Tanh(), nn.GELU())
    added = UnitCounts().add_modules(net, skip={id(net[2])})
    assert [name for name, _ in added] == ["1"] and added[0][1] is net[1]


def _one_moment(variance: float, mean: float = 0.0, count: float = 4.0):
    """The merged moments of one rank and one channel with this population variance."""
    return merge_moments(torch.tensor([[count]]), torch.tensor([[mean]]), torch.tensor([[count * variance]]))


def test_target_metrics_read_growth_and_branch_ratio_from_the_moments():
    stem = Target("stem", nn.Identity(), "stem")
    block = Target("b1", nn.Identity(), "block", add=nn.Identity())
    block2 = Target("b2", nn.Identity(), "block", add=nn.Identity())
    layer = Target("head", nn.Identity(), "layer")
    stats = {
        "0/out": _one_moment(1.0),
        "1/out": _one_moment(2.0), "1/shortcut": _one_moment(1.0), "1/branch": _one_moment(1.0),
        "2/out": _one_moment(8.0), "2/branch": _one_moment(6.0),  # its shortcut is b1's output (an alias)
        "3/out": _one_moment(math.inf),
    }  # fmt: skip
    metrics, blocks, first_bad = target_metrics([stem, block, block2, layer], {"2/shortcut": "1/out"}, stats)
    assert blocks == [2.0, 8.0] and geomean_growth(blocks) == 4.0
    assert metrics["b1/growth"] == 2.0 and metrics["b1/branch_ratio"] == 1.0 and metrics["b1/sum_var"] == 2.0
    assert (
        metrics["b2/shortcut_var"] == 2.0
        and metrics["b2/branch_ratio"] == 3.0
        and metrics["b2/growth"] == 4.0
    )
    assert metrics["stem/dead_fraction"] == 0.0 and "stem/branch_ratio" not in metrics
    assert first_bad == "head"
    # a target that saw nothing is left out, and the growth skips it
    metrics, blocks, first_bad = target_metrics([stem, layer], {}, {"0/out": _one_moment(1.0)})
    assert sorted(metrics) == [
        "stem/dead_fraction",
        "stem/mean",
        "stem/var",
        "stem/var_ch_max",
        "stem/var_ch_min",
    ]
    assert (blocks, first_bad) == ([], None)
    assert math.isnan(geomean_growth([0.0, 1.0]))


def test_activation_findings_are_one_rule_call_each_on_the_latest_entry():
    targets = [
        Target("stem", nn.Identity(), "stem"),
        Target("b1", nn.Identity(), "block", add=nn.Identity()),
        Target("b2", nn.Identity(), "block", add=nn.Identity(), projection=True),
    ]
    counts = UnitCounts()
    counts.add("act", "relu")
    counts.add("gate", "sigmoid")
    entry = {"step": 7.0}
    for name, metric, value in (
        ("stem", "var", 1.0), ("b1", "var", 1.0), ("b2", "var", 1.0), ("act", "dead_fraction", 0.5),
        ("gate", "saturated_fraction", 0.5), ("b1", "branch_ratio", 30.0), ("b2", "branch_ratio", 30.0),
    ):  # fmt: skip
        entry[f"activation_variance/{name}/{metric}"] = value
    findings = activation_findings(entry, {"step": 3, "layer": "b1"}, targets, counts)
    assert [f.kind for f in findings] == [
        "nonfinite",
        "variance_stable",
        "dead_relu",
        "branch_dominates",
        "saturated_units",
    ]
    by_kind = {f.kind: f for f in findings}
    assert by_kind["dead_relu"].layers == ["act"] and by_kind["saturated_units"].layers == ["gate"]
    assert by_kind["branch_dominates"].layers == ["b1"]  # a projection shortcut's ratio is not judged
    assert all(f.step == 7 for f in findings[1:])
    # stricter thresholds turn the findings off; no history: the non-finite record only
    quiet = activation_findings(entry, None, targets, counts, dead_threshold=0.9, saturated_threshold=0.9)
    assert [f.kind for f in quiet] == ["variance_stable", "branch_dominates"]
    assert activation_findings(None, None, targets, counts) == []
    assert measured_targets(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))[1].name == "2"


def test_unit_names_keep_their_import_path_from_the_monitor_module():
    for name in units.__all__:
        if name != "UnitCounts":
            assert getattr(activation_variance, name) is getattr(units, name), name
    assert activation_variance.UnitCounts is UnitCounts and "UnitCounts" in activation_variance.__all__
