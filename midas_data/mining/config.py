"""`MineConfig`: the settings of the `mine-misaligned` stage, the one place their defaults live.

`mine_misaligned` takes it (or the same names as keyword arguments), `midas-data
mine-misaligned` generates its options from it (`midas_data.options`), and every pairs part
records it under `settings` in its `midas.config` metadata.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from midas_data.mining.knn import INDEX_CHOICES
from midas_data.options import check_settings, setting, settings_dict

APPROX_KINDS = ("ivf", "auto")


@dataclass
class MineConfig:
    """How different-label partners are mined (see midas_data.mining.stage)."""

    splits: tuple[str, ...] = setting(("train",), "splits to mine")
    k: int = setting(16, "Partners per anchor and modality.", min=1)
    index: str = setting("cpu", "cpu: FAISS on the CPU; gpu: faiss-gpu, else the torch backend on CUDA; "
                        "torch: the torch backend (its GPU, else the CPU); auto: the fastest "
                        "available.", choices=INDEX_CHOICES)
    approx: str | None = setting(None, "ivf: approximate IVF search (recall@k against exact search "
                                       "is measured and stored); auto: IVF above --approx-above "
                                       "rows with --index cpu, else exact.", choices=APPROX_KINDS)
    approx_above: int = setting(200_000, "approx auto: rows above which IVF is used (the exact "
                                         "search grows as rows^2: ~2 min at 200k x 256 on 2 "
                                         "cores).", min=0)
    nlist: int | None = setting(None, "IVF lists per class (default ~sqrt(n_class)/4).", min=1)
    nprobe: int | None = setting(None, "IVF lists probed per query: in total over the other "
                                       "classes' lists, nearest first (--index cpu), or per "
                                       "class (FAISS on GPU). Default: raised from 2 until "
                                       "the sample recall reaches --recall-target.", min=1)
    recall_target: float = setting(0.95, "IVF: recall@k wanted on the sample; a lower held-out "
                                         "recall is warned about", min=0, max=1)
    report: bool = setting(False, "Similarity histograms, class matrix (PNG + JSON).")
    block_size: int = setting(16384, "anchors searched per block (bounds memory)", min=1)
    recall_queries: int = setting(1000, "approx: anchors sampled to measure recall@k against "
                                        "exact search", min=1)
    seed: int = setting(0, "seed of the recall sample", min=0)

    def __post_init__(self) -> None:
        self.splits = (self.splits,) if isinstance(self.splits, str) else tuple(self.splits)
        check_settings(self)

    def to_dict(self) -> dict[str, Any]:
        return settings_dict(self)

    def replace(self, **changes: Any) -> MineConfig:
        return dataclasses.replace(self, **changes)
