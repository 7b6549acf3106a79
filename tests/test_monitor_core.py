"""The shared monitor core: exact streaming moments, rank merging, one collective per interval, any-logger
output, bounded checkpointed history, the shared diagnosis."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from lightning_convnets.callbacks.core import MonitorCallback, observers_paused
from lightning_convnets.callbacks.diagnosis import Diagnosis, Finding, diagnosis_for
from lightning_convnets.callbacks.moments import MomentBank, RunningMoments, ShiftedMoments
from lightning_convnets.callbacks.packing import StatsPacker
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@pytest.mark.parametrize("kind", [RunningMoments, ShiftedMoments])
def test_streaming_moments_match_float64_when_mean_dwarfs_spread(kind):
    gen = torch.Generator().manual_seed(0)
    # mean / std = 1e6, batches of uneven sizes, and a drift of the mean between batches
    batches = [
        1e4 + s + 1e-2 * torch.randn(n, 3, 5, 5, generator=gen)
        for s, n in zip((0, 0.1, -0.05, 0.02), (7, 1, 16, 3))
    ]
    moments = kind()
    for batch in batches:
        moments.update(batch)
    union = torch.cat(batches).double()
    exact = union.var(dim=(0, 2, 3), unbiased=False)
    assert torch.equal(moments.count, torch.full((3,), float(union.numel() // 3), dtype=torch.float64))
    torch.testing.assert_close(moments.mean, union.mean(dim=(0, 2, 3)), rtol=1e-12, atol=0)
    torch.testing.assert_close(moments.var, exact, rtol=1e-6, atol=0)
    # the naive float32 E[x^2] - E[x]^2 the core must not use is off by orders of magnitude here
    flat = torch.cat(batches).transpose(0, 1).reshape(3, -1)
    naive = (flat**2).mean(1) - flat.mean(1) ** 2
    assert ((naive.double() - exact).abs() / exact).max() > 10


@pytest.mark.parametrize("kind", [RunningMoments, ShiftedMoments])
def test_moments_reset_and_bf16_inputs(kind):
    moments = kind()
    moments.update(torch.ones(4, 2, dtype=torch.bfloat16) * 100)
    moments.reset()
    assert moments.count is not None and float(moments.count.sum()) == 0
    moments.update(torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.bfloat16))
    torch.testing.assert_close(moments.mean, torch.tensor([2.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(moments.var, torch.tensor([1.0, 4.0], dtype=torch.float64))


def test_moment_bank_deferred_counts_and_reused_buffer_match_per_tensor_moments():
    """The bank's fast path (one reused difference buffer, counts settled only when read, at most 16
    waiting patterns) gives the bits of ShiftedMoments.update, through shapes that keep changing, a slot
    that sits batches out, a second call of a module within a batch, and resets in between."""
    gen = torch.Generator().manual_seed(0)
    bank = MomentBank()
    fast = [bank.add("a"), bank.add("b")]
    slow = [ShiftedMoments(), ShiftedMoments()]

    def batch(step: int) -> list[torch.Tensor]:
        # three batch sizes (many batches per pattern), then 23 (more patterns than the bank lets wait)
        n = 1 + step % 3 if step < 30 else 1 + step % 23
        return [torch.randn(n, 3, 5, 5, generator=gen) * 4 + 2, torch.randn(n, 4, 9, generator=gen) - 7]

    waiting = []  # patterns whose counts wait for settle, after each batch
    for step in range(60):
        xs = batch(step)
        calls = [(0, xs[0]), (1, xs[1])] if step % 5 else [(0, xs[0])]  # slot 1 sits every 5th batch out
        if step % 7 == 3:
            calls.append((0, xs[0] * 0.5))  # the same module called twice in one batch
        for slot, x in calls:
            if not bank.take(slot, x):
                fast[slot].update(x)
            slow[slot].update(x)
        bank.fold()
        if not bank.ready:
            bank.build()
        waiting.append(len(bank._unsettled))
        if step in (20, 41):  # an interval's end: settle, compare, re-centre
            bank.settle()
            for f, s in zip(fast, slow):
                assert torch.equal(f.state, s.state)
            bank.reset()
            for s in slow:
                s.reset()
            for f, s in zip(fast, slow):
                assert torch.equal(f.shift, s.shift)
    assert max(waiting) == 16 and min(waiting[2:]) == 0  # counts wait between reads, bounded by a settle
    bank.settle()
    assert not bank._unsettled
    for f, s in zip(fast, slow):
        assert torch.equal(f.state, s.state) and torch.equal(f.count, s.count)
        assert torch.equal(f.var, s.var)


def test_packer_merges_ranks_like_the_union():
    gen = torch.Generator().manual_seed(1)
    rank_data = [3.0 + torch.randn(5, 4, generator=gen), -2.0 + 4 * torch.randn(9, 4, generator=gen)]
    rows, packer = [], None
    for data in rank_data:
        moments = RunningMoments()
        moments.update(data)
        packer = StatsPacker()
        packer.running("x", moments)
        packer.sum("n", torch.tensor([float(len(data))]))
        packer.min("lo", data.min(0).values)
        packer.max("hi", data.max(0).values)
        rows.append(packer.flat())
    stats = packer.unpack(torch.stack(rows))
    union = torch.cat(rank_data).double()
    torch.testing.assert_close(stats["x"].mean, union.mean(0))
    torch.testing.assert_close(stats["x"].var, union.var(0, unbiased=False))
    assert float(stats["n"]) == 14
    torch.testing.assert_close(stats["lo"], union.min(0).values)
    torch.testing.assert_close(stats["hi"], union.max(0).values)
    _, mean, var = stats["x"].pooled()
    assert mean == pytest.approx(float(union.mean())) and var == pytest.approx(
        float(union.var(unbiased=False))
    )


class CountingMonitor(MonitorCallback):
    """A minimal monitor: counts the training-mode forwards of the model and the samples they saw."""

    monitor_name = "counting"

    def attach(self, trainer, pl_module):
        self.forwards = torch.zeros(())
        self.samples = RunningMoments()
        self.add_hook(pl_module.net, self._record)

    def _record(self, module, args, output):
        if self.is_recording(module):
            self.forwards += 1
            self.samples.update(args[0])

    def pack(self, trainer, pl_module, packer):
        packer.sum("forwards", self.forwards)
        packer.running("inputs", self.samples)

    def compute_metrics(self, trainer, pl_module, stats):
        return {"forwards": float(stats["forwards"]), "input_count": float(stats["inputs"].count[0])}

    def reset_interval(self):
        self.forwards.zero_()
        self.samples.reset()

    def diagnose(self, trainer, pl_module):
        return [Finding(self.monitor_name, "info", ["net"], f"{len(self.history)} entries", "none needed")]


class TinyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3, 1)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class RecordingLogger(Logger):
    def __init__(self, root):
        super().__init__()
        self.calls: list[tuple[int, dict]] = []
        self._root = str(root)

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    @property
    def log_dir(self):
        return self._root

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        if any(k.startswith("counting/") for k in metrics):
            self.calls.append((step, dict(metrics)))


def _loader(n=16, batch_size=2):
    gen = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 3, generator=gen), torch.randn(n, 1, generator=gen)), batch_size
    )


def _trainer(tmp_path, logger, callbacks, **kw):
    defaults = dict(
        accelerator="cpu",
        max_steps=6,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kw)
    return pl.Trainer(**defaults)


def test_one_collective_and_one_log_per_interval_with_accumulation(tmp_path, monkeypatch):
    gathers: list[int] = []
    trainer_ref = {}
    original = pl.strategies.SingleDeviceStrategy.all_gather

    def counting_all_gather(self, tensor, group=None, sync_grads=False):
        gathers.append(trainer_ref["trainer"].global_step)
        return original(self, tensor, group, sync_grads)

    monkeypatch.setattr(pl.strategies.SingleDeviceStrategy, "all_gather", counting_all_gather)
    logger = RecordingLogger(tmp_path)
    monitor = CountingMonitor(log_every_n_steps=2)
    trainer = _trainer(
        tmp_path, logger, [monitor], accumulate_grad_batches=2, limit_val_batches=2, val_check_interval=4
    )
    trainer_ref["trainer"] = trainer
    trainer.fit(TinyModule(), _loader(), _loader(4))
    # 6 optimizer steps = 12 micro-batches; a flush every 2 optimizer steps, one collective each
    assert gathers == [2, 4, 6]
    assert monitor.collectives == 3
    assert [step for step, _ in logger.calls] == [2, 4, 6]
    for _, metrics in logger.calls:
        # 2 steps x 2 micro-batches x 2 samples; validation forwards are not counted
        assert metrics == {"counting/forwards": 4.0, "counting/input_count": 8.0}
    assert [e["step"] for e in monitor.history] == [2.0, 4.0, 6.0]


def test_tail_of_run_is_flushed_and_sampling_skips_steps(tmp_path):
    logger = RecordingLogger(tmp_path)
    monitor = CountingMonitor(log_every_n_steps=4, sample_every_n_steps=2)
    _trainer(tmp_path, logger, [monitor], max_steps=6).fit(TinyModule(), _loader())
    # steps 0..3 -> flush at 4 with steps 0 and 2 recorded; steps 4, 5 -> flushed at the end (step 4 only)
    assert [(s, m["counting/forwards"]) for s, m in logger.calls] == [(4, 2.0), (6, 1.0)]


def test_history_is_bounded_and_checkpointed():
    monitor = CountingMonitor(max_history=8)
    for step in range(1, 101):
        monitor.append_history({"step": float(step)})
    steps = [e["step"] for e in monitor.history]
    assert len(steps) <= 8 and steps[0] == 1.0 and steps[-1] == 100.0 and steps == sorted(steps)
    state = monitor.state_dict()
    fresh = CountingMonitor(max_history=8)
    fresh.load_state_dict(state)
    assert fresh.history == monitor.history
    with pytest.raises(KeyError, match="history"):
        fresh.load_state_dict({"oops": 1})


def test_shared_diagnosis_printed_once_and_written(tmp_path, capsys):
    first, second = CountingMonitor(log_every_n_steps=3), CountingMonitor(log_every_n_steps=2)
    second.monitor_name = "counting_b"
    trainer = _trainer(tmp_path, RecordingLogger(tmp_path), [first, second])
    trainer.fit(TinyModule(), _loader())
    out = capsys.readouterr().out
    assert out.count("lightning-convnets diagnosis") == 1
    written = json.loads((tmp_path / "diagnosis.json").read_text())
    assert sorted(f["monitor"] for f in written) == ["counting", "counting_b"]
    assert "3 entries" in (tmp_path / "diagnosis.md").read_text()  # second: flushes at 2, 4, 6
    assert diagnosis_for(trainer).findings == []  # consumed: a second fit starts a fresh report


def test_paused_observers_and_eval_mode_record_nothing(tmp_path):
    monitor = CountingMonitor()
    module = TinyModule()
    monitor.attach(None, module)
    monitor._recording = True
    with observers_paused():
        module(torch.randn(2, 3))
    module.eval()
    module(torch.randn(2, 3))
    assert float(monitor.forwards) == 0
    module.train()
    module(torch.randn(2, 3))
    assert float(monitor.forwards) == 1


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="log_every_n_steps"):
        CountingMonitor(log_every_n_steps=0)
    with pytest.raises(ValueError, match="max_history"):
        CountingMonitor(max_history=1)
    with pytest.raises(ValueError, match="sample_every_n_steps"):
        CountingMonitor(sample_every_n_steps=0)
    with pytest.raises(ValueError, match="severity"):
        Finding("m", "fatal", [], "x")
    report = Diagnosis()
    report.add([Finding("m", "info", ["a|b"], "ok"), Finding("m", "error", ["c"], "bad", "fix it")])
    lines = report.to_markdown().splitlines()
    assert "error" in lines[4] and "a\\|b" in lines[5]


@pytest.mark.parametrize(
    ("name", "home"),
    [
        ("StatsPacker", "packing"),
        ("PackedStats", "packing"),
        ("ShiftedMoments", "moments"),
        ("MomentBank", "moments"),
        ("batch_moments", "moments"),
        ("Finding", "diagnosis"),
        ("Diagnosis", "diagnosis"),
        ("diagnosis_for", "diagnosis"),
        ("HookSpec", "hooks"),
        ("DEFAULT_DENSE_STEPS", "schedule"),
    ],
)
def test_names_moved_out_of_the_core_still_import_from_it_with_a_deprecation_warning(name, home):
    import importlib

    core = importlib.import_module("lightning_convnets.callbacks.core")
    new = importlib.import_module(f"lightning_convnets.callbacks.{home}")
    with pytest.warns(
        DeprecationWarning, match=f"callbacks.core.{name} moved to lightning_convnets.callbacks.{home}"
    ):
        old = getattr(core, name)
    assert old is getattr(new, name)
    with pytest.raises(AttributeError, match="no_such_name"):
        core.no_such_name  # noqa: B018


def test_checkpointed_state_versions_and_the_guard_module_are_the_cores():
    from lightning_convnets.callbacks import core, guard, monitor_state

    # the names the monitors import from the core are the guard's and the state module's very objects
    assert core.MonitorConfigError is guard.MonitorConfigError and core.strict_default is guard.strict_default
    assert core._cached_state_key is monitor_state.cached_state_key
    monitor = CountingMonitor(log_every_n_steps=3)
    monitor.append_history({"step": 3.0, "counting/forwards": 2.0})
    monitor._last_flush_step, monitor._batches_since_flush = 3, 1
    state = monitor.state_dict()
    assert list(state) == ["version", "history", "extra", "last_flush_step", "batches_since_flush"]
    assert state["version"] == monitor_state.STATE_VERSION == 2
    fresh = CountingMonitor(log_every_n_steps=3)
    # one process: rank 0's "extra", not an entry of "extra_ranks"
    with_ranks = {**state, "extra": {"mine": 0}, "extra_ranks": [{"other": 1}, {"other": 2}]}
    assert monitor_state.MonitorState.from_dict(with_ranks).extra == {"mine": 0}
    fresh.load_state_dict(with_ranks)
    assert (fresh.history, fresh._last_flush_step, fresh._batches_since_flush) == (monitor.history, 3, 1)
    old = CountingMonitor(log_every_n_steps=3)
    old.load_state_dict({"history": state["history"], "extra": {}})  # version 1: the interval restarts
    assert (old._last_flush_step, old._batches_since_flush) == (-1, 0)
    with pytest.raises(
        KeyError, match=r"CountingMonitor\.load_state_dict: checkpoint state has no 'history'"
    ):
        old.load_state_dict({"extra": {}})
