"""Images larger than memory on one GPU: streamed tiled-TIFF prediction with pinned memory, non-blocking
copies, bf16 autocast and channels_last (issue 28), for ``benchmarks/gpu_check.sh``.

Per U-Net padding (valid: overlap-tile; same: blended tiles) and precision (fp32, bf16), one
``predict_large`` of a synthetic ``--size`` square RGB tiled TIFF (256-px tiles, deflate; generated once
into ``--cache``) into a tiled TIFF mask: input Mpix/s, peak GPU memory, peak process RSS, and the
reader alone (every tile window read and normalised, no network) so that one sees who sets the pace.
The first row of each configuration is a warm-up on a small image (cuDNN autotuning, CUDA context).

    .venv/bin/python benchmarks/gpu_large_images.py                  # 16384 px, writes results/gpu_large_images.*
    .venv/bin/python benchmarks/gpu_large_images.py --size 32768 --tile 512 --batch 8
    .venv/bin/python benchmarks/gpu_large_images.py --cpu-check      # a tiny CPU run: checks this script only

Exits 2 with a message when no CUDA device is visible (unless ``--cpu-check``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16384, help="image side in pixels (default 16384)")
    parser.add_argument("--tile", type=int, default=512, help="tile_size (default 512)")
    parser.add_argument("--batch", type=int, default=8, help="tiles per forward (default 8)")
    parser.add_argument("--width", type=int, default=32, help="U-Net width (default 32)")
    parser.add_argument("--depth", type=int, default=4, help="U-Net depth (default 4)")
    parser.add_argument(
        "--cache", type=Path, default=Path.home() / ".cache" / "lightning-convnets" / "bench-tiling"
    )
    parser.add_argument("--cpu-check", action="store_true", help="tiny run on the CPU (checks the script)")
    args = parser.parse_args()

    import torch

    if args.cpu_check:
        args.size, args.tile, args.batch, args.width, args.depth = 512, 128, 2, 4, 2
        args.cache = Path(tempfile.mkdtemp(prefix="gpu_large_images-"))
    elif not torch.cuda.is_available():
        print(
            "gpu_large_images: FAILED: no CUDA device visible (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}). --cpu-check runs this script on the CPU.",
            file=sys.stderr,
        )
        return 2
    from tiling import synthetic_tiff
    from torch import nn

    from lightning_convnets.backbones import create_backbone
    from lightning_convnets.predict.large import LargeImagePredictor
    from lightning_convnets.predict.readers import open_image
    from lightning_convnets.predict.tiling import network_geometry

    device = torch.device("cpu" if args.cpu_check else "cuda")
    on_gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(0) if on_gpu else "CPU (script check)"
    source = synthetic_tiff(args.size, args.cache)
    warm = synthetic_tiff(1024 if not args.cpu_check else 256, args.cache)
    print(
        f"gpu_large_images: {name}, torch {torch.__version__}, {args.size}^2 px, tile {args.tile}, batch {args.batch}"
    )
    rows = []
    for padding in ("valid", "same"):
        torch.manual_seed(0)
        unet = create_backbone("unet", width=args.width, depth=args.depth, padding=padding, norm="batch")
        head = nn.Conv2d(args.width, 2, 1)
        model = nn.Sequential()  # holds both so that .to / .eval / channels_last reach them
        model.unet, model.head = unet, head
        model = model.to(device).eval()
        geometry = network_geometry(unet)

        def net(x: torch.Tensor, unet: nn.Module = unet, head: nn.Module = head) -> torch.Tensor:
            return head(unet(x)[0])

        for precision in ("fp32", "bf16"):
            if precision == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
                continue
            model.to(memory_format=torch.channels_last)
            predictor = LargeImagePredictor(
                net, args.tile, None, args.batch, geometry=geometry, device=device, mean=[0.5] * 3,
                std=[0.25] * 3, channels_last=True, progress=False,
                autocast=torch.bfloat16 if precision == "bf16" else None,
            )  # fmt: skip
            with tempfile.TemporaryDirectory() as tmp:
                predictor.predict(warm, Path(tmp) / "warm.tif")
                if on_gpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                result = predictor.predict(source, Path(tmp) / "mask.tif")
                if on_gpu:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
            row = {
                "padding": padding,
                "precision": precision,
                "tiles": result.tiles,
                "seconds": round(seconds, 2),
                "mpix_per_s": round(args.size**2 / 1e6 / seconds, 2),
                "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if on_gpu else None,
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
            rows.append(row)
            print(f"gpu_large_images: {row}", flush=True)
        # the reader alone: every window of the plan read and normalised, no network
        reader = open_image(source)
        height, width = reader.shape[:2]
        th_in, _, ys = predictor.tiler.plan(height)
        tw_in, _, xs = predictor.tiler.plan(width)
        b = predictor.tiler.geometry.border
        start = time.perf_counter()
        for y in ys:
            for x in xs:
                predictor._window(reader, y - b, th_in, x - b, tw_in)
        seconds = time.perf_counter() - start
        reader.close()
        rows.append({"padding": padding, "precision": "reader only", "tiles": len(ys) * len(xs),
                     "seconds": round(seconds, 2), "mpix_per_s": round(args.size**2 / 1e6 / seconds, 2)})  # fmt: skip
        print(f"gpu_large_images: {rows[-1]}", flush=True)
    table = [
        "| padding | precision | tiles | s | Mpix/s | peak GPU MiB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['padding']} | {r['precision']} | {r['tiles']} | {r['seconds']} | {r['mpix_per_s']} | "
            f"{r.get('peak_gpu_mib', '')} | {r.get('peak_rss_mib', '')} |"
        )
    print("\n".join(table))
    if on_gpu:
        meta = {"device": name, "torch": torch.__version__, "size": args.size, "tile": args.tile,
                "batch": args.batch, "width": args.width, "depth": args.depth}  # fmt: skip
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "gpu_large_images.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (RESULTS / "gpu_large_images.md").write_text(
            "# Images larger than memory on one GPU\n\n"
            "Command: `.venv/bin/python benchmarks/gpu_large_images.py` (pinned memory, non-blocking copies, "
            "channels_last; bf16 = autocast).\n\n" + json.dumps(meta) + "\n\n" + "\n".join(table) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
