"""Side-by-side segmentation on the generated shapes: our same-padding U-Net, our valid-padding U-Net and
``smp:Unet/resnet18`` (no pretrained weights), same data, same epochs, same optimiser and schedule.

Each model is trained by the ``lightning-convnets`` CLI in this process (``fit`` on its config, then ``test``
on the best checkpoint), with the data generated before the clock starts. Reported per model: test mIoU,
IoU per class, training wall time and process CPU time (all threads; a shared machine inflates wall time
much more than CPU time), and the load average before and after.

    python benchmarks/bench_segmentation.py                       # all three, the configs' own epochs
    python benchmarks/bench_segmentation.py --models same valid --epochs 4
    python benchmarks/bench_segmentation.py --out benchmarks/results/segmentation_shapes
    python benchmarks/bench_segmentation.py --merge a.json b.json c.json   # one table from separate runs

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/segmentation_shapes``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "segmentation"

# name -> (config, extra CLI arguments, description)
MODELS: dict[str, tuple[Path, list[str], str]] = {
    "same": (CONFIGS / "shapes_unet.yaml", [], "our U-Net, same padding (shapes_unet.yaml)"),
    "valid": (
        CONFIGS / "shapes_unet_valid.yaml",
        [],
        "our U-Net, valid padding, mirrored context (shapes_unet_valid.yaml)",
    ),
    "smp": (
        CONFIGS / "shapes_unet.yaml",
        ["--model.init_args.backbone", "smp:Unet/resnet18", "--model.init_args.backbone_kwargs", "{}"],
        "smp:Unet/resnet18, random init (shapes_unet.yaml with backbone swapped)",
    ),
}


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"


def run_one(name: str, epochs: int | None, workdir: Path, extra: list[str]) -> dict[str, Any]:
    """Fit and test one model; return its metrics and timings."""
    from lightning_convnets.cli import ConvNetsCLI

    config, model_args, description = MODELS[name]
    common = [
        "--config",
        str(config),
        *model_args,
        "--trainer.logger.init_args.save_dir",
        str(workdir / "logs"),
        "--trainer.logger.init_args.name",
        f"bench_{name}",
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]
    if epochs is not None:
        common += ["--trainer.max_epochs", str(epochs)]
    # Generate the data (and read the config) before the clock starts.
    probe = ConvNetsCLI(args=common, run=False)
    probe.datamodule.prepare_data()
    params = sum(p.numel() for p in probe.model.parameters())
    load_before = _loadavg()
    wall, cpu = time.perf_counter(), time.process_time()
    fit = ConvNetsCLI(args=["fit", *common])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    load_after = _loadavg()
    best = fit.trainer.checkpoint_callback.best_model_path
    test = ConvNetsCLI(args=["test", *common, "--ckpt_path", best])
    metrics = {k: float(v) for k, v in test.trainer.callback_metrics.items() if k.startswith("test/")}
    return {
        "model": name,
        "description": description,
        "parameters": params,
        "epochs": int(fit.trainer.current_epoch),
        "fit_wall_s": round(wall, 1),
        "fit_cpu_s": round(cpu, 1),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "miou": metrics.get("test/miou"),
        "iou": {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith("test/iou/")},
        "pixel_acc": metrics.get("test/pixel_acc"),
        "best_checkpoint": Path(best).name,
    }


def to_markdown(rows: list[dict[str, Any]], threads: int, command: str = "") -> str:
    """A table: model, mIoU, IoU per class, parameters, fit wall/CPU time, load average."""
    classes = list(rows[0]["iou"]) if rows else []
    head = ["model", "test mIoU", *(f"IoU {c}" for c in classes), "params", "fit wall s", "fit CPU s", "load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["description"],
            f"{r['miou']:.3f}",
            *(f"{r['iou'][c]:.3f}" for c in classes),
            f"{r['parameters'] / 1e6:.2f} M",
            f"{r['fit_wall_s']:.0f}",
            f"{r['fit_cpu_s']:.0f}",
            f"{r['loadavg_before'].split()[0]} -> {r['loadavg_after'].split()[0]}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    epochs = sorted({r["epochs"] for r in rows})
    lines += [
        "",
        f"Epochs: {', '.join(map(str, epochs))}; torch threads: {threads}; same data (1000/200/200 generated "
        "64 px shapes images), same optimiser (AdamW, warmup-cosine), test on the best checkpoint (val mIoU).",
        f"Command: `{command or 'python benchmarks/bench_segmentation.py'}` (the models one after another in one "
        "process; `--merge` renders one table from runs made separately).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--epochs", type=int, default=None, help="override every config's max_epochs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "segmentation_shapes"))
    parser.add_argument("--merge", nargs="+", default=None, help="only render the table of these json files")
    parser.add_argument("extra", nargs="*", help="extra CLI arguments for every model (after --)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    command = " ".join(["python benchmarks/bench_segmentation.py", *(argv if argv is not None else sys.argv[1:])])
    if args.merge:
        rows = [row for path in args.merge for row in json.loads(Path(path).read_text())]
        out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
        out.with_suffix(".md").write_text(to_markdown(rows, args.threads, command))
        print(to_markdown(rows, args.threads, command))
        return rows

    import torch

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_seg_") as tmp:
        for name in args.models:
            row = run_one(name, args.epochs, Path(tmp), args.extra)
            print(json.dumps(row), flush=True)
            rows.append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(rows, args.threads, command))
    print(to_markdown(rows, args.threads, command))
    return rows


if __name__ == "__main__":
    main()
