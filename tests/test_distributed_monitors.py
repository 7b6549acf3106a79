"""The three monitors on 2 CPU ranks (gloo, ``ddp_fork`` in this process).

One run with all three monitors together checks what they log against the ranks' data: the activation
variance of the union of both ranks' batches, one collective per monitor and logging interval and none
in between, one shattering probe per interval on rank zero only, and DDP's buffer broadcast seen by the
BN monitor. Separate runs check the BN monitor's cross-rank disagreement without that broadcast and its
``"pooled"`` / ``"broadcast"`` synchronisation before validation and checkpoint saves.

The data's odd-indexed images are shifted and dealt to the ranks in order, so rank 1 sees another
distribution than rank 0 (non-i.i.d. shards): per-rank statistics then differ visibly from the union's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from ddp_utils import (
    CPU_DDP,
    QUIET,
    CollectiveCounter,
    ShardedTinyData,
    TinyResNet,
    ddp_env,  # noqa: F401  (a fixture)
    ddp_hygiene,
    dump,
    load_ranks,
    logged,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning_convnets.callbacks import (
    ActivationVarianceMonitor,
    BatchNormDriftMonitor,
    GradientShatteringMonitor,
)

INTERVAL = 2
STEPS = 4  # 32 images / 2 ranks / batch 4 = 4 steps: two logging intervals
SHIFT = 1.0


class StepInputs(Callback):
    """Per rank: each training batch's images and the weights it ran with (``steps-rank<r>.pt``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.steps.append({"step": trainer.global_step, "images": batch[0].clone(), "weights": weights})

    def on_train_end(self, trainer, pl_module) -> None:
        dump(self.folder, "steps", self.steps)


class MonitorState(Callback):
    """Per rank, at the end of training: each monitor's history and BN running statistics after every
    logging step (taken after the monitors' own batch-end work: put this callback after them)."""

    def __init__(self, folder: Path, monitors: dict[str, pl.Callback]) -> None:
        self.folder = folder
        self.monitors = monitors
        self.running: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % INTERVAL == 0:
            self.running[trainer.global_step] = {
                name: (m.running_mean.clone(), m.running_var.clone())
                for name, m in pl_module.named_modules()
                if isinstance(m, torch.nn.BatchNorm2d)
            }

    def on_train_end(self, trainer, pl_module) -> None:
        histories = {name: list(m.history) for name, m in self.monitors.items()}
        dump(
            self.folder, "state", {"history": histories, "running": self.running, "step": trainer.global_step}
        )


def _trainer(root: Path, callbacks: list, **kwargs) -> pl.Trainer:
    options = {**CPU_DDP, **QUIET, "max_steps": STEPS, "log_every_n_steps": INTERVAL, "limit_val_batches": 0}
    options.update(kwargs)
    return pl.Trainer(
        default_root_dir=root,
        logger=CSVLogger(root, name="logs"),
        enable_checkpointing=False,
        callbacks=callbacks,
        **options,
    )


# --------------------------------------------------------------------------------------------------
# All three monitors in one run
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    root: Path  # records and logs
    sample_every: int  # the activation monitor records one optimizer step in this many


@pytest.fixture(scope="module")
def together(tmp_path_factory):
    root = tmp_path_factory.mktemp("together")
    monitors = {
        # one step in two: the union is taken over the sampled steps of each interval only
        "av": ActivationVarianceMonitor(sample_every_n_steps=2),
        "bn": BatchNormDriftMonitor(),
        "shattering": GradientShatteringMonitor(every_n_steps=INTERVAL, num_points=16),
    }
    callbacks = [
        StepInputs(root / "records"),
        *monitors.values(),
        MonitorState(root / "records", monitors),
        CollectiveCounter(root / "records", owners=list(monitors.values())),
    ]
    with ddp_hygiene():
        pl.seed_everything(0, verbose=False)
        _trainer(root, callbacks).fit(TinyResNet(), ShardedTinyData(num=32, batch_size=4, odd_shift=SHIFT))
    return Run(root, monitors["av"].sample_every_n_steps)


def _union_outputs(steps_per_rank: list[list[dict]], steps: list[int]) -> dict[str, torch.Tensor]:
    """Recompute, in this process, the outputs the monitor hooks saw on both ranks for ``steps``: each rank's
    batch through the weights it ran with (BN in training mode uses that batch's statistics, as the rank's
    forward did), concatenated along the batch."""
    model = TinyResNet().train()
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(name):
        def hook(module, args, output):
            seen.setdefault(f"{name}/out", []).append(output.detach().double())
            if len(args) == 2:  # ResidualAdd: (shortcut, branch)
                seen.setdefault(f"{name}/shortcut", []).append(args[0].detach().double())
                seen.setdefault(f"{name}/branch", []).append(args[1].detach().double())

        return hook

    for name in ("stem", "layer1.0", "layer1.1", "layer1.0.add", "layer1.1.add"):
        model.get_submodule(name).register_forward_hook(keep(name))
    with torch.no_grad():
        for records in steps_per_rank:
            for record in records:
                if record["step"] in steps:
                    model.load_state_dict(record["weights"])
                    model(record["images"])
    return {key: torch.cat(parts) for key, parts in seen.items()}


def test_activation_variance_is_that_of_the_union_of_the_ranks_batches(together):
    steps = load_ranks(together.root / "records", "steps")
    assert [len(s) for s in steps] == [STEPS, STEPS]
    prefix = "activation_variance"
    for end in range(INTERVAL, STEPS + 1, INTERVAL):
        # the optimizer steps of the interval that the monitor recorded (one in `sample_every_n_steps`)
        recorded = [s for s in range(end - INTERVAL, end) if s % together.sample_every == 0]
        assert recorded
        union = _union_outputs(steps, recorded)
        expected = {
            "stem/var": union["stem/out"].var(unbiased=False),
            "stem/mean": union["stem/out"].mean(),
        }
        for block in ("layer1.0", "layer1.1"):
            expected[f"{block}/var"] = union[f"{block}/out"].var(unbiased=False)
            expected[f"{block}/mean"] = union[f"{block}/out"].mean()
            expected[f"{block}/shortcut_var"] = union[f"{block}.add/shortcut"].var(unbiased=False)
            expected[f"{block}/branch_var"] = union[f"{block}.add/branch"].var(unbiased=False)
            expected[f"{block}/sum_var"] = union[f"{block}.add/out"].var(unbiased=False)
        for key, value in expected.items():
            rows = [v for s, v in logged(together.root, f"{prefix}/{key}") if s == end]
            assert len(rows) == 1, f"{key} logged {len(rows)} times at step {end}"
            assert math.isclose(rows[0], float(value), rel_tol=1e-5, abs_tol=1e-9), (end, key, rows[0], value)
        # the check can tell the union from one rank's share: rank 0's batches alone give another variance
        alone = _union_outputs(steps[:1], recorded)["stem/out"].var(unbiased=False)
        assert abs(float(alone) / float(expected["stem/var"]) - 1) > 1e-3


def test_one_collective_per_monitor_and_interval_and_none_in_between(together):
    logging_steps = list(range(INTERVAL, STEPS + 1, INTERVAL))
    for calls in load_ranks(together.root / "records", "collectives"):
        by_owner = {}
        for call in calls:
            by_owner.setdefault(call["owner"], []).append(call)
        for owner in ("ActivationVarianceMonitor", "BatchNormDriftMonitor"):
            assert [c["step"] for c in by_owner[owner]] == logging_steps, owner
            assert all(c["in_batch"] and c["op"] == "all_gather" for c in by_owner[owner])
        assert "GradientShatteringMonitor" not in by_owner  # rank zero probes alone, nobody waits
        # inside training batches, nothing but the monitors' flushes communicates from Python
        in_batch = [c for c in calls if c["in_batch"]]
        assert all(c["owner"] is not None for c in in_batch), in_batch
        assert len(in_batch) == 2 * len(logging_steps)


def test_shattering_probes_on_rank_zero_only_and_logs_once(together):
    rows = logged(together.root, "shattering/lag1")
    assert [s for s, _ in rows] == [0, *range(INTERVAL, STEPS + 1, INTERVAL)]  # the init probe, then each
    assert all(math.isfinite(v) for _, v in rows)
    zero, one = load_ranks(together.root / "records", "state")
    assert zero["step"] == one["step"] == STEPS  # both ranks finished: no deadlock
    assert len(zero["history"]["shattering"]) == len(rows) and one["history"]["shattering"] == []


def test_batchnorm_monitor_sees_ddp_broadcast_buffers(together):
    # DDP (broadcast_buffers=True) copies rank 0's buffers at the start of each training forward, so the
    # statistics every rank started its last forward from agree exactly; after the step's own update
    # they differ, and that is what validation on each rank and the checkpoint would see.
    states = load_ranks(together.root / "records", "state")
    for step in range(INTERVAL, STEPS + 1, INTERVAL):
        for layer in ("stem.1", "layer1.0.bn1", "layer1.1.bn2"):
            (pre,) = [v for s, v in logged(together.root, f"batchnorm/{layer}/rank_spread_pre") if s == step]
            (post,) = [v for s, v in logged(together.root, f"batchnorm/{layer}/rank_spread") if s == step]
            assert pre == 0.0
            assert math.isclose(post, _rank_spread(states, step, layer), rel_tol=1e-6)
            assert post > 0.0


def _rank_spread(states: list[dict], step: int, layer: str) -> float:
    """RMS over channels of the std across ranks of the running means, in running stds (by hand)."""
    means = torch.stack([s["running"][step][layer][0].double() for s in states])
    variances = torch.stack([s["running"][step][layer][1].double() for s in states])
    across = means.var(0, unbiased=True)
    return float((across / (variances.mean(0) + 1e-5)).mean().sqrt())


# --------------------------------------------------------------------------------------------------
# BN: disagreement without DDP's buffer broadcast, and the monitor's sync
# --------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("ddp_env")
def test_batchnorm_disagreement_without_buffer_broadcast_is_above_the_noise_floor(tmp_path):
    monitor = BatchNormDriftMonitor()
    records = tmp_path / "records"
    callbacks = [monitor, MonitorState(records, {"bn": monitor})]
    strategy = DDPStrategy(broadcast_buffers=False, start_method="fork")
    pl.seed_everything(0, verbose=False)
    trainer = _trainer(tmp_path, callbacks, strategy=strategy)
    trainer.fit(TinyResNet(), ShardedTinyData(num=32, batch_size=4, odd_shift=2.0))
    states = load_ranks(records, "state")
    for step in range(INTERVAL, STEPS + 1, INTERVAL):
        (ratio,) = [v for s, v in logged(tmp_path, "batchnorm/rank_noise_ratio") if s == step]
        assert ratio > 10, f"ranks with different data should disagree far above batch noise, got {ratio}"
        for layer in ("stem.1", "layer1.1.bn2"):
            (pre,) = [v for s, v in logged(tmp_path, f"batchnorm/{layer}/rank_spread_pre") if s == step]
            (post,) = [v for s, v in logged(tmp_path, f"batchnorm/{layer}/rank_spread") if s == step]
            assert pre > 0.0  # no broadcast: ranks start every forward from their own statistics
            assert math.isclose(post, _rank_spread(states, step, layer), rel_tol=1e-6)
    diagnosis = next(tmp_path.rglob("diagnosis.md")).read_text()
    assert "ranks disagree on BN running stats" in diagnosis


class SyncRecorder(Callback):
    """Per rank: BN running statistics at every validation start and checkpoint save (after the monitor's
    sync: put this callback after it), the values in the checkpoint, and each BN's last training input."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.events: list[dict] = []
        self.inputs: dict[str, torch.Tensor] = {}

    def setup(self, trainer, pl_module, stage) -> None:
        for name, module in pl_module.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.register_forward_pre_hook(self._keep(name))

    def _keep(self, name):
        def hook(module, args):
            if module.training:
                self.inputs[name] = args[0].detach().clone()

        return hook

    def _event(self, kind, trainer, pl_module, checkpoint=None) -> None:
        layers = {}
        for name, module in pl_module.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                saved = None
                if checkpoint is not None:
                    state = checkpoint["state_dict"]
                    saved = (state[f"{name}.running_mean"].clone(), state[f"{name}.running_var"].clone())
                layers[name] = {
                    "mean": module.running_mean.clone(),
                    "var": module.running_var.clone(),
                    "saved": saved,
                    "input": self.inputs[name].clone(),
                }
        self.events.append({"kind": kind, "step": trainer.global_step, "layers": layers})

    def on_validation_start(self, trainer, pl_module) -> None:
        self._event("validation", trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._event("checkpoint", trainer, pl_module, checkpoint)

    def on_train_end(self, trainer, pl_module) -> None:
        dump(self.folder, "syncs", self.events)


@pytest.mark.usefixtures("ddp_env")
@pytest.mark.parametrize("sync", ["pooled", "broadcast"])
def test_batchnorm_sync_makes_ranks_agree_before_validation_and_checkpoints(tmp_path, sync):
    # momentum 1: each rank's running statistics are exactly its last batch's (mean, unbiased variance),
    # so the pooled statistics must be those of the union of both ranks' last batches
    monitor = BatchNormDriftMonitor(sync=sync)
    records = tmp_path / "records"
    saver = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}"
    )
    strategy = DDPStrategy(broadcast_buffers=False, start_method="fork")
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path, name="logs"),
        callbacks=[monitor, SyncRecorder(records), saver],
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        max_steps=6,
        val_check_interval=3,
        limit_val_batches=1,
        log_every_n_steps=INTERVAL,
        **QUIET,
    )
    trainer.fit(TinyResNet(momentum=1.0), ShardedTinyData(num=48, batch_size=4, odd_shift=SHIFT))

    zero, one = load_ranks(records, "syncs")
    kinds = [(e["kind"], e["step"]) for e in zero]
    assert kinds == [
        ("checkpoint", 2),
        ("validation", 3),
        ("checkpoint", 4),
        ("checkpoint", 6),
        ("validation", 6),
    ]
    assert [(e["kind"], e["step"]) for e in one] == kinds
    for a, b in zip(zero, one):
        for name, left in a["layers"].items():
            right = b["layers"][name]
            # the disagreement after the sync is zero, bit for bit
            assert torch.equal(left["mean"], right["mean"]) and torch.equal(left["var"], right["var"]), name
            if a["kind"] == "checkpoint":  # and the checkpoint holds the synced values
                assert torch.equal(left["saved"][0], left["mean"]) and torch.equal(
                    left["saved"][1], left["var"]
                )
            # the expected statistics: the union of both ranks' last batches, or rank 0's batch alone
            data = torch.cat([left["input"], right["input"]]) if sync == "pooled" else left["input"]
            data = data.double().transpose(0, 1).flatten(1)
            torch.testing.assert_close(left["mean"].double(), data.mean(1), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(left["var"].double(), data.var(1, unbiased=True), rtol=1e-5, atol=1e-6)
            # ...which is not what either rank held alone (the sync did something)
            other = right["input"].double().transpose(0, 1).flatten(1)
            assert not torch.allclose(left["mean"].double(), other.mean(1), rtol=1e-3, atol=1e-4)
    # the files on disk hold the synced statistics of their step
    for event in [e for e in zero if e["kind"] == "checkpoint"]:
        state = torch.load(tmp_path / "ckpt" / f"step={event['step']}.ckpt", weights_only=False)["state_dict"]
        for name, layer in event["layers"].items():
            assert torch.equal(state[f"{name}.running_mean"], layer["mean"])
    # the monitor logged how far apart the ranks were before each sync
    before = logged(tmp_path, "batchnorm/rank_spread_before_sync")
    assert [s for s, _ in before] == [2, 3, 4, 6] and all(v > 0 for _, v in before)
