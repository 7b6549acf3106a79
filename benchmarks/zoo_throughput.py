"""Zoo rows of the throughput monitor and of the activation monitor's saturated units (issue 29, parts 1
and 3): a loader made slow on purpose, a ``.item()`` in the forward, a tanh layer pushed into saturation;
each with its healthy twin. ``benchmarks/diagnosis_zoo.py`` adds :func:`rows` to its table; run them alone
with ``python benchmarks/zoo_throughput.py [--seeds 3]``.

Dead units from a large negative bias are the ``dead-relu`` row of ``diagnosis_zoo.py`` already.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diagnosis_zoo import Classifier, PlainCNN, Row, fit_and_read, images, monitors, run_zoo
from lightning_convnets.callbacks.diagnosis import Finding

SLEEP_S = 0.002
"""Seconds the slow loader sleeps per example (64 ms per batch of 32: several times a step here)."""


class SlowImages(Dataset):
    """:func:`images` read one example at a time, sleeping ``sleep`` seconds in each ``__getitem__`` (a
    decoder slower than the network)."""

    def __init__(self, n: int, seed: int, sleep: float) -> None:
        self.data = images(n, seed)
        self.sleep = sleep

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if self.sleep:
            time.sleep(self.sleep)
        return self.data[index]


def all_monitors() -> list[pl.Callback]:
    """The diagnosis zoo's three monitors and the throughput monitor, at their defaults (10-step logs)."""
    return monitors()


def slow_loader_run(slow: bool, seed: int) -> tuple[list[Finding], str]:
    torch.manual_seed(seed)
    train = DataLoader(SlowImages(640, seed, SLEEP_S if slow else 0.0), batch_size=32, shuffle=True)
    findings = fit_and_read(Classifier(), train, steps=30, seed=seed, callbacks=all_monitors())
    verdict = next((f for f in findings if f.kind in ("input_bound", "compute_bound")), None)
    return findings, (f"loader {verdict.values['wait_share']:.0%} of the step" if verdict else "-")


class SyncingClassifier(Classifier):
    """The zoo's classifier, reading a value on the host in its forward when ``sync`` (a guard against
    exploding features written the way people write it)."""

    def __init__(self, sync: bool) -> None:
        super().__init__()
        self.sync = sync

    def forward(self, x: Tensor) -> Tensor:
        features = self.net(x)[-1]
        if self.sync and features.abs().max().item() > 1e4:
            features = features / 1e4
        return self.head(features.mean((2, 3)))


def host_sync_run(sync: bool, seed: int) -> tuple[list[Finding], str]:
    torch.manual_seed(seed)
    train = DataLoader(images(640, seed), batch_size=32, shuffle=True)
    findings = fit_and_read(SyncingClassifier(sync), train, steps=20, seed=seed, callbacks=all_monitors())
    hit = next((f for f in findings if f.kind == "host_sync"), None)
    return findings, (f"{hit.values['syncs_per_step']:.0f} per step in {hit.layers[0]}" if hit else "no sync")


class TanhCNN(PlainCNN):
    """The zoo's plain four-layer CNN with tanh activations; ``saturate`` puts a bias of +8 on half the
    channels of the second conv (its tanh sits at 1 on them, with no gradient to bring it back)."""

    def __init__(self, saturate: bool, width: int = 16, lr: float = 0.02) -> None:
        super().__init__(lr=lr, width=width)
        for index in range(1, len(self.features), 2):
            self.features[index] = nn.Tanh()
        if saturate:
            with torch.no_grad():
                self.features[2].bias[: width // 2] = 8.0


def saturation_run(saturate: bool, seed: int) -> tuple[list[Finding], str]:
    torch.manual_seed(seed)
    train = DataLoader(images(640, seed), batch_size=32, shuffle=True)
    findings = fit_and_read(TanhCNN(saturate), train, steps=20, seed=seed, callbacks=all_monitors())
    hit = next((f for f in findings if f.kind == "saturated_units"), None)
    return findings, (
        f"{hit.values['saturated_fraction']:.0%} saturated in {hit.layers[0]}" if hit else "no saturated layer"
    )


def rows() -> list[Row]:
    return [
        Row(
            "slow-loader",
            f"__getitem__ sleeps {SLEEP_S * 1e3:.0f} ms per image, num_workers=0: input-bound",
            "the same data in memory",
            {"input_bound"},
            slow_loader_run,
        ),
        Row(
            "host-sync",
            "a .item() in the forward (a guard on the features' magnitude): a host sync per step",
            "the same forward without it",
            {"host_sync"},
            host_sync_run,
        ),
        Row(
            "tanh-saturation",
            "bias +8 on half the channels of a tanh CNN's second conv: saturated units",
            "default initialisation",
            {"saturated_units"},
            saturation_run,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell (default 3)")
    parser.add_argument("--rows", default="", help="comma-separated row names or prefixes (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    wanted = [w for w in args.rows.split(",") if w]
    selected = [r for r in rows() if not wanted or any(r.name.startswith(w) for w in wanted)]
    cells = run_zoo(selected, args.seeds)
    return 0 if all(c.ok for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
