"""Zoo rows of the optimization monitor: learning rates wrong on one parameter group, and a loss spike.

Each row pairs a pathology with its healthy twin (3 seeds in the zoo), on the zoo's small BN ResNet-18
(``Classifier``: width 8, CIFAR stem, 16x16 generated images) split into two parameter groups (the
backbone, ``net``, and the linear head), SGD with momentum 0.9, with the zoo's three monitors and
:class:`~lightning_convnets.callbacks.optimization.OptimizationMonitor` at their defaults (a healthy twin
must stay quiet on all four):

* ``lr-too-low``: the backbone group's learning rate is 1e-6 (the head keeps 0.05): the backbone barely
  learns (``update_ratio_low``); the twin has 0.05 on both groups.
* ``lr-too-high``: on the zoo's norm-free ``PlainCNN`` (four conv-LeakyReLU layers and a head, the same two
  groups), the conv group's learning rate is 10x the healthy one (0.5 against 0.05): its updates outgrow
  its weights (``update_ratio_high``) and the run diverges; the twin has 0.05 on both. (A head alone at 10x
  on this easy task sits at the band's edge, ~1e-1 on 65-75% of the steps, and is not flagged: the band is
  absolute, and a BatchNorm network absorbs a high rate by growing its weights.)
* ``loss-spike``: one batch (step 30) corrupted: its labels shifted by one class (a mislabelled shard):
  ``loss_spike`` at that step, with the layer whose gradient norm jumped first; the twin sees clean data.
  (Images scaled x30 instead make no loss spike on this network: its stem's BatchNorm normalises the batch
  away; the BN monitor flags the running variance that batch leaves behind.)

``rows()`` is wired into ``benchmarks/diagnosis_zoo.py``; ``python benchmarks/zoo_optim.py [--seeds 3]``
runs these rows alone and prints the cells.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diagnosis_zoo import Classifier, PlainCNN, Row, fit_and_read, images, monitors, run_zoo
from lightning_convnets.callbacks.diagnosis import Finding

HEALTHY_LR = 0.05
STEPS = 40
LOG_EVERY = 10
SPIKE_STEP = 30


class GroupedClassifier(Classifier):
    """The zoo's classifier with two parameter groups, each with its own learning rate."""

    def __init__(self, backbone_lr: float = HEALTHY_LR, head_lr: float = HEALTHY_LR) -> None:
        super().__init__(lr=HEALTHY_LR)
        self.backbone_lr, self.head_lr = backbone_lr, head_lr

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [
            {"params": self.net.parameters(), "lr": self.backbone_lr, "name": "backbone"},
            {"params": self.head.parameters(), "lr": self.head_lr, "name": "head"},
        ]
        return torch.optim.SGD(groups, lr=HEALTHY_LR, momentum=0.9)


class GroupedPlainCNN(PlainCNN):
    """The zoo's norm-free CNN with two parameter groups (the conv layers, the head)."""

    def __init__(self, features_lr: float = HEALTHY_LR, head_lr: float = HEALTHY_LR) -> None:
        super().__init__(lr=HEALTHY_LR)
        self.features_lr, self.head_lr = features_lr, head_lr

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [
            {"params": self.features.parameters(), "lr": self.features_lr, "name": "features"},
            {"params": self.head.parameters(), "lr": self.head_lr, "name": "head"},
        ]
        return torch.optim.SGD(groups, lr=HEALTHY_LR, momentum=0.9)


class Corrupted(Dataset):
    """A dataset whose batch ``bad_batch`` (in loader order, no shuffling) has its labels shifted by one
    class: one corrupted batch."""

    def __init__(self, data: Dataset, batch_size: int, bad_batch: int | None, classes: int = 4) -> None:
        self.data, self.classes = data, classes
        self.bad = (
            range(bad_batch * batch_size, (bad_batch + 1) * batch_size) if bad_batch is not None else range(0)
        )

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        x, y = self.data[index]
        return (x, (y + 1) % self.classes) if index in self.bad else (x, y)


def optim_monitors() -> list[Any]:
    """The zoo's monitors (the OptimizationMonitor among them)."""
    return monitors()


def _ratio_note(findings: list[Finding], kind: str) -> str:
    hit = next((f for f in findings if f.kind == kind), None)
    if hit is not None:
        return f"{hit.layers[0]} {hit.values['ratio']:.1e} (lr {hit.values['lr']:.0e}, {int(hit.values['layers_out'])} layers)"
    ok = next((f for f in findings if f.kind == "update_ratio_ok"), None)
    if ok is not None:
        return f"in band: median {ok.values['median_ratio']:.1e} ({ok.values['min_ratio']:.0e}-{ok.values['max_ratio']:.0e})"
    return "-"


def lr_run(
    module_class: type, first_lr: float, head_lr: float, kind: str, seed: int
) -> tuple[list[Finding], str]:
    torch.manual_seed(seed)
    module = module_class(first_lr, head_lr)
    train = DataLoader(images(STEPS * 32, seed), batch_size=32, shuffle=True)
    findings = fit_and_read(module, train, steps=STEPS, seed=seed, callbacks=optim_monitors())
    return findings, _ratio_note(findings, kind)


def spike_run(corrupt: bool, seed: int) -> tuple[list[Finding], str]:
    torch.manual_seed(seed)
    module = GroupedClassifier()
    data = Corrupted(images(STEPS * 32, seed), 32, SPIKE_STEP if corrupt else None)
    train = DataLoader(data, batch_size=32, shuffle=False)
    findings = fit_and_read(module, train, steps=STEPS, seed=seed, callbacks=optim_monitors())
    hit = next((f for f in findings if f.kind == "loss_spike"), None)
    if hit is None:
        return findings, "no spike"
    layer = hit.layers[0] if hit.layers else "no layer"
    return (
        findings,
        f"step {hit.step}: {hit.values['sigmas']:.0f} sigmas, {hit.values['ratio']:.1f}x median; {layer}",
    )


def rows() -> list[Row]:
    return [
        Row(
            "lr-too-low",
            "backbone parameter group at learning rate 1e-6 (head 0.05): update/weight ratio far below the band",
            "0.05 on both groups",
            {"update_ratio_low"},
            lambda bad, seed: lr_run(
                GroupedClassifier, 1e-6 if bad else HEALTHY_LR, HEALTHY_LR, "update_ratio_low", seed
            ),
        ),
        Row(
            "lr-too-high",
            "norm-free CNN, conv parameter group at 10x the learning rate (0.5, head 0.05): update/weight "
            "ratio far above the band",
            "0.05 on both groups",
            {"update_ratio_high"},
            lambda bad, seed: lr_run(
                GroupedPlainCNN, 10 * HEALTHY_LR if bad else HEALTHY_LR, HEALTHY_LR, "update_ratio_high", seed
            ),
        ),
        Row(
            "loss-spike",
            f"one corrupted batch (step {SPIKE_STEP}: labels shifted by one class): loss spike, step and first layer named",
            "clean data",
            {"loss_spike"},
            spike_run,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", default="", help="comma-separated row names or prefixes (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    wanted = [w for w in args.rows.split(",") if w]
    selected = [r for r in rows() if not wanted or any(r.name.startswith(w) for w in wanted)]
    t0 = time.perf_counter()
    cells = run_zoo(selected, args.seeds)
    ok = all(c.ok for c in cells)
    print(f"{'all cells green' if ok else 'SOME CELLS FAILED'} ({time.perf_counter() - t0:.0f} s)")
    for c in cells:
        print(f"  {c.row} {c.twin} {c.seed}: {c.seconds:.1f} s CPU; {c.messages}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
