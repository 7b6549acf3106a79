"""A training sampler that a resumed run can continue mid-epoch without repeating or skipping images,
in one process or across DDP ranks.

Lightning restarts a plain ``DataLoader`` from a fresh shuffle after a mid-epoch resume and then runs
only the batches the epoch had left: some images are seen twice that epoch and others never. Under DDP,
Lightning's own ``DistributedSampler`` restarts the epoch's order from its start the same way. The
:class:`ResumableSampler` makes the order a function of ``(seed, epoch)`` only, deals it to the ranks
like ``DistributedSampler`` (rank ``r`` of ``W`` takes positions ``r, r + W, ...``) and can start at an
offset, so the data module can put ``(epoch, positions consumed)`` in the checkpoint and continue
exactly. It is a ``DistributedSampler``, so Lightning keeps it instead of putting its own in its place.
It also hands every index out with its own augmentation seed (:class:`SeededIndex`), so the random
augmentations of an image do not depend on what the process did before (a resumed run draws the same
flips as an uninterrupted one, in the main process and in workers alike). :class:`TrainingOrder` is the
data module's side: the run's shuffle seed, the position a checkpoint recorded, and the sampler of this
rank that continues from it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DistributedSampler


class SeededIndex(NamedTuple):
    """A dataset index and the seed of its augmentations (datasets with ``accepts_seeded_index``)."""

    index: int
    seed: int


class ResumableSampler(DistributedSampler):
    """Seeded shuffled order of ``range(n)`` per epoch, dealt to ``num_replicas`` ranks, restartable at any
    position.

    The epoch's order is one permutation drawn from ``(seed, epoch)``; rank ``r`` of ``W`` takes its
    positions ``r, r + W, r + 2W, ...`` (as ``DistributedSampler`` does; the order wraps around to give every
    rank the same count, ``ceil(n / W)``). ``resume(epoch, consumed)`` skips the first ``consumed``
    positions of that epoch's order, counted over all ranks together (``W`` times the images each rank
    consumed), once. Being a ``torch.utils.data.DistributedSampler``, it is kept by Lightning as the
    training loader's sampler under DDP (Lightning replaces any other sampler, whatever
    ``use_distributed_sampler`` says, unless it is turned off).

    Args:
        n: dataset length.
        seed: base seed; the order of epoch ``e`` is a permutation drawn from ``(seed, e)``. Every rank
            must get the same seed.
        seeded_indices: yield :class:`SeededIndex` items (index, per-image augmentation seed) instead of
            plain ints (for datasets that accept them).
        num_replicas: how many ranks share the epoch (``trainer.world_size``).
        rank: this process's rank among them (``trainer.global_rank``).

    Example:
        >>> sampler = ResumableSampler(6, seed=1)
        >>> full = list(sampler)
        >>> sampler.resume(epoch=0, consumed=4)  # after 4 images of epoch 0: its last 2
        >>> list(sampler) == full[4:], list(sampler) == full  # the offset applies once
        (True, True)
        >>> ranks = [ResumableSampler(6, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
        >>> [list(r) for r in ranks] == [full[0::2], full[1::2]]
        True
        >>> for r in ranks:
        ...     r.resume(epoch=0, consumed=4)  # each rank took 2: positions 0-3 are done
        >>> [list(r) for r in ranks] == [full[4::2], full[5::2]]
        True
    """

    def __init__(
        self, n: int, seed: int, seeded_indices: bool = False, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if int(n) < 0:
            raise ValueError(f"ResumableSampler: n must be >= 0, got {n}")
        if int(num_replicas) < 1:
            raise ValueError(f"ResumableSampler: num_replicas must be >= 1, got {num_replicas}")
        # DistributedSampler.__init__ checks rank against num_replicas (ValueError) and sets num_samples,
        # total_size, epoch; it reads only the length of what it is given.
        super().__init__(range(int(n)), num_replicas=int(num_replicas), rank=int(rank), shuffle=True,
                         seed=int(seed), drop_last=False)  # fmt: skip
        self.n = int(n)
        self.seeded_indices = seeded_indices
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order (Lightning calls it at each epoch start)."""
        self.epoch = int(epoch)

    def resume(self, epoch: int, consumed: int) -> None:
        """Skip the first ``consumed`` positions of ``epoch``'s order (all ranks together), the next time
        that epoch is iterated (once: an epoch Lightning does not iterate again, because it had finished,
        is not affected)."""
        if int(consumed) < 0:
            raise ValueError(f"ResumableSampler.resume: consumed must be >= 0, got {consumed}")
        self._resume = (int(epoch), int(consumed))

    def order(self) -> np.ndarray:
        """The epoch's full order of indices (before it is dealt to the ranks)."""
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def positions(self, start: int = 0) -> range:
        """This rank's positions in the epoch's order from global position ``start`` on (each rank gets
        the same count; positions past ``n`` wrap around to the order's start)."""
        start = min(max(int(start), 0), self.n)
        per_rank = math.ceil((self.n - start) / self.num_replicas)
        return range(start + self.rank, start + per_rank * self.num_replicas, self.num_replicas)

    def __iter__(self) -> Iterator[int | SeededIndex]:
        start = 0
        if self._resume is not None:
            if self._resume[0] == self.epoch:
                start = self._resume[1]
            self._resume = None
        if self.n == 0:
            return
        order = self.order()
        positions = self.positions(start)
        if not self.seeded_indices:
            yield from (int(order[p % self.n]) for p in positions)
            return
        seeds = np.random.default_rng([self.seed, self.epoch, 1]).integers(0, 2**31 - 1, size=self.n)
        for position in positions:
            yield SeededIndex(int(order[position % self.n]), int(seeds[position % self.n]))

    def __len__(self) -> int:
        """Indices per rank in a whole epoch, ``ceil(n / num_replicas)`` (a resumed epoch yields fewer)."""
        return self.num_samples


def world_and_rank(trainer: Any) -> tuple[int, int]:
    """``(trainer.world_size, trainer.global_rank)``, ``(1, 0)`` without a trainer."""
    if trainer is None:
        return 1, 0
    return max(1, int(getattr(trainer, "world_size", 1) or 1)), int(getattr(trainer, "global_rank", 0) or 0)


class TrainingOrder:
    """A data module's training order: the run's shuffle seed (drawn once, rank zero's under DDP), the
    position a checkpoint recorded, and the :class:`ResumableSampler` of this rank that continues from it.

    Its checkpoint entries (:meth:`state`) are ``shuffle_seed``, ``epoch``, ``images_consumed`` (positions of
    the epoch's order consumed by all ranks together) and ``world_size``; :meth:`load_state` takes them back
    and the next :meth:`sampler` starts there, once.

    Args:
        owner: the name its warnings give (the data module's class name).

    Example:
        >>> order = TrainingOrder("Mine")
        >>> order.load_state({"shuffle_seed": 7, "epoch": 2, "images_consumed": 4})
        >>> sampler = order.sampler(6, trainer=None)  # epoch 2, its first 4 positions done
        >>> sampler.seed, sampler.epoch, len(list(sampler)), len(list(sampler))
        (7, 2, 2, 6)
        >>> order.state(trainer=None, batch_size=2)  # without a trainer there is no position to record
        {}
    """

    def __init__(self, owner: str = "ConvDataModule") -> None:
        self.owner = owner
        self.seed: int | None = None  # drawn once, checkpointed
        # (epoch, positions of its order consumed by all ranks) and the world size that wrote them
        self.resume_position: tuple[int, int] | None = None
        self.resume_world_size = 1

    def state(self, trainer: Any, batch_size: int) -> dict[str, int]:
        """The checkpoint entries of the position reached (none before a training loader was built or
        without a trainer)."""
        if trainer is None or self.seed is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        world = world_and_rank(trainer)[0]
        return {
            "shuffle_seed": int(self.seed),
            "epoch": int(trainer.current_epoch),
            # positions of the epoch's order consumed by all ranks together (each rank took as many)
            "images_consumed": int(done) * batch_size * world,
            "world_size": world,
        }

    def load_state(self, state_dict: Mapping[str, Any]) -> None:
        """Take the seed and position of a checkpoint's entries (a checkpoint without them: nothing)."""
        if "shuffle_seed" in state_dict:
            self.seed = int(state_dict["shuffle_seed"])
            self.resume_position = (int(state_dict["epoch"]), int(state_dict["images_consumed"]))
            self.resume_world_size = int(state_dict.get("world_size", 1))

    def sampler(self, n: int, trainer: Any, seeded_indices: bool = False) -> ResumableSampler:
        """The sampler of this rank (rank and world size from ``trainer``) over ``n`` examples, starting
        where a loaded checkpoint left off; the seed is drawn at the first call (under DDP rank zero's,
        sent to every rank through ``trainer.strategy.broadcast``)."""
        world, rank = world_and_rank(trainer)
        if self.seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
            if world > 1:  # every rank must deal the same order: rank zero's seed
                seed = int(trainer.strategy.broadcast(seed, src=0))
            self.seed = seed
        sampler = ResumableSampler(n, self.seed, seeded_indices=seeded_indices, num_replicas=world, rank=rank)
        if self.resume_position is not None:
            epoch, consumed = self.resume_position
            self.resume_position = None
            finished = consumed >= n
            if self.resume_world_size != world and not finished:
                rank_zero_warn(
                    f"{self.owner}: the checkpoint was written mid-epoch by {self.resume_world_size} process(es) "
                    f"and this run has {world}: the rest of epoch {epoch} (from position {consumed} of "
                    f"{n}) is dealt to the new ranks, and the resumed run may see a few images "
                    "of that epoch once more or once less than an uninterrupted one"
                )
            # Lightning may iterate the loader before it calls set_epoch (workers start eagerly): start
            # at the epoch the resumed run continues, skipping what that epoch already consumed.
            if finished:
                sampler.set_epoch(epoch + 1)
            else:
                sampler.set_epoch(epoch)
                sampler.resume(epoch, consumed)
        return sampler
