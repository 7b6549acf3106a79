"""Inference throughput per task: eager vs BatchNorm fused vs channels_last vs torch.compile vs ONNX Runtime.

For each task configuration of ``common.task_configs`` (eval mode, fp32, the task's own batch), the
network that ``lightning_convnets.predict.export`` exports (classifier logits, segmenter logits at input size,
CenterNet boxes/scores/labels) runs as:

* ``eager``: the unfused eval network;
* ``fused``: BatchNorm folded into the convolutions (``fuse_for_inference``);
* ``fused+channels_last``: the fused network and its input in the channels-last memory format;
* ``compiled``: ``torch.compile`` (inductor) of the fused network (compilation excluded: warm-up calls);
* ``onnxruntime``: the exported ONNX file (only when onnxruntime is installed).

Every variant's outputs are checked against eager within 1e-4 (CenterNet: the same detections above
score 0). Variants run interleaved (one batch of each in turn, ``--rounds`` times); reported: median
process-CPU and wall time per batch, images/s and the speed-up over eager.

Usage::

    .venv/bin/python benchmarks/bench_inference.py            # full
    .venv/bin/python benchmarks/bench_inference.py --quick    # smoke test (no compile)

Writes ``benchmarks/results/inference.json`` and ``inference.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch

from lightning_convnets.predict.export import (
    export_model,
    fuse_for_inference,
    inference_module,
    onnx_runner,
    same_detections,
)


def _close(a: Any, b: Any, detector: bool) -> bool:
    if detector:
        return same_detections(tuple(a), tuple(b), 0.0, 1e-4)
    a = a[0] if isinstance(a, tuple | list) else a
    b = b[0] if isinstance(b, tuple | list) else b
    return bool(torch.allclose(torch.as_tensor(a), b, rtol=0, atol=1e-4 * max(1.0, float(b.abs().max()))))


def variants(config: common.TaskConfig, images: torch.Tensor, root: str, compile: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    task = config.build().eval()
    eager = inference_module(task)
    fused, _count = fuse_for_inference(eager, images)
    cl = images.contiguous(memory_format=torch.channels_last)
    fused_cl = fused.to(memory_format=torch.channels_last)
    out: dict[str, Any] = {
        "eager": lambda: eager(images),
        "fused": lambda: fused(images),
        "fused+channels_last": lambda: fused_cl(cl),
    }
    if compile:
        compiled = torch.compile(fused)
        out["compiled"] = lambda: compiled(images)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = export_model(task, "onnx", images, Path(root) / f"{config.name}.onnx")
        run = onnx_runner(path)
        out["onnxruntime"] = lambda: run(images)
    except ImportError as err:
        print(f"{config.name}: onnxruntime row skipped ({err})")
    return out


def bench(config: common.TaskConfig, rounds: int, root: str, compile: bool) -> dict[str, Any]:
    images = torch.randn(
        config.batch, 3, config.size, config.size, generator=torch.Generator().manual_seed(0)
    )
    runs = variants(config, images, root, compile)
    detector = config.name == "detector"
    with torch.inference_mode():
        reference = runs["eager"]()
        equal = {}
        for name, run in runs.items():
            run()  # warm-up (compilation, ORT's first-run allocations)
            equal[name] = _close(run(), reference, detector)
        times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                start = common.clock()
                run()
                end = common.clock()
                times[name]["wall"].append(end[0] - start[0])
                times[name]["cpu"].append(end[1] - start[1])
    rows = {}
    base = common.median(times["eager"]["cpu"])
    for name in runs:
        cpu, wall = common.median(times[name]["cpu"]), common.median(times[name]["wall"])
        rows[name] = {
            "cpu_s": cpu,
            "wall_s": wall,
            "images_per_s_cpu": config.batch / cpu,
            "speedup_cpu": base / cpu,
            "equal_1e-4": equal[name],
        }
    return {"batch": config.batch, "size": config.size, "rounds": rounds, "variants": rows}


def to_markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Inference: eager vs fused BN vs channels_last vs compiled vs ONNX Runtime (CPU, fp32)",
        "",
        f"Command: `{results['setup']['command']}`. Interleaved, median per batch.",
        "",
        "| task | batch | variant | CPU ms/batch | wall ms/batch | images/s (CPU) | speed-up (CPU) | equal to eager (1e-4) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, row in results["tasks"].items():
        for name, v in row["variants"].items():
            lines.append(
                f"| {task} | {row['batch']}x{row['size']}² | {name} | {v['cpu_s'] * 1e3:.1f} | "
                f"{v['wall_s'] * 1e3:.1f} | {v['images_per_s_cpu']:.0f} | {v['speedup_cpu']:.2f} | "
                f"{'yes' if v['equal_1e-4'] else 'NO'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 3 rounds, no compile")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--no_compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--tasks", nargs="+", default=["classifier", "segmenter", "detector"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.no_compile = 3, True
    torch.set_num_threads(args.threads)
    configs = common.task_configs(args.quick)
    setup = common.machine()
    setup["command"] = "python benchmarks/bench_inference.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    results: dict[str, Any] = {"setup": setup, "tasks": {}}
    with tempfile.TemporaryDirectory() as root:
        for name in args.tasks:
            results["tasks"][name] = bench(configs[name], args.rounds, root, not args.no_compile)
    common.write_results(
        args.out, "inference_quick" if args.quick else "inference", results, to_markdown(results)
    )
    return results


if __name__ == "__main__":
    main()
