"""Partner policies: which in-batch row lends each anchor the modality it swaps.

A policy does two things, both pure functions of (seed, epoch, position in the order),
so that every rank and DataLoader worker computes the same plan:

- ``order(seed, epoch)``: the epoch's order of the split's rows, and ``partner_of`` [n]
  (each anchor's matched partner, -1 = none) for the *paired* policies, which lay every
  matched pair at an even position of the order (they need an even batch size, and the
  stream splits their final step in units of two so that no pair is cut);
- ``assign(rows, labels, partner_of, seed, epoch, first)``: the in-batch partner of every
  row of one batch for every modality, int64 [b, M] (-1 = no different-label row), or
  None when the policy builds no misaligned samples. ``first`` is the batch's global
  position in the order, the seed of its randomness.

`POLICIES` maps each name to its class, the way MosaicML Streaming picks a shuffle
algorithm from a name-keyed table; `make_policy` builds one from `PartnerOptions`, whose
`validate` is the one check of the options (used by `MidasDataset` and `TrainConfig`).

Public: ``none`` (aligned samples only) and ``random`` (the paper's construction: a
different-label partner from the same batch, drawn afresh every epoch; the default).
`RESEARCH_POLICIES` are experimental: none showed a significant gain over ``random``
(docs/partner_study.md, docs/partner_selection.md); they stay for reproducing that study.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from midas_data.errors import MidasDataError, SchemaError, where
from midas_data.features.tables import Features
from midas_data.loss import weak_and_strong

from . import epoch_plan as plan
from .knn_graph import load_knn_graph

_MIXED_TAG = 0x313D
_TEMPERED_TAG = 0x7E3D


@dataclass
class PartnerOptions:
    """A partner policy and its options (modality names may be "weak" or "strong": the
    lowest / highest mean stored confidence, see `resolve_modalities`).

    swap_modalities: which modalities take the policy's chosen partner (default: all); the
        others get the random in-batch partner, so a matched pair does not yield the same
        misaligned sample twice. Policies mined, mixed, soft, tempered.
    knn_modalities: whose mined k-NN lists form the matching graph (default: all).
        Policies mined, mixed, soft.
    knn_temperature: policy soft: a neighbour is drawn with probability
        softmax(mined similarity / knn_temperature) over the anchor's k-NN list.
    similarity_modalities: policy tempered: whose stored-feature cosines (averaged) weigh
        the draw (default: all).
    similarity_temperature: policy tempered: the partner is drawn among the batch's
        other-label rows with probability softmax(cosine / similarity_temperature).
    mined_fraction: policy mixed: the fraction of anchors matched on the graph (the rest
        get random partners).
    mined_ramp: policy mixed: (start, end) epochs over which the fraction grows linearly
        from 0 to mined_fraction (None: constant).
    """

    policy: str = "random"
    swap_modalities: Sequence[str] = ()
    knn_modalities: Sequence[str] = ()
    knn_temperature: float = 0.1
    similarity_modalities: Sequence[str] = ()
    similarity_temperature: float = 0.1
    mined_fraction: float = 0.5
    mined_ramp: Sequence[int] | None = None

    def __post_init__(self) -> None:
        self.swap_modalities = tuple(str(m) for m in self.swap_modalities or ())
        self.knn_modalities = tuple(str(m) for m in self.knn_modalities or ())
        self.similarity_modalities = tuple(str(m) for m in self.similarity_modalities or ())
        self.mined_ramp = tuple(int(e) for e in self.mined_ramp) if self.mined_ramp else None

    def validate(self, batch_size: int | None = None) -> None:
        """Raise ValueError naming the first bad option and what to use instead."""
        if self.policy not in POLICIES:
            raise ValueError(f"policy {self.policy!r} is unknown; choose from {tuple(POLICIES)}")
        cls = POLICIES[self.policy]
        for name, users in _OPTION_USERS.items():
            value = getattr(self, name)
            if value and self.policy not in users:
                raise ValueError(f"{name} applies to policies {users}; policy is {self.policy!r}")
        ramp = self.mined_ramp
        if ramp is not None and (len(ramp) != 2 or not 0 <= ramp[0] <= ramp[1]):
            raise ValueError(f"mined_ramp must be (start, end) epochs with 0 <= start <= end, got {ramp}")
        if not 0.0 <= self.mined_fraction <= 1.0:
            raise ValueError(f"mined_fraction must be in [0, 1], got {self.mined_fraction}")
        for name in ("knn_temperature", "similarity_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if batch_size is not None and cls.paired and batch_size % 2:
            raise ValueError(f"policy {self.policy!r} pairs anchors inside a batch: use an even "
                             f"batch_size, got {batch_size}")


# Options whose non-empty value only some policies read (giving it to another is a mistake).
_OPTION_USERS = {
    "swap_modalities": ("mined", "mixed", "soft", "tempered"),
    "knn_modalities": ("mined", "mixed", "soft"),
    "similarity_modalities": ("tempered",),
    "mined_ramp": ("mixed",),
}


def resolve_modalities(names: Sequence[str], modalities: Sequence[str], features: Features | None,
                       root: Path) -> tuple[str, ...]:
    """Modality names, with "weak"/"strong" resolved by mean stored confidence (the tie rule
    of `midas_data.loss.weak_and_strong`); empty `names` means all `modalities`."""
    if not names:
        return tuple(modalities)
    out = []
    for name in names:
        if name in ("weak", "strong"):
            if features is None:
                raise MidasDataError(f"{where(root / 'features')}: '{name}' needs stored "
                                     "confidences; run `midas-data extract`")
            weak, strong = weak_and_strong([float(np.mean(features.confs[m])) for m in modalities])
            name = modalities[weak if name == "weak" else strong]
        if name not in modalities:
            raise SchemaError(f"{where(root / 'manifest.json', field=name)}: no such modality")
        out.append(name)
    return tuple(out)


@dataclass(frozen=True)
class SplitData:
    """What a policy may read about the split it serves."""

    root: Path
    split: str
    modalities: list[str]  # the stream's modalities, in the order of the batch's columns
    dataset_modalities: list[str]
    num_samples: int
    features: Features | None
    shuffle: bool = True  # False: unpaired policies keep the index order


class PartnerPolicy:
    """Base of the policies: epoch order and in-batch partners. Subclasses set `name`."""

    name: ClassVar[str]
    paired: ClassVar[bool] = False  # order() lays matched pairs at even positions

    def __init__(self, options: PartnerOptions, data: SplitData):
        self.options, self.data = options, data
        self.swap = [data.modalities.index(m) for m in options.swap_modalities]

    def order(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
        n = self.data.num_samples
        if not self.data.shuffle:
            return np.arange(n, dtype=np.int64), None
        return plan.epoch_order(n, seed, epoch), None

    def assign(self, rows: np.ndarray, labels: np.ndarray, partner_of: np.ndarray | None,
               seed: int, epoch: int, first: int) -> np.ndarray | None:
        """The random in-batch different-label partner (`epoch_plan.assign_partners`)."""
        rng = plan.partner_rng(seed, epoch, first)
        return plan.assign_partners(labels, len(self.data.modalities), rng)

    def assign_many(self, rows: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                    partner_of: np.ndarray | None, seed: int, epoch: int,
                    firsts: Sequence[int]) -> list[np.ndarray | None]:
        """`assign` of several batches (rows, labels and first position of each): the same
        partners; a policy may compute them together."""
        return [self.assign(r, y, partner_of, seed, epoch, f) for r, y, f in zip(rows, labels, firsts)]


class NoPartners(PartnerPolicy):
    """Aligned samples only (evaluation, Joint and unimodal training)."""

    name = "none"

    def assign(self, rows: np.ndarray, labels: np.ndarray, partner_of: np.ndarray | None,
               seed: int, epoch: int, first: int) -> None:
        return None


class RandomPartners(PartnerPolicy):
    """The paper's partner: a different-label row of the same batch, fresh every epoch."""

    name = "random"

    def assign_many(self, rows: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                    partner_of: np.ndarray | None, seed: int, epoch: int,
                    firsts: Sequence[int]) -> list[np.ndarray | None]:
        """The batches' partners vectorised across them (`epoch_plan.assign_partners_many`),
        each batch's draws from its own generator as `assign` makes them."""
        rngs = [plan.partner_rng(seed, epoch, f) for f in firsts]
        return list(plan.assign_partners_many(labels, len(self.data.modalities), rngs))


class MinedPartners(PartnerPolicy):
    """The epoch is ordered as a random maximal matching on the mined k-NN graph of
    `knn_modalities`, so each matched anchor's partner is one of its mined neighbours and
    sits in the same batch; it lends the `swap_modalities`, the other modalities (and
    unmatched anchors) get the random partner."""

    name = "mined"
    paired = True

    def __init__(self, options: PartnerOptions, data: SplitData):
        super().__init__(options, data)
        self.neighbours, self.similarities = load_knn_graph(
            data.root, data.split, data.features, list(options.knn_modalities),
            data.dataset_modalities, self.name)

    def graph(self, seed: int, epoch: int) -> np.ndarray:
        """The neighbour lists matched in `epoch` ([n, k], -1 = none)."""
        return self.neighbours

    def neighbour_probs(self) -> np.ndarray | None:
        """Sampling weights of the neighbours in the matching (None: uniform)."""
        return None

    def order(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        return plan.matched_order(self.data.num_samples, self.graph(seed, epoch), seed, epoch,
                                  self.neighbour_probs())

    def assign(self, rows: np.ndarray, labels: np.ndarray, partner_of: np.ndarray | None,
               seed: int, epoch: int, first: int) -> np.ndarray:
        partner = super().assign(rows, labels, partner_of, seed, epoch, first)
        pos = {int(r): i for i, r in enumerate(rows)}
        for i, r in enumerate(rows):  # matched partners sit in the same batch: use them
            j = pos.get(int(partner_of[r]), -1)
            if j >= 0 and labels[j] != labels[i]:
                partner[i, self.swap] = j
        return partner


class MixedPartners(MinedPartners):
    """`mined_fraction` of the anchors (ramped over `mined_ramp`) are matched on the
    graph in an epoch; the rest get random partners (a curriculum from random to mined)."""

    name = "mixed"

    def fraction_at(self, epoch: int) -> float:
        """The fraction of anchors paired on the mined graph in `epoch`."""
        ramp = self.options.mined_ramp
        if ramp is None:
            return self.options.mined_fraction
        start, end = ramp
        t = 1.0 if end == start else (epoch - start) / (end - start)
        return self.options.mined_fraction * float(np.clip(t, 0.0, 1.0))

    def graph(self, seed: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([seed, epoch, _MIXED_TAG])
        on_graph = rng.random(self.data.num_samples) < self.fraction_at(epoch)
        return np.where(on_graph[:, None], self.neighbours, -1)


class SoftPartners(MinedPartners):
    """The matching draws each neighbour with probability softmax(mined similarity /
    `knn_temperature`) instead of uniformly: the most similar neighbour as the
    temperature shrinks, uniform over the k-NN list as it grows."""

    name = "soft"

    def __init__(self, options: PartnerOptions, data: SplitData):
        super().__init__(options, data)
        z = self.similarities / options.knn_temperature
        z = z - z.max(axis=1, keepdims=True)
        p = np.where(self.neighbours >= 0, np.exp(z), 0.0)
        self.probs = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-300)

    def neighbour_probs(self) -> np.ndarray:
        return self.probs


class TemperedPartners(PartnerPolicy):
    """No mined pairs: each anchor draws its `swap_modalities` partner among the batch's
    other-label rows with probability softmax(mean cosine of the stored features of
    `similarity_modalities` / `similarity_temperature`): the paper's random partner as the
    temperature grows, the batch's nearest as it shrinks."""

    name = "tempered"

    def __init__(self, options: PartnerOptions, data: SplitData):
        super().__init__(options, data)
        if data.features is None:
            raise MidasDataError(f"{where(data.root / 'features' / f'{data.split}.arrow')}: policy "
                                 "'tempered' needs stored features; run `midas-data extract`")

    def assign(self, rows: np.ndarray, labels: np.ndarray, partner_of: np.ndarray | None,
               seed: int, epoch: int, first: int) -> np.ndarray:
        """Gumbel-max sampling; the RNG depends on seed, epoch and the batch's global
        position only, so any worker count or world size draws the same."""
        partner = super().assign(rows, labels, partner_of, seed, epoch, first)
        b = len(rows)
        if b < 2:
            return partner
        mods = self.options.similarity_modalities
        sim = np.zeros((b, b))
        for m in mods:
            f = self.data.features.feats[m][rows].astype(np.float64)
            f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
            sim += f @ f.T
        logits = sim / (len(mods) * self.options.similarity_temperature)
        logits[labels[:, None] == labels[None, :]] = -np.inf  # same label, and self
        rng = np.random.default_rng([int(seed), int(epoch), int(first), _TEMPERED_TAG])
        choice = np.argmax(logits + rng.gumbel(size=(b, b)), axis=1)
        has = np.flatnonzero(np.isfinite(logits).any(axis=1))
        partner[np.ix_(has, self.swap)] = choice[has][:, None]
        return partner


POLICIES: dict[str, type[PartnerPolicy]] = {
    cls.name: cls for cls in (NoPartners, RandomPartners, MinedPartners, MixedPartners,
                              SoftPartners, TemperedPartners)
}
# Experimental: no significant gain over `random` in docs/partner_study.md (10 seeds, six
# sets) or in the validation rounds of docs/partner_selection.md; kept to reproduce them.
RESEARCH_POLICIES = frozenset({"mined", "mixed", "soft", "tempered"})


def make_policy(options: PartnerOptions, data: SplitData) -> PartnerPolicy:
    """The policy of `options` for `data`, with its modality names resolved (options are
    validated by the caller, which knows the batch size)."""
    resolved = dataclasses.replace(
        options, **{name: resolve_modalities(getattr(options, name), data.modalities,
                                             data.features, data.root)
                    for name in ("swap_modalities", "knn_modalities", "similarity_modalities")})
    return POLICIES[options.policy](resolved, data)
