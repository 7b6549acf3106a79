"""ResNet-50 on ImageNet-shaped synthetic data on one GPU: bf16-mixed, channels_last, eager vs torch.compile.

``ImageClassifier("resnet50", num_classes=1000)`` (our post-activation ResNet-50, ImageNet stem) in a Trainer,
batch ``--batch`` of random 224x224 images kept on the GPU, AdamW, ``precision="bf16-mixed"``,
``channels_last=True``; one run with ``compile=False`` and one with ``compile=True`` (inductor; the first
``--warmup`` steps, which include compilation, are not timed). Reports ms/step and images/s (wall time
between the first and the last timed step, with a CUDA synchronisation at both ends) and peak memory.

Written in a session without a GPU: run by ``benchmarks/gpu_check.sh`` on a GPU machine; not yet run.

    .venv/bin/python benchmarks/bench_gpu_resnet50.py --steps 200 --warmup 50

Writes ``benchmarks/results/gpu_resnet50.json`` and ``gpu_resnet50.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_convnets import ImageClassifier

RESULTS = Path(__file__).resolve().parent / "results"


class _Timer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.warmup:
            torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, *args: object) -> None:
        torch.cuda.synchronize()
        self.end = time.perf_counter()
        self.steps = trainer.global_step - self.warmup


def run(compile: bool, batch: int, steps: int, warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    images = torch.randn(batch, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 1000, (batch,), device="cuda")
    data = [(images, labels)] * steps
    model = ImageClassifier(
        "resnet50",
        num_classes=1000,
        channels_last=True,
        compile=compile,
        figure_every_n_epochs=0,
        num_sample_figures=0,
    )
    timer = _Timer(warmup)
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[timer],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=None))
    ms = (timer.end - timer.start) / timer.steps * 1e3
    return {
        "ms_per_step": ms,
        "images_per_s": batch / ms * 1e3,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_resnet50: needs a CUDA GPU")
    rows = {
        name: run(flag, args.batch, args.steps, args.warmup)
        for name, flag in (("eager", False), ("compiled", True))
    }
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, **vars(args)}
    lines = [
        "# ResNet-50, 224x224, bf16-mixed, channels_last: eager vs torch.compile",
        "",
        json.dumps(meta),
        "",
        "| run | ms/step | images/s | peak memory GiB |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {v['ms_per_step']:.1f} | {v['images_per_s']:.0f} | {v['peak_memory_gib']:.1f} |"
        for k, v in rows.items()
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu_resnet50.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    (RESULTS / "gpu_resnet50.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
