"""The mined k-NN graph that the paired partner policies match anchors on.

Reads the split's pairs table (docs/CONTRACTS.md, "Pairs"), checks it against the split
and its features, and lays each anchor's mined partners out as a padded row:
``neighbours`` int64 [n, k] (-1 = no partner) and ``similarities`` float64 [n, k]
(-inf where there is none), the input of `epoch_plan.matched_order`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from midas_data.errors import MidasDataError, SchemaError, where
from midas_data.features.tables import Features
from midas_data.mining.pairs import pairs_dir, read_pairs

_COLUMNS = ("anchor_row", "partner_row", "similarity", "modality", "anchor_label", "partner_label")


def load_knn_graph(root: Path, split: str, features: Features | None, modalities: list[str],
                   known_modalities: list[str], policy: str) -> tuple[np.ndarray, np.ndarray]:
    """(neighbours [n, k], similarities [n, k]) of the partners mined in `modalities`.

    features: the split's features (the pairs must have been mined from them; None is an
    error naming what to run); known_modalities: the dataset's, for the pairs' check;
    policy: named in the error when the artifacts are missing.
    """
    if features is None:
        raise MidasDataError(f"{where(root / 'features')}: policy {policy!r} needs features and "
                             "mined pairs; run `midas-data extract` then `midas-data mine-misaligned`")
    t = read_pairs(root, split, features.fingerprint)
    check_pairs(t, root, split, features, known_modalities)
    keep = np.isin(np.asarray(t.column("modality").to_pylist()), modalities)
    anchor = t.column("anchor_row").to_numpy()[keep]
    partner = t.column("partner_row").to_numpy()[keep]
    sim = t.column("similarity").to_numpy().astype(np.float64)[keep]
    n = len(features.keys)
    counts = np.bincount(anchor, minlength=n)
    width = int(counts.max()) if len(counts) else 0
    order = np.argsort(anchor, kind="stable")
    slot = np.arange(len(anchor)) - np.repeat(np.cumsum(counts) - counts, counts)
    neighbours = np.full((n, width), -1, np.int64)
    similarities = np.full((n, width), -np.inf)
    neighbours[anchor[order], slot] = partner[order]
    similarities[anchor[order], slot] = sim[order]
    return neighbours, similarities


def check_pairs(t, root: Path, split: str, features: Features, known_modalities: list[str]) -> None:
    """Rows in range, no nulls, labels that agree with the features and always differ."""
    parts = sorted(pairs_dir(root, split).glob("part-*.arrow"))
    path = ", ".join(str(q) for q in parts) or pairs_dir(root, split)
    n = len(features.keys)
    for col in _COLUMNS:
        if col not in t.column_names or t.column(col).null_count:
            raise SchemaError(f"{where(path, field=col)}: column missing or has nulls; "
                              "rerun `midas-data mine-misaligned`")
    a, p = t.column("anchor_row").to_numpy(), t.column("partner_row").to_numpy()
    bad = np.flatnonzero((a < 0) | (a >= n) | (p < 0) | (p >= n))
    if len(bad):
        raise SchemaError(f"{where(path, field='anchor_row/partner_row')}: row {int(bad[0])} points "
                          f"outside the split's {n} samples; rerun `midas-data mine-misaligned`")
    labels = features.labels
    la, lp = t.column("anchor_label").to_numpy(), t.column("partner_label").to_numpy()
    bad = np.flatnonzero((labels[a] != la) | (labels[p] != lp) | (la == lp))
    if len(bad):
        key = features.keys[int(a[bad[0]])]
        raise SchemaError(f"{where(path, key, 'anchor_label/partner_label')}: labels disagree with "
                          "the features table or coincide; rerun `midas-data mine-misaligned`")
    if not np.all(np.isfinite(t.column("similarity").to_numpy())):
        raise SchemaError(f"{where(path, field='similarity')}: non-finite values")
    unknown = set(t.column("modality").unique().to_pylist()) - set(known_modalities)
    if unknown:
        raise SchemaError(f"{where(path, field='modality')}: unknown modalities {sorted(unknown)}")
