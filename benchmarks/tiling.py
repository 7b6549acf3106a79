"""Tiled vs whole-image prediction (time, peak memory) and what test-time augmentation changes on shapes.

Part ``memory``: a U-Net (width 8, depth 3, 2 classes) predicts a random ``S x S`` RGB image, ``S`` in
1024, 2048, 4096, either in one forward ("whole") or with :class:`~lightning_convnets.predict.tiling.TiledPredictor`
(256-px tiles, batch 4, the mask reduced strip by strip). Both paddings: same padding (blended tiles,
overlap 64, Gaussian window) and valid padding (overlap-tile, mirror padding). Each run is a fresh
subprocess; peak RSS (``resource.getrusage``, ``ru_maxrss``) is read before the prediction (model and image
loaded) and after it: the difference is what prediction allocated. "one tile batch" is the same
difference for a single forward of one batch of 4 tiles. Times are process CPU seconds (one thread).

Part ``large``: images larger than memory (issue 28). Square synthetic RGB tiled TIFFs (256-px tiles,
deflate) of each ``--large-sizes`` side, generated once (tile by tile, never whole) into ``--cache``
(outside the repository; default ``~/.cache/lightning-convnets/bench-tiling``), then, one fresh process
per row and one thread: :func:`~lightning_convnets.predict.large.predict_large` streaming the TIFF into a
tiled TIFF mask ("streamed"), and at the sizes in ``--in-memory-sizes`` the in-memory tiled path (the
whole TIFF read with ``tifffile.imread``, normalised, ``TiledPredictor.predict`` with the mask reduction:
"in memory"). Peak RSS is the whole process's (``ru_maxrss``, imports and model included); Mpix/s is input
pixels over the prediction's wall time. The report ends with a 100,000 x 100,000 estimate from the
largest streamed row.

Part ``tta``: short CPU trainings on the generated shapes (classification, segmentation, detection),
then the test split evaluated with ``tta="none"``, ``"flip"`` and ``"flip+scales"``.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tiling.py             # both parts (~10 CPU minutes)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tiling.py --part memory --sizes 1024 2048
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tiling.py --part large      # 1k..32k (a quiet machine)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tiling.py --part large --large-sizes 1024 --in-memory-sizes 1024

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
from collections.abc import Sequence
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


# ----------------------------------------------------------------------------------- large images
DEFAULT_CACHE = Path.home() / ".cache" / "lightning-convnets" / "bench-tiling"
LARGE_TILE, LARGE_BATCH = 256, 4


def synthetic_tiff(size: int, cache: Path) -> Path:
    """A ``size x size`` RGB tiled TIFF (256-px tiles, deflate), written tile by tile once into ``cache``."""
    import numpy as np
    import tifffile

    path = cache / f"synthetic_{size}.tif"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    t = LARGE_TILE
    columns = -(-size // t)
    y, x = np.mgrid[0:t, 0:t]

    def tiles():  # smooth blobs plus a little noise: compresses like a real scan, not like pure noise
        for k in range(columns * columns):
            rng = np.random.default_rng(k)
            base = rng.integers(40, 200, 3)
            wave = 30 * np.sin((x + k) / 23.0)[..., None] * np.cos(y / 17.0)[..., None]
            noise = rng.integers(0, 12, (t, t, 3))
            yield np.clip(base + wave + noise, 0, 255).astype(np.uint8)

    tmp = path.with_suffix(".partial")
    with tifffile.TiffWriter(tmp, bigtiff=size * size * 3 > 2**31) as tif:
        tif.write(
            tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(t, t), compression="zlib", photometric="rgb"
        )
    tmp.replace(path)
    return path


def _large_child(padding: str, method: str, size: int, cache: str) -> dict[str, Any]:
    import numpy as np
    import torch
    from torch import nn

    from lightning_convnets.backbones import create_backbone
    from lightning_convnets.predict.large import predict_large
    from lightning_convnets.predict.tiling import TiledPredictor, network_geometry

    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet = create_backbone("unet", width=8, depth=3, padding=padding).eval()
    head = nn.Conv2d(8, 2, 1)
    geometry = network_geometry(unet)

    def net(x: torch.Tensor) -> torch.Tensor:
        return head(unet(x)[0])

    source = synthetic_tiff(size, Path(cache))
    out = Path(cache) / f"mask_{padding}_{size}.tif"
    mean, std = [0.5] * 3, [0.25] * 3
    with torch.no_grad():  # warm-up: library initialisation is not prediction time
        side = 156 if padding == "valid" else 128  # sizes each U-Net takes (valid: 8 t + 28)
        net(torch.rand(1, 3, side, side))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if method == "streamed":
        result = predict_large(
            net,
            source,
            out,
            tile_size=LARGE_TILE,
            overlap=64,
            batch_size=LARGE_BATCH,
            mean=mean,
            std=std,
            geometry=geometry,
            progress=False,
        )
        tiles = result.tiles
        out.unlink()
    else:
        import tifffile

        image = torch.from_numpy(tifffile.imread(source)).permute(2, 0, 1).float().div_(255)
        image.sub_(0.5).div_(0.25)
        tiler = TiledPredictor(
            net, tile_size=LARGE_TILE, overlap=64, batch_size=LARGE_BATCH, geometry=geometry
        )
        with torch.no_grad():
            mask = tiler.predict(image, reduce=lambda logits: logits.argmax(0).to(torch.uint8))
        tifffile.imwrite(out, np.asarray(mask), tile=(256, 256), compression="zlib")
        tiles = tiler.num_tiles(size, size)
        out.unlink()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "padding": padding,
        "method": method,
        "size": size,
        "tiles": tiles,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "mpix_per_s": round(size * size / 1e6 / wall, 3),
        "peak_rss_mib": round(_rss_mib(), 1),
    }


def large_part(
    sizes: list[int], in_memory_sizes: list[int], cache: Path, paddings: Sequence[str] = ("valid", "same")
) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:  # generated once, in this (parent) process: not counted in any row
        synthetic_tiff(size, cache)
    for padding in paddings:
        for size in sizes:
            methods = ["streamed"] + (["in memory"] if size in in_memory_sizes else [])
            for method in methods:
                load = os.getloadavg()[0]
                rows.append(_run_child(["large", padding, method, str(size), str(cache)]))
                rows[-1]["load"] = [round(load, 2), round(os.getloadavg()[0], 2)]
                print(rows[-1], flush=True)
    return rows


def _paper_estimate(rows: list[dict[str, Any]]) -> list[str]:
    """A 100,000 x 100,000 RGB image from the largest streamed rows (memory, time on this CPU)."""
    lines = []
    for padding in ("valid", "same"):
        done = [
            r
            for r in rows
            if r.get("method") == "streamed" and r.get("padding") == padding and "error" not in r
        ]
        if not done:
            continue
        big = max(done, key=lambda r: r["size"])
        mpix = 100_000 * 100_000 / 1e6
        hours = mpix / big["mpix_per_s"] / 3600
        # what grows with the width: the writer's bands (~3 x 256 rows of uint8) and, same padding, the blend
        # band (the 64 overlap rows: 2 classes of float32 logits + the weight sums)
        per_px = 256 * 3 + (64 * (2 * 4 + 4) if padding == "same" else 0)
        grown = (100_000 - big["size"]) * per_px / 2**20
        lines.append(
            f"* {padding} padding: {big['peak_rss_mib']:.0f} MiB at {big['size']} px + ~{grown:.0f} MiB of "
            f"width-proportional buffers -> ~{big['peak_rss_mib'] + grown:.0f} MiB peak; at {big['mpix_per_s']} "
            f"Mpix/s (one CPU thread) 10,000 Mpix take ~{hours:.1f} h. On one H100 the network's share shrinks "
            "by 2-3 orders of magnitude (an estimate, not measured here): the read (deflate decode) and write "
            "(deflate encode) threads then set the pace; benchmarks/gpu_large_images.py measures the GPU's "
            "tile throughput and the reader's Mpix/s."
        )
    return lines


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
def write_report(
    memory: list[dict[str, Any]],
    tta: list[dict[str, Any]],
    loadavg: tuple[str, str],
    large: list[dict[str, Any]] | None = None,
    command: str = "",
) -> None:
    lines = [
        "# Tiled prediction and test-time augmentation",
        "",
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tiling.py{command}` (CPU, one thread;",
        f"load average before / after: {loadavg[0]} / {loadavg[1]}). Parts and rows not run by this command",
        "are kept from the run before (rows without a load column: a quiet machine, load 0.8 -> 1.0).",
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
    if large:
        lines += [
            "## Images larger than memory: streamed from a tiled TIFF into a tiled TIFF mask",
            "",
            f"U-Net width 8, depth 3, 2 classes; {LARGE_TILE}-px tiles, batch {LARGE_BATCH}, one thread; synthetic",
            "RGB tiled TIFFs (256-px tiles, deflate). `peak RSS`: the whole process (imports, model, reader,",
            "writer). `in memory`: the whole TIFF read, the in-memory tiled path, the mask written at the end.",
            "`load`: the 1-minute load average before / after the row (Mpix/s is trustworthy below ~1.5).",
            "",
            "| padding | method | image | tiles | wall s | Mpix/s | peak RSS MiB | load |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in large:
            if "error" in r:
                lines.append(f"| {' '.join(r['args'])} | failed: {r['error']} (rc {r['rc']}) | | | | | | |")
                continue
            lines.append(
                f"| {r['padding']} | {r['method']} | {r['size']}x{r['size']} | {r['tiles']} | {r['wall_s']} | "
                f"{r['mpix_per_s']} | {r['peak_rss_mib']} | {' / '.join(map(str, r.get('load', ['-'])))} |"
            )
        lines += ["", "100,000 x 100,000 RGB (30 GB raw), estimated from the largest streamed rows:", ""]
        lines += _paper_estimate(large)
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
    parser.add_argument("--part", choices=["memory", "tta", "large", "both"], default="both")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--large-sizes", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--in-memory-sizes", type=int, nargs="+", default=[4096])
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="where the synthetic TIFFs are kept"
    )
    parser.add_argument(
        "--paddings",
        nargs="+",
        choices=["valid", "same"],
        default=["valid", "same"],
        help="part large: these paddings only (the other's rows are kept from the last run)",
    )
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "large":
            padding, method, size, cache = args.child[1:]
            print(json.dumps(_large_child(padding, method, int(size), cache)))
            return
        padding, method, size = args.child
        print(json.dumps(_memory_child(padding, method, int(size))))
        return
    load_before = Path("/proc/loadavg").read_text().strip()
    previous = json.loads((RESULTS / "tiling.json").read_text()) if (RESULTS / "tiling.json").exists() else {}
    memory = memory_part(args.sizes) if args.part in ("memory", "both") else previous.get("memory", [])
    tta = tta_part(args.max_steps) if args.part in ("tta", "both") else previous.get("tta", [])
    if args.part == "large":
        large = large_part(args.large_sizes, args.in_memory_sizes, args.cache.expanduser(), args.paddings)
        large = [r for r in previous.get("large", []) if r.get("padding") not in args.paddings] + large
    else:
        large = previous.get("large", [])
    load_after = Path("/proc/loadavg").read_text().strip()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tiling.json").write_text(json.dumps({"memory": memory, "tta": tta, "large": large}, indent=1))
    command = "".join(" " + a for a in sys.argv[1:])
    write_report(memory, tta, (load_before, load_after), large, command)
    print((RESULTS / "tiling.md").read_text())


if __name__ == "__main__":
    main()
