"""Each task's quickstart config on 2 CPU ranks (gloo, ``ddp_fork`` in this process): ``fit`` + ``test``
through the CLI, and the distributed test metrics equal a single-process evaluation of the same
checkpoint on the same data.

The test sets hold 8 images, divisible by the world size: DistributedSampler pads a set that does not
divide by repeating its first samples, and the repeated samples would then count twice in the metrics.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from ddp_utils import ddp_env, dump, load_ranks  # noqa: F401  (ddp_env: a fixture, used through pytestmark)

from lightning_convnets.cli import ConvNetsCLI

pytestmark = pytest.mark.usefixtures("ddp_env")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# config, tiny overrides, the headline test metric
TASKS: dict[str, tuple[Path, list[str], str]] = {
    "classification": (
        CONFIGS / "quickstart.yaml",
        ["--model.init_args.backbone_kwargs={stem: cifar, width: 4}"],
        "test/acc",
    ),
    "segmentation": (
        CONFIGS / "segmentation" / "shapes_unet.yaml",
        [
            "--model.init_args.backbone_kwargs={width: 4, depth: 2, norm: batch}",
            "--data.init_args.image_size=32",
        ],
        "test/miou",
    ),
    "detection": (
        CONFIGS / "detection" / "centernet_hourglass_shapes.yaml",
        [
            '--model.init_args.backbone_kwargs={"num_stacks": 2, "order": 2, "width": 8}',
            "--model.init_args.head_channels=4",
            "--trainer.check_val_every_n_epoch=1",  # the config validates every 2nd epoch: no checkpoint in 1
        ],
        "test/map_50",
    ),
}
# Testing runs one image per batch. test/loss is a mean over batches of the batch's loss, and for
# segmentation (Dice over the batch) and detection (CenterNet divides by the batch's object count) that
# depends on which images share a batch, which differs between 2 ranks (the sampler deals every other
# image to a rank) and 1 process. With single-image batches every test metric must match exactly.
TEST_BATCH = ["--data.init_args.batch_size=1"]

NUM_TEST = 8  # divisible by the world size: no padded duplicates


def _common(tmp_path: Path, task: str) -> list[str]:
    config, extra, _ = TASKS[task]
    return [
        "--config",
        str(config),
        "--trainer.max_epochs=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.precision=32",
        "--trainer.accelerator=cpu",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        f"--data.init_args.root={tmp_path / 'shapes'}",
        # 24 / 2 ranks / batch 2 = 6 steps (OneCycleLR divides by zero when pct_start * total_steps == 1)
        "--data.init_args.num_train=24",
        "--data.init_args.num_val=4",
        f"--data.init_args.num_test={NUM_TEST}",
        "--data.init_args.batch_size=2",
        "--model.init_args.figure_every_n_epochs=0",
        *extra,
    ]


def _recorder(folder: Path) -> str:
    spec = {"class_path": "ddp_utils.EvalSampleRecorder", "init_args": {"folder": str(folder)}}
    return f"--trainer.callbacks+={json.dumps(spec)}"


class WarningRecorder(pl.Callback):
    """Record, per rank, every warning raised from ``setup`` to the end of training or testing
    (``fit-warnings`` / ``test-warnings``, read back with ``load_ranks``)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._context: Any = None
        self._caught: list[warnings.WarningMessage] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._context = warnings.catch_warnings(record=True)
        self._caught = self._context.__enter__()
        warnings.simplefilter("always")

    def _dump(self, name: str) -> None:
        self._context.__exit__(None, None, None)
        dump(self.folder, name, [str(w.message) for w in self._caught])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dump("fit-warnings")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dump("test-warnings")


def _warnings(folder: Path) -> str:
    spec = {"class_path": "test_distributed_tasks.WarningRecorder", "init_args": {"folder": str(folder)}}
    return f"--trainer.callbacks+={json.dumps(spec)}"


def _close(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return a == b


def _numel(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    return sum(_numel(v) for v in (value.values() if isinstance(value, dict) else value))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_quickstart_config_on_two_ranks_matches_one_process(task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written relative to the working directory stays in tmp_path
    common = _common(tmp_path, task)
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp_fork"]
    fit = ConvNetsCLI(args=["fit", *common, *ddp, _recorder(tmp_path / "fit"), _warnings(tmp_path / "warned")])
    best = fit.trainer.checkpoint_callback.best_model_path
    assert best and Path(best).is_file(), "the 2-rank fit saved no checkpoint"
    # rank zero alone wrote logs and checkpoints: one version folder; the checkpoints in it, or, with
    # AtomicModelCheckpoint, in <save_dir>/<name>/checkpoints, shared by every version of the run
    run = Path(best).parents[1]
    run = run.parent if run.name.startswith("version_") else run
    versions = sorted(p.name for p in run.iterdir() if p.name.startswith("version_"))
    assert versions == ["version_0"] and Path(best).parent.name == "checkpoints"
    for record in load_ranks(tmp_path / "fit", "fit"):
        assert record == {"samplers": {"train": "ResumableSampler"}, "world_size": 2}

    common += TEST_BATCH
    distributed = ConvNetsCLI(
        args=["test", *common, *ddp, "--ckpt_path", best, _recorder(tmp_path / "ddp"), _warnings(tmp_path / "warned")]
    )
    single = ConvNetsCLI(
        args=["test", *common, "--trainer.devices=1", "--ckpt_path", best, _recorder(tmp_path / "one")]
    )

    # the same data: the two ranks split the test set exactly, without duplicates
    ranks = load_ranks(tmp_path / "ddp", "test")
    (alone,) = load_ranks(tmp_path / "one", "test", world=1)
    assert [r["samplers"]["test"] for r in ranks] == ["DistributedSampler"] * 2
    assert [len(r["fingerprints"]) for r in ranks] == [NUM_TEST // 2] * 2
    assert not set(ranks[0]["fingerprints"]) & set(ranks[1]["fingerprints"])
    assert sorted(ranks[0]["fingerprints"] + ranks[1]["fingerprints"]) == sorted(alone["fingerprints"])
    # the same model on every rank: each image's predictions equal the single process's
    predictions = {**ranks[0]["predictions"], **ranks[1]["predictions"]}
    assert predictions.keys() == alone["predictions"].keys()
    assert any(_numel(p) for p in alone["predictions"].values()), (
        "nothing predicted: the check would be vacuous"
    )
    for key, expected in alone["predictions"].items():
        assert _close(predictions[key], expected), f"{task}: predictions differ for image {key[:8]}"

    # the same metrics: torchmetrics synced the ranks' states before computing
    got = {k: float(v) for k, v in distributed.trainer.callback_metrics.items() if k.startswith("test/")}
    want = {k: float(v) for k, v in single.trainer.callback_metrics.items() if k.startswith("test/")}
    # the epoch metrics are logged as values torchmetrics has synced already (LoggedValue): Lightning has no
    # reason to ask for sync_dist on any rank, in fit (train and val) or test
    for stage in ("fit", "test"):
        caught = [m for rank in load_ranks(tmp_path / "warned", f"{stage}-warnings") for m in rank]
        assert not [m for m in caught if "sync_dist" in m], (stage, caught)
    headline = TASKS[task][2]
    assert headline in want and got.keys() == want.keys(), (sorted(got), sorted(want))
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=1e-6, abs_tol=1e-7), (key, got[key], value)


def test_an_eval_set_that_does_not_divide_by_the_world_size_counts_padded_duplicates(tmp_path, monkeypatch):
    # what the README's "Scaling out" warns about: 7 test images on 2 ranks are evaluated as 8, the
    # first image twice (DistributedSampler pads by repeating the first samples)
    monkeypatch.chdir(tmp_path)
    common = [*_common(tmp_path, "classification"), "--data.init_args.num_test=7", *TEST_BATCH]
    ConvNetsCLI(
        args=["test", *common, "--trainer.devices=2", "--trainer.strategy=ddp_fork", _recorder(tmp_path)]
    )
    ranks = load_ranks(tmp_path, "test")
    seen = ranks[0]["fingerprints"] + ranks[1]["fingerprints"]
    assert [len(r["fingerprints"]) for r in ranks] == [4, 4] and len(set(seen)) == 7
    assert ranks[1]["fingerprints"][-1] == ranks[0]["fingerprints"][0]  # rank 1's last is image 0 again
