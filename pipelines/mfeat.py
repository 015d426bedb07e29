"""UCI Multiple Features: 2000 handwritten digits, six views, shipped in pipelines/data/."""

from __future__ import annotations

from importlib import resources

import numpy as np

from midas_data.dataset.shards import Sample

VIEWS = {"fac": 216, "pix": 240, "kar": 64, "fou": 76, "zer": 47, "mor": 6}
# One strong view and the weak 6-feature morphological view (docs/REFERENCE_RESULTS.md: fac/mor).
DEFAULT_MODALITIES = ("fac", "mor")
# The independent prototype's protocol on mfeat (docs/REFERENCE_RESULTS.md), as TrainConfig
# fields: Adam without weight decay, constant lr, MLP in -> 128 -> 64 encoders.
RECIPE = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "batch_size": 64, "epochs": 60,
          "step_size": 0, "warmup_epochs": 10, "lam": 1.0, "eta": 0.05, "feature_dim": 64,
          "hidden": [128], "encoders": {}}


def load_mfeat() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The six views (float32 [2000, d]) and labels (int64 [2000])."""
    path = resources.files(__package__) / "data" / "mfeat.npz"
    with resources.as_file(path) as p, np.load(p, allow_pickle=False) as z:
        return {v: z[v] for v in VIEWS}, z["label"].astype(np.int64)


def read_mfeat(modalities: tuple[str, ...] | list[str] | None = None) -> dict:
    """Samples for build-shards; keys `mfeat-00000`.., labels 0..9, no split (stratified later)."""
    mods = list(modalities or DEFAULT_MODALITIES)
    unknown = [m for m in mods if m not in VIEWS]
    if unknown:
        raise ValueError(f"unknown mfeat view(s) {unknown}; choose from {list(VIEWS)}")
    if len(mods) < 2:
        raise ValueError("MIDAS needs at least two modalities; pass e.g. --modalities fac,mor")
    views, labels = load_mfeat()
    samples = [Sample(key=f"mfeat-{i:05d}", label=int(labels[i]),
                      payloads={m: views[m][i] for m in mods}, source="pipelines/data/mfeat.npz")
               for i in range(len(labels))]
    return {"samples": samples, "classes": [str(c) for c in range(10)], "modalities": mods,
            "source": {"pipeline": "mfeat", "modalities": mods,
                       "citation": "UCI Multiple Features (Duin), CC BY 4.0"}}
