"""The reference trainer: MIDAS, Joint and unimodal training on a midas-data dataset.

    from midas_data.trainers import TrainConfig, train
    results = train("DATASET", "RUN", TrainConfig.from_preset("mfeat", method="midas"))

The MIDAS math lives once in `midas_data.loss.terms`; this package wires it into a model
(`MultimodalModel`), an epoch loop (`trainers.loop`), held-out metrics (`trainers.metrics`)
and run artifacts (`trainers.artifacts`).
"""

from __future__ import annotations

from typing import Any

from .cli_options import config_from_options, train_options
from .config import PAPER_PRESETS, TrainConfig
from .metrics import evaluate, macro_f1, misaligned_metrics, misaligned_pairs
from .models import MultimodalModel

__all__ = [
    "PAPER_PRESETS",
    "MultimodalModel",
    "TrainConfig",
    "config_from_options",
    "evaluate",
    "macro_f1",
    "misaligned_metrics",
    "misaligned_pairs",
    "train",
    "train_options",
]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `python -m midas_data.trainers.run` does not import trainers.run twice.
    if name in ("train", "main"):
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module 'midas_data.trainers' has no attribute {name!r}")
