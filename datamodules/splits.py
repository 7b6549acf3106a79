"""Seeded train/val/test splits of a data module's samples: :func:`carve_splits` (the splits the data has no
files for, carved out of the training samples), on :func:`seeded_split` or, keeping the class balance,
:func:`stratified_split`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


def seeded_split(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split ``range(n)`` into consecutive parts of a seeded permutation.

    ``fractions`` are the shares of all parts but the first, which takes the rest (so rounding never
    loses an example). Returns sorted index arrays, first part first.

    Example:
        >>> parts = seeded_split(10, [0.2, 0.1], seed=0)
        >>> [len(part) for part in parts], sorted(i for part in parts for i in part.tolist()) == list(range(10))
        ([7, 2, 1], True)
    """
    order = np.random.default_rng(seed).permutation(n)
    sizes = [round(f * n) for f in fractions]
    if sum(sizes) > n:
        raise ValueError(f"split fractions {list(fractions)} leave no examples out of {n}")
    parts, start = [], n - sum(sizes)
    parts.append(np.sort(order[:start]))
    for size in sizes:
        parts.append(np.sort(order[start : start + size]))
        start += size
    return parts


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Like :func:`seeded_split` but keeping the class balance in every part.

    Part sizes match :func:`seeded_split` (``round(fraction * n)``); each class contributes its share,
    the rounding remainders going to the classes with the largest fractional shares.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    members = [
        np.random.default_rng([seed, offset]).permutation(np.flatnonzero(labels == cls))
        for offset, cls in enumerate(classes)
    ]
    counts = np.array([len(m) for m in members])
    taken = np.zeros(len(classes), np.int64)
    parts: list[np.ndarray] = []
    for fraction in fractions:
        quota = fraction * counts
        sizes = np.floor(quota).astype(np.int64)
        missing = round(fraction * len(labels)) - int(sizes.sum())
        room = counts - taken - sizes
        for i in np.argsort(-(quota - sizes), kind="stable"):
            if missing <= 0:
                break
            if room[i] > 0:
                sizes[i] += 1
                missing -= 1
        sizes = np.minimum(sizes, counts - taken)
        parts.append(np.concatenate([m[t : t + k] for m, t, k in zip(members, taken, sizes)]))
        taken += sizes
    rest = np.concatenate([m[t:] for m, t in zip(members, taken)])
    return [np.sort(p).astype(np.int64) for p in [rest, *parts]]


def carve_splits(
    samples: dict[str, list],
    fractions: Mapping[str, float],
    seed: int,
    label: Callable[[Any], int] | None = None,
) -> dict[str, list]:
    """Fill the splits missing from ``samples`` by carving ``fractions`` out of ``samples["train"]``.

    A split already in ``samples`` (it had its own folder or file) or with a fraction of 0 is left
    alone. With ``label`` (a sample's class), the carving keeps the class balance
    (:func:`stratified_split`), else it is a plain :func:`seeded_split`. Returns ``samples``, updated.

    Example:
        >>> out = carve_splits({"train": list("abcdefghij")}, {"val": 0.2, "test": 0.0}, seed=0)
        >>> {split: len(items) for split, items in out.items()}
        {'train': 8, 'val': 2}
    """
    carve = [(split, f) for split, f in fractions.items() if split not in samples and f > 0]
    if carve:
        pool = samples["train"]
        shares = [f for _, f in carve]
        if label is None:
            parts = seeded_split(len(pool), shares, seed)
        else:
            parts = stratified_split([label(item) for item in pool], shares, seed)
        samples["train"] = [pool[i] for i in parts[0]]
        for (split, _), idx in zip(carve, parts[1:]):
            samples[split] = [pool[i] for i in idx]
    return samples
