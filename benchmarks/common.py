"""Shared pieces of the benchmarks: the three task configurations of issue 12, their plain-loop losses,
in-memory data, timing helpers and the results writer.

Every benchmark imports this file as ``common`` (``benchmarks/`` is put on ``sys.path`` by each script).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch
from torch import Tensor, nn

from lightning_convnets import ImageClassifier, ObjectDetector, SemanticSegmenter
from lightning_convnets.nn.centernet import centernet_loss, encode_targets
from lightning_convnets.nn.detectors import batch_images
from lightning_convnets.tasks import WarmupCosineLR

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class TaskConfig:
    """One benchmarked task: how to build it, its batch, and the plain loop's loss."""

    name: str
    batch: int
    size: int
    classes: int
    build: Callable[[], nn.Module]


def _classifier(quick: bool) -> nn.Module:
    return ImageClassifier(
        "preact_resnet18",
        num_classes=10,
        backbone_kwargs={"stem": "cifar", "width": 4 if quick else 16},
        figure_every_n_epochs=0,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )


def _segmenter(quick: bool) -> nn.Module:
    return SemanticSegmenter(
        "unet",
        num_classes=5,
        backbone_kwargs={"width": 4 if quick else 8, "depth": 2 if quick else 3, "upsample": "bilinear"},
        figure_every_n_epochs=0,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )


def _detector(quick: bool) -> nn.Module:
    return ObjectDetector(
        "hourglass",
        num_classes=4,
        backbone_kwargs={"num_stacks": 2, "order": 2 if quick else 3, "width": 8 if quick else 32},
        head_channels=8 if quick else 32,
        figure_every_n_epochs=0,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )


def task_configs(quick: bool = False) -> dict[str, TaskConfig]:
    """The issue's three configurations (``quick``: tiny widths and batches, for smoke tests)."""
    return {
        "classifier": TaskConfig("classifier", 8 if quick else 64, 32, 10, lambda: _classifier(quick)),
        "segmenter": TaskConfig(
            "segmenter", 2 if quick else 8, 32 if quick else 64, 5, lambda: _segmenter(quick)
        ),
        "detector": TaskConfig("detector", 2 if quick else 16, 64, 4, lambda: _detector(quick)),
    }


# ------------------------------------------------------------------------------------------ data
def make_batches(
    config: TaskConfig, count: int, seed: int = 0, batch: int | None = None, size: int | None = None
) -> list[Any]:
    """``count`` generated batches in the task's batch format (tensors for classifier / segmenter, a
    tuple of image and target lists for the detector)."""
    gen = torch.Generator().manual_seed(seed)
    n, s = batch or config.batch, size or config.size
    out: list[Any] = []
    for _ in range(count):
        images = torch.randn(n, 3, s, s, generator=gen)
        if config.name == "classifier":
            out.append((images, torch.randint(0, config.classes, (n,), generator=gen)))
        elif config.name == "segmenter":
            out.append((images, torch.randint(0, config.classes, (n, s, s), generator=gen)))
        else:
            targets = []
            for _ in range(n):
                k = int(torch.randint(1, 5, (1,), generator=gen))
                xy = torch.rand(k, 2, generator=gen) * (s - 16)
                wh = torch.rand(k, 2, generator=gen) * 12 + 4
                boxes = torch.cat([xy, xy + wh], dim=1)
                targets.append(
                    {"boxes": boxes, "labels": torch.randint(0, config.classes, (k,), generator=gen)}
                )
            out.append((list(images), targets))
    return out


class BatchList(torch.utils.data.Dataset):
    """A dataset whose items are whole prepared batches (the loader uses ``batch_size=None``)."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Any:
        return self.batches[i]


def loader(batches: list[Any]) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(BatchList(batches), batch_size=None, shuffle=False)


# ------------------------------------------------------------------------------------ plain loop
def plain_loss(config: TaskConfig, model: nn.Module) -> Callable[[Any], Tensor]:
    """The loss a hand-written loop computes with the task's own network and loss functions."""
    if config.name == "classifier":
        return lambda batch: nn.functional.cross_entropy(model(batch[0]), batch[1])
    if config.name == "segmenter":
        return lambda batch: model.criterion(model(batch[0])[-1], batch[1])

    def detection(batch: Any) -> Tensor:
        images, targets = batch
        outputs = model.detector(batch_images(images, model.size_divisor))
        encoded = encode_targets(
            [t["boxes"] for t in targets],
            [t["labels"] for t in targets],
            model.num_classes,
            tuple(outputs[-1]["heatmap"].shape[-2:]),
            stride=model.detector.stride,
        )
        return torch.stack([centernet_loss(o, encoded)["loss"] for o in outputs]).sum()

    return detection


def plain_optimizer(model: nn.Module, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW lr 1e-3 + WarmupCosineLR stepped per batch: what the task configures."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return opt, WarmupCosineLR(opt, total_steps=total_steps)


# ---------------------------------------------------------------------------------------- timing
def plain_step_stamps(config: TaskConfig, batches: list[Any]) -> list[tuple[float, float]]:
    """A fresh task network trained by the plain loop (forward, loss, backward, AdamW, schedule) over
    ``batches``: the clock at every batch start and once at the end (for :func:`intervals`)."""
    torch.manual_seed(0)
    model = config.build()
    opt, sched = plain_optimizer(model, total_steps=10**6)
    loss_fn = plain_loss(config, model)
    stamps = []
    for batch in batches:
        stamps.append(clock())
        opt.zero_grad(set_to_none=True)
        loss_fn(batch).backward()
        opt.step()
        sched.step()
    stamps.append(clock())
    return stamps


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def intervals(stamps: list[tuple[float, float]], skip: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds between consecutive stamps, the first ``skip`` intervals dropped."""
    wall = [b[0] - a[0] for a, b in itertools.pairwise(stamps)][skip:]
    cpu = [b[1] - a[1] for a, b in itertools.pairwise(stamps)][skip:]
    return wall, cpu


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()),
    }


def write_results(out: Path, stem: str, results: dict[str, Any], markdown: str) -> None:
    results["setup"]["load_average_at_end"] = list(os.getloadavg())
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    load = results["setup"]
    footer = (
        f"\nLoad average (1, 5, 15 min) at start {tuple(round(x, 2) for x in load['load_average_at_start'])}, "
        f"at end {tuple(round(x, 2) for x in load['load_average_at_end'])}; {load['cpus']} CPUs, "
        f"{load['threads']} torch thread(s), torch {load['torch']}.\n"
    )
    (out / f"{stem}.md").write_text(markdown + footer)
    print(markdown + footer)
