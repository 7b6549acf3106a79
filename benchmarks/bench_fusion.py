"""Eval throughput of conv-BN fusion: :func:`lightning_convnets.nn.fusion.fuse_conv_bn` vs the unfused model.

fp32, channels_last, ``torch.inference_mode``. Models: our ResNet-18 v1 (every BN folds), our
pre-activation ResNet-18 (partial: the BN before each block's ReLU stays) and torchvision's ResNet-18, all
with the ImageNet stem, random weights and non-trivial BN statistics. The fused and unfused models run
interleaved, batch by batch (alternating which goes first), so load from other processes sharing the CPU
hits both alike; we report the median wall time per batch of each, images/s from the medians, and the
throughput ratio unfused time / fused time (> 1: fused is faster), and the same ratio from the process
CPU time per batch (less sensitive to other processes on a shared CPU). The max absolute and relative
output differences are recorded as a check.

Usage::

    .venv/bin/python benchmarks/bench_fusion.py                       # CPU, a minute or two
    .venv/bin/python benchmarks/bench_fusion.py --device cuda --batch 128 --size 224

Writes ``benchmarks/results/fusion.json`` and ``benchmarks/results/fusion.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("resnet18", "preact_resnet18", "torchvision_resnet18")


def build(name: str) -> nn.Module:
    """An eval-mode model with BN statistics and affine parameters away from their init values."""
    if name == "torchvision_resnet18":
        import torchvision

        model = torchvision.models.resnet18(num_classes=1000)
    elif name in ("resnet18", "preact_resnet18"):
        from lightning_convnets.backbones import create_backbone

        model = create_backbone(name)
    else:
        raise ValueError(f"bench_fusion: unknown model {name!r}; choose from {MODELS}")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                module.weight.copy_(0.5 + torch.rand(c, generator=gen))
                module.bias.copy_(0.1 * torch.randn(c, generator=gen))
    return model.eval()


def _last(out: Any) -> torch.Tensor:
    return out[-1] if isinstance(out, (list, tuple)) else out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(
    name: str, batch: int, size: int, reps: int, warmup: int, device: torch.device
) -> dict[str, Any]:
    from lightning_convnets.nn.fusion import fuse_conv_bn

    model = build(name)
    fused = fuse_conv_bn(model)
    bn_before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    bn_after = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    model = model.to(device, memory_format=torch.channels_last)
    fused = fused.to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {"unfused": [], "fused": []}
    cpu: dict[str, list[float]] = {"unfused": [], "fused": []}
    with torch.inference_mode():
        reference = _last(model(x))
        diff = float((_last(fused(x)) - reference).abs().max())
        scale = float(reference.abs().max())
        for i in range(warmup + reps):
            # alternate which goes first, so neither always runs right after the other's cache warm-up
            order = (
                (("unfused", model), ("fused", fused))
                if i % 2 == 0
                else (("fused", fused), ("unfused", model))
            )
            for label, net in order:
                _sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                net(x)
                _sync(device)
                if i >= warmup:
                    times[label].append(time.perf_counter() - start)
                    cpu[label].append(time.process_time() - start_cpu)
    medians = {label: statistics.median(values) for label, values in times.items()}
    cpu_medians = {label: statistics.median(values) for label, values in cpu.items()}
    return {
        "bn_layers": bn_before,
        "bn_layers_after_fusion": bn_after,
        "max_abs_diff": diff,
        "max_rel_diff": diff / scale if scale > 0 else 0.0,
        "unfused_median_s": medians["unfused"],
        "fused_median_s": medians["fused"],
        "unfused_images_per_s": batch / medians["unfused"],
        "fused_images_per_s": batch / medians["fused"],
        "throughput_ratio": medians["unfused"] / medians["fused"],
        "unfused_cpu_median_s": cpu_medians["unfused"],
        "fused_cpu_median_s": cpu_medians["fused"],
        "cpu_time_ratio": cpu_medians["unfused"] / cpu_medians["fused"],
        "unfused_times_s": times["unfused"],
        "fused_times_s": times["fused"],
    }


def to_markdown(results: dict[str, Any]) -> str:
    setup = results["setup"]
    lines = [
        "# Conv-BN fusion: eval throughput",
        "",
        f"device {setup['device']} ({setup['machine']}, {setup['threads']} threads), fp32, channels_last, "
        f"batch {setup['batch']}, {setup['size']}x{setup['size']}, median of {setup['reps']} interleaved "
        f"batches after {setup['warmup']} warm-up; torch {setup['torch']}; load average "
        f"{setup['load_average_at_start'][0]:.1f} at start, {setup['load_average_at_end'][0]:.1f} at end.",
        "",
        "| model | BN layers (fused -> left) | unfused ms/batch | fused ms/batch | unfused img/s | "
        "fused img/s | fused / unfused throughput (wall) | same from process CPU time | max abs (rel) diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["models"].items():
        lines.append(
            f"| {name} | {row['bn_layers']} -> {row['bn_layers_after_fusion']} | "
            f"{1e3 * row['unfused_median_s']:.1f} | {1e3 * row['fused_median_s']:.1f} | "
            f"{row['unfused_images_per_s']:.1f} | {row['fused_images_per_s']:.1f} | "
            f"{row['throughput_ratio']:.3f}x | {row['cpu_time_ratio']:.3f}x | "
            f"{row['max_abs_diff']:.1e} ({row['max_rel_diff']:.1e}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=20, help="timed batches per model and variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_fusion: --device cuda asked for, but CUDA is not available here")
    results: dict[str, Any] = {
        "setup": {
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "batch": args.batch,
            "size": args.size,
            "reps": args.reps,
            "warmup": args.warmup,
            "torch": torch.__version__,
            "load_average_at_start": os.getloadavg(),
        },
        "models": {},
    }
    for name in args.models:
        row = bench_model(name, args.batch, args.size, args.reps, args.warmup, device)
        results["models"][name] = row
        print(
            f"{name:22s} unfused {1e3 * row['unfused_median_s']:7.1f} ms  "
            f"fused {1e3 * row['fused_median_s']:7.1f} ms  ratio {row['throughput_ratio']:.3f}x "
            f"(cpu {row['cpu_time_ratio']:.3f}x)  diff {row['max_rel_diff']:.1e} rel",
            flush=True,
        )
    results["setup"]["load_average_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fusion.json").write_text(json.dumps(results, indent=2))
    (args.out / "fusion.md").write_text(to_markdown(results))
    print(to_markdown(results))
    return results


if __name__ == "__main__":
    main()
