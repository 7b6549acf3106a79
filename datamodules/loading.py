"""How a data module's split becomes a DataLoader: the worker count (:func:`auto_num_workers`) and the one
loader builder of every split, the training split's with its resumable sampler (:class:`SplitLoaders`, a
base of ``ConvDataModule``; the order itself: ``sampling.TrainingOrder``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from torch.utils.data import DataLoader, Dataset

from .datasets import detection_collate
from .sampling import ResumableSampler

if TYPE_CHECKING:
    from .sampling import TrainingOrder


def auto_num_workers(cpus: int | None = None, processes: int = 1) -> int:
    """DataLoader workers for ``num_workers="auto"``: ``0`` when a training process has at most two CPUs of
    its own, else ``min(8, cpus_per_process - 1)`` (one core stays with the training step).

    Two CPUs are the line because a worker then takes one of the two cores the step's own threads use:
    on a 2-core machine one worker delivered fewer images/s than the main process for every task's
    shapes loader, which alone ran 4-10x faster than the step (``benchmarks/bench_data.py``). The environment variable ``LIGHTNING_CONVNETS_NUM_WORKERS`` (an int)
    overrides the rule.

    Args:
        cpus: CPUs this process may run on (default: its affinity set, else ``os.cpu_count()``).
        processes: training processes sharing them (DDP ranks on this machine).

    Example:
        >>> auto_num_workers(cpus=2), auto_num_workers(cpus=4), auto_num_workers(cpus=64), auto_num_workers(16, 4)
        (0, 3, 8, 3)
    """
    override = os.environ.get("LIGHTNING_CONVNETS_NUM_WORKERS")
    if override is not None and cpus is None:
        try:
            value = int(override)
        except ValueError:
            value = -1
        if value < 0:
            raise ValueError(f"LIGHTNING_CONVNETS_NUM_WORKERS must be an int >= 0, got {override!r}")
        return value
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cpus // max(1, processes)
    return 0 if per_process <= 2 else min(8, per_process - 1)


class SplitLoaders:
    """The loaders of a ``ConvDataModule`` (one of its bases): ``train_dataloader`` (shuffled by the
    module's :class:`~.sampling.TrainingOrder`), ``val_dataloader``, ``test_dataloader``, all built by
    ``_loader`` from the module's loader arguments (``batch_size``, ``num_workers``, ``pin_memory``,
    ``persistent_workers``, ``drop_last``) and ``task`` (``detection_collate`` for detection).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_convnets.datamodules import ConvDataModule
        >>> class Pairs(ConvDataModule):
        ...     def resolve_class_names(self):
        ...         return ["a", "b"]
        ...     def build_datasets(self, splits):
        ...         for split in splits:
        ...             setattr(self, f"{split}_dataset", TensorDataset(torch.zeros(5, 3), torch.arange(5) % 2))
        >>> dm = Pairs(batch_size=2, num_workers=0)
        >>> dm.setup("fit")
        >>> [len(labels) for _, labels in dm.train_dataloader()], len(dm.val_dataloader())
        ([2, 2, 1], 3)
    """

    # the host's arguments and state (ConvDataModule sets them)
    task: str
    batch_size: int
    num_workers: int | str
    pin_memory: bool
    persistent_workers: bool | None
    drop_last: bool
    training_order: TrainingOrder
    train_sampler: ResumableSampler | None

    def set_loader_options(
        self, batch_size: int, num_workers: int | str, pin_memory: bool, persistent_workers: bool | None
    ) -> None:
        """Check and keep the loader arguments (``num_workers="auto"``: :func:`auto_num_workers` when the
        loaders are built).

        Raises:
            ValueError: naming ``batch_size`` or ``num_workers`` and what they must be.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers != "auto" and (
            isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0
        ):
            raise ValueError(f"num_workers must be an int >= 0 or 'auto', got {num_workers!r}")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
    train_dataset: Dataset | None
    val_dataset: Dataset | None
    test_dataset: Dataset | None

    @property
    def loader_workers(self) -> int:
        """The worker processes the loaders use: ``num_workers``, with ``"auto"`` resolved for this machine
        and the number of training processes on it (:func:`auto_num_workers`)."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        trainer = getattr(self, "trainer", None)
        processes = 1
        if trainer is not None:
            processes = max(1, int(getattr(trainer, "num_devices", 1) or 1))
        return auto_num_workers(processes=processes)

    def _training_sampler(self, dataset: Dataset) -> ResumableSampler:
        """The training loader's sampler: the seeded order of :class:`ResumableSampler`, dealt to the ranks
        under DDP (rank and world size from the trainer; a ``DistributedSampler``, so Lightning keeps it),
        starting where a checkpoint left off."""
        self.train_sampler = self.training_order.sampler(
            len(dataset),  # type: ignore[arg-type]
            getattr(self, "trainer", None),
            seeded_indices=getattr(dataset, "accepts_seeded_index", False),
        )
        return self.train_sampler

    def _loader(
        self, dataset: Dataset | None, split: str, shuffle: bool, batch_size: int | None = None
    ) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__} has no {split} split: call setup() first, or, if it ran, "
                f"{type(self).__name__}.build_datasets built no {split}_dataset (the data has no {split} split)"
            )
        sampler = self._training_sampler(dataset) if shuffle else None
        workers = self.loader_workers
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=workers > 0 and self.persistent_workers is not False,
            drop_last=self.drop_last and shuffle,
            collate_fn=detection_collate if self.task == "detection" else None,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled loader of the training split."""
        return self._loader(self.train_dataset, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Loader of the validation split."""
        return self._loader(self.val_dataset, "val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Loader of the test split."""
        return self._loader(self.test_dataset, "test", shuffle=False)
