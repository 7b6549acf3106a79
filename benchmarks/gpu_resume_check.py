"""Exact resume on one GPU: the kill/resume cases of ``tests/test_fault_resume.py`` in deterministic mode.

Each case fits a tiny classifier three times, each fit in its own process (CUDA cannot be used in a forked
child): A uninterrupted; B SIGKILLed by itself after a training batch that is neither an epoch nor a
checkpoint boundary; C resumed from B's ``last.ckpt``. Then C must have trained on A's images batch for
batch and end with A's weights, optimizer and scheduler states bit for bit (``deterministic=True``,
``CUBLAS_WORKSPACE_CONFIG=:4096:8``); the monitors' histories too, except the gaps
``tests/test_fault_resume.py`` lists (``known_monitor_gaps``: printed as "known gap", not a failure).

    .venv/bin/python benchmarks/gpu_resume_check.py                    # every case on the GPU
    .venv/bin/python benchmarks/gpu_resume_check.py --cases compile --compile-backend inductor
    .venv/bin/python benchmarks/gpu_resume_check.py --cpu-self-check   # the same code on the CPU

Cases: ``workers`` (one process, 2 loader workers), ``accumulate`` (gradient accumulation 2, killed between
micro-batches), ``compile`` (``torch.compile``, backend ``aot_eager`` unless ``--compile-backend``). The
2-rank DDP cases need two GPUs (NCCL) and stay in the CPU suite (gloo). Exits 2 without a CUDA device
(unless ``--cpu-self-check``), 1 when a case fails, 0 otherwise. About 1-2 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# kill after this training batch -> (epoch, batches done, step) of B's last.ckpt (as in the tests)
CASES: dict[str, dict] = {
    "workers": {"options": {"workers": 2}, "kill_after": 20, "position": [1, 4, 18]},
    "accumulate": {"options": {"accumulate": 2}, "kill_after": 21, "position": [1, 4, 9]},
    "compile": {"options": {"compile": True}, "kill_after": 17, "position": [1, 1, 15]},
}


def _child(args: argparse.Namespace) -> None:
    """One fit (A, B or C) of one case, in this process."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_fault_resume as cases

    options = dict(json.loads(args.options))
    folder = Path(args.folder)
    kwargs = {"shapes": Path(args.shapes), "accelerator": args.accelerator, **options}
    if args._run == "killed":
        cases.fit(folder, "killed", kill_after=args.kill_after, **kwargs)
        raise SystemExit("run B was not killed")
    ckpt = str(folder / "ckpt" / "last.ckpt") if args._run == "resumed" else None
    cases.fit(folder, args._run, ckpt_path=ckpt, **kwargs)


def _spawn(run: str, folder: Path, shapes: Path, case: dict, accelerator: str, backend: str) -> int:
    options = dict(case["options"])
    if options.get("compile"):
        options["compile_backend"] = backend
    command = [
        sys.executable, __file__, "--_run", run, "--folder", str(folder), "--shapes", str(shapes),
        "--options", json.dumps(options), "--kill-after", str(case["kill_after"]), "--accelerator", accelerator,
    ]  # fmt: skip
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8", PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode not in (0, -signal.SIGKILL):
        print(done.stdout[-3000:], done.stderr[-6000:], sep="\n", file=sys.stderr)
    return done.returncode


def _case(name: str, accelerator: str, backend: str, work: Path) -> tuple[str, str]:
    import pytest

    sys.path.insert(0, str(ROOT / "tests"))
    import test_fault_resume as cases

    case = CASES[name]
    shapes, straight, killed = work / "shapes", work / name / "straight", work / name / "killed"
    if _spawn("straight", straight, shapes, case, accelerator, backend) != 0:
        return "FAIL", "run A failed"
    code = _spawn("killed", killed, shapes, case, accelerator, backend)
    if code != -signal.SIGKILL:
        return "FAIL", f"run B ended with {code}, not SIGKILL"
    position = list(cases.checkpoint_position(killed / "ckpt" / "last.ckpt"))
    if position != case["position"]:
        return "FAIL", f"B's last.ckpt was written at {position}, expected {case['position']}"
    if _spawn("resumed", killed, shapes, case, accelerator, backend) != 0:
        return "FAIL", "run C failed"
    try:
        cases.check_resumed(straight, killed, tuple(position), accumulate=case["options"].get("accumulate", 1))
    except pytest.xfail.Exception as known:
        return "ok (known gap)", str(known)
    except AssertionError as failure:
        return "FAIL", str(failure)[:2000]
    return "ok", "bit-identical"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {list(CASES)}")
    parser.add_argument("--compile-backend", default="aot_eager", help="torch.compile backend of the compile case")
    parser.add_argument("--cpu-self-check", action="store_true", help="run on the CPU (a check of this script)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' folder (printed)")
    for hidden in ("--_run", "--folder", "--shapes", "--options", "--accelerator"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--kill-after", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._run:
        _child(args)
        return 0
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; expected some of {list(CASES)}")
    import torch

    if args.cpu_self_check:
        accelerator = "cpu"
    elif not torch.cuda.is_available():
        print("gpu_resume_check: no CUDA device visible (use --cpu-self-check to run it on the CPU)", file=sys.stderr)
        return 2
    else:
        accelerator = "gpu"
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    work = Path(tempfile.mkdtemp(prefix="gpu_resume_check-"))
    failed = False
    for name in names:
        start = time.perf_counter()
        verdict, detail = _case(name, accelerator, args.compile_backend, work)
        failed |= verdict == "FAIL"
        print(f"{name:<11} {verdict:<15} {time.perf_counter() - start:6.1f} s  {detail}", flush=True)
    if args.keep:
        print(f"runs kept in {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
