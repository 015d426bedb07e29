"""`TrainConfig`: the one place the reference trainer's defaults live.

The command line (trainers.cli_options) and `PAPER_PRESETS` only override fields of this
dataclass; every checkpoint and results.json stores `config.to_dict()`, and
`TrainConfig.from_dict` reads it back. Field help strings live here too (`metadata["help"]`)
so that the command line documents exactly these defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from midas_data.pipelines.registry import recipes

from midas_data.devices import check_device_name
from midas_data.features.config import SMALL_ENCODERS
from midas_data.options import check_settings
from midas_data.stream.partners import POLICIES, PartnerOptions

METHODS = ("midas", "joint", "unimodal")
ALPHA_UPDATES = ("epoch", "batch")
OPTIMIZERS = ("sgd", "adam")
PARTNER_FIELDS = ("swap_modalities", "knn_modalities", "knn_temperature", "similarity_modalities",
                  "similarity_temperature", "mined_fraction", "mined_ramp")


def _opt(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Settings of one training run. Defaults are the MIDAS authors' (docs/METHOD.md,
    "Authors' settings")."""

    method: str = _opt("midas", "midas (aligned CE + unimodal CE + lam * misaligned loss), "
                                "joint (aligned CE only) or unimodal (unimodal heads only)")
    policy: str = _opt("random", "partner policy of the stream: random (the paper's, the default); "
                                 "research policies (no significant gain over random): mined, "
                                 "mixed, soft, tempered")
    swap_modalities: list[str] = _opt([], "mined, mixed, soft, tempered: modalities that take the "
                                          "policy's partner (others get a random in-batch partner; "
                                          "names or weak/strong; empty: all)")
    knn_modalities: list[str] = _opt([], "mined, mixed, soft: modalities whose mined k-NN lists form "
                                         "the matching graph (names or weak/strong; empty: all)")
    knn_temperature: float = _opt(0.1, "soft: neighbours drawn by softmax(mined similarity / T)")
    similarity_modalities: list[str] = _opt([], "tempered: modalities whose stored-feature cosines "
                                                "weigh the draw (names or weak/strong; empty: all)")
    similarity_temperature: float = _opt(0.1, "tempered: in-batch partner drawn by "
                                              "softmax(feature cosine / T)")
    mined_fraction: float = _opt(0.5, "mixed: fraction of anchors paired on the mined graph")
    mined_ramp: list[int] = _opt([], "mixed: [start, end] epochs over which the mined "
                                     "fraction ramps up from 0 (empty: constant)")
    epochs: int = _opt(70, "training epochs (warm-up included)", min=1)
    warmup_epochs: int = _opt(10, "midas: first epochs train the unimodal heads only", min=0)
    lam: float = _opt(1.0, "midas: weight lambda of the misaligned loss", min=0)
    eta: float = _opt(0.05, "midas: step of the weak-modality weight alpha", min=0)
    alpha_update: str = _opt("epoch", "midas: refresh alpha once per epoch (epoch) or after "
                                      "every batch as the authors' code does (batch)")
    hard_weighting: bool = _opt(True, "midas: weight misaligned rows by 1 + (cos + 1) / 2")
    optimizer: str = _opt("sgd", "sgd (momentum, the authors') or adam")
    lr: float = _opt(1e-3, "learning rate", min=0, min_open=True)
    momentum: float = _opt(0.9, "sgd momentum", min=0, max=1, max_open=True)
    weight_decay: float = _opt(1e-4, "weight decay (sgd and adam)", min=0)
    batch_size: int = _opt(64, "anchors (aligned samples) per batch per rank", min=1)
    step_size: int = _opt(50, "StepLR: multiply the lr by gamma every step_size epochs (0 = never)",
                          min=0)
    gamma: float = _opt(0.1, "StepLR decay factor", min=0, min_open=True)
    feature_dim: int = _opt(64, "encoder output (shared feature) dimension", min=1)
    hidden: list[int] = _opt([128], "hidden layer sizes of mlp encoders")
    encoders: dict[str, str] = _opt({}, "encoder per modality (name in the midas_data.features.encoders "
                                        "registry); a modality left out is chosen automatically")
    modalities: list[str] = _opt([], "modalities to train on, in order (empty: all of the dataset)")
    seed: int = _opt(0, "seed of the model init, the stream order and the misaligned evaluation",
                     min=0)
    device: str = _opt("auto", "auto (CUDA when present), cpu, cuda, cuda:N")
    num_workers: int = _opt(0, "DataLoader workers for the train stream (0: in-process)", min=0)
    checkpoint_every: int = _opt(0, "also write last.pt every this many steps (0: once per epoch)",
                                 min=0)
    eval_batch_size: int = _opt(256, "batch size of validation and test passes", min=1)
    stats_samples: int = _opt(100_000, "train samples used for the input standardisation statistics",
                              min=0)
    deterministic: bool = _opt(True, "torch.use_deterministic_algorithms (exact resume on CPU)")
    preset: str = _opt("", "name of the preset these settings started from (for the record)")

    def __post_init__(self) -> None:
        self.hidden = [int(h) for h in self.hidden]
        self.modalities = [str(m) for m in self.modalities]
        for name in ("swap_modalities", "knn_modalities", "similarity_modalities"):
            setattr(self, name, [str(m) for m in getattr(self, name)])
        self.mined_ramp = [int(e) for e in self.mined_ramp]
        self.encoders = {str(k): str(v) for k, v in dict(self.encoders).items() if v is not None}
        self.validate()

    def validate(self) -> None:
        """Reject bad settings up front, saying what to use instead."""
        check_settings(self)  # the ranges in the fields' metadata (also the CLI's ranges)
        check_device_name(self.device, "TrainConfig.device")
        choices = {"method": METHODS, "alpha_update": ALPHA_UPDATES, "optimizer": OPTIMIZERS,
                   "policy": tuple(p for p in POLICIES if p != "none")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}; choose from {allowed}")
        for name in ("epochs", "warmup_epochs", "step_size", "checkpoint_every", "num_workers",
                     "stats_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "feature_dim", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        try:  # the stream's own check of the policy options
            options = {name: getattr(self, name) for name in PARTNER_FIELDS}
            PartnerOptions(self.policy, **options).validate(
                self.batch_size if self.method == "midas" else None)
        except ValueError as e:
            raise ValueError(f"TrainConfig.{e}") from None
        if self.lr <= 0 or self.eta < 0 or self.lam < 0:
            raise ValueError("TrainConfig: lr must be > 0, eta and lam >= 0")
        if self.method == "midas" and self.epochs and self.warmup_epochs >= self.epochs:
            raise ValueError(f"TrainConfig: warmup_epochs={self.warmup_epochs} leaves no MIDAS epoch "
                             f"of epochs={self.epochs}; lower warmup_epochs or raise epochs")

    def partner_options(self) -> dict[str, Any]:
        """Keyword arguments of the train stream's partner policy (`MidasDataset`); methods
        other than midas build no misaligned samples and get policy none."""
        if self.method != "midas":
            return {"policy": "none"}
        return {"policy": self.policy, **{name: getattr(self, name) for name in PARTNER_FIELDS}}

    # -- (de)serialisation: plain dicts, so checkpoints load with torch.load(weights_only=True)
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """The preset's settings, then `overrides` (None values are ignored)."""
        if name not in PAPER_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PAPER_PRESETS)}")
        values = {**PAPER_PRESETS[name], "preset": name}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# Each pipeline's RECIPE, keyed by pipeline name (the authors' settings for the paper's data
# sets, docs/METHOD.md "Authors' settings"; the independent prototype's protocol for mfeat,
# docs/REFERENCE_RESULTS.md). The recipes live beside their readers, so there is one copy.
PAPER_PRESETS: dict[str, dict[str, Any]] = recipes()


# -- settings for a run without --preset ---------------------------------------------------
# Small encoders trained from scratch on feature vectors or small images converge with the
# mfeat protocol (Adam, constant lr) and not with the authors' SGD lr 1e-3 schedule, which
# was tuned for ResNet-18 on spectrograms and frames (a small MLP under it is still
# improving after 70 epochs and leaves the weak view unused). SMALL_ENCODERS is the same
# split `extract` makes for its warm-up models.


def settings_for_encoders(encoders: dict[str, str]) -> tuple[str, str]:
    """(preset, reason) for a run without --preset, from each modality's encoder name."""
    small = sorted(m for m, e in encoders.items() if e in SMALL_ENCODERS)
    large = {m: e for m, e in sorted(encoders.items()) if e not in SMALL_ENCODERS}
    if not large:
        return "mfeat", (f"every modality has a small encoder ({', '.join(f'{m}={encoders[m]}' for m in small)}): "
                         "the mfeat protocol (Adam lr 1e-3, constant lr, batch 64, 60 epochs, warm-up 10), "
                         "which converges on feature vectors and small images")
    return "cremad", (f"{', '.join(f'{m}={e}' for m, e in large.items())}: the authors' schedule for "
                      "ResNet-18 encoders (SGD lr 1e-3, momentum 0.9, weight decay 1e-4, batch 64, "
                      "70 epochs, StepLR x0.1 at 50, warm-up 10)")
