"""`MidasDataset`: a torch IterableDataset of batches of aligned samples with misaligned partners.

It yields whole batches (use it with `DataLoader(ds, batch_size=None, num_workers=...)` or
`MidasLoader`), because exactly-once delivery with equal batch counts per rank is decided
per batch: every rank and worker recomputes the epoch plan from (seed, epoch) and keeps
its own batches (`midas_data.stream.epoch_plan`: `batch_spans` for the rank,
`worker_groups` for the worker, `offset_after_step` for the resume state). Which row
lends each anchor its swapped modality is the partner policy's job
(`midas_data.stream.partners`); misaligned samples are expressed by an in-batch partner
index per swapped modality (`partner[b, m]`), the paper's in-batch construction, so a
trainer can swap encoder features at no extra cost; `materialize_misaligned` turns them
into ready-made inputs for model-agnostic users. See docs/CONTRACTS.md for the layout.

The epoch's last step (`last_batch`): by default ("pad") every rank's final batch holds at
least two rows; where too few real samples remain, it is topped up with repeated samples
marked `batch["valid"] == False` and `batch["weight"] == 0` (fill rows), which get no
misaligned partner and lend none. The mask-aware helpers (`aligned_loss`,
`batch_misaligned_loss`, `materialize_misaligned`, `batch_alpha_stats`) ignore them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from midas_data.dataset.reader import Dataset, open_dataset
from midas_data.dataset.transport import (
    MAX_TRANSFER_GROUP,
    TRANSFER_BYTES,
    SegmentPool,
    pack_group,
    torch_batch,
    transfer_group_size,
    unpack_batch,
)
from midas_data.distributed import rank_and_world_size
from midas_data.errors import CorruptShardError, MidasDataError, SchemaError, where
from midas_data.features.tables import read_features
from midas_data.loss import hard_weight_from_similarity, normalised_confidences, source_rows

from . import epoch_plan as plan
from .partners import PartnerOptions, PartnerPolicy, SplitData, make_policy, resolve_modalities

PARTNER_CHUNK = 16  # batches whose partners are computed together, one batch at a time


class MidasDataset(IterableDataset):
    """Batches of one split: aligned inputs, labels, and misaligned partners with weights.

    policy: who lends each anchor its swapped modality (`midas_data.stream.partners`):
    `random` (the default and the paper's: a different-label partner from the same batch,
    drawn afresh each epoch) or `none` (aligned samples only). The research policies
    `mined`, `mixed`, `soft` and `tempered` and their options (`swap_modalities`,
    `knn_modalities`, `knn_temperature`, `similarity_modalities`,
    `similarity_temperature`, `mined_fraction`, `mined_ramp`) are described in
    `PartnerOptions`; they showed no significant gain over `random`.
    shuffle: False keeps the index order (evaluation); the paired research policies
    always use their matched order.
    on_error: `raise` (default: a damaged shard stops the epoch naming shard and key) or
    `skip` (drop the sample, and report its key in `batch["skipped"]`; a batch may then
    hold fewer rows).
    last_batch: how the epoch's final, partial global step is delivered. Its items are
    spread over the ranks as evenly as possible (real sizes differ by at most one) and:
    `pad` (default) tops every rank's final batch up to two rows with fill rows, repeats of
    real samples of the split (deterministic for seed and epoch) marked
    `batch["valid"] == False` and `batch["weight"] == 0`, so no batch is empty or of one
    row; `drop` leaves the partial step out (every batch full, those samples unseen this
    epoch); `uneven` delivers it unpadded (a rank may get a batch of one or an empty batch:
    only for loops that handle both). `drop_last=True` is the same as `last_batch="drop"`.
    Every mode keeps equal batch counts on every rank and each real sample once per epoch.
    rank, world_size: default to torch.distributed or the torchrun environment.
    root may be a URL (s3://, gs://, https://): shards are then read through a local cache
    (`cache_dir`, bounded by `cache_limit` bytes; `storage_options` go to fsspec), or a
    dataset already opened with `open_dataset(url, ...)` for the other remote options.
    """

    def __init__(self, root: str | Path | Dataset, split: str = "train", *, batch_size: int = 64,
                 policy: str = "random", seed: int = 0, shuffle: bool = True,
                 last_batch: str = "pad", drop_last: bool = False,
                 modalities: list[str] | None = None,
                 transform: Callable | None = None, on_error: str = "raise",
                 rank: int | None = None, world_size: int | None = None, use_features: bool = True,
                 swap_modalities: Sequence[str] = (), knn_modalities: Sequence[str] = (),
                 knn_temperature: float = 0.1, similarity_modalities: Sequence[str] = (),
                 similarity_temperature: float = 0.1, mined_fraction: float = 0.5,
                 mined_ramp: Sequence[int] | None = None,
                 storage_options: dict | None = None, cache_dir: str | Path | None = None,
                 cache_limit: int | str | None = None):
        options = PartnerOptions(
            policy=policy, swap_modalities=swap_modalities, knn_modalities=knn_modalities,
            knn_temperature=knn_temperature, similarity_modalities=similarity_modalities,
            similarity_temperature=similarity_temperature, mined_fraction=mined_fraction,
            mined_ramp=mined_ramp)
        options.validate(batch_size)
        if on_error not in ("raise", "skip"):
            raise ValueError("on_error must be 'raise' or 'skip'")
        if last_batch not in plan.LAST_BATCH_MODES:
            raise ValueError(f"last_batch must be one of {plan.LAST_BATCH_MODES}, got {last_batch!r}")
        if drop_last and last_batch not in ("pad", "drop"):
            raise ValueError(f"drop_last=True means last_batch='drop'; it contradicts "
                             f"last_batch={last_batch!r}: give only one of them")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
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
        self.last_batch = "drop" if drop_last else last_batch
        self.shuffle, self.transform, self.on_error = shuffle, transform, on_error
        self._rank, self._world = rank, world_size
        self.epoch, self.offset = 0, 0
        self._transfer_group = 0  # batches per worker-queue item; set by MidasLoader for its workers
        self._pass_state: torch.Tensor | None = None  # persistent workers: [epoch, offset, group]
        self._pool: SegmentPool | None = None  # MidasLoader's shared segments, for its workers
        self._exhausted = False  # set when an iteration ran to the end of the epoch
        self._order_cache: tuple | None = None  # ((policy, seed, epoch), order, partner_of)
        self.features = None
        feat_path = self.root / "features" / f"{split}.arrow"
        if use_features and feat_path.exists():
            self.features = read_features(feat_path, self.ds.fingerprint)  # stale -> clear error
            if self.features.keys != self.reader.keys:
                raise SchemaError(f"{where(feat_path, field='key')}: rows do not match the split's "
                                  "index; rerun `midas-data extract`")
        self.partners: PartnerPolicy = make_policy(options, SplitData(
            self.root, split, self.modalities, list(self.ds.modalities), len(self.reader),
            self.features, shuffle))

    @property
    def drop_last(self) -> bool:
        """True when the final partial step is dropped (`last_batch == "drop"`)."""
        return self.last_batch == "drop"

    @property
    def options(self) -> PartnerOptions:
        """The partner policy's options, modality names resolved."""
        return self.partners.options

    def resolve_modalities(self, names: Sequence[str]) -> list[str]:
        """Modality names, with 'weak'/'strong' chosen by mean stored train confidence."""
        return list(resolve_modalities(names, self.modalities, self.features, self.root))

    # -- epoch plan ----------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (call once per epoch, as with DistributedSampler)."""
        if epoch != self.epoch:
            self.epoch, self.offset, self._exhausted = int(epoch), 0, False

    def epoch_order(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The current epoch's order and matched partners (`PartnerPolicy.order`), kept for
        the epoch: MidasLoader computes it before starting fresh workers, which then
        inherit it instead of each recomputing it every pass (a permutation of the split,
        or a matching on the mined graph for the paired policies)."""
        key = (self.partners, self.seed, self.epoch)
        cached = self._order_cache
        if cached is None or cached[0] != key:
            order, partner_of = self.partners.order(self.seed, self.epoch)
            for a in (order, partner_of):  # shared by every pass of the epoch: read only
                if a is not None:
                    a.flags.writeable = False
            cached = self._order_cache = (key, order, partner_of)
        return cached[1], cached[2]

    def rank_world(self) -> tuple[int, int]:
        rank, world = rank_and_world_size()
        return (self._rank if self._rank is not None else rank,
                self._world if self._world is not None else world)

    def __len__(self) -> int:
        """Batches this rank's next pass yields: the rest of the current epoch, or the whole
        next epoch when a pass ran to the end of this one (it rolls over)."""
        _, world = self.rank_world()
        consumed = 0 if self._exhausted else self.offset
        return plan.num_batches(len(self.reader) - consumed, self.batch_size, world, self.drop_last)

    def begin_epoch(self) -> None:
        """An epoch that an iteration ran to its end rolls over when iteration starts again.

        A state loaded at the end of an epoch (offset == len) is not rolled over: its
        iteration yields nothing, so a resumed trainer can finish that epoch's bookkeeping.
        """
        if self._exhausted:
            self.epoch, self.offset, self._exhausted = self.epoch + 1, 0, False

    def __iter__(self):
        """This rank's and worker's batches of the rest of the epoch (`epoch_plan`)."""
        rank, world = self.rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is None:
            self.begin_epoch()
        elif self._pass_state is not None:  # a persistent worker: this pass's position, from the loader
            self.epoch, self.offset, self._transfer_group = (int(v) for v in self._pass_state.tolist())
        order, partner_of = self.epoch_order()
        start, n, paired = self.offset, len(order), self.partners.paired
        spans = plan.batch_spans(n, start, self.batch_size, world, rank, self.drop_last,
                                 pair_aligned=paired)
        fill = (plan.fill_positions(n, start, self.batch_size, world, rank, pair_aligned=paired)
                if self.last_batch == "pad" else np.empty(0, np.int64))

        def rows_of(k: int) -> np.ndarray:
            lo, hi = (int(v) for v in spans[k])
            extra = fill if k == len(spans) - 1 else fill[:0]  # fill pads only the final batch
            return np.concatenate([order[lo:hi], order[extra]])

        # In a MidasLoader worker, groups of consecutive batches cross the worker queue as one
        # packed buffer each (midas_data.dataset.transport); a plain DataLoader's worker, or
        # the main process, yields plain dicts one batch at a time.
        grouped = info is not None and self._transfer_group > 0
        groups = plan.worker_groups(len(spans), worker, workers, self._transfer_group if grouped else 1)
        if hasattr(self.reader, "plan_reads"):  # remote root: fetch this worker's shards ahead
            self.reader.plan_reads([rows_of(k) for group in groups for k in group])

        def plan_partners(ks: Sequence[int]) -> list[tuple]:
            """The partners of the real rows of batches `ks`, computed together
            (`PartnerPolicy.assign_many`), and without stored features the batches' partner
            fields too; a batch that loses a row to on_error="skip" has its own recomputed."""
            real = [order[int(spans[k][0]):int(spans[k][1])] for k in ks]
            got = self.partners.assign_many(real, [self.reader.labels[r] for r in real], partner_of,
                                            self.seed, self.epoch, [int(spans[k][0]) for k in ks])
            if self.features is not None or any(p is None for p in got):
                return [(p, None) for p in got]
            rows = [rows_of(k) for k in ks]
            padded = [p if len(r) == len(p) else  # fill rows: no partner
                      np.concatenate([p, np.full((len(r) - len(p), p.shape[1]), -1, np.int64)])
                      for p, r in zip(got, rows)]
            fields = partner_fields_without_features(padded, [self.reader.labels[r] for r in rows])
            return list(zip(got, fields))

        def build(k: int, planned: tuple) -> dict:
            lo, hi = (int(v) for v in spans[k])
            batch = self._make_batch(rows_of(k), hi - lo, partner_of, lo, planned)
            offset = plan.offset_after_step(n, start, self.batch_size, world, k)
            batch["stream_state"] = {"seed": self.seed, "epoch": self.epoch, "offset": offset}
            return batch

        if not grouped:  # one batch at a time; partners planned for chunks of 1, 2, 4, ... batches
            mine, done, size = [k for group in groups for k in group], 0, 1
            while done < len(mine):
                ks = mine[done:done + size]
                done, size = done + len(ks), min(2 * size, PARTNER_CHUNK)
                for k, planned in zip(ks, plan_partners(ks)):
                    batch = build(k, planned)
                    if info is None:
                        self.offset = batch["stream_state"]["offset"]
                    yield batch
        else:
            for group in groups:
                # A batch that fails (a damaged shard) fails its whole group: the loader raises
                # at the group's turn, after every earlier batch, so the consumed position
                # stays a prefix of the order (sending the group's first batches alone would
                # let the next worker's group overtake the failed batch).
                yield pack_group((build(k, p) for k, p in zip(group, plan_partners(group))),
                                 self._pool, worker)
        if info is None:
            self.offset = n  # epoch done (items dropped by drop_last included)
            self._exhausted = True

    def row_bytes(self) -> int:
        """About how many bytes one row of a batch holds once decoded: exact for the
        fixed-shape modalities (tensors, images), the mean encoded sample size of the split's
        shards for the others (text, audio), plus the per-row fields. Sizes the groups of
        batches that MidasLoader's workers send at once."""
        total, unknown = 64 + 40 * len(self.modalities), False
        for m in self.modalities:
            spec = self.ds.schema[m]
            shape = spec.get("shape")
            if spec["kind"] == "text" or not shape or None in shape:
                unknown = True
            else:
                total += int(np.prod(shape)) * np.dtype(spec["dtype"]).itemsize
        if unknown:
            shards = [s for s in self.ds.manifest.get("shards", ()) if s.get("split") == self.split]
            count = sum(int(s.get("count", 0)) for s in shards)
            total += sum(int(s.get("bytes", 0)) for s in shards) // max(count, 1)
        return total

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
        if self.partners.paired and self.offset % 2:
            raise MidasDataError("a paired policy cannot resume from an odd offset")

    # -- batch assembly ------------------------------------------------------------------
    def _read(self, rows: np.ndarray) -> tuple[list[dict], np.ndarray]:
        """Decoded samples of `rows` and which rows they are (bool [len(rows)]: False = skipped)."""
        try:
            return self.reader.get_many(rows, self.modalities), np.ones(len(rows), bool)
        except (CorruptShardError, SchemaError):
            if self.on_error == "raise":
                raise
        good, ok = [], np.ones(len(rows), bool)  # slow path: find exactly which samples are damaged
        for i, r in enumerate(rows):
            try:
                good.extend(self.reader.get_many(np.array([r]), self.modalities))
            except (CorruptShardError, SchemaError):
                ok[i] = False
        return good, ok

    def _read_batch(self, rows: np.ndarray) -> tuple[dict, np.ndarray]:
        """The collated batch of `rows` and which rows it holds (bool [len(rows)]).

        Without a transform the reader decodes the whole batch at once into batch arrays
        (`SplitReader.read_batch`: the same checks, far fewer system calls); a damaged
        sample under on_error="skip", or a transform, takes the per-sample path."""
        if self.transform is None:
            try:
                return torch_batch(self.reader.read_batch(rows, self.modalities)), np.ones(len(rows), bool)
            except (CorruptShardError, SchemaError):
                if self.on_error == "raise":
                    raise
        samples, ok = self._read(rows)
        if self.transform is not None:
            samples = [self.transform(s) for s in samples]
        return collate(samples, self.modalities), ok

    def _make_batch(self, rows: np.ndarray, real: int, partner_of: np.ndarray | None,
                    first: int, planned: tuple | None = None) -> dict:
        """The batch of `rows`: the first `real` are the items at global positions `first`...
        of the order, the rest fill rows (repeats that pad the final batch). `planned`: the
        policy's partners of the real rows, computed ahead (used if every real row is read),
        and the batch's partner fields (None: made here; used if every row is read)."""
        valid = np.arange(len(rows)) < real
        batch, ok = self._read_batch(rows)
        skipped = [self.reader.keys[int(r)] for r in rows[~ok & valid]]  # a fill row's own turn reports it
        rows, valid = rows[ok], valid[ok]
        if not len(rows):  # an empty final batch keeps ranks in step; give it the right shapes
            batch["inputs"] = {m: self._empty(m) for m in self.modalities}
        batch["row"] = torch.from_numpy(rows.copy())
        batch["valid"] = torch.from_numpy(valid)
        batch["weight"] = torch.from_numpy(valid.astype(np.float32))
        batch["skipped"] = skipped
        if planned is not None and planned[1] is not None and ok.all():
            batch.update(planned[1])
            return batch
        labels = self.reader.labels[rows]
        # Partners among the real rows only (they come first): fill rows lend and get none.
        if planned is not None and ok[:real].all():
            partner = planned[0]
        else:
            partner = self.partners.assign(rows[valid], labels[valid], partner_of, self.seed,
                                           self.epoch, first)
        if partner is not None:
            if not valid.all():  # fill rows: no partner
                partner = np.concatenate([partner, np.full((int((~valid).sum()), partner.shape[1]), -1,
                                                           dtype=np.int64)])
            conf = feats = None
            if self.features is not None:
                conf = np.stack([self.features.confs[m][rows] for m in self.modalities], axis=1)
                feats = [self.features.feats[m][rows] for m in self.modalities]
            batch.update(partner_fields(partner, labels, conf, feats))
        return batch

    def _empty(self, m: str) -> torch.Tensor | list:
        spec = self.ds.schema[m]
        if spec["kind"] == "text" or spec["shape"] is None or None in spec["shape"]:
            return []
        return torch.from_numpy(np.zeros((0, *spec["shape"]), dtype=np.dtype(spec["dtype"])))


def partner_fields(partner: np.ndarray, labels: np.ndarray, conf: np.ndarray | None,
                   feats: list[np.ndarray] | None) -> dict:
    """The batch's fields for its misaligned samples (docs/CONTRACTS.md, "Stream batch layout").

    partner: int64 [b, M] in-batch partners (-1 = none); labels: int64 [b]; conf: float
    [b, M] stored confidences and feats: M arrays [b, d_m] of stored features, or None
    without a features table. Misaligned sample (b, m) has the sources `source_rows`;
    `partner_weight` is the swapped modality's `normalised_confidences`, `anchor_weight`
    the rest; without confidences both are 0.5. Invalid (b, m) get weight 0.
    """
    if conf is None and not feats:  # no features table: even split, hard weight 1 (fast path)
        return partner_fields_without_features([partner], [labels])[0]
    b, M = partner.shape
    valid = partner >= 0
    safe = np.where(valid, partner, 0)
    partner_label = torch.from_numpy(np.where(valid, labels[safe], -1))
    conf = np.full((b, M), np.nan, np.float32) if conf is None else conf.astype(np.float32)
    sim = np.full((b, M), np.nan, np.float32)
    for mi, f in enumerate(feats or ()):
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        sim[:, mi] = np.einsum("bd,bd->b", f, f[safe[:, mi]])
    anchor, swapped = np.repeat(np.arange(b), M), np.tile(np.arange(M), b)
    src = source_rows(*(torch.from_numpy(a) for a in (anchor, swapped, safe.reshape(-1))), M).numpy()
    w = normalised_confidences(torch.from_numpy(conf[src, np.arange(M)].astype(np.float64)))
    w = w.numpy()[np.arange(b * M), swapped].reshape(b, M)
    w = np.where(np.isfinite(w), w, 0.5)  # no stored confidences: split the label evenly
    hard = np.where(np.isfinite(sim), hard_weight_from_similarity(torch.from_numpy(sim)).numpy(), 1.0)
    return {"partner": torch.from_numpy(partner), "misaligned_flat": torch.from_numpy(misaligned_flat(partner)),
            "partner_label": partner_label, "conf": torch.from_numpy(conf),
            "similarity": torch.from_numpy(np.where(valid, sim, np.nan).astype(np.float32)),
            "hard_weight": torch.from_numpy(np.where(valid, hard, 0.0).astype(np.float32)),
            "anchor_weight": torch.from_numpy(np.where(valid, 1.0 - w, 0.0).astype(np.float32)),
            "partner_weight": torch.from_numpy(np.where(valid, w, 0.0).astype(np.float32))}


def misaligned_flat(partner: np.ndarray) -> np.ndarray:
    """The batch's `misaligned_flat` field, int64 [B + N, M]: where modality k of each row
    comes from, as the flat position r * M + k of its source row r in the batch's
    (row, modality) pairs laid out row-major. The B aligned rows come first (r = b); then
    the N misaligned samples (b, m) with `partner[b, m] >= 0`, b-major as
    `materialize_misaligned` orders them, modality m from r = partner[b, m] and the others
    from r = b. Built with the partners (in the loader's workers when there are any), so
    that a training step gathers every fused-head input of the batch in one index_select
    without building this index itself (`trainers/models.py`, `misaligned_index`)."""
    size, m = partner.shape
    if size and partner.min() >= 0:  # every partner present (the usual batch): a fixed layout
        return _full_flats(partner[None])[0]
    anchor, swapped = np.nonzero(partner >= 0)
    k = np.arange(m)
    out = np.empty((size + anchor.size, m), np.int64)
    np.add(np.arange(size)[:, None] * m, k, out=out[:size])
    tail = out[size:]
    np.add(anchor[:, None] * m, k, out=tail)
    tail[np.arange(anchor.size), swapped] = partner[anchor, swapped] * m + swapped
    return out


@functools.lru_cache(maxsize=16)
def _full_flat_layout(size: int, m: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """`misaligned_flat` of a batch whose every row has every partner, with each source the
    row itself, and the entries (size + b * m + k, k) that the partners replace."""
    flat = np.arange(size * m, dtype=np.int64).reshape(size, m)
    unswapped = np.concatenate([flat, np.repeat(flat, m, axis=0)])
    n = np.arange(size * m)
    unswapped.flags.writeable = False  # shared by every batch of this size
    return unswapped, (size + n, n % m)


def _full_flats(partners: np.ndarray) -> np.ndarray:
    """`misaligned_flat` of K batches of one size whose every partner is present, from
    their partners [K, B, M] (>= 0): [K, B * (M + 1), M], the fixed layout with the
    partners' entries filled in."""
    count, size, m = partners.shape
    unswapped, (rows, cols) = _full_flat_layout(size, m)
    out = np.repeat(unswapped[None], count, axis=0)
    out[:, rows, cols] = (partners * m + np.arange(m)).reshape(count, -1)
    return out


def _misaligned_flats(partners: Sequence[np.ndarray], every: np.ndarray, valid: np.ndarray) -> list[np.ndarray]:
    """`misaligned_flat` of each batch; batches of one size with every partner present
    (the usual chunk) together, in a few array operations for all of them.
    every, valid: the batches' partners concatenated, and where they are >= 0."""
    size, m = partners[0].shape
    if size == 0 or not valid.all() or any(len(p) != size for p in partners):
        return [misaligned_flat(p) for p in partners]
    return list(_full_flats(every.reshape(len(partners), size, m)))


def partner_fields_without_features(partners: Sequence[np.ndarray],
                                    labels: Sequence[np.ndarray]) -> list[dict]:
    """`partner_fields(partner, labels, None, None)` of several batches, computed together:
    without stored features every misaligned sample splits its label evenly (0.5 / 0.5)
    with hard weight 1, and `conf` and `similarity` are NaN. Each batch's tensors are views
    of arrays made once for all of them (disjoint rows)."""
    sizes = [len(p) for p in partners]
    if not partners:
        return []
    m = partners[0].shape[1]
    every = np.concatenate(partners).reshape(-1, m)
    valid = every >= 0
    first = np.repeat(np.cumsum(sizes) - sizes, sizes)[:, None]  # each row's batch start
    all_labels = np.concatenate(labels)
    partner_label = np.where(valid, all_labels[np.where(valid, every + first, 0)], -1)
    floats = np.empty((5, every.shape[0], m), np.float32)  # conf, similarity, hard, anchor, partner
    floats[:2] = np.nan
    floats[2] = valid
    np.multiply(floats[2], 0.5, out=floats[3])
    floats[4] = floats[3]
    out, lo = [], 0
    for p, b, flat in zip(partners, sizes, _misaligned_flats(partners, every, valid)):
        hi = lo + b
        out.append({"partner": torch.from_numpy(p), "misaligned_flat": torch.from_numpy(flat),
                    "partner_label": torch.from_numpy(partner_label[lo:hi]),
                    "conf": torch.from_numpy(floats[0, lo:hi]), "similarity": torch.from_numpy(floats[1, lo:hi]),
                    "hard_weight": torch.from_numpy(floats[2, lo:hi]),
                    "anchor_weight": torch.from_numpy(floats[3, lo:hi]),
                    "partner_weight": torch.from_numpy(floats[4, lo:hi])})
        lo = hi
    return out


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
    for the N (b, m) with a partner (`partner[b, m] >= 0`), ordered b-major. Fill rows
    (`batch["valid"] == False`) take part in none of them, so every misaligned row is real.
    """
    mods = modalities or list(batch["inputs"])
    partner = batch["partner"]
    has = partner >= 0
    valid = batch.get("valid")
    if valid is not None:  # fill rows neither get nor lend a modality (the stream never pairs them)
        has &= valid.unsqueeze(1) & valid[partner.clamp(min=0)]
    b_idx, m_idx = torch.nonzero(has, as_tuple=True)
    rows = source_rows(b_idx, m_idx, partner[b_idx, m_idx], len(mods))
    out_inputs = {}
    for mi, m in enumerate(mods):
        x = batch["inputs"][m]
        take = rows[:, mi]
        out_inputs[m] = x[take] if isinstance(x, torch.Tensor) else [x[int(i)] for i in take]
    return {"inputs": out_inputs, "anchor": b_idx, "swapped": m_idx,
            "labels": torch.stack([batch["label"][b_idx], batch["partner_label"][b_idx, m_idx]], 1),
            "weights": torch.stack([batch["anchor_weight"][b_idx, m_idx],
                                    batch["partner_weight"][b_idx, m_idx]], 1),
            "hard_weight": batch["hard_weight"][b_idx, m_idx]}


def _as_built(batch: object) -> object:
    """MidasLoader's collate_fn: the batch as the dataset built it (module level: picklable)."""
    return batch


class MidasLoader(DataLoader):
    """A DataLoader for MidasDataset that remembers how far the epoch has been consumed.

    `state_dict()` after any batch resumes, via `load_state_dict`, to the identical
    remaining sequence, with any num_workers (and, through the dataset, any world size).
    Iterating again after leaving a pass early (`break`) continues from the batches consumed,
    for every num_workers, as `state_dict()` reports; a pass run to its end rolls over to
    the next epoch. Workers are started afresh for every pass (they copy the dataset's
    epoch and offset then) unless `persistent_workers=True`: then they stay up across
    passes and take each pass's epoch, offset and group size from the loader through a
    small shared-memory tensor, written before the pass starts (no fork per pass). Only
    those three reach kept workers: other changes to the dataset after the first pass
    (its transform, `on_error`, partner options) need a new loader.

    batches_per_transfer: with workers, each worker sends groups of this many consecutive
    batches of its share as one item of the worker queue (one packed buffer; the loader
    splits it back into batches), because the queue costs the main process about a
    millisecond per item whatever its size. None (default) picks it from the decoded batch
    size (`transfer_group_size`): groups of about `TRANSFER_BYTES`, at most
    `MAX_TRANSFER_GROUP` batches, 1 for batches that large. A worker's first groups are
    smaller (1, 2, 4, ... batches), so the first batch comes as soon as one is built. The
    batches and their order are the same for any value. Each group crosses in a new
    shared-memory segment, as in PyTorch.

    reuse_shared_memory=True (opt-in, forked workers only): workers pack their groups into
    shared slots made once per loader (`transport.SegmentPool`) instead, each reused once
    nothing refers to its batches any more (tensors, views, numpy/DLPack arrays, the
    storage object). It saves the workers a new segment per group (bench/stream.py: 2
    fresh workers with random partners 1.14x of 0 workers instead of about 1.0). Keep a
    batch past its reuse only through references Python can see: a process forked while it
    holds a batch (multiprocessing with the fork start method) shares the slot and sees
    later batches in it, and raw pointers (`data_ptr()`, ctypes) do not hold a slot;
    `clone()` what such code keeps.

    collate_fn: applied by the loader, in this process, to each batch (a dict) it yields,
    with or without workers (they send packed groups); None hands batches on as built.
    """

    def __init__(self, dataset: MidasDataset, num_workers: int = 0, *,
                 batches_per_transfer: int | None = None, reuse_shared_memory: bool = False,
                 **kwargs):
        if batches_per_transfer is not None and (isinstance(batches_per_transfer, bool)
                                                 or int(batches_per_transfer) != batches_per_transfer
                                                 or batches_per_transfer < 1):
            raise ValueError(f"batches_per_transfer must be an integer >= 1 or None (automatic), "
                             f"got {batches_per_transfer!r}")
        self.batches_per_transfer = batches_per_transfer
        self.reuse_shared_memory = bool(reuse_shared_memory)
        # The dataset's batches are tensors already: hand them on as built, instead of
        # DataLoader's default_convert walking every batch (each key of its key list too).
        # A user's collate_fn gets each batch in this process, after a worker's group is
        # unpacked (a worker sends packed groups, not batches).
        self.batch_fn = kwargs.pop("collate_fn", None)
        super().__init__(dataset, batch_size=None, num_workers=num_workers, collate_fn=_as_built, **kwargs)
        # Persistent workers copied the dataset once; each pass's position reaches them here.
        self._pass_state = (torch.zeros(3, dtype=torch.int64).share_memory_()
                            if self.persistent_workers else None)
        self._pool: SegmentPool | None = None  # made on the first pass with workers

    def transfer_group(self) -> int:
        """Batches per worker-queue item for the next pass (0 without workers)."""
        if self.num_workers == 0:
            return 0
        if self.batches_per_transfer is not None:
            return int(self.batches_per_transfer)
        ds: MidasDataset = self.dataset  # type: ignore[assignment]
        return transfer_group_size(ds.batch_size * ds.row_bytes(), len(ds), self.num_workers)

    def __iter__(self):
        ds: MidasDataset = self.dataset  # type: ignore[assignment]
        ds.begin_epoch()  # before workers copy it
        ds._transfer_group = self.transfer_group()
        # Workers about to be forked (every pass, or the first of persistent ones) inherit
        # the epoch's order and the loader's shared segments from this process.
        forking = self.num_workers > 0 and not (self.persistent_workers and self._iterator is not None)
        pool = self._segment_pool() if forking else None
        if forking:
            ds.epoch_order()
            ds.reader.key_table()
            ds._pool = pool if pool is not None and pool.new_generation() else None
        if self._pass_state is not None:  # before the workers are told to start the pass
            self._pass_state.copy_(torch.tensor([ds.epoch, ds.offset, ds._transfer_group]))
            ds._pass_state = self._pass_state
        try:
            items = super().__iter__()
        finally:
            # the dataset's own iteration (and plain DataLoaders) gets dicts, at its own position
            ds._transfer_group, ds._pass_state, started, ds._pool = 0, None, ds._pool, None
        if started is not None:
            started.own(items)  # its workers may use the segments while this iterator lives
        pool, batch_fn = self._pool, self.batch_fn
        before = (ds.epoch, ds.offset)  # the position before the batch being handed out
        for item in items:
            if pool is not None:
                pool.release()  # slots whose batches the consumer has let go of
            batches = unpack_batch(item)  # a worker's group of batches, or one in-process batch
            for batch in batches if isinstance(batches, list) else (batches,):
                # The consumed position lives in the dataset, whatever process built the batch,
                # so a pass left early continues from here and state_dict() reports the same point.
                state = batch["stream_state"]
                try:
                    out = batch if batch_fn is None else batch_fn(batch)
                except BaseException:  # the batch was not handed out: it stays unconsumed
                    ds.epoch, ds.offset = before  # (in process the dataset moved past it)
                    raise
                ds.epoch, ds.offset = before = int(state["epoch"]), int(state["offset"])
                yield out
        ds.offset, ds._exhausted = len(ds.reader), True  # epoch finished

    def _segment_pool(self) -> SegmentPool | None:
        """The shared segments this loader's forked workers pack their groups into (made
        on first use, kept across passes): per worker, `prefetch_factor + 2` slots (the
        groups in flight, the one being consumed and the one before it) of the largest
        group a pass can send. None without grouped workers, for workers that are not
        forked, or for groups larger than 4 x `TRANSFER_BYTES`."""
        ds: MidasDataset = self.dataset  # type: ignore[assignment]
        ctx = self.multiprocessing_context
        method = ctx.get_start_method() if ctx is not None else torch.multiprocessing.get_start_method()
        if (not self.reuse_shared_memory or self.num_workers == 0 or ds._transfer_group <= 0
                or method != "fork"):
            return None
        batch = ds.batch_size * ds.row_bytes() + 64 * (16 + len(ds.modalities))  # + alignment
        group = self.batches_per_transfer or max(1, min(MAX_TRANSFER_GROUP, TRANSFER_BYTES // batch))
        need = group * batch
        if need > 4 * TRANSFER_BYTES:
            return None
        pool = self._pool
        if pool is not None and pool.creator != os.getpid():
            # this process was forked after the pool was made: its slots are shared with the
            # parent's, whose workers may write them; never use them here
            self._pool = pool = None
        if pool is None or (pool.slot_bytes < need and not pool.in_use()):
            self._pool = pool = SegmentPool(self.num_workers, (self.prefetch_factor or 2) + 2, need)
        return pool

    def __len__(self) -> int:
        # The dataset's length shrinks as the epoch is consumed, so DataLoader's own __len__,
        # which records it to warn about replicas yielding more, would warn after a resume.
        return len(self.dataset)  # type: ignore[arg-type]

    def state_dict(self) -> dict:
        return self.dataset.state_dict()  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)  # type: ignore[attr-defined]
