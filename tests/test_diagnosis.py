"""The judging rules (callbacks/diagnosis.py) on synthetic numbers, and one representative pair of each row
of the diagnosis zoo (benchmarks/diagnosis_zoo.py): the pathology must be named with the right kind, the
healthy twin must get no warning."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import pytest
import torch
from lightning_convnets.callbacks import ActivationVarianceMonitor, BatchNormDriftMonitor, Diagnosis, Finding
from lightning_convnets.callbacks import diagnosis as dg

from lightning_convnets.backbones import create_backbone

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import diagnosis_zoo as zoo


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _loud(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity in ("warning", "error")]


# --------------------------------------------------------------------------------------------------
# Variance growth: the shape, not one geometric-mean threshold
# --------------------------------------------------------------------------------------------------


def _exponential(rate: float, blocks: int, stages: int = 1) -> list[dg.DepthPoint]:
    """Var(F) = (rate - 1) Var(x): the increments grow with the level."""
    points, level = [], 1.0
    per_stage = blocks // stages
    for i in range(blocks):
        branch = (rate - 1.0) * level
        points.append(
            dg.DepthPoint(f"layer{i // per_stage + 1}.{i % per_stage}", level + branch, level, branch)
        )
        level += branch
    return points


def _linear(blocks: int, stages: int = 1, reset: float = 1.0) -> list[dg.DepthPoint]:
    """Var(F) = 1 whatever the input (BatchNorm); a projection at each new stage resets the level."""
    points, level = [], 0.5
    per_stage = blocks // stages
    for i in range(blocks):
        if i and i % per_stage == 0:
            level = reset  # the projection shortcut of a normalised input
        points.append(dg.DepthPoint(f"layer{i // per_stage + 1}.{i % per_stage}", level + 1.0, level, 1.0))
        level += 1.0
    return points


def test_exponential_growth_at_a_modest_rate_is_a_warning_that_says_so():
    points = _exponential(1.37, 16, stages=4)
    shape = dg.variance_growth_shape(points)
    assert shape.regime == "exponential" and shape.source == "branch"
    assert shape.increment_growth == pytest.approx(1.37, rel=1e-6)
    finding = dg.variance_growth(points, step=4)
    assert finding.severity == "warning" and finding.kind == dg.KIND_VARIANCE_EXPONENTIAL
    assert "grows exponentially" in finding.message and "1.37x per block" in finding.message
    assert f"{1.37**15:.3g}x over 16 blocks" in finding.message
    assert finding.layers == ["layer1.0", "layer4.3"]


def test_linear_growth_is_info_even_when_its_average_rate_is_high():
    points = _linear(4)  # 1.5, 2.5, 3.5, 4.5: 1.44x per block on average, yet linear
    shape = dg.variance_growth_shape(points)
    assert shape.per_block > 1.4 and shape.increment_growth == pytest.approx(1.0)
    finding = dg.variance_growth(points, step=0)
    assert finding.severity == "info" and finding.kind == dg.KIND_VARIANCE_LINEAR
    assert "grows linearly" in finding.message and "as expected with BatchNorm" in finding.message


def test_stage_boundaries_with_projections_do_not_fool_it():
    # BN net: the level drops at each projection and climbs linearly within the stage
    bn = _linear(16, stages=4)
    assert dg.variance_growth_shape(bn).regime == "linear"
    assert dg.variance_growth(bn, 0).severity == "info"
    # a projection that doubles the level (a big jump at the boundary) in an exponential net
    exp = _exponential(1.4, 12, stages=3)
    for i in (4, 8):
        for p in exp[i:]:
            p.var, p.shortcut_var, p.branch_var = 2 * p.var, 2 * p.shortcut_var, 2 * p.branch_var
    assert dg.variance_growth_shape(exp).regime == "exponential"
    # chain only (no branch measured): rises across a boundary are never used
    chain = [dg.DepthPoint(p.name, p.var) for p in _linear(16, stages=4, reset=0.2)]
    shape = dg.variance_growth_shape(chain)
    assert shape.source == "chain" and shape.regime == "linear", shape
    chain_exp = [dg.DepthPoint(p.name, p.var) for p in _exponential(1.5, 16, stages=4)]
    assert dg.variance_growth_shape(chain_exp).regime == "exponential"


def test_vanishing_slow_and_too_short_chains():
    shrinking = [dg.DepthPoint(f"s.{i}", 0.5**i) for i in range(6)]
    finding = dg.variance_growth(shrinking, 0)
    assert finding.kind == dg.KIND_VARIANCE_VANISHING and finding.severity == "warning"
    slow = _exponential(1.18, 16)  # exponential in shape, below explode_growth: reported, not a warning
    finding = dg.variance_growth(slow, 0)
    assert finding.kind == dg.KIND_VARIANCE_EXPONENTIAL and finding.severity == "info"
    assert "(slowly)" in finding.message
    assert dg.variance_growth(_exponential(1.08, 16), 0).severity == "info"  # a down-scaled branch
    two = [dg.DepthPoint("a.0", 1.0), dg.DepthPoint("a.1", 1.6)]  # one ratio: no shape to see
    assert dg.variance_growth(two, 0).severity == "info"
    two[1].var = 2.5
    finding = dg.variance_growth(two, 0)
    assert finding.severity == "warning" and "too few blocks" in finding.message
    assert dg.variance_growth(two[:1], 0) is None
    assert dg.variance_growth([dg.DepthPoint("a", math.nan), dg.DepthPoint("b", 1.0)], 0) is None


def test_issue_reproducer_preact_resnet34_without_norm_warns_and_its_bn_twin_does_not():
    def judge(norm):
        torch.manual_seed(0)
        net = create_backbone("preact_resnet34", stem="cifar", width=8, norm=norm)
        monitor = ActivationVarianceMonitor()
        metrics = monitor.measure(net, torch.randn(4, 3, 16, 16))
        monitor.append_history({"step": 4.0, **{f"activation_variance/{k}": v for k, v in metrics.items()}})
        return monitor.diagnose(None, None)

    (growth,) = [f for f in judge("none") if f.kind.startswith("variance_")]
    assert growth.severity == "warning" and growth.kind == dg.KIND_VARIANCE_EXPONENTIAL
    assert "grows exponentially" in growth.message and "over 16 blocks" in growth.message
    assert 1.25 < growth.values["growth_per_block"] < 1.5 and growth.values["overall"] > 50
    twin = judge("batch")
    assert _loud(twin) == []
    (linear,) = [f for f in twin if f.kind.startswith("variance_")]
    assert linear.kind == dg.KIND_VARIANCE_LINEAR


# --------------------------------------------------------------------------------------------------
# Other rules on synthetic numbers
# --------------------------------------------------------------------------------------------------


def test_dead_relus_one_finding_naming_every_layer():
    assert dg.dead_relus({"a": 0.1, "b": 0.0}, 3) is None
    finding = dg.dead_relus({"a": 0.5, "b": 0.1, "c": 1.0}, 3)
    assert finding.kind == dg.KIND_DEAD_RELU and finding.layers == ["a", "c"]
    assert "100% of the channels of c" in finding.message and "1 more layer" in finding.message


def test_noisy_batch_statistics_need_starved_layers_and_visible_noise():
    layers = [f"bn{i}" for i in range(10)]
    elements = {n: (8.0 if i >= 6 else 512.0) for i, n in enumerate(layers)}
    entry = {f"batchnorm/{n}/z_shift": (0.25 if i >= 6 else 0.03) for i, n in enumerate(layers)}
    entry.update({f"batchnorm/{n}/log_var_ratio": -0.25 for n in layers})
    finding = dg.bn_noisy_batch_stats(entry, elements, 40)
    assert finding.kind == dg.KIND_BN_NOISY_BATCH_STATS and finding.severity == "warning"
    assert finding.layers == layers[6:] and "fewest 8" in finding.message
    assert "recalibrate_batchnorm" in finding.suggestion and "GroupNorm" in finding.suggestion
    assert dg.bn_noisy_batch_stats(entry, {n: 256.0 for n in layers}, 40) is None  # batch of 64
    quiet = {k: 0.01 for k in entry}
    assert dg.bn_noisy_batch_stats(quiet, elements, 40) is None  # starved but no visible noise
    one = {n: (8.0 if n == "bn9" else 512.0) for n in layers}
    assert dg.bn_noisy_batch_stats(entry, one, 40) is None  # one head layer of ten is not the batch size


def test_rank_disagreement_must_stand_above_the_batch_noise_floor():
    entry = {"batchnorm/bn/rank_spread": 0.3, "batchnorm/bn/rank_noise_ratio": 2.0}
    assert dg.bn_rank_disagreement(entry, ["bn"], 5) is None  # large but as noisy as i.i.d. shards are
    entry["batchnorm/bn/rank_noise_ratio"] = 300.0
    finding = dg.bn_rank_disagreement(entry, ["bn"], 5)
    assert finding.kind == dg.KIND_BN_RANK_DISAGREEMENT and "non-i.i.d." in finding.message
    assert dg.bn_rank_disagreement({"batchnorm/bn/rank_spread": 0.3}, ["bn"], 5) is not None  # no floor


def test_noisy_statistics_replace_the_shift_finding_in_the_monitor():
    monitor = BatchNormDriftMonitor()
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)).train()
    metrics = monitor.measure(net, [torch.randn(2, 3, 2, 2) * 3 + 2 for _ in range(4)])  # 8 elements
    monitor.append_history({"step": 4.0, **{f"batchnorm/{k}": v for k, v in metrics.items()}})
    kinds = {f.kind for f in monitor.diagnose(None, None)}
    assert dg.KIND_BN_NOISY_BATCH_STATS in kinds and dg.KIND_BN_TRAIN_TEST_SHIFT not in kinds


def test_finding_kind_defaults_and_the_report_reads_at_80_columns():
    assert Finding("m", "info", [], "x").kind == ""
    report = Diagnosis()
    report.add(
        [
            Finding(
                "activation_variance",
                "warning",
                ["net.layer1.0", "net.layer4.2"],
                "variance grows " * 12,
                "add BatchNorm",
                kind="variance_exponential",
            ),
            Finding("shattering", "info", ["Net"], "gradients are smooth"),
        ]
    )
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(report.blocks())
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "WARNING  activation_variance / variance_exponential" in text and "try: add BatchNorm" in text
    assert "| variance_exponential |" in report.to_markdown()


# --------------------------------------------------------------------------------------------------
# One representative pair per zoo row (the zoo itself: make zoo)
# --------------------------------------------------------------------------------------------------


def _pair(run, expected: str) -> list[Finding]:
    sick, _ = run(True, 0)
    assert any(f.kind == expected for f in _loud(sick)), [(f.severity, f.kind, f.message) for f in sick]
    healthy, _ = run(False, 0)
    assert _loud(healthy) == [], [(f.severity, f.kind, f.message) for f in _loud(healthy)]
    return sick


def test_zoo_variance_pair():
    _pair(lambda bad, seed: zoo.variance_run(18, 8, "none" if bad else "batch", seed), "variance_exponential")


def test_zoo_shattering_pair():
    _pair(lambda bad, seed: zoo.shattering_run(not bad, seed), "shattered")


def test_zoo_nonfinite_pair_names_the_first_module():
    findings = _pair(lambda bad, seed: zoo.nonfinite_run(100.0 if bad else 1.0, seed), "nonfinite")
    (error,) = [f for f in findings if f.kind == "nonfinite" and f.monitor == "activation_variance"]
    assert error.severity == "error" and error.layers[0].startswith("features.")


def test_zoo_dead_relu_pair():
    _pair(zoo.dead_run, "dead_relu")


def test_zoo_bn_train_test_pair():
    _pair(zoo.shift_run, "bn_variance_mismatch")


def test_zoo_small_batch_pair():
    _pair(lambda bad, seed: zoo.small_batch_run(2 if bad else 64, seed), "bn_noisy_batch_stats")


def test_zoo_ddp_pair():
    _pair(zoo.ddp_run, "bn_rank_disagreement")
