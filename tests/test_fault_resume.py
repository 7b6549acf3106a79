"""Fault injection, resume: a run SIGKILLed at a step that is neither an epoch nor a checkpoint boundary,
resumed from its ``last.ckpt``, ends exactly where the uninterrupted run ends.

Every case fits three times the same tiny classifier (pre-activation ResNet-18 of width 4 on 32 px
generated shapes, AdamW with a warmup-cosine schedule, the three monitors attached), on the CPU with
``deterministic=True``:

A. uninterrupted;
B. the same run, killed with SIGKILL by :class:`KillSwitch` (``os.kill(os.getpid(), SIGKILL)`` in the
   process that trains: a forked child for one process, every rank for DDP) after its K-th training
   batch; its ``last.ckpt`` is the one the :class:`AtomicModelCheckpoint` wrote every ``EVERY`` optimizer
   steps, before step K;
C. ``Trainer.fit(ckpt_path=<B's last.ckpt>)`` (one case through the CLI's ``--ckpt_path last``).

Then, on every rank, the training batches of B up to its checkpoint followed by C's are A's batch for
batch (each image's dataset index is stamped into its first pixel by :class:`StampedShapes` and read
back by the :class:`KillSwitch`), so every image is seen exactly as often as in A; and A's and C's final
checkpoints hold bit-identical weights, optimizer and scheduler states, monitor histories and data
module state (no tolerance), and every rank ends with A's weights.

The default suite keeps one short case per kind (workers, DDP, compile, accumulation, CLI); the
others are ``slow``. On a GPU: ``benchmarks/gpu_resume_check.py``.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from ddp_utils import ddp_hygiene, state_differences
from lightning.pytorch import Callback
from lightning_convnets.callbacks import (
    ActivationVarianceMonitor,
    BatchNormDriftMonitor,
    GradientShatteringMonitor,
    OptimizationMonitor,
    ThroughputMonitor,
)
from lightning_convnets.datamodules import ShapesDataModule
from torch.utils.data import Dataset

from lightning_convnets.checkpointing import AtomicModelCheckpoint
from lightning_convnets.tasks import ImageClassifier

NUM_TRAIN, BATCH, EVERY = 54, 4, 3  # 54 images: one process 14 batches/epoch (last 2), 2 ranks 7 (last 3)
# The monitors log every 4 steps by default (a checkpoint every 3 falls inside a logging interval: the
# interval's partial sums must be restored); a case with monitor_every=3 checkpoints right after a flush
# (under accumulation, the resumed run must not flush the checkpoint's step again)
MONITOR_EVERY = 4
KILL_ENV = "LIGHTNING_CONVNETS_TEST_KILL_AFTER_BATCH"


# --------------------------------------------------------------------------------------------------
# Data that says which image each sample is
# --------------------------------------------------------------------------------------------------


class IndexStamp(Dataset):
    """``(image, label)`` of ``inner`` with the dataset index written into the image's first pixel (channel 0,
    row 0, column 0), after the augmentations. Passes :class:`~lightning_convnets.datamodules.sampling.
    SeededIndex` items through to ``inner``."""

    def __init__(self, inner: Dataset) -> None:
        self.inner = inner
        self.accepts_seeded_index = getattr(inner, "accepts_seeded_index", False)

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, Any]:
        image, label = self.inner[index]
        image = image.clone()
        image[0, 0, 0] = float(index[0] if isinstance(index, tuple) else index)
        return image, label


class StampedShapes(ShapesDataModule):
    """:class:`ShapesDataModule` (classification) whose training images carry their index
    (:class:`IndexStamp`)."""

    def build_datasets(self, splits: Any) -> None:
        super().build_datasets(splits)
        if self.train_dataset is not None and not isinstance(self.train_dataset, IndexStamp):
            self.train_dataset = IndexStamp(self.train_dataset)


def stamped_indices(images: torch.Tensor) -> list[int]:
    return [int(v) for v in images[:, 0, 0, 0].tolist()]


# --------------------------------------------------------------------------------------------------
# Recording and killing
# --------------------------------------------------------------------------------------------------


class KillSwitch(Callback):
    """Record every training batch of this rank (``{"epoch", "batch", "step", "images"}``, one JSON line per
    batch in ``<folder>/<tag>-rank<r>.jsonl``, written before the next batch starts) and SIGKILL the
    process after the ``kill_after``-th training batch it ran (or ``$LIGHTNING_CONVNETS_TEST_KILL_AFTER_BATCH``).
    ``images`` are the stamped dataset indices (:class:`StampedShapes`), else a hash of each image.
    At the end of training, ``<tag>-final-rank<r>.pt`` gets the rank's weights.

    Args:
        folder: where the records go.
        tag: the run's name in the file names.
        kill_after: training batches (micro-batches under accumulation) after which the process kills
            itself; ``None``: never.
    """

    def __init__(self, folder: str, tag: str, kill_after: int | None = None) -> None:
        self.folder = Path(folder)
        self.tag = tag
        env = os.environ.get(KILL_ENV)
        self.kill_after = kill_after if kill_after is not None else (int(env) if env else None)
        self.batches = 0

    def _rank(self) -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        images = batch[0].detach().cpu()
        if images[:, 0, 0, 0].eq(images[:, 0, 0, 0].round()).all() and images[:, 0, 0, 0].ge(0).all():
            seen: list[Any] = stamped_indices(images)
        else:
            seen = [hash_image(image) for image in images]
        record = {"epoch": trainer.current_epoch, "batch": batch_idx, "step": trainer.global_step, "images": seen}
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"{self.tag}-rank{self._rank()}.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.batches += 1
        if self.kill_after is not None and self.batches == self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Any) -> None:
        """Record each save: ``{"save": global step, "batches": training batches this process ran}``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"{self.tag}-saves-rank{self._rank()}.jsonl", "a") as handle:
            handle.write(json.dumps({"save": trainer.global_step, "batches": self.batches}) + "\n")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(weights, self.folder / f"{self.tag}-final-rank{self._rank()}.pt")


class RankSeeds(Callback):
    """Reseed torch on every rank with ``1000 + rank`` at setup: the ranks draw different dropout masks, as
    in a run seeded per rank (a resumed run must then restore each rank's own random stream)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        torch.manual_seed(1000 + trainer.global_rank)


def hash_image(image: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()[:16]


def records(folder: Path, tag: str, rank: int = 0) -> list[dict[str, Any]]:
    path = folder / f"{tag}-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --------------------------------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------------------------------


def fit(
    folder: Path,
    tag: str,
    *,
    shapes: Path,
    world: int = 1,
    workers: int = 0,
    compile: bool = False,
    accumulate: int = 1,
    epochs: int = 2,
    kill_after: int | None = None,
    ckpt_path: str | None = None,
    accelerator: str = "cpu",
    compile_backend: str = "aot_eager",
    monitors: bool = True,
    monitor_every: int = MONITOR_EVERY,
    dropout: float = 0.0,
    rank_seeds: bool = False,
) -> pl.Trainer:
    """One fit of the case (A, B or C): checkpoints in ``folder/ckpt``, records under ``folder``
    (``accelerator="gpu"``: one GPU, for ``benchmarks/gpu_resume_check.py``). ``dropout``: before the
    classifier's linear layer; ``rank_seeds``: every rank reseeds torch with its own seed at setup
    (:class:`RankSeeds`), so the ranks' random streams (dropout masks) differ."""
    pl.seed_everything(0, verbose=False)
    data = StampedShapes(
        task="classification", root=str(shapes), image_size=32, num_train=NUM_TRAIN, num_val=8, num_test=4,
        batch_size=BATCH, num_workers=workers, train_transforms="light",
    )  # fmt: skip
    model = ImageClassifier(
        "preact_resnet18",
        backbone_kwargs={"stem": "cifar", "width": 4},
        num_sample_figures=0,
        compile={"backend": compile_backend} if compile else False,
        dropout=dropout,
    )
    watching = [
        ActivationVarianceMonitor(log_every_n_steps=monitor_every),
        BatchNormDriftMonitor(log_every_n_steps=monitor_every),
        GradientShatteringMonitor(every_n_steps=4, num_points=8),
        ThroughputMonitor(log_every_n_steps=monitor_every, sync_steps=(5, 11, 20)),
        OptimizationMonitor(log_every_n_steps=monitor_every),
    ]
    callbacks = [
        *(watching if monitors else []),
        *([RankSeeds()] if rank_seeds else []),
        KillSwitch(str(folder), tag, kill_after),
        AtomicModelCheckpoint(
            dirpath=folder / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=EVERY
        ),
    ]
    placement: dict[str, Any] = {"accelerator": accelerator, "devices": world}
    if world > 1:
        placement["strategy"] = "ddp_fork"
    trainer = pl.Trainer(
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        deterministic=True,
        logger=False,
        log_every_n_steps=2,
        callbacks=callbacks,
        default_root_dir=str(folder),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **placement,
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer


def fit_in_child(folder: Path, tag: str, **options: Any) -> int:
    """:func:`fit` in a forked child process; returns its exit code (``-SIGKILL`` when it killed itself).

    One-process fits all run in children: this process never runs a backward pass itself, so a later
    fork (this module's, ``ddp_fork``'s) never inherits autograd's threads (after a compiled backward in
    the parent, a forked child's backward raises "Unable to handle autograd's threading in combination with
    fork-based multiprocessing")."""
    child = multiprocessing.get_context("fork").Process(target=fit, args=(folder, tag), kwargs=options)
    child.start()
    child.join(timeout=900)
    if child.exitcode is None:
        child.kill()
        child.join()
    return int(child.exitcode)


def run_fit(folder: Path, tag: str, **options: Any) -> None:
    """Run A or C: in this process for DDP (``ddp_fork`` forks the ranks), else in a forked child."""
    if options.get("world", 1) > 1:
        fit(folder, tag, **options)
        return
    code = fit_in_child(folder, tag, **options)
    assert code == 0, f"run {tag} failed with exit code {code} (its traceback is in the captured stderr)"


def killed_fit(folder: Path, kill_after: int, **options: Any) -> None:
    """Run B: the fit killed by SIGKILL after ``kill_after`` batches (a forked child for one process; every
    rank for DDP, whose launcher then raises in this process)."""
    if options.get("world", 1) > 1:
        with pytest.raises(Exception, match=r"SIGKILL|signal 9|exit code -9"):
            fit(folder, "killed", kill_after=kill_after, **options)
        return
    code = fit_in_child(folder, "killed", kill_after=kill_after, **options)
    assert code == -signal.SIGKILL, f"run B ended with exit code {code}, not SIGKILL"


def checkpoint_position(path: Path) -> tuple[int, int, int]:
    """``(epoch, batches of that epoch done, global step)`` at which ``path`` was written."""
    checkpoint = torch.load(path, weights_only=True)
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    return int(checkpoint["epoch"]), int(progress["processed"]), int(checkpoint["global_step"])


THROUGHPUT_TIMINGS = ("wait_ms", "compute_ms", "callbacks_ms", "wait_share", "callback_share", "images_per_s", "mfu")
"""The ThroughputMonitor's history keys that are wall-clock measurements (no two runs share them)."""


def without_wall_clock(key: str, state: dict[str, Any], timed_counts: bool = True) -> dict[str, Any]:
    """A monitor's checkpointed state (``checkpoint["callbacks"][key]``) without its wall-clock values,
    which no two runs share: the history's ``*_seconds`` (the shattering probe's time) and the
    :data:`THROUGHPUT_TIMINGS`; the ThroughputMonitor's seconds in ``totals`` and in its open interval. Its
    counts stay: timed steps and images (totals and interval), the steps chosen for FLOPs and host-sync
    counting, FLOPs per step, the host syncs counted (``timed_counts=False``: the timed steps and images
    left out too). Everything else of every monitor is kept."""
    throughput = key.startswith("ThroughputMonitor")

    def timing(name: str) -> bool:
        return name.endswith("_seconds") or (throughput and name.split("/")[-1] in THROUGHPUT_TIMINGS)

    def extra(value: dict[str, Any]) -> dict[str, Any]:
        if not throughput or not isinstance(value, dict):
            return value
        value = dict(value)
        counts = ("steps", "images") if timed_counts else ()
        value["totals"] = {k: v for k, v in value["totals"].items() if k in counts}
        # timed steps, images (wait, compute, callbacks, wall: seconds)
        value["interval"] = value["interval"][3:5] if timed_counts else []
        return value

    kept = {k: v for k, v in state.items() if k not in ("history", "extra", "extra_ranks")}
    kept["history"] = [{k: v for k, v in row.items() if not timing(k)} for row in state["history"]]
    kept["extra"] = extra(state["extra"])
    if "extra_ranks" in state:
        kept["extra_ranks"] = [extra(e) for e in state["extra_ranks"]]
    return kept


def monitor_differences(
    a: dict[str, Any], c: dict[str, Any], expected: int | None = None, timed_counts: bool = True
) -> dict[str, list[str]]:
    """Per monitor, where two checkpoints' monitor states differ (wall-clock values left out:
    :func:`without_wall_clock`): history, extra state (every rank's under DDP), interval position. Every
    monitor must have recorded something (else the comparison would be vacuous); ``expected``: how many
    monitors there must be; ``timed_counts``: see :func:`without_wall_clock`."""
    monitors = sorted(k for k in a["callbacks"] if "Monitor" in k and "Checkpoint" not in k)
    assert expected is None or len(monitors) == expected, sorted(a["callbacks"])
    assert monitors == sorted(k for k in c["callbacks"] if "Monitor" in k and "Checkpoint" not in k)
    differing: dict[str, list[str]] = {}
    for key in monitors:
        assert a["callbacks"][key]["history"], f"{key} recorded nothing: the comparison would be vacuous"
        gaps = state_differences(
            without_wall_clock(key, a["callbacks"][key], timed_counts),
            without_wall_clock(key, c["callbacks"][key], timed_counts),
            key,
        )
        if gaps:
            differing[key.split("{")[0]] = gaps[:4]
    return differing


def check_resumed(
    straight: Path,
    killed: Path,
    resumed_from: tuple[int, int, int],
    *,
    world: int = 1,
    accumulate: int = 1,
    last_a: Path | None = None,
    last_c: Path | None = None,
    monitors: int = 5,
    known: dict[str, str] | None = None,
) -> None:
    """The stitched batches equal A's on every rank, every image is counted as often, and the final
    checkpoints and every rank's weights are A's bit for bit, monitor states included (wall-clock values
    left out: :func:`without_wall_clock`)."""
    epoch, done, _ = resumed_from

    def stitched(rank: int) -> list[dict[str, Any]]:
        before = [r for r in records(killed, "killed", rank) if (r["epoch"], r["batch"]) < (epoch, done)]
        return before + records(killed, "resumed", rank)

    for rank in range(world):
        full, ours = records(straight, "straight", rank), stitched(rank)
        after = records(killed, "resumed", rank)
        assert after, f"rank {rank}: the resumed run trained no batch"
        assert (after[0]["epoch"], after[0]["batch"]) == (epoch, done), (rank, after[0], resumed_from)
        assert [(r["epoch"], r["batch"], r["step"]) for r in ours] == [
            (r["epoch"], r["batch"], r["step"]) for r in full
        ], f"rank {rank}: the resumed run's batches are not the uninterrupted run's"
        assert [r["images"] for r in ours] == [r["images"] for r in full], (
            f"rank {rank}: the resumed run trained on other images than the uninterrupted one"
        )
    # every image as often as in A, counted per epoch over all ranks (A sees each image once per epoch,
    # plus the sampler's padding under DDP)
    for e in sorted({r["epoch"] for r in records(straight, "straight")}):
        counts_a: dict[Any, int] = {}
        counts_c: dict[Any, int] = {}
        for rank in range(world):
            for counts, rows in ((counts_a, records(straight, "straight", rank)), (counts_c, stitched(rank))):
                for image in (i for r in rows if r["epoch"] == e for i in r["images"]):
                    counts[image] = counts.get(image, 0) + 1
        assert counts_a == counts_c, f"epoch {e}: images seen a different number of times"
        if all(isinstance(i, int) for i in counts_a):
            assert sorted(counts_a) == list(range(NUM_TRAIN)), f"epoch {e} of A did not see every image"
            assert sum(counts_a.values()) == math.ceil(NUM_TRAIN / world) * world

    a = torch.load(last_a or straight / "ckpt" / "last.ckpt", weights_only=True)
    c = torch.load(last_c or killed / "ckpt" / "last.ckpt", weights_only=True)
    assert a["global_step"] == c["global_step"] and a["epoch"] == c["epoch"]
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert state_differences(a[key], c[key], key) == [], key
    data_keys = [k for k in a if "Shapes" in k]
    assert data_keys and state_differences({k: a[k] for k in data_keys}, {k: c[k] for k in data_keys}) == []
    for rank in range(world):
        final_a = torch.load(straight / f"straight-final-rank{rank}.pt", weights_only=True)
        final_c = torch.load(killed / f"resumed-final-rank{rank}.pt", weights_only=True)
        assert state_differences(final_a, final_c, f"rank {rank}") == [], f"rank {rank} ended elsewhere"

    differing = monitor_differences(a, c, expected=monitors)
    known = known or {}
    unexpected = {k: v for k, v in differing.items() if k not in known}
    assert not unexpected, f"monitor states differ after the resume: {unexpected}"
    fixed = sorted(set(known) - set(differing))
    assert not fixed, f"{fixed} now resume exactly: remove them from the known gaps"


def run_case(tmp_path: Path, kill_after: int, **options: Any) -> tuple[int, int, int]:
    """A, B and C of one case; returns the position B's last.ckpt was written at."""
    shapes = tmp_path / "shapes"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    world = options.get("world", 1)
    with ddp_hygiene():
        run_fit(straight, "straight", shapes=shapes, **options)
    with ddp_hygiene():
        killed_fit(killed, kill_after, shapes=shapes, **options)
    last = killed / "ckpt" / "last.ckpt"
    assert last.is_file(), "run B wrote no last.ckpt before it was killed"
    position = checkpoint_position(last)
    batches_per_epoch = math.ceil(math.ceil(NUM_TRAIN / world) / BATCH)
    accumulate = options.get("accumulate", 1)
    # a genuine mid-run kill: not on an epoch boundary nor on the checkpoint's step
    assert kill_after % batches_per_epoch != 0 and kill_after > position[1] + position[0] * batches_per_epoch
    assert 0 < position[1] < batches_per_epoch, f"B's last.ckpt is not a mid-epoch one: {position}"
    steps_per_epoch = math.ceil(batches_per_epoch / accumulate)
    assert position[2] == position[0] * steps_per_epoch + position[1] // accumulate
    with ddp_hygiene():
        run_fit(killed, "resumed", shapes=shapes, ckpt_path=str(last), **options)
    check_resumed(
        straight, killed, position, world=world, accumulate=accumulate, monitors=5 if options.get("monitors", True) else 0
    )
    return position


# --------------------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------------------


def test_one_process_with_two_workers_killed_mid_epoch_resumes_exactly(tmp_path):
    # 14 batches per epoch, last.ckpt every 3 steps: killed after batch 20 (epoch 1, batch 5 of 14),
    # resumed from step 18 (epoch 1 after its 4th batch)
    assert run_case(tmp_path, kill_after=20, workers=2) == (1, 4, 18)


def test_two_ddp_ranks_killed_mid_epoch_resume_at_the_right_position_on_every_rank(tmp_path):
    # 7 batches per rank and epoch (27 images each, the last batch 3): killed after batch 11 (epoch 1,
    # batch 4), resumed from step 9 (epoch 1 after its 2nd batch)
    assert run_case(tmp_path, kill_after=11, world=2) == (1, 2, 9)


def test_compiled_model_killed_mid_epoch_resumes_exactly(tmp_path):
    # without the monitors: their hooks on recorded steps make dynamo compile more graphs (slow case below)
    assert run_case(tmp_path, kill_after=17, compile=True, monitors=False) == (1, 1, 15)


@pytest.mark.slow
def test_compiled_model_with_the_monitors_killed_mid_epoch_resumes_exactly(tmp_path):
    assert run_case(tmp_path, kill_after=17, compile=True) == (1, 1, 15)


def test_gradient_accumulation_killed_between_micro_batches_resumes_exactly(tmp_path):
    # 2 micro-batches per step, 7 steps per epoch: killed after micro-batch 21 (the first half of step 11),
    # resumed from step 9 (epoch 1 after 4 micro-batches), a step the monitors flushed (every 3): the
    # resumed run's first micro-batch, still at step 9, must not flush it again
    assert run_case(tmp_path, kill_after=21, accumulate=2, monitor_every=3) == (1, 4, 9)


@pytest.mark.slow
def test_two_ddp_ranks_with_two_workers_each_killed_mid_epoch_resume_exactly(tmp_path):
    assert run_case(tmp_path, kill_after=12, world=2, workers=2) == (1, 2, 9)


@pytest.mark.slow
def test_two_ddp_ranks_with_accumulation_killed_between_micro_batches_resume_exactly(tmp_path):
    # 7 micro-batches per rank and epoch (the epoch's last step has one): steps 1-4 in epoch 0, 5-8 in 1;
    # killed after micro-batch 12 (the first half of step 7), resumed from step 6
    assert run_case(tmp_path, kill_after=12, world=2, accumulate=2, epochs=3) == (1, 4, 6)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [4, 9, 16, 25, 31, 38])
def test_one_process_killed_at_many_steps_resumes_exactly(tmp_path, kill_after):
    # kills in epoch 0, 1 and 2, before and after the epoch's checkpoints (none at an epoch end)
    position = run_case(tmp_path, kill_after=kill_after, epochs=3)
    assert position[2] == max(range(EVERY, kill_after, EVERY))  # the last checkpoint before the kill


def test_two_ddp_ranks_with_dropout_and_their_own_random_streams_resume_exactly(tmp_path):
    # every rank seeds itself (1000 + rank) and draws its own dropout masks: the checkpoint holds every
    # rank's random streams and each rank resumes its own (rank zero's on both would change rank one's
    # masks, and the weights); killed after batch 11 as above, resumed from step 9
    assert run_case(tmp_path, kill_after=11, world=2, dropout=0.5, rank_seeds=True, monitors=False) == (1, 2, 9)


def test_a_resumed_run_does_not_save_again_between_micro_batches(tmp_path):
    shapes, killed = tmp_path / "shapes", tmp_path / "killed"
    options: dict[str, Any] = {"shapes": shapes, "accumulate": 2, "monitors": False}
    with ddp_hygiene():
        killed_fit(killed, 21, **options)
    with ddp_hygiene():
        run_fit(killed, "resumed", ckpt_path=str(killed / "ckpt" / "last.ckpt"), **options)
    saves = [json.loads(line) for line in (killed / "resumed-saves-rank0.jsonl").read_text().splitlines()]
    assert saves, "the resumed run saved nothing"
    between = [s for s in saves if s["batches"] % 2]  # an odd number of micro-batches: inside a step
    assert not between, f"the resumed run saved between the micro-batches of a step: {between}"


# --------------------------------------------------------------------------------------------------
# Through the CLI: --ckpt_path last, the quickstart config
# --------------------------------------------------------------------------------------------------

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
KNOWN_GAPS: dict[str, str] = {}
"""Monitors of the quickstart whose state a resume does not restore exactly yet, and why. The CLI cases
fail if another monitor differs, or once a listed one no longer does (then remove it: the list only
shrinks)."""


def draw_kill(seed: int, batches_per_epoch: int, epochs: int, every: int) -> tuple[int, int]:
    """A "random" kill, reproducible: ``(kill after this many batches, step of the last.ckpt before it)``,
    drawn with ``random.Random(seed)`` among the batches that are not the last of an epoch and whose last
    checkpoint before them (one every ``every`` steps, and one after each epoch's validation) is a
    mid-epoch one written strictly before the kill, with at least one batch left to resume."""
    import random

    total = batches_per_epoch * epochs
    candidates = []
    for k in range(1, total):
        saves = [s for s in range(1, k + 1) if s % every == 0 or s % batches_per_epoch == 0]
        if k % batches_per_epoch and saves and saves[-1] < k and saves[-1] % batches_per_epoch:
            candidates.append((k, saves[-1]))
    assert candidates, "no batch to kill at: change the sizes"
    kill, saved = random.Random(seed).choice(candidates)
    assert kill % batches_per_epoch != 0 and saved % every == 0 and saved % batches_per_epoch != 0 and saved < kill
    return kill, saved


def quickstart_config(folder: Path, every: int) -> Path:
    """configs/quickstart.yaml as a test runs it: its logs under ``folder``, last.ckpt every ``every`` steps,
    no progress bar (everything else as shipped: the model, optimizer, schedule and every monitor)."""
    import yaml

    config = yaml.safe_load(QUICKSTART.read_text())
    trainer = config["trainer"]
    trainer["logger"]["init_args"]["save_dir"] = str(folder / "logs")
    callbacks = []
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("RichProgressBar"):
            continue
        if callback.get("init_args", {}).get("every_n_train_steps"):
            callback["init_args"]["every_n_train_steps"] = every
        callbacks.append(callback)
    trainer["callbacks"] = callbacks
    trainer["enable_progress_bar"] = False
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "quickstart.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli_fit(
    config: Path, folder: Path, tag: str, shapes: Path, *extra: str, kill_after: int | None = None, world: int = 1
) -> None:
    """``lightning-convnets fit --config <config>`` in-process (:func:`lightning_convnets.cli.main`), CPU,
    deterministic, tiny data, with a :class:`KillSwitch`; ``world`` > 1: ``ddp_fork`` ranks."""
    from lightning_convnets.cli import main

    switch = {"class_path": "test_fault_resume.KillSwitch", "init_args": {"folder": str(folder), "tag": tag}}
    if kill_after is not None:
        switch["init_args"]["kill_after"] = kill_after
    placement = [f"--trainer.devices={world}"] + (["--trainer.strategy=ddp_fork"] if world > 1 else [])
    main(
        [
            "fit", "--config", str(config), "--trainer.accelerator=cpu", "--trainer.deterministic=true",
            f"--trainer.callbacks+={json.dumps(switch)}", *placement,
            f"--data.init_args.root={shapes}", "--data.init_args.num_val=16", "--data.init_args.num_test=8",
            *extra,
        ]
    )  # fmt: skip


def cli_in_child(*args: Any, **kwargs: Any) -> int:
    """:func:`cli_fit` in a forked child (this process never trains: see :func:`fit_in_child`)."""
    child = multiprocessing.get_context("fork").Process(target=cli_fit, args=args, kwargs=kwargs)
    child.start()
    child.join(timeout=900)
    if child.exitcode is None:
        child.kill()
        child.join()
    return int(child.exitcode)


def run_cli_case(tmp_path: Path, *, world: int, num_train: int, batch: int, epochs: int, every: int, seed: int) -> int:
    """A, B (killed at a drawn batch) and C (``--ckpt_path last``) of the quickstart through the CLI, then
    :func:`check_resumed`; returns B's last.ckpt step."""
    shapes = tmp_path / "shapes"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    per_rank = math.ceil(num_train / world)
    batches_per_epoch = math.ceil(per_rank / batch)
    kill, saved = draw_kill(seed, batches_per_epoch, epochs, every)
    sizes = [f"--data.init_args.num_train={num_train}", f"--data.init_args.batch_size={batch}",
             f"--trainer.max_epochs={epochs}"]  # fmt: skip
    config_a, config_b = quickstart_config(straight, every), quickstart_config(killed, every)
    if world > 1:
        with ddp_hygiene():
            cli_fit(config_a, straight, "straight", shapes, *sizes, world=world)
        with ddp_hygiene(), pytest.raises(Exception, match=r"SIGKILL|signal 9|exit code -9"):
            cli_fit(config_b, killed, "killed", shapes, *sizes, kill_after=kill, world=world)
        with ddp_hygiene():
            cli_fit(config_b, killed, "resumed", shapes, *sizes, "--ckpt_path", "last", world=world)
    else:
        assert cli_in_child(config_a, straight, "straight", shapes, *sizes) == 0
        assert cli_in_child(config_b, killed, "killed", shapes, *sizes, kill_after=kill) == -signal.SIGKILL
        assert cli_in_child(config_b, killed, "resumed", shapes, *sizes, "--ckpt_path", "last") == 0
    (last_a,) = (straight / "logs" / "quickstart").glob("version_0/checkpoints/last.ckpt")
    (last_c,) = (killed / "logs" / "quickstart").glob("version_0/checkpoints/last.ckpt")
    assert not (killed / "logs" / "quickstart" / "version_1").exists(), "--ckpt_path last started a new version"
    # B's last.ckpt was overwritten by C: where C started is the first resumed batch
    first = records(killed, "resumed")[0]
    position = (first["epoch"], first["batch"], saved)
    assert first["epoch"] * batches_per_epoch + first["batch"] == saved, (first, saved, kill)
    check_resumed(
        straight, killed, position, world=world, last_a=last_a, last_c=last_c, monitors=5, known=KNOWN_GAPS
    )
    return saved


def test_cli_resumes_a_killed_quickstart_with_ckpt_path_last(tmp_path):
    # one process, 64 images in batches of 16 (4 per epoch), 3 epochs, last.ckpt every 3 steps
    run_cli_case(tmp_path, world=1, num_train=64, batch=16, epochs=3, every=3, seed=27)


def test_quickstart_on_two_ddp_ranks_killed_mid_epoch_resumes_exactly(tmp_path):
    # the repro, shrunk: the quickstart config on 2 CPU DDP ranks, killed mid-epoch, resumed with
    # --ckpt_path last: final weights (every rank), optimizer, scheduler and monitors equal to the
    # uninterrupted run's. 128 images, 4 batches of 16 per rank and epoch, 3 epochs, last.ckpt every 3 steps
    run_cli_case(tmp_path, world=2, num_train=128, batch=16, epochs=3, every=3, seed=32)
