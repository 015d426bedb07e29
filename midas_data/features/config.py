"""`ExtractConfig`: the settings of the `extract` stage, the one place their defaults live.

`extract_features` takes it (or the same names as keyword arguments), `midas-data extract`
generates its options from it (`midas_data.options`), and every features table records it
under `settings` in its `midas.config` metadata.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from midas_data.devices import check_device_name
from midas_data.options import check_settings, setting, settings_dict

SOURCES = ("warmup", "user")
OPTIMIZERS = ("adam", "sgd")


@dataclass
class ExtractConfig:
    """How features and unimodal confidences are computed (see midas_data.features.extract)."""

    source: str = setting("warmup", "warmup (train one unimodal model per modality) or user "
                                    "(score the features in features_file with linear probes)",
                          choices=SOURCES, cli=False)
    features_file: str | None = setting(
        None, "Bring your own features (npz/Arrow/Parquet keyed by sample key); confidences "
              "then come from cross-fitted linear probes.", flag="features", path="file")
    splits: tuple[str, ...] = setting(("train", "val", "test"), "splits to extract (ones the "
                                      "dataset lacks are skipped and listed)")
    warmup_epochs: int = setting(10, "warm-up: epochs of each unimodal model", min=0)
    batch_size: int = setting(64, "warm-up: batch size", min=1)
    lr: float = setting(1e-3, "warm-up: learning rate", min=0, min_open=True)
    optimizer: str = setting("adam", "warm-up: adam (weight decay 0) or sgd (momentum 0.9, "
                                     "weight decay 1e-4, as the MIDAS authors)", choices=OPTIMIZERS)
    feature_dim: int = setting(64, "warm-up: encoder output (feature) dimension", min=1)
    encoders: dict[str, Any] = setting({}, "warm-up: encoder per modality, a registered name or "
                                           "{'name': ..., **kwargs} (a modality left out gets "
                                           "default_encoder_for)", cli=False)
    seed: int = setting(0, "seed of the warm-up models and of the probes' folds", min=0)
    device: str = setting("auto", "warm-up: auto (CUDA when present), cpu, cuda, cuda:N")
    num_threads: int = setting(
        1, "torch CPU threads for the call; results are reproducible for a fixed thread count, "
           "and 1 is fastest for the small reference models (0: leave torch's setting)",
        min=0, flag="threads")
    probe_folds: int = setting(5, "user: folds of the cross-fitted probes", min=2)
    probe_epochs: int = setting(100, "user: L-BFGS iterations of each probe", min=1)
    probe_l2: float = setting(1e-3, "user: L2 penalty of the probes", min=0)

    def __post_init__(self) -> None:
        if self.num_threads is None:  # the Python API's former "leave torch's setting"
            self.num_threads = 0
        self.splits = (self.splits,) if isinstance(self.splits, str) else tuple(self.splits)
        self.encoders = dict(self.encoders or {})
        if self.features_file is not None:
            self.features_file = str(self.features_file)
        check_settings(self)
        check_device_name(self.device, "ExtractConfig.device")

    def to_dict(self) -> dict[str, Any]:
        return settings_dict(self)

    def replace(self, **changes: Any) -> ExtractConfig:
        return dataclasses.replace(self, **changes)
