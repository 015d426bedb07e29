"""`MidasDataset`: a torch IterableDataset of batches of aligned samples with misaligned partners.

It yields whole batches (use it with `DataLoader(ds, batch_size=None, num_workers=...)` or
`MidasLoader`), because exactly-once delivery with equal batch counts per rank is decided
per batch: every rank and worker recomputes the epoch plan from (seed, epoch) and keeps
its own batches (midas_data.stream.epoch_plan). Misaligned samples are expressed by an in-batch
partner index per swapped modality (`partner[b, m]`), the paper's in-batch construction,
so a trainer can swap encoder features at no extra cost; `materialize_misaligned` turns
them into ready-made inputs for model-agnostic users. See docs/CONTRACTS.md for the layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from midas_data.dataset.reader import Dataset, open_dataset
from midas_data.errors import CorruptShardError, MidasDataError, SchemaError, where
from midas_data.features.tables import read_features
from midas_data.loss import hard_weight_from_similarity

from . import epoch_plan as plan

POLICIES = ("none", "random", "mined", "mixed", "soft", "tempered")
_TEMPERED_TAG = 0x7E3D


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed, else the torchrun environment, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class MidasDataset(IterableDataset):
    """Batches of one split: aligned inputs, labels, and misaligned partners with weights.

    policy: `random` (a different-label in-batch partner, drawn afresh each epoch: the
    paper), `mined` (the epoch is ordered as a random matching on the mined k-NN graph so
    that each anchor's partner is one of its mined neighbours, in the same batch), `mixed`
    (`mined_fraction` of the anchors matched on the graph, the rest random), `soft`
    (matching on the graph with neighbours drawn with probability softmax(s / temperature)),
    `tempered` (each anchor draws its in-batch different-label partner with probability
    softmax(cos / temperature) over the stored features of `graph_modalities`: uniform, the
    paper's random partner, as temperature grows; the batch's nearest as it shrinks; no
    mined pairs needed, only features), `none` (aligned only).
    mined_ramp: (start, end) epochs: policy `mixed` ramps its fraction linearly from 0 at
    `start` to `mined_fraction` at `end` (a curriculum from random to mined partners).
    graph_modalities: whose mined k-NN lists form the matching graph (default: all);
    mined_swap: which modalities take the mined partner (default: all; the others get a
    random in-batch partner, so a matched pair yields distinct misaligned samples). Both
    accept modality names or "weak"/"strong" (lowest/highest mean stored confidence).
    on_error: `raise` (default: a damaged shard stops the epoch naming shard and key) or
    `skip` (drop the sample, and report its key in `batch["skipped"]`).
    root may be a URL (s3://, gs://, https://): shards are then read through a local cache
    (`cache_dir`, bounded by `cache_limit` bytes; `storage_options` go to fsspec), or a
    dataset already opened with `open_dataset(url, ...)` for the other remote options.
    """

    def __init__(self, root: str | Path | Dataset, split: str = "train", *, batch_size: int = 64,
                 policy: str = "random", mined_fraction: float = 0.5, temperature: float = 0.1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 modalities: list[str] | None = None, transform: Callable | None = None,
                 on_error: str = "raise", rank: int | None = None, world_size: int | None = None,
                 use_features: bool = True, graph_modalities: list[str] | None = None,
                 mined_swap: list[str] | None = None, mined_ramp: tuple[int, int] | None = None,
                 storage_options: dict | None = None, cache_dir: str | Path | None = None,
                 cache_limit: int | str | None = None):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")
        if on_error not in ("raise", "skip"):
            raise ValueError("on_error must be 'raise' or 'skip'")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if mined_ramp is not None and (len(mined_ramp) != 2 or not 0 <= mined_ramp[0] <= mined_ramp[1]):
            raise ValueError(f"mined_ramp must be (start, end) epochs with 0 <= start <= end, got {mined_ramp}")
        if mined_ramp is not None and policy != "mixed":
            raise ValueError(f"mined_ramp ramps the mined fraction of policy 'mixed'; policy is {policy!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if policy in ("mined", "mixed", "soft") and batch_size % 2:
            raise ValueError("mined partner policies pair anchors inside a batch: use an even batch_size")
        self.split = split  # root may be a URL: open_dataset caches it, self.root is local
        self.ds = root if isinstance(root, Dataset) else open_dataset(
            root, storage_options=storage_options, cache_dir=cache_dir, cache_limit=cache_limit)
        self.root = self.ds.root
        self.reader = self.ds.split(split)
        self.modalities = list(modalities or self.ds.modalities)
        unknown = [m for m in self.modalities if m not in self.ds.modalities]
        if unknown:
            raise SchemaError(f"{where(self.root / 'manifest.json', field=unknown[0])}: no such modality")
        self.batch_size, self.policy, self.seed = batch_size, policy, seed
        self.mined_fraction, self.temperature = mined_fraction, temperature
        self.mined_ramp = None if mined_ramp is None else (int(mined_ramp[0]), int(mined_ramp[1]))
        self.shuffle, self.drop_last, self.transform, self.on_error = shuffle, drop_last, transform, on_error
        self._rank, self._world = rank, world_size
        self.epoch, self.offset = 0, 0
        self._exhausted = False  # set when an iteration ran to the end of the epoch
        self.features = None
        feat_path = self.root / "features" / f"{split}.arrow"
        if use_features and feat_path.exists():
            self.features = read_features(feat_path, self.ds.fingerprint)  # stale -> clear error
            if self.features.keys != self.reader.keys:
                raise SchemaError(f"{where(feat_path, field='key')}: rows do not match the split's "
                                  "index; rerun `midas-data extract`")
        self.neighbours = self.neighbour_sims = None
        self.graph_modalities = self.resolve_modalities(graph_modalities)
        self.mined_swap = self.resolve_modalities(mined_swap)
        if policy in ("mined", "mixed", "soft"):
            self._load_neighbours()
        if policy == "tempered" and self.features is None:
            raise MidasDataError(f"{where(self.root / 'features' / f'{split}.arrow')}: policy "
                                 "'tempered' needs stored features; run `midas-data extract`")

    def resolve_modalities(self, names: list[str] | None) -> list[str]:
        """Modality names, with 'weak'/'strong' chosen by mean stored train confidence."""
        if not names:
            return list(self.modalities)
        out = []
        for name in names:
            if name in ("weak", "strong"):
                if self.features is None:
                    raise MidasDataError(f"{where(self.root / 'features')}: '{name}' needs stored "
                                         "confidences; run `midas-data extract`")
                conf = [float(np.mean(self.features.confs[m])) for m in self.modalities]
                name = self.modalities[int(np.argmin(conf) if name == "weak" else np.argmax(conf))]
            if name not in self.modalities:
                raise SchemaError(f"{where(self.root / 'manifest.json', field=name)}: no such modality")
            out.append(name)
        return out

    # -- mined graph ---------------------------------------------------------------------
    def _load_neighbours(self) -> None:
        from midas_data.mining.pairs import read_pairs

        if self.features is None:
            raise MidasDataError(f"{where(self.root / 'features')}: policy {self.policy!r} needs "
                                 "features and mined pairs; run `midas-data extract` then "
                                 "`midas-data mine-misaligned`")
        t = read_pairs(self.root, self.split, self.features.fingerprint)
        self._check_pairs(t)
        keep = np.isin(np.asarray(t.column("modality").to_pylist()), self.graph_modalities)
        anchor = t.column("anchor_row").to_numpy()[keep]
        partner = t.column("partner_row").to_numpy()[keep]
        sim = t.column("similarity").to_numpy().astype(np.float64)[keep]
        n = len(self.reader)
        counts = np.bincount(anchor, minlength=n)
        width = int(counts.max()) if len(counts) else 0
        order = np.argsort(anchor, kind="stable")
        slot = np.arange(len(anchor)) - np.repeat(np.cumsum(counts) - counts, counts)
        nb = np.full((n, width), -1, np.int64)
        sims = np.full((n, width), -np.inf)
        nb[anchor[order], slot] = partner[order]
        sims[anchor[order], slot] = sim[order]
        self.neighbours, self.neighbour_sims = nb, sims

    def _check_pairs(self, t) -> None:
        """Rows in range, no nulls, labels that agree with the features and always differ."""
        parts = sorted((self.root / "pairs" / self.split).glob("part-*.arrow"))
        path = ", ".join(str(q) for q in parts) or self.root / "pairs" / self.split
        n = len(self.reader)
        for col in ("anchor_row", "partner_row", "similarity", "modality", "anchor_label", "partner_label"):
            if col not in t.column_names or t.column(col).null_count:
                raise SchemaError(f"{where(path, field=col)}: column missing or has nulls; "
                                  "rerun `midas-data mine-misaligned`")
        a, p = t.column("anchor_row").to_numpy(), t.column("partner_row").to_numpy()
        bad = np.flatnonzero((a < 0) | (a >= n) | (p < 0) | (p >= n))
        if len(bad):
            raise SchemaError(f"{where(path, field='anchor_row/partner_row')}: row {int(bad[0])} points "
                              f"outside the split's {n} samples; rerun `midas-data mine-misaligned`")
        labels = self.features.labels
        la, lp = t.column("anchor_label").to_numpy(), t.column("partner_label").to_numpy()
        bad = np.flatnonzero((labels[a] != la) | (labels[p] != lp) | (la == lp))
        if len(bad):
            key = self.reader.keys[int(a[bad[0]])]
            raise SchemaError(f"{where(path, key, 'anchor_label/partner_label')}: labels disagree with "
                              "the features table or coincide; rerun `midas-data mine-misaligned`")
        sim = t.column("similarity").to_numpy()
        if not np.all(np.isfinite(sim)):
            raise SchemaError(f"{where(path, field='similarity')}: non-finite values")
        unknown = set(t.column("modality").unique().to_pylist()) - set(self.ds.modalities)
        if unknown:
            raise SchemaError(f"{where(path, field='modality')}: unknown modalities {sorted(unknown)}")

    def _neighbour_probs(self) -> np.ndarray | None:
        if self.policy != "soft":
            return None
        z = self.neighbour_sims / max(self.temperature, 1e-6)
        z = z - z.max(axis=1, keepdims=True)
        p = np.where(self.neighbours >= 0, np.exp(z), 0.0)
        return p / np.maximum(p.sum(axis=1, keepdims=True), 1e-300)

    # -- epoch plan ----------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (call once per epoch, as with DistributedSampler)."""
        if epoch != self.epoch:
            self.epoch, self.offset, self._exhausted = int(epoch), 0, False

    def _order(self) -> tuple[np.ndarray, np.ndarray | None]:
        n = len(self.reader)
        if self.policy in ("mined", "mixed", "soft"):
            nb = self.neighbours
            if self.policy == "mixed":
                rng = np.random.default_rng([self.seed, self.epoch, 0x313D])
                nb = np.where((rng.random(n) < self.fraction_at(self.epoch))[:, None], nb, -1)
            order, partner_of = plan.matched_order(n, nb, self.seed, self.epoch, self._neighbour_probs())
            return order, partner_of
        if not self.shuffle:
            return np.arange(n, dtype=np.int64), None
        return plan.epoch_order(n, self.seed, self.epoch), None

    def fraction_at(self, epoch: int) -> float:
        """Policy `mixed`: the fraction of anchors paired on the mined graph in `epoch`."""
        if self.mined_ramp is None:
            return self.mined_fraction
        start, end = self.mined_ramp
        ramp = 1.0 if end == start else (epoch - start) / (end - start)
        return self.mined_fraction * float(np.clip(ramp, 0.0, 1.0))

    def rank_world(self) -> tuple[int, int]:
        rank, world = dist_info()
        return (self._rank if self._rank is not None else rank,
                self._world if self._world is not None else world)

    def _paired(self) -> bool:
        return self.policy in ("mined", "mixed", "soft")

    def __len__(self) -> int:
        """Batches this rank yields for the rest of the current epoch."""
        _, world = self.rank_world()
        return plan.num_batches(len(self.reader) - self.offset, self.batch_size, world, self.drop_last)

    def begin_epoch(self) -> None:
        """An epoch that an iteration ran to its end rolls over when iteration starts again.

        A state loaded at the end of an epoch (offset == len) is not rolled over: its
        iteration yields nothing, so a resumed trainer can finish that epoch's bookkeeping.
        """
        if self._exhausted:
            self.epoch, self.offset, self._exhausted = self.epoch + 1, 0, False

    def __iter__(self):
        rank, world = self.rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is None:
            self.begin_epoch()
        order, partner_of = self._order()
        start = self.offset
        spans = plan.batch_spans(len(order), start, self.batch_size, world, rank,
                                 self.drop_last, pair_aligned=self._paired())
        step = self.batch_size * world
        if hasattr(self.reader, "plan_reads"):  # remote root: fetch this worker's shards ahead
            self.reader.plan_reads([order[lo:hi] for lo, hi in spans[worker::workers]])
        for k in range(worker, len(spans), workers):
            lo, hi = (int(v) for v in spans[k])
            batch = self._make_batch(order, partner_of, lo, hi)
            # Global items consumed once every rank has finished this step (DDP lockstep).
            batch["stream_state"] = {"seed": self.seed, "epoch": self.epoch,
                                     "offset": min(start + (k + 1) * step, len(order))}
            if info is None:
                self.offset = batch["stream_state"]["offset"]
            yield batch
        if info is None:
            self.offset = len(order)  # epoch done (items dropped by drop_last included)
            self._exhausted = True

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Position in the epoch. In-process iteration tracks it; with workers use MidasLoader."""
        return {"seed": self.seed, "epoch": self.epoch, "offset": self.offset,
                "num_samples": len(self.reader), "policy": self.policy, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume mid-epoch: the remaining global order is identical, for any worker count or
        world size (the remaining items are re-split across the new ranks)."""
        if state.get("num_samples", len(self.reader)) != len(self.reader):
            raise MidasDataError(f"{where(self.root, field='num_samples')}: state is for a split of "
                                 f"{state['num_samples']} samples, this one has {len(self.reader)}")
        if state.get("seed", self.seed) != self.seed:
            raise MidasDataError(f"stream state has seed {state['seed']}, dataset seed is {self.seed}")
        if state.get("policy", self.policy) != self.policy:
            raise MidasDataError(f"stream state has policy {state['policy']!r}, dataset has {self.policy!r}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._exhausted = False
        if self._paired() and self.offset % 2:
            raise MidasDataError("a paired policy cannot resume from an odd offset")

    # -- batch assembly ------------------------------------------------------------------
    def _read(self, rows: np.ndarray) -> tuple[list[dict], list[str]]:
        try:
            return self.reader.get_many(rows, self.modalities), []
        except (CorruptShardError, SchemaError):
            if self.on_error == "raise":
                raise
        good, skipped = [], []  # slow path: find exactly which samples are damaged
        for r in rows:
            try:
                good.extend(self.reader.get_many(np.array([r]), self.modalities))
            except (CorruptShardError, SchemaError):
                skipped.append(self.reader.keys[int(r)])
        return good, skipped

    def _make_batch(self, order: np.ndarray, partner_of: np.ndarray | None, lo: int, hi: int) -> dict:
        rows = order[lo:hi]
        samples, skipped = self._read(rows)
        if skipped:
            keep = ~np.isin(np.array([self.reader.keys[int(r)] for r in rows]), skipped)
            rows = rows[keep]
        if self.transform is not None:
            samples = [self.transform(s) for s in samples]
        batch = collate(samples, self.modalities)
        if not samples:  # an empty final batch keeps ranks in step; give it the right shapes
            batch["inputs"] = {m: self._empty(m) for m in self.modalities}
        batch["row"] = torch.from_numpy(rows.copy())
        batch["skipped"] = skipped
        if self.policy != "none":
            self._add_partners(batch, rows, partner_of, lo)
        return batch

    def _empty(self, m: str) -> torch.Tensor | list:
        spec = self.ds.schema[m]
        if spec["kind"] == "text" or spec["shape"] is None or None in spec["shape"]:
            return []
        return torch.from_numpy(np.zeros((0, *spec["shape"]), dtype=np.dtype(spec["dtype"])))

    def _add_partners(self, batch: dict, rows: np.ndarray, partner_of, lo: int) -> None:
        labels = self.reader.labels[rows]
        M, b = len(self.modalities), len(rows)
        partner = plan.assign_partners(labels, M, plan.partner_rng(self.seed, self.epoch, lo))
        if partner_of is not None:  # mined pairs sit in the same batch: use them
            pos = {int(r): i for i, r in enumerate(rows)}
            swap = [self.modalities.index(m) for m in self.mined_swap]
            for i, r in enumerate(rows):
                j = pos.get(int(partner_of[r]), -1)
                if j >= 0 and labels[j] != labels[i]:
                    partner[i, swap] = j
        if self.policy == "tempered":
            self._tempered_partners(partner, rows, labels, lo)
        batch["partner"] = torch.from_numpy(partner)
        valid = partner >= 0
        safe = np.where(valid, partner, 0)
        batch["partner_label"] = torch.from_numpy(np.where(valid, labels[safe], -1))
        conf = np.full((b, M), np.nan, np.float32)
        sim = np.full((b, M), np.nan, np.float32)
        if self.features is not None:
            for mi, m in enumerate(self.modalities):
                conf[:, mi] = self.features.confs[m][rows]
                f = self.features.feats[m][rows]
                f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
                sim[:, mi] = np.einsum("bd,bd->b", f, f[safe[:, mi]])
        kept = np.nansum(conf, axis=1, keepdims=True) - conf  # anchor's kept modalities
        partner_c = np.take_along_axis(conf, safe, axis=0) if b else conf
        with np.errstate(invalid="ignore", divide="ignore"):
            w = kept / (kept + partner_c)
        w = np.where(np.isfinite(w), w, 0.5).astype(np.float32)
        batch["conf"] = torch.from_numpy(conf)
        batch["similarity"] = torch.from_numpy(np.where(valid, sim, np.nan).astype(np.float32))
        hard = np.where(np.isfinite(sim), hard_weight_from_similarity(torch.from_numpy(sim)).numpy(), 1.0)
        batch["hard_weight"] = torch.from_numpy(np.where(valid, hard, 0.0).astype(np.float32))
        batch["anchor_weight"] = torch.from_numpy(np.where(valid, w, 0.0).astype(np.float32))
        batch["partner_weight"] = torch.from_numpy(np.where(valid, 1.0 - w, 0.0).astype(np.float32))

    def _tempered_partners(self, partner: np.ndarray, rows: np.ndarray, labels: np.ndarray,
                           lo: int) -> None:
        """Overwrite the `mined_swap` columns of `partner` with partners drawn by
        softmax(mean cosine over `graph_modalities` / temperature) among the batch's rows of
        another label (Gumbel-max sampling; the RNG depends on seed, epoch and the batch's
        global position only, so any worker count or world size draws the same)."""
        b = len(rows)
        if b < 2:
            return
        sim = np.zeros((b, b))
        for m in self.graph_modalities:
            f = self.features.feats[m][rows].astype(np.float64)
            f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
            sim += f @ f.T
        logits = sim / (len(self.graph_modalities) * self.temperature)
        logits[labels[:, None] == labels[None, :]] = -np.inf  # same label, and self
        rng = np.random.default_rng([int(self.seed), int(self.epoch), int(lo), _TEMPERED_TAG])
        choice = np.argmax(logits + rng.gumbel(size=(b, b)), axis=1)
        has = np.flatnonzero(np.isfinite(logits).any(axis=1))
        swap = [self.modalities.index(m) for m in self.mined_swap]
        partner[np.ix_(has, swap)] = choice[has][:, None]


def collate(samples: list[dict], modalities: list[str]) -> dict:
    """Stack decoded samples: {'key': [...], 'label': int64 [B], 'inputs': {m: [B, ...]}}."""
    inputs = {}
    for m in modalities:
        vals = [s[m] for s in samples]
        if vals and isinstance(vals[0], str):
            inputs[m] = vals  # text stays a list of strings for the user's tokenizer
        elif vals and isinstance(vals[0], torch.Tensor):
            inputs[m] = torch.stack(vals)
        else:
            inputs[m] = torch.from_numpy(np.stack(vals)) if vals else torch.empty(0)
    return {"key": [s["__key__"] for s in samples],
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
            "inputs": inputs}


def materialize_misaligned(batch: dict, modalities: list[str] | None = None) -> dict:
    """Ready-made misaligned inputs: row (b, m) takes modality m from row partner[b, m].

    Returns {'inputs': {m: [N, ...]}, 'anchor': [N], 'swapped': [N] (modality index),
    'labels': [N, 2] (anchor label, partner label), 'weights': [N, 2], 'hard_weight': [N]}
    for the N = number of valid (b, m) pairs, ordered b-major.
    """
    mods = modalities or list(batch["inputs"])
    partner = batch["partner"]
    b_idx, m_idx = torch.nonzero(partner >= 0, as_tuple=True)
    src = partner[b_idx, m_idx]
    out_inputs = {}
    for mi, m in enumerate(mods):
        x = batch["inputs"][m]
        take = torch.where(m_idx == mi, src, b_idx)
        out_inputs[m] = x[take] if isinstance(x, torch.Tensor) else [x[int(i)] for i in take]
    return {"inputs": out_inputs, "anchor": b_idx, "swapped": m_idx,
            "labels": torch.stack([batch["label"][b_idx], batch["partner_label"][b_idx, m_idx]], 1),
            "weights": torch.stack([batch["anchor_weight"][b_idx, m_idx],
                                    batch["partner_weight"][b_idx, m_idx]], 1),
            "hard_weight": batch["hard_weight"][b_idx, m_idx]}


class MidasLoader(DataLoader):
    """A DataLoader for MidasDataset that remembers how far the epoch has been consumed.

    `state_dict()` after any batch resumes, via `load_state_dict`, to the identical
    remaining sequence, with any num_workers (and, through the dataset, any world size).
    """

    def __init__(self, dataset: MidasDataset, num_workers: int = 0, **kwargs):
        kwargs.setdefault("persistent_workers", False)
        super().__init__(dataset, batch_size=None, num_workers=num_workers, **kwargs)
        self._last_state: dict | None = None

    def __iter__(self):
        self.dataset.begin_epoch()  # type: ignore[attr-defined]  # before workers copy it
        for batch in super().__iter__():
            self._last_state = batch["stream_state"]
            yield batch
        ds: MidasDataset = self.dataset  # type: ignore[assignment]
        ds.offset, ds._exhausted = len(ds.reader), True  # epoch finished
        self._last_state = None

    def state_dict(self) -> dict:
        ds: MidasDataset = self.dataset  # type: ignore[assignment]
        state = ds.state_dict()
        if self._last_state is not None:
            state.update(self._last_state)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)  # type: ignore[attr-defined]
        self._last_state = None
