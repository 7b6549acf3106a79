"""A model compiled, and already run, before the monitors attach keeps its monitors.

(Without the reset, the compiled network below logs no activation statistic at all and the BatchNorm
monitor only its drift keys: checked by hand when this test was written.)

Dynamo does not guard on forward hooks added later to a compiled module's inner modules: a graph traced
before the monitors attach would be reused without their hooks and the monitors would measure nothing.
The core detects a compiled model in ``setup`` and drops the cached graphs (``torch.compiler.reset()``),
so the next call traces again with the hooks in; the hooks then stay installed (a compiled graph keeps
the hooks it traced), and the schedule's on/off switch is a guard (two graph variants). Tested with
``backend="aot_eager"`` on the CPU, with the default ``fullgraph=False`` and with ``fullgraph=True``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning_convnets.callbacks import ActivationVarianceMonitor, BatchNormDriftMonitor
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_convnets.backbones.resnet import PreActBasicBlock, ResNet


class Wrapper(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.head = nn.Linear(net.out_channels[-1], 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x)[-1].mean((2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return ResNet(PreActBasicBlock, [1, 1, 1, 1], stem="cifar", width=4)


def _data() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, 3, 16, 16, generator=gen), torch.randint(0, 3, (12,), generator=gen))
    return DataLoader(data, batch_size=4)


def _histories(tmp_path, model: nn.Module) -> tuple[list[dict], list[dict], list[torch.Tensor]]:
    monitors = [
        ActivationVarianceMonitor(log_every_n_steps=1, sample_every_n_steps=2, strict=True),
        BatchNormDriftMonitor(log_every_n_steps=1, sample_every_n_steps=2, strict=True),
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=monitors,
    )
    trainer.fit(model, _data())
    params = [p.detach().clone() for p in model.parameters()]
    return monitors[0].history, monitors[1].history, params


def _renamed(history: list[dict]) -> list[dict]:
    """Layer names as in the eager model (the compiled network's modules sit under ``_orig_mod``)."""
    return [{key.replace("._orig_mod", ""): value for key, value in entry.items()} for entry in history]


@pytest.mark.parametrize("fullgraph", [False, True], ids=["default", "fullgraph"])
def test_model_compiled_and_run_before_the_monitors_attach_keeps_them(tmp_path, fullgraph):
    x = torch.randn(4, 3, 16, 16)
    eager = Wrapper(_net())
    eager.train()(x)  # the same first forward as the compiled model's (it moves BN running stats)
    eager_av, eager_bn, eager_params = _histories(tmp_path / "eager", eager)

    torch.compiler.reset()
    # the network compiled inside the LightningModule (Lightning does not unwrap that, unlike a compiled
    # LightningModule), and a training graph traced before any monitor exists: no hooks in it, and grad
    # mode on as in the fit, so no guard of dynamo's makes the fit trace again by itself
    compiled = Wrapper(_net())
    compiled.net = torch.compile(compiled.net, backend="aot_eager", fullgraph=fullgraph)
    compiled.train()(x)
    av, bn, params = _histories(tmp_path / "compiled", compiled)
    av, bn = _renamed(av), _renamed(bn)

    key = "activation_variance/net.layer1.0/var"
    assert [key in entry for entry in av] == [True, False, True]  # steps 0 and 2 recorded, 1 not
    assert [e["step"] for e in bn] == [e["step"] for e in eager_bn] == [1.0, 2.0, 3.0]
    for got, want in zip(av, eager_av, strict=True):
        assert got.keys() == want.keys()
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-9), name
    for got, want in zip(bn, eager_bn, strict=True):
        assert got.keys() == want.keys()
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    for got, want in zip(params, eager_params, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
