"""The adapters over Lightning's and torch's private members (the only places the package reads them):
each test here fails loudly when an upgrade renames what an adapter relies on."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_convnets.nn.compile import clear_compiled, is_compiled
from lightning_convnets.tasks.adapters import attached_trainer, logger_writes_this_step
from lightning_convnets.tasks.nonfinite import any_nonfinite


class _Probe(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.seen: list[tuple[int, bool]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((batch_idx, logger_writes_this_step(attached_trainer(self))))
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_still_decides_the_logging_steps_in_its_logger_connector():
    from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector

    assert isinstance(getattr(_LoggerConnector, "should_update_logs", None), property), (
        "Lightning renamed _LoggerConnector.should_update_logs: update tasks/adapters.logger_writes_this_step"
    )
    assert hasattr(pl.Trainer(logger=False), "_logger_connector")


def test_logger_writes_this_step_follows_log_every_n_steps(tmp_path):
    probe = _Probe()
    trainer = pl.Trainer(
        max_steps=6, log_every_n_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(probe, torch.utils.data.DataLoader(torch.randn(6, 2), batch_size=1))
    assert probe.seen == [(0, False), (1, False), (2, True), (3, False), (4, False), (5, True)]
    assert logger_writes_this_step(None) is True  # outside a trainer: every step


def test_attached_trainer_is_none_outside_a_trainer_and_the_trainer_inside(tmp_path):
    probe = _Probe()
    assert attached_trainer(probe) is None
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(probe, torch.utils.data.DataLoader(torch.randn(2, 2), batch_size=1))
    assert attached_trainer(probe) is trainer


def test_torch_keeps_the_in_place_compiled_call_where_the_adapter_reads_it():
    net = nn.Linear(2, 2)
    assert "_compiled_call_impl" in vars(nn.Module), (
        "torch renamed nn.Module._compiled_call_impl: update nn/compile.py"
    )
    assert not is_compiled(net)
    net.compile(backend="eager")
    assert is_compiled(net)
    wrapper = nn.Sequential(net)
    assert clear_compiled(wrapper) is wrapper and not is_compiled(net)


def test_the_fused_non_finite_check_exists_and_agrees_with_the_fallback():
    assert hasattr(torch, "_amp_foreach_non_finite_check_and_unscale_"), (
        "torch dropped _amp_foreach_non_finite_check_and_unscale_: any_nonfinite falls back to norms"
    )
    good = [torch.ones(3), torch.zeros(2, 2)]
    assert not bool(any_nonfinite(good))
    assert bool(any_nonfinite([*good, torch.tensor([float("inf")])]))
    # mixed dtypes: the fused kernel refuses them, the fallback answers
    mixed = [torch.ones(3, dtype=torch.float64), torch.tensor([float("nan")], dtype=torch.float16)]
    assert bool(any_nonfinite(mixed)) and not bool(
        any_nonfinite([torch.ones(2, dtype=torch.float64), torch.ones(2)])
    )
