"""recalibrate_batchnorm (PreciseBN): exact population statistics of a small dataset, pooled over batches of
unequal size and over (simulated) ranks; modes, counters and RNG restored; the monitor's schedule."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from ddp_utils import CPU_DDP, QUIET, ShardedTinyData, TinyResNet, ddp_env, dump, load_ranks  # noqa: F401
from lightning.pytorch.callbacks import Callback
from lightning_convnets.callbacks.batchnorm import BatchNormDriftMonitor
from lightning_convnets.callbacks.precise_bn import recalibrate_batchnorm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def _dataset(n=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # a mean that dwarfs the spread, so pooling mistakes (or float32 sums) would show
    return 50.0 + torch.randn(n, 3, 5, 5, generator=gen) * torch.tensor([1.0, 0.1, 3.0])[:, None, None]


def _population(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1)  # the unbiased variance BN keeps as running_var


def test_single_layer_gets_the_exact_population_statistics_with_unequal_batches():
    data = _dataset()
    bn = nn.BatchNorm2d(3)
    loader = DataLoader(TensorDataset(data), batch_size=3)  # batches of 3, 3, 3, 1
    recalibrate_batchnorm(nn.Sequential(bn), loader)
    mean, var = _population(data)
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=0)
    # the naive average of batch statistics (equal weights, no between-batch term) is visibly wrong here
    batches = [data[i : i + 3] for i in range(0, 10, 3)]
    naive = torch.stack([_population(b)[1] for b in batches[:3]] + [torch.zeros(3, dtype=torch.float64)])
    assert not torch.allclose(naive.mean(0), var, rtol=1e-2)


def test_deeper_layers_see_inputs_normalised_with_batch_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(4, 2, 1),
        nn.BatchNorm2d(2),
    )
    data = _dataset(n=12)
    batches = [data[:5], data[5:9], data[9:]]
    twin = copy.deepcopy(net)
    inputs = []
    twin[5].register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    twin.eval()
    twin[1].train()
    twin[5].train()
    with torch.no_grad():
        for x in batches:
            twin(x)
    net.train()
    counter = net[1].num_batches_tracked.clone()
    recalibrate_batchnorm(net, batches)
    mean, var = _population(torch.cat(inputs))
    torch.testing.assert_close(net[5].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[5].running_var.double(), var, rtol=1e-5, atol=1e-6)
    # modes and counters are restored, dropout was off during the pass (else the twin would differ)
    assert all(m.training for m in net.modules())
    assert torch.equal(net[1].num_batches_tracked, counter)


def test_simulated_ranks_pool_to_the_union():
    data = _dataset(n=14)
    halves = [data[:9], data[9:]]
    captured = {}

    def capture(tensor):  # rank 1 runs first here; its moments are kept for rank 0's gather
        captured["rank1"] = tensor.clone()
        return tensor.unsqueeze(0)

    rank1 = nn.Sequential(nn.BatchNorm2d(3))
    recalibrate_batchnorm(rank1, DataLoader(TensorDataset(halves[1]), batch_size=2), all_gather=capture)
    rank0 = nn.Sequential(nn.BatchNorm2d(3))
    recalibrate_batchnorm(
        rank0,
        DataLoader(TensorDataset(halves[0]), batch_size=4),
        all_gather=lambda t: torch.stack([t, captured["rank1"]]),
    )
    mean, var = _population(data)
    torch.testing.assert_close(rank0[0].running_mean.double(), mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(rank0[0].running_var.double(), var, rtol=1e-5, atol=0)
    # without the gather each rank only knows its half
    torch.testing.assert_close(rank1[0].running_mean.double(), _population(halves[1])[0], rtol=1e-6, atol=0)


def test_num_batches_batch_formats_rng_and_modes():
    data = _dataset(n=12)
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn).eval()
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    shuffled = DataLoader(TensorDataset(data), batch_size=4, shuffle=True)  # draws from the global RNG
    recalibrate_batchnorm(model, shuffled, num_batches=1)
    torch.testing.assert_close(torch.rand(3), expected_draw)  # the training RNG stream is untouched
    assert not model.training and not bn.training
    recalibrate_batchnorm(model, [{"image": data[:4]}, {"image": data[4:]}], num_batches=1)
    torch.testing.assert_close(bn.running_mean.double(), _population(data[:4])[0], rtol=1e-6, atol=0)
    recalibrate_batchnorm(model, [data], forward_fn=lambda m, b: m(b[6:]))
    torch.testing.assert_close(bn.running_mean.double(), _population(data[6:])[0], rtol=1e-6, atol=0)


def test_bad_input_is_named():
    model = nn.Sequential(nn.BatchNorm2d(3)).eval()
    with pytest.raises(ValueError, match="num_batches must be >= 1"):
        recalibrate_batchnorm(model, [torch.zeros(2, 3, 2, 2)], num_batches=0)
    with pytest.raises(ValueError, match="yielded no batch"):
        recalibrate_batchnorm(model, [])
    with pytest.raises(TypeError, match="batch of type str"):
        recalibrate_batchnorm(model, ["not a batch"])
    assert not model[0].training  # the pass put BN in train mode; the error path restored eval


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # fixed weights: recalibration is reproducible


class Capture(Callback):
    def __init__(self):
        self.seen = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and batch_idx == 0:
            bn = pl_module.net[1]
            self.seen.append((bn.running_mean.clone(), bn.running_var.clone()))


def test_monitor_recalibrates_before_validation(tmp_path):
    data = _dataset(n=16)
    loader = DataLoader(TensorDataset(data), batch_size=4)
    torch.manual_seed(0)
    module = Net()
    reference = copy.deepcopy(module.net)
    capture = Capture()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[BatchNormDriftMonitor(recalibrate_batches=2), capture],
    )
    trainer.fit(module, loader, loader)
    recalibrate_batchnorm(reference, loader, num_batches=2)
    ((mean, var),) = capture.seen
    torch.testing.assert_close(mean, reference[1].running_mean)
    torch.testing.assert_close(var, reference[1].running_var)


@pytest.mark.parametrize("name", ["recalibrate_batchnorm", "pool_running_stats", "batchnorm_layers"])
def test_precise_bn_names_still_import_from_the_monitor_module_with_a_deprecation_warning(name):
    from lightning_convnets.callbacks import batchnorm, precise_bn

    with pytest.warns(DeprecationWarning, match=f"batchnorm.{name} moved to lightning_convnets.callbacks.precise_bn"):
        old = getattr(batchnorm, name)
    assert old is getattr(precise_bn, name)


# ---------------------------------------------------------------------- two ranks, non-i.i.d. shards
class _BuffersAtValidation(Callback):
    """Dump every BN layer's running statistics at the first validation batch, and before and after a
    direct ``recalibrate_batchnorm`` of the rank's own shard at step 2."""

    def __init__(self, folder):
        self.folder = folder

    @staticmethod
    def _buffers(pl_module):
        return {k: v.clone() for k, v in pl_module.state_dict().items() if "running" in k}

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and not trainer.sanity_checking:
            dump(self.folder, "validation", self._buffers(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != 2:  # after two steps of rank-local statistics
            return
        before = self._buffers(pl_module)
        recalibrate_batchnorm(pl_module, trainer.datamodule.train_dataloader(), num_batches=3)
        dump(self.folder, "direct", {"before": before, "after": self._buffers(pl_module)})


@pytest.mark.usefixtures("ddp_env")
def test_precise_bn_leaves_bit_identical_statistics_on_two_ranks_with_different_shards(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    # no buffer broadcast: each rank's statistics are its own shard's (rank 1's images are shifted)
    strategy = DDPStrategy(broadcast_buffers=False, start_method="fork")
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        **dict(CPU_DDP, strategy=strategy),
        **QUIET,
        max_steps=4,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[BatchNormDriftMonitor(recalibrate_batches=2), _BuffersAtValidation(tmp_path)],
    )
    trainer.fit(TinyResNet(), ShardedTinyData(num=32, batch_size=4, odd_shift=2.0))
    at_validation = load_ranks(tmp_path, "validation")
    direct = load_ranks(tmp_path, "direct")
    assert at_validation[0].keys() == at_validation[1].keys() and len(at_validation[0]) == 10
    for name, value in at_validation[0].items():  # PreciseBN in fit, before validation
        assert torch.equal(value, at_validation[1][name]), name
    for name, value in direct[0]["after"].items():  # recalibrate_batchnorm called on each rank's shard
        assert torch.equal(value, direct[1]["after"][name]), name
    # ...which differed before (the shards differ), so the agreement is the pooling's doing
    assert any(not torch.equal(v, direct[1]["before"][k]) for k, v in direct[0]["before"].items())
