"""A training sampler that a resumed run can continue mid-epoch without repeating or skipping images.

Lightning restarts a plain ``DataLoader`` from a fresh shuffle after a mid-epoch resume and then runs
only the batches the epoch had left: some images are seen twice that epoch and others never. The
:class:`ResumableSampler` makes the order a function of ``(seed, epoch)`` only and can start at an
offset, so the data module can put ``(epoch, images consumed)`` in the checkpoint and continue exactly.
It also hands every index out with its own augmentation seed (:class:`SeededIndex`), so the random
augmentations of an image do not depend on what the process did before (a resumed run draws the same
flips as an uninterrupted one, in the main process and in workers alike).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from torch.utils.data import Sampler


class SeededIndex(NamedTuple):
    """A dataset index and the seed of its augmentations (datasets with ``accepts_seeded_index``)."""

    index: int
    seed: int


class ResumableSampler(Sampler):
    """Seeded shuffled order of ``range(n)`` per epoch, restartable at any position.

    Args:
        n: dataset length.
        seed: base seed; the order of epoch ``e`` is a permutation drawn from ``(seed, e)``.
        seeded_indices: yield :class:`SeededIndex` items (index, per-image augmentation seed) instead of
            plain ints (for datasets that accept them).

    Example:
        >>> sampler = ResumableSampler(6, seed=1)
        >>> full = list(sampler)
        >>> sampler.resume(epoch=0, consumed=4)  # after 4 images of epoch 0: its last 2
        >>> list(sampler) == full[4:], list(sampler) == full  # the offset applies once
        (True, True)
    """

    def __init__(self, n: int, seed: int, seeded_indices: bool = False) -> None:
        self.n = int(n)
        self.seed = int(seed)
        self.seeded_indices = seeded_indices
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order (Lightning calls it at each epoch start)."""
        self.epoch = int(epoch)

    def resume(self, epoch: int, consumed: int) -> None:
        """Skip the first ``consumed`` indices of ``epoch``'s order, the next time that epoch is iterated
        (once: an epoch Lightning does not iterate again, because it had finished, is not affected)."""
        self._resume = (int(epoch), int(consumed))

    def order(self) -> np.ndarray:
        """The epoch's full order of indices."""
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[int | SeededIndex]:
        start = 0
        if self._resume is not None:
            if self._resume[0] == self.epoch:
                start = min(self._resume[1], self.n)
            self._resume = None
        order = self.order()
        if not self.seeded_indices:
            yield from (int(i) for i in order[start:])
            return
        seeds = np.random.default_rng([self.seed, self.epoch, 1]).integers(0, 2**31 - 1, size=self.n)
        for position in range(start, self.n):
            yield SeededIndex(int(order[position]), int(seeds[position]))

    def __len__(self) -> int:
        return self.n
