"""A killed run resumes exactly: ``lightning-convnets fit --config configs/quickstart.yaml --ckpt_path last``.

The quickstart (shortened: 640 training images in batches of 16, 2 epochs = 80 optimizer steps; the
config's own last.ckpt trigger, every 50 steps, lands mid-epoch 1) runs three times as a subprocess
of the real console entry point, on the CPU with ``deterministic=True``:

A. uninterrupted;
B. paused by :class:`StepRecorder` right after optimizer step 60 (the recorder writes each step to a
   file; the test reads that file, then SIGKILLs the process: no sleep decides when) - its last.ckpt is
   the one of step 50, written mid-epoch;
C. ``--ckpt_path last`` in B's folder.

A's and C's final ``last.ckpt`` must hold bit-identical weights (no tolerance: the same operations run
in the same order on the same numbers), equal optimizer and LR-scheduler states and equal monitor
histories; and the images each step trained on (hashes of the augmented batch, recorded by
:class:`StepRecorder`) of B up to step 50 followed by C must be A's, image for image: the resumed
epoch neither repeats nor skips an image (each epoch sees each of the 640 images once).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
PAUSE_ENV = "LIGHTNING_CONVNETS_TEST_PAUSE_AT_STEP"
NUM_TRAIN, BATCH, EPOCHS, PAUSE_AT = 640, 16, 2, 60


class StepRecorder(Callback):
    """Append ``{"step", "epoch", "images": [hash...]}`` per training batch to ``path`` (flushed and
    fsync-ed); with ``$LIGHTNING_CONVNETS_TEST_PAUSE_AT_STEP=K``, write ``{"paused": K}`` after step K
    and wait there to be killed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        images = batch[0].detach().cpu().contiguous()
        hashes = [hashlib.sha1(image.numpy().tobytes()).hexdigest()[:16] for image in images]
        record = {"step": trainer.global_step - 1, "epoch": trainer.current_epoch, "images": hashes}
        self._write(record)
        pause = os.environ.get(PAUSE_ENV)
        if pause is not None and trainer.global_step == int(pause):
            self._write({"paused": trainer.global_step})
            while True:  # the test kills the process here
                time.sleep(0.05)

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _command(run_dir: Path, data_root: Path, *extra: str) -> list[str]:
    recorder = {"class_path": "test_resume.StepRecorder", "init_args": {"path": str(run_dir / "steps.jsonl")}}
    return [
        sys.executable,
        "-m",
        "lightning_convnets.cli",
        "fit",
        "--config",
        str(QUICKSTART),
        f"--trainer.max_epochs={EPOCHS}",
        "--trainer.accelerator=cpu",
        "--trainer.deterministic=true",
        f"--trainer.callbacks+={json.dumps(recorder)}",
        f"--data.init_args.num_train={NUM_TRAIN}",
        "--data.init_args.num_val=64",
        "--data.init_args.num_test=16",
        f"--data.init_args.batch_size={BATCH}",
        f"--data.init_args.root={data_root}",
        *extra,
    ]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    env.pop(PAUSE_ENV, None)
    env.update(extra)
    return env


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "steps.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _relative_gap(x: float, y: float) -> float:
    if x == y or (math.isnan(x) and math.isnan(y)):
        return 0.0
    return abs(x - y) / max(abs(x), abs(y), 1e-12)


def _equal(a: Any, b: Any, where: str = "") -> list[str]:
    """Paths where two nested checkpoint values differ (tensors bit for bit, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.nan_to_num(), b.nan_to_num())
        same = same and torch.equal(a.isnan(), b.isnan()) if a.is_floating_point() else same
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where} keys {sorted(set(a) ^ set(b), key=str)}"]
        return [d for k in a for d in _equal(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{where} length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _equal(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


@pytest.mark.slow
def test_killed_quickstart_resumes_bit_identically_without_repeating_or_skipping_images(tmp_path):
    data_root = tmp_path / "shapes"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()

    # A: the uninterrupted run.
    done = subprocess.run(
        _command(straight, data_root), cwd=straight, env=_env(), capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]

    # B: paused after step PAUSE_AT (read from the file it writes), then SIGKILLed.
    proc = subprocess.Popen(
        _command(killed, data_root),
        cwd=killed,
        env=_env(**{PAUSE_ENV: str(PAUSE_AT)}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 900
        while not any(r.get("paused") == PAUSE_AT for r in _records(killed)):
            assert proc.poll() is None, f"run B ended before step {PAUSE_AT}: {proc.stderr.read()[-4000:]}"
            assert time.monotonic() < deadline, "run B never reached the pause step"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    (last_b,) = (killed / "lightning_logs" / "quickstart" / "version_0" / "checkpoints").glob("last*.ckpt")
    resumed_from = torch.load(last_b, weights_only=True)["global_step"]
    assert resumed_from == 50, resumed_from  # the config's every_n_train_steps, mid-epoch 1 (40 steps/epoch)
    before_kill = [r for r in _records(killed) if "step" in r and r["step"] < resumed_from]

    # C: resume B with --ckpt_path last.
    (killed / "steps.jsonl").unlink()
    done = subprocess.run(
        _command(killed, data_root, "--ckpt_path", "last"),
        cwd=killed,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    # Images: B up to the checkpoint, then C, is A image for image; every epoch sees each image once.
    full = _records(straight)
    stitched = before_kill + _records(killed)
    assert len(full) == EPOCHS * NUM_TRAIN // BATCH
    assert [r["step"] for r in stitched] == [r["step"] for r in full]
    assert [r["images"] for r in stitched] == [r["images"] for r in full]
    for epoch in range(EPOCHS):
        seen = [h for r in stitched if r["epoch"] == epoch for h in r["images"]]
        assert len(seen) == NUM_TRAIN, (epoch, len(seen))

    # Final state: weights bit-identical; optimizer, scheduler and monitor histories equal.
    (last_a,) = (straight / "lightning_logs" / "quickstart" / "version_0" / "checkpoints").glob("last*.ckpt")
    (last_c,) = (killed / "lightning_logs" / "quickstart" / "version_0" / "checkpoints").glob("last*.ckpt")
    a, c = torch.load(last_a, weights_only=True), torch.load(last_c, weights_only=True)
    assert a["global_step"] == c["global_step"] == EPOCHS * NUM_TRAIN // BATCH
    assert _equal(a["state_dict"], c["state_dict"], "state_dict") == []
    assert _equal(a["optimizer_states"], c["optimizer_states"], "optimizer") == []
    assert _equal(a["lr_schedulers"], c["lr_schedulers"], "lr_schedulers") == []
    # every monitor of the quickstart: every number bit-identical except wall-clock timings (the shattering
    # probe's probe_seconds, the ThroughputMonitor's times), which no two runs share
    # (tests/test_fault_resume.py::without_wall_clock), and the known gaps listed there
    from test_fault_resume import KNOWN_GAPS, monitor_differences

    differing = monitor_differences(a, c, expected=5)
    assert {k: v for k, v in differing.items() if k not in KNOWN_GAPS} == {}
