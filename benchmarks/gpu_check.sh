#!/usr/bin/env bash
# GPU smoke check: each task's quickstart for a few hundred steps with bf16-mixed, without and with all
# three monitors; prints throughput, the monitors' overhead and peak memory. One command, a few minutes
# on one GPU (most of it generating the shapes data the first time):
#
#   benchmarks/gpu_check.sh                 # 300 steps per run, the first 50 not timed
#   benchmarks/gpu_check.sh --steps 500 --warmup 100
#   benchmarks/gpu_check.sh --each          # also each monitor alone (5 runs per task instead of 2)
#
# Exits 2 with a message when no CUDA device is visible. GPU_CHECK_ALLOW_CPU=1 runs the same code on the
# CPU (a check of this script itself, e.g. `GPU_CHECK_ALLOW_CPU=1 benchmarks/gpu_check.sh --steps 5
# --warmup 1 --tiny`: its numbers are not GPU numbers and are not written to benchmarks/results).
#
# Per task and configuration: ms/step is the wall time between the first timed step and the last, with a
# CUDA synchronisation at both ends only (the monitors are meant to run without host syncs, and a sync per
# step would hide that), divided by the steps; img/s = per-step batch / that. The monitor run includes its
# logging steps (every trainer.log_every_n_steps = 10) and the monitors' default schedules (every step
# recorded below step 50, then one in 10 at this logging interval); the shattering probe's derived interval
# (1.35 x 256 / batch / 1% steps) exceeds these runs, so its probes (before the first step and at the end of
# fit) are outside the timed window. Data loading runs in worker processes
# (num_workers = min(8, CPUs - 1)) so the GPU, not the PNG decoding, sets the pace on a decent machine; if
# "loader-bound" is printed, the timing measures the input pipeline, and the overhead is understated.
# A GPU run writes benchmarks/results/gpu_check.json and gpu_check.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
else
  py=python3
fi
exec "$py" - "$@" <<'PYTHON_EOF'
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description="GPU smoke check of the quickstarts")
parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
parser.add_argument("--warmup", type=int, default=50, help="first steps not timed (default 50)")
parser.add_argument("--each", action="store_true", help="also time each monitor alone")
parser.add_argument("--tiny", action="store_true", help="tiny models and data (a check of the script itself)")
parser.add_argument("--tasks", default="classification,segmentation,detection")
args = parser.parse_args()
sys.argv = sys.argv[:1]  # the CLI runs below get their arguments explicitly
if args.steps <= args.warmup or args.warmup < 1:
    parser.error(f"need 1 <= --warmup < --steps, got warmup={args.warmup} steps={args.steps}")

cpu_allowed = os.environ.get("GPU_CHECK_ALLOW_CPU") == "1"
if not torch.cuda.is_available() and not cpu_allowed:
    print(
        "gpu_check: FAILED: no CUDA device visible (torch.cuda.is_available() is False; "
        f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}).\n"
        "gpu_check: this check needs an NVIDIA GPU and a CUDA build of torch. On a CPU-only machine run the "
        "tests instead (make test); GPU_CHECK_ALLOW_CPU=1 runs this script on the CPU only to check the script.",
        file=sys.stderr,
    )
    sys.exit(2)

import lightning.pytorch as pl  # noqa: E402

from lightning_convnets.callbacks import (  # noqa: E402
    ActivationVarianceMonitor,
    BatchNormDriftMonitor,
    GradientShatteringMonitor,
)
from lightning_convnets.cli import ConvNetsCLI  # noqa: E402

on_gpu = torch.cuda.is_available()
precision = "bf16-mixed" if (not on_gpu or torch.cuda.is_bf16_supported()) else "16-mixed"
workers = max(0, min(8, (os.cpu_count() or 1) - 1))
TASKS = {
    "classification": ("configs/quickstart.yaml", ["--model.init_args.backbone_kwargs={stem: cifar, width: 4}"]),
    "segmentation": (
        "configs/segmentation/shapes_unet.yaml",
        ["--model.init_args.backbone_kwargs={width: 4, depth: 2, norm: batch}", "--data.init_args.image_size=32"],
    ),
    "detection": (
        "configs/detection/centernet_hourglass_shapes.yaml",
        ['--model.init_args.backbone_kwargs={"num_stacks": 2, "order": 2, "width": 8}', "--model.init_args.head_channels=4"],
    ),
}
TINY_DATA = ["--data.init_args.num_train=32", "--data.init_args.num_val=4", "--data.init_args.num_test=4", "--data.init_args.batch_size=4"]


def sync() -> None:
    if on_gpu:
        torch.cuda.synchronize()


class StepTimer(pl.Callback):
    """Wall time from the start of step `warmup` to the end of the last step, synchronised at both ends;
    time spent waiting for the loader is the part of each step before its batch arrived."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = None
        self.images = 0
        self.steps = 0
        self.loader_wait = 0.0
        self._last_end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if trainer.global_step == self.warmup and self.start is None:
            sync()
            self.start = time.perf_counter()
        elif self.start is not None and self._last_end is not None:
            self.loader_wait += now - self._last_end
        if self.start is not None:
            images = batch[0] if isinstance(batch, (list, tuple)) else batch.get("image", batch.get("images"))
            self.images += len(images)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._last_end = time.perf_counter()
        if self.start is not None:
            self.steps += 1
        if trainer.global_step >= trainer.max_steps and self.start is not None:
            sync()
            self.end = time.perf_counter()


def run(task: str, monitors: list, root: Path) -> dict:
    config, tiny = TASKS[task]
    overrides = [
        "--config", config,
        "--seed_everything=0",
        f"--trainer.accelerator={'gpu' if on_gpu else 'cpu'}",
        "--trainer.devices=1",
        f"--trainer.precision={precision}",
        f"--trainer.max_steps={args.steps}",
        "--trainer.max_epochs=-1",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=10",
        f"--trainer.logger.init_args.save_dir={root}",
        "--model.init_args.figure_every_n_epochs=0",
        f"--data.init_args.num_workers={workers}",
        f"--data.init_args.persistent_workers={'true' if workers else 'false'}",
        f"--data.init_args.pin_memory={'true' if on_gpu else 'false'}",
    ]
    if args.tiny:
        overrides += [*tiny, *TINY_DATA, f"--data.init_args.root={root / 'shapes'}"]
    cli = ConvNetsCLI(args=overrides, run=False)
    timer = StepTimer(args.warmup)
    cli.trainer.callbacks.extend([*monitors, timer])
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    for monitor in monitors:
        if not monitor.history:
            raise RuntimeError(f"gpu_check: {type(monitor).__name__} logged nothing in {task}")
    if timer.end is None or timer.steps == 0:
        raise RuntimeError(f"gpu_check: {task} stopped before the timed window ended ({timer.steps} timed steps)")
    seconds = timer.end - timer.start
    return {
        "ms_per_step": 1000 * seconds / timer.steps,
        "images_per_s": timer.images / seconds,
        "loader_wait_fraction": timer.loader_wait / seconds,
        "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else float("nan"),
        "timed_steps": timer.steps,
    }


class ListBatchShattering(GradientShatteringMonitor):
    """The detection batches are ``(list of image tensors, targets)``, which the monitor's probe capture does
    not unpack (it wants a tensor first): stack the images for it."""

    def capture_probe(self, batch):
        images = batch[0]
        if isinstance(images, (list, tuple)):
            batch = (torch.stack(list(images[:2])), batch[1])
        super().capture_probe(batch)


# The shattering probe differentiates one number per input point. The classifier's predicted-class logit
# is the default; for the segmenter we take the mean over pixels of the top class logit of its last map,
# and the detector's forward returns decoded boxes (not differentiable), so its CenterNet module is probed
# on the same quantity of its last heatmap.
SHATTERING = {
    "classification": {},
    "segmentation": {"output_fn": lambda out: out[-1].float().amax(1).mean((1, 2))},
    "detection": {"probe_module": "detector", "output_fn": lambda out: out[-1]["heatmap"].float().amax(1).mean((1, 2))},
}


def monitor_sets(task: str) -> dict:
    shattering = SHATTERING[task]
    sets = {
        "none": lambda: [],
        "all three": lambda: [ActivationVarianceMonitor(), BatchNormDriftMonitor(), ListBatchShattering(**shattering)],
    }
    if args.each:
        sets["activation variance"] = lambda: [ActivationVarianceMonitor()]
        sets["batchnorm drift"] = lambda: [BatchNormDriftMonitor()]
        sets["gradient shattering"] = lambda: [ListBatchShattering(**shattering)]
    return sets


device = torch.cuda.get_device_name(0) if on_gpu else f"CPU ({platform.processor() or platform.machine()})"
print(f"gpu_check: {device}, torch {torch.__version__}, lightning {pl.__version__}, precision {precision}, "
      f"{args.steps} steps per run ({args.warmup} not timed), {workers} loader workers", flush=True)
begin = time.perf_counter()
results = []
with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        if task not in TASKS:
            sys.exit(f"gpu_check: unknown task {task!r}; choose from {sorted(TASKS)}")
        base = None
        for name, make in monitor_sets(task).items():
            row = {"task": task, "monitors": name, **run(task, make(), Path(tmp) / task / name.replace(" ", "_"))}
            if base is None:
                base = row
            row["overhead"] = row["ms_per_step"] / base["ms_per_step"] - 1
            results.append(row)
            print(f"gpu_check: {task:<14} monitors={name:<20} {row['ms_per_step']:8.2f} ms/step "
                  f"{row['images_per_s']:9.0f} img/s  overhead {100 * row['overhead']:+6.1f}%  "
                  f"peak {row['peak_memory_mib']:8.1f} MiB  loader wait {100 * row['loader_wait_fraction']:4.1f}%",
                  flush=True)

header = "| task | monitors | ms/step | img/s | overhead vs none | peak MiB | loader wait |"
lines = [header, "|---|---|---|---|---|---|---|"]
for r in results:
    lines.append(f"| {r['task']} | {r['monitors']} | {r['ms_per_step']:.2f} | {r['images_per_s']:.0f} | "
                 f"{100 * r['overhead']:+.1f}% | {r['peak_memory_mib']:.1f} | {100 * r['loader_wait_fraction']:.1f}% |")
table = "\n".join(lines)
print()
print(table)
bound = [r for r in results if r["loader_wait_fraction"] > 0.2]
if bound:
    print(f"\ngpu_check: loader-bound in {len(bound)} run(s) (>20% of the time waiting for data): "
          "throughput there is the input pipeline's; the monitors' overhead is understated")
elapsed = time.perf_counter() - begin
print(f"\ngpu_check: done in {elapsed:.0f} s")
if on_gpu and not args.tiny:
    out = Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "torch": torch.__version__, "lightning": pl.__version__, "precision": precision,
            "steps": args.steps, "warmup": args.warmup, "loader_workers": workers, "seconds": elapsed}
    (out / "gpu_check.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (out / "gpu_check.md").write_text(f"# GPU check\n\n{json.dumps(meta)}\n\n{table}\n")
    print(f"gpu_check: wrote {out / 'gpu_check.md'} and gpu_check.json")
# Issue 12 (written in a session without a GPU, not yet run): each task in a Trainer vs its plain loop on
# the GPU in bf16-mixed (benchmarks/results/tasks_cuda.md), and a ResNet-50 224x224 bf16-mixed
# channels_last run without and with torch.compile (benchmarks/results/gpu_resnet50.md).
if on_gpu and not args.tiny:
    import subprocess

    for command in (
        ["benchmarks/bench_tasks.py", "--device", "cuda", "--precision", "bf16-mixed", "--steps", "100",
         "--rounds", "4", "--threads", str(os.cpu_count() or 1)],
        ["benchmarks/bench_gpu_resnet50.py"],
    ):
        print(f"\ngpu_check: {' '.join(command)}", flush=True)
        subprocess.run([sys.executable, *command], check=True)
# Issue 25 (written in a session without a GPU, not yet run; no GPU figure exists until it has): the three
# monitors at their default schedules add no host synchronisation on the steps that do not log, checked
# on the GPU with torch.cuda.set_sync_debug_mode("error") on every quiet step (tests/test_sync_free_monitors.py
# with SYNC_FREE_DEVICE=cuda: bf16-mixed, channels_last; tests/test_sync_free_tasks.py too if it reads
# the same variable); then the monitors' cost table of benchmarks/bench_monitors.py --sweep on the GPU
# (bf16-mixed, channels_last, wall time synchronised at the block boundaries only), written to
# benchmarks/results/monitors_cuda.{md,json}. About 6-10 minutes on one H100 (rows of tiny networks are
# kernel-launch bound there: their per-step share is the one to read).
if on_gpu and not args.tiny:
    env = {**os.environ, "SYNC_FREE_DEVICE": "cuda"}
    tests = [t for t in ("tests/test_sync_free_monitors.py", "tests/test_sync_free_tasks.py") if Path(t).exists()]
    print(f"\ngpu_check: sync-free tests on the GPU: {' '.join(tests)}", flush=True)
    subprocess.run([sys.executable, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider"], check=True, env=env)
    command = ["benchmarks/bench_monitors.py", "--sweep", "--device", "cuda", "--null", "--cycles", "4",
               "--row-seconds", "15", "--threads", str(min(4, os.cpu_count() or 1))]
    print(f"\ngpu_check: {' '.join(command)}", flush=True)
    subprocess.run([sys.executable, *command], check=True)
# Issues 27 and 28 (written in sessions without a GPU, not yet run): exact resume after a kill in
# deterministic mode (workers, gradient accumulation, compile), and images larger than memory streamed
# through the GPU (pinned memory, non-blocking copies, bf16, channels_last).
if on_gpu and not args.tiny:
    for command in (["benchmarks/gpu_resume_check.py"], ["benchmarks/gpu_large_images.py"]):
        print(f"\ngpu_check: {' '.join(command)}", flush=True)
        subprocess.run([sys.executable, *command], check=True)
PYTHON_EOF
