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
# Encoders small enough to converge from scratch with Adam at a constant lr 1e-3 (feature
# vectors, small images); the others (ResNet-18 on spectrograms and frames) get the MIDAS
# authors' SGD schedule. The trainer's choice without --preset uses the same split.
SMALL_ENCODERS = ("mlp", "small_cnn")
SMALL_WARMUP = ("adam", 1e-3)
LARGE_WARMUP = ("sgd", 1e-3)


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
    lr: float | None = setting(None, "warm-up: learning rate (not given: 1e-3, see --optimizer)",
                               min=0, min_open=True)
    optimizer: str | None = setting(
        None, "warm-up: adam (weight decay 0) or sgd (momentum 0.9, weight decay 1e-4, as the "
              "MIDAS authors); not given: chosen per encoder, adam for mlp and small_cnn, sgd for "
              "resnet18 and other encoders", choices=OPTIMIZERS)
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

    def warmup_settings(self, encoders: dict[str, str]) -> tuple[dict[str, tuple[str, float]], str]:
        """Each modality's warm-up (optimizer, lr) for the encoder names `encoders` (modality
        -> name), and one line saying what was chosen and why ("" when both were given)."""
        return warmup_settings(encoders, self.optimizer, self.lr)

    def to_dict(self) -> dict[str, Any]:
        return settings_dict(self)

    def replace(self, **changes: Any) -> ExtractConfig:
        return dataclasses.replace(self, **changes)


def warmup_settings(encoders: dict[str, str], optimizer: str | None = None,
                    lr: float | None = None) -> tuple[dict[str, tuple[str, float]], str]:
    """Per modality the warm-up (optimizer, lr): the given ones, and for those not given the
    setting that converges for the modality's encoder (`SMALL_ENCODERS`: Adam lr 1e-3; other
    encoders: the authors' SGD lr 1e-3). Returns also one line saying what was chosen and
    why, or "" when both were given (nothing was chosen)."""
    chosen: dict[str, tuple[str, float]] = {}
    for m, name in encoders.items():
        opt, rate = SMALL_WARMUP if name in SMALL_ENCODERS else LARGE_WARMUP
        chosen[m] = (optimizer or opt, rate if lr is None else lr)
    if optimizer is not None and lr is not None:
        return chosen, ""
    groups: dict[tuple[str, float], list[str]] = {}
    for m, setting_ in chosen.items():
        groups.setdefault(setting_, []).append(f"{m}={encoders[m]}")
    parts = []
    for (opt, rate), mods in groups.items():
        small = all(e.split("=", 1)[1] in SMALL_ENCODERS for e in mods)
        what = (f"Adam lr {rate:g}" if opt == "adam"
                else f"SGD lr {rate:g} (momentum 0.9, weight decay 1e-4)")
        if optimizer is None:
            why = ("which converges for small encoders on feature vectors and small images" if small
                   else "the MIDAS authors' schedule for ResNet-18 encoders")
        else:
            why = f"--optimizer {optimizer} as given"
        parts.append(f"{what} for {', '.join(mods)}, {why}")
    given = "--lr to choose" if optimizer is not None else (
        "--optimizer to choose" if lr is not None else "--optimizer and --lr to choose")
    return chosen, f"warm-up settings: {'; '.join(parts)}. Name {given}."
