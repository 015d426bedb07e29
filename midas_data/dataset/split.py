"""Seeded, stratified train/val/test split for sources that come without one."""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "val", "test")


def stratified_split(labels: np.ndarray, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
                     seed: int = 0) -> np.ndarray:
    """Assign each of n samples to a split, class by class, deterministically for `seed`.

    Returns an object array [n] of split names. Every class gets round(f * n_c) samples in
    train and val (test takes the rest), so class proportions match across splits.
    """
    labels = np.asarray(labels)
    if not np.isclose(sum(fractions), 1.0) or min(fractions) < 0:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    out = np.empty(len(labels), dtype=object)
    rng = np.random.default_rng([seed, 0x5917])
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_train = int(round(fractions[0] * len(idx)))
        n_val = int(round(fractions[1] * len(idx)))
        out[idx[:n_train]] = "train"
        out[idx[n_train:n_train + n_val]] = "val"
        out[idx[n_train + n_val:]] = "test"
    return out
