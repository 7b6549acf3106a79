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
flips as an uninterrupted one, in the main process and in workers alike).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
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
