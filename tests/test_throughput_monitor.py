"""ThroughputMonitor: the input-bound verdict, host syncs named by module and line, FLOPs, no host read on
quiet steps, the guard (training bit-identical), checkpointed totals, the CLI and 2-rank DDP."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning_convnets.callbacks import throughput as tp
from lightning_convnets.callbacks.throughput import HostSyncCounter, ThroughputMonitor
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))


class Images(Dataset):
    def __init__(self, n: int = 256, sleep: float = 0.0) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, 3, (n,), generator=gen)
        self.sleep = sleep

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if self.sleep:
            time.sleep(self.sleep)
        return self.x[i], self.y[i]


class Plain(pl.LightningModule):
    """A manual nn.Sequential, written the way people write it; ``sync`` reads a value in its forward."""

    def __init__(self, sync: bool = False, manual: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), Probe(sync))
        self.head = nn.Linear(8, 3)
        self.automatic_optimization = not manual

    def forward(self, x):
        return self.head(self.net(x).mean((2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Probe(nn.Module):
    def __init__(self, sync: bool) -> None:
        super().__init__()
        self.sync = sync

    def forward(self, x):
        if self.sync and float(x.abs().max()) > 1e6:  # a host read on every forward
            x = x / 1e6
        return x


def _fit(tmp_path, callbacks, module=None, sleep=0.0, steps=30, **kw):
    pl.seed_everything(0, verbose=False)
    module = module or Plain()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks, log_every_n_steps=10, **kw,
    )
    trainer.fit(module, DataLoader(Images(sleep=sleep), batch_size=8, shuffle=True))
    rows = json.loads((Path(tmp_path) / "diagnosis.json").read_text())
    return module, trainer, {row["kind"]: row for row in rows if row["monitor"] == "throughput"}


def test_a_slow_loader_is_input_bound_and_its_twin_is_not(tmp_path):
    _, _, slow = _fit(tmp_path / "slow", [ThroughputMonitor(strict=True)], sleep=0.003)
    assert slow["input_bound"]["severity"] == "warning"
    assert "num_workers is 0 on" in slow["input_bound"]["message"]
    assert slow["input_bound"]["values"]["wait_share"] > 0.5
    _, _, fast = _fit(tmp_path / "fast", [ThroughputMonitor(strict=True)])
    assert "input_bound" not in fast and fast["compute_bound"]["severity"] == "info"
    assert fast["throughput"]["values"]["images_per_s"] > 0
    assert fast["throughput"]["values"]["tflops_per_step"] > 0  # FlopCounterMode on one step


def test_a_host_sync_in_a_forward_is_counted_and_named(tmp_path):
    monitor = ThroughputMonitor(strict=True, sync_steps=(3, 12))
    _, _, found = _fit(tmp_path / "sync", [monitor], module=Plain(sync=True), steps=20)
    assert monitor.sync_counts == [1, 1] and monitor.sync_counted_steps == [3, 12]
    finding = found["host_sync"]
    assert finding["severity"] == "warning" and finding["layers"] == ["net.3"]
    assert "Probe.forward (tests/test_throughput_monitor.py:" in finding["message"]
    clean = ThroughputMonitor(strict=True, sync_steps=(3, 12))
    _, _, quiet = _fit(tmp_path / "clean", [clean], steps=20)
    assert clean.sync_counts == [0, 0] and "host_sync" not in quiet


def test_the_sync_counter_sees_what_a_gpu_would_wait_on():
    names = {}
    with HostSyncCounter(names) as counter:
        x = torch.arange(6.0)
        _ = x.sum().item()
        _ = x[x > 2]  # boolean-mask indexing: a data-dependent size
        _ = x.nonzero()
        _ = (x * 2).sum()  # no sync
    assert counter.count >= 3
    assert tp.host_syncs([0, 2], [], [1, 2]) is None
    assert tp.host_syncs([2, 2], [("torchvision/ops/boxes.py:3", "x", False, 2)], [1, 2]).severity == "info"


def test_rules_and_bad_arguments():
    assert tp.input_bound(0.1, 10.0, 4, 8).kind == "compute_bound"
    finding = tp.input_bound(0.5, 10.0, 0, 8)
    assert finding.kind == "input_bound" and "num_workers to 7" in finding.suggestion
    assert "cannot keep up" in tp.input_bound(0.5, 10.0, 7, 8).suggestion
    assert tp.callback_overhead(0.3, 10.0).kind == "callback_overhead"
    assert tp.peak_flops_of(torch.device("cpu")) is None
    with pytest.raises(ValueError, match="peak_flops must be > 0"):
        ThroughputMonitor(peak_flops=0)
    with pytest.raises(ValueError, match="sync_steps must be ints"):
        ThroughputMonitor(sync_steps=(-1,))
    with pytest.raises(ValueError, match="input_bound_share must be in"):
        ThroughputMonitor(input_bound_share=1.5)


def test_mfu_against_a_given_peak_and_manual_optimization(tmp_path):
    monitor = ThroughputMonitor(strict=True, peak_flops=1e12)
    _, _, found = _fit(tmp_path, [monitor], module=Plain(manual=True), steps=20)
    assert 0 < found["throughput"]["values"]["mfu"] < 1
    assert "model FLOP utilisation" in found["throughput"]["message"]
    assert {"throughput/wait_share", "throughput/mfu", "throughput/images_per_s"} <= set(monitor.history[-1])
    tables = monitor.tables(None, None)
    assert tables["Where the step's time goes"][0]["part"] == "waiting for the batch"


def test_no_host_read_on_quiet_steps(tmp_path):
    from test_sync_free_monitors import _quiet, _reads

    reads = _reads(tmp_path, [ThroughputMonitor()])
    quiet = {step: n for step, n in reads.items() if _quiet(step)}
    assert len(quiet) > 50 and sum(quiet.values()) == 0, {s: n for s, n in quiet.items() if n}


def test_a_failure_steps_aside_and_training_is_bit_identical(tmp_path, monkeypatch):
    bare, _, _ = _fit(tmp_path / "bare", [ThroughputMonitor(strict=True, sync_steps=())], steps=12)

    def broken(batch):
        raise RuntimeError("boom")

    monkeypatch.setattr(tp, "_batch_size", broken)
    monitor = ThroughputMonitor(strict=False)
    with pytest.warns(UserWarning, match="ThroughputMonitor switched itself off"):
        watched, _, found = _fit(tmp_path / "broken", [monitor], steps=12)
    assert not monitor.active and found["monitor_error"]["severity"] == "error"
    for a, b in zip(bare.parameters(), watched.parameters()):
        assert torch.equal(a, b)


def test_totals_and_syncs_come_back_from_a_checkpoint():
    monitor = ThroughputMonitor(sync_steps=(3,))
    monitor.totals["steps"], monitor.flops_per_step = 7.0, 1e9
    monitor.sync_counts, monitor.sync_counted_steps, monitor.sync_where = [2], [3], [("module a", "x", True, 2)]
    again = ThroughputMonitor(sync_steps=(3,))
    again.load_state_dict(monitor.state_dict())
    assert again.totals["steps"] == 7.0 and again.flops_per_step == 1e9
    assert again.sync_where == [("module a", "x", True, 2)] and again.sync_counted_steps == [3]


def test_through_the_cli(tmp_path):
    # the monitor and its options given on the command line (`--trainer.callbacks+=`) to the quickstart,
    # whose own ThroughputMonitor is left out of the config first (Lightning refuses two with one state key)
    import yaml

    from lightning_convnets.cli import ConvNetsCLI

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml").read_text())
    callbacks = config["trainer"]["callbacks"]
    kept = [c for c in callbacks if not c["class_path"].endswith(".ThroughputMonitor")]
    assert len(kept) == len(callbacks) - 1, "the quickstart lists no ThroughputMonitor any more"
    config["trainer"]["callbacks"] = kept
    (tmp_path / "quickstart.yaml").write_text(yaml.safe_dump(config))
    cli = ConvNetsCLI(args=[
        "fit", "--config", str(tmp_path / "quickstart.yaml"),
        "--trainer.max_steps=12", "--trainer.limit_val_batches=0", f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}",
        '--trainer.callbacks+={"class_path": "lightning_convnets.callbacks.throughput.ThroughputMonitor", '
        '"init_args": {"sync_steps": [3]}}',
    ])  # fmt: skip
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, ThroughputMonitor)]
    assert monitor.sync_steps == (3,) and monitor.sync_counted_steps and monitor.sync_counted_steps[0] >= 3
    assert monitor.totals["steps"] > 0 and cli.trainer.global_step == 12
    rows = json.loads(next(tmp_path.rglob("diagnosis.json")).read_text())
    assert {"compute_bound", "throughput"} <= {r["kind"] for r in rows if r["monitor"] == "throughput"}


@pytest.mark.slow
def test_two_ddp_ranks_sum_their_images(tmp_path):
    from ddp_utils import ddp_hygiene

    with ddp_hygiene():
        pl.seed_everything(0, verbose=False)
        data = TensorDataset(torch.randn(256, 3, 16, 16), torch.randint(0, 3, (256,)))
        monitor = ThroughputMonitor(strict=True, sync_steps=(4,))
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy="ddp_fork", max_steps=12, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path, callbacks=[monitor], log_every_n_steps=5,
        )
        trainer.fit(Plain(), DataLoader(data, batch_size=8))
    rows = json.loads((tmp_path / "diagnosis.json").read_text())
    summary = next(r for r in rows if r["kind"] == "throughput")
    assert "images/s over" in summary["message"] and summary["values"]["images_per_s"] > 0


def test_a_validation_run_inside_the_gap_is_not_waiting(tmp_path):
    class Validated(Plain):
        def validation_step(self, batch, batch_idx):
            time.sleep(0.05)  # a slow validation: 5 batches, 0.25 s, every 5 steps

    monitor = ThroughputMonitor(strict=True, sync_steps=())
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[monitor], log_every_n_steps=10,
        val_check_interval=5, limit_val_batches=5, num_sanity_val_steps=0,
    )
    loader = DataLoader(Images(), batch_size=8)
    trainer.fit(Validated(), loader, loader)
    assert monitor.totals["wait"] / monitor.totals["steps"] < 0.02  # 50 ms per step were it counted
