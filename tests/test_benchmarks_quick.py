"""Each benchmark's smallest configuration (``--quick``) runs and writes its table (smoke test of the
scripts behind ``make bench``; the numbers themselves are not checked)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # 20-60 s each on the loaded 2-core machine
@pytest.mark.parametrize(
    ("name", "stem", "key"),
    [
        ("bench_tasks", "tasks_quick", "ratio_cpu"),
        ("bench_inference", "inference_quick", "variants"),
        ("bench_data", "data_quick", "loader"),
        ("bench_scaling", "scaling_quick", "batch"),
    ],
)
def test_benchmark_quick_mode_writes_its_tables(tmp_path, name, stem, key):
    _load(name).main(["--quick", "--tasks", "classifier", "--out", str(tmp_path)])
    results = json.loads((tmp_path / f"{stem}.json").read_text())
    assert key in results["tasks"]["classifier"]
    assert "load_average_at_end" in results["setup"]
    assert (tmp_path / f"{stem}.md").read_text().startswith("# ")
    if name == "bench_inference":
        assert all(v["equal_1e-4"] for v in results["tasks"]["classifier"]["variants"].values())
