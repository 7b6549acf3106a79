"""Tiled vs whole-image prediction (time, peak memory) and what test-time augmentation changes on shapes.

Part ``memory``: a U-Net (width 8, depth 3, 2 classes) predicts a random ``S x S`` RGB image, ``S`` in
1024, 2048, 4096, either in one forward ("whole") or with :class:`~lightning_convnets.predict.tiling.TiledPredictor`
(256-px tiles, batch 4, the mask reduced strip by strip). Both paddings: same padding (blended tiles,
overlap 64, Gaussian window) and valid padding (overlap-tile, mirror padding). Each run is a fresh
subprocess; peak RSS (``resource.getrusage``, ``ru_maxrss``) is read before the prediction (model and image
loaded) and after it: the difference is what prediction allocated. "one tile batch" is the same
difference for a single forward of one batch of 4 tiles. Times are process CPU seconds (one thread).

Part ``tta``: short CPU trainings on the generated shapes (classification, segmentation, detection),
then the test split evaluated with ``tta="none"``, ``"flip"`` and ``"flip+scales"``.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tiling.py             # both parts (~10 CPU minutes)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tiling.py --part memory --sizes 1024 2048

Writes ``benchmarks/results/tiling.json`` and ``benchmarks/results/tiling.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------- memory
def _memory_child(padding: str, method: str, size: int) -> dict[str, Any]:
    import torch
    from torch import nn

    from lightning_convnets.backbones import create_backbone
    from lightning_convnets.predict.tiling import TiledPredictor, mirror_pad, network_geometry

    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet = create_backbone("unet", width=8, depth=3, padding=padding).eval()
    head = nn.Conv2d(8, 2, 1)

    def net(x: torch.Tensor) -> torch.Tensor:
        return head(unet(x)[0])

    tiler = TiledPredictor(net, tile_size=256, overlap=64, batch_size=4, geometry=network_geometry(unet))
    image = torch.rand(3, size, size)
    # Warm-up on a small input, so that library initialisation is not counted as prediction memory.
    with torch.no_grad():
        net(torch.rand(1, 3, tiler.tile_in, tiler.tile_in))
    before = _rss_mib()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with torch.no_grad():
        if method == "tiled":
            mask = tiler.predict(image, reduce=lambda logits: logits.argmax(0).to(torch.uint8))
            tiles = tiler.num_tiles(size, size)
        elif method == "one tile batch":
            net(torch.rand(4, 3, tiler.tile_in, tiler.tile_in))
            mask, tiles = None, 4
        else:
            x = image[None]
            if padding == "valid":
                x = mirror_pad(x, *tiler.whole_image_padding(size, size))
            mask = net(x)[0, :, :size, :size].argmax(0).to(torch.uint8)
            tiles = 1
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    after = _rss_mib()
    return {
        "padding": padding,
        "method": method,
        "size": size,
        "tiles": tiles,
        "cpu_s": round(cpu, 2),
        "wall_s": round(wall, 2),
        "rss_before_mib": round(before, 1),
        "peak_rss_mib": round(after, 1),
        "prediction_mib": round(after - before, 1),
        "output_shape": None if mask is None else list(mask.shape),
    }


def _run_child(args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode != 0:
        return {
            "args": args,
            "error": out.stderr.strip().splitlines()[-1:] or ["killed"],
            "rc": out.returncode,
        }
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_part(sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for padding in ("same", "valid"):
        rows.append(_run_child([padding, "one tile batch", "256"]))
        print(rows[-1], flush=True)
        for size in sizes:
            for method in ("tiled", "whole"):
                rows.append(_run_child([padding, method, str(size)]))
                print(rows[-1], flush=True)
    return rows


# -------------------------------------------------------------------------------------------- TTA
def tta_part(max_steps: int) -> list[dict[str, Any]]:
    import lightning.pytorch as pl
    import torch
    from lightning_convnets.datamodules import ShapesDataModule

    from lightning_convnets.tasks import ImageClassifier, ObjectDetector, SemanticSegmenter

    torch.set_num_threads(1)
    setups = {
        "classification": (
            lambda: ImageClassifier("resnet18", backbone_kwargs={"stem": "cifar", "width": 8}),
            dict(task="classification", num_train=2000, num_val=100, num_test=500, batch_size=64),
            ("test/acc",),
        ),
        "segmentation": (
            lambda: SemanticSegmenter(
                "unet", backbone_kwargs={"width": 8, "depth": 3, "norm": "batch", "upsample": "bilinear"}
            ),
            dict(task="segmentation", num_train=600, num_val=50, num_test=200, batch_size=16),
            ("test/miou", "test/pixel_acc"),
        ),
        "detection": (
            lambda: ObjectDetector(
                "resnet18",
                backbone_kwargs={"width": 16},
                neck_channels=32,
                head_channels=32,
                score_threshold=0.01,
            ),
            dict(task="detection", num_train=600, num_val=50, num_test=200, batch_size=32),
            ("test/map", "test/map_50"),
        ),
    }
    rows = []
    for task, (build, data, keys) in setups.items():
        pl.seed_everything(0)
        dm = ShapesDataModule(**data)
        dm.prepare_data()
        model = build()
        trainer = pl.Trainer(
            max_steps=max_steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
        cpu0 = time.process_time()
        trainer.fit(model, datamodule=dm)
        train_cpu = time.process_time() - cpu0
        for tta in ("none", "flip", "flip+scales"):
            model.hparams.tta = tta
            cpu0 = time.process_time()
            (metrics,) = trainer.test(model, datamodule=dm, verbose=False)
            row = {
                "task": task,
                "tta": tta,
                "train_steps": max_steps,
                "train_cpu_s": round(train_cpu, 1),
                "test_cpu_s": round(time.process_time() - cpu0, 1),
            }
            row.update({k: round(float(metrics[k]), 4) for k in keys})
            rows.append(row)
            print(row, flush=True)
    return rows


# ------------------------------------------------------------------------------------------ report
def write_report(memory: list[dict[str, Any]], tta: list[dict[str, Any]], loadavg: tuple[str, str]) -> None:
    lines = [
        "# Tiled prediction and test-time augmentation",
        "",
        "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tiling.py` (CPU, one thread, shared machine;",
        f"load average before / after: {loadavg[0]} / {loadavg[1]}).",
        "",
    ]
    if memory:
        lines += [
            "## Whole image vs tiles (U-Net width 8, depth 3, 2 classes; 256-px tiles, batch 4)",
            "",
            "`prediction MiB`: peak RSS after the prediction minus peak RSS before it (model and image",
            "loaded), fresh process per row. `one tile batch`: the same for one forward of 4 tiles.",
            "Same padding: blended tiles (overlap 64, Gaussian); valid padding: overlap-tile (mirror).",
            "",
            "| padding | method | image | tiles | CPU s | prediction MiB | x one tile batch |",
            "|---|---|---|---|---|---|---|",
        ]
        unit = {r["padding"]: r.get("prediction_mib") for r in memory if r.get("method") == "one tile batch"}
        for r in memory:
            if "error" in r:
                lines.append(f"| {' '.join(r['args'])} | failed: {r['error']} (rc {r['rc']}) | | | | | |")
                continue
            ratio = r["prediction_mib"] / unit[r["padding"]] if unit.get(r["padding"]) else float("nan")
            lines.append(
                f"| {r['padding']} | {r['method']} | {r['size']}x{r['size']} | {r['tiles']} | {r['cpu_s']} | "
                f"{r['prediction_mib']} | {ratio:.2f} |"
            )
        lines.append("")
    if tta:
        lines += [
            "## Test-time augmentation on the generated shapes",
            "",
            "Short trainings (max_steps per row), then the test split with each `tta` setting.",
            "",
            "| task | tta | train steps | metric(s) | test CPU s |",
            "|---|---|---|---|---|",
        ]
        for r in tta:
            metrics = ", ".join(f"{k} {v}" for k, v in r.items() if k.startswith("test/"))
            lines.append(f"| {r['task']} | {r['tta']} | {r['train_steps']} | {metrics} | {r['test_cpu_s']} |")
        lines.append("")
    (RESULTS / "tiling.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["memory", "tta", "both"], default="both")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        padding, method, size = args.child
        print(json.dumps(_memory_child(padding, method, int(size))))
        return
    load_before = Path("/proc/loadavg").read_text().strip()
    previous = json.loads((RESULTS / "tiling.json").read_text()) if (RESULTS / "tiling.json").exists() else {}
    memory = memory_part(args.sizes) if args.part in ("memory", "both") else previous.get("memory", [])
    tta = tta_part(args.max_steps) if args.part in ("tta", "both") else previous.get("tta", [])
    load_after = Path("/proc/loadavg").read_text().strip()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tiling.json").write_text(json.dumps({"memory": memory, "tta": tta}, indent=1))
    write_report(memory, tta, (load_before, load_after))
    print((RESULTS / "tiling.md").read_text())


if __name__ == "__main__":
    main()
