"""The pairs table (docs/CONTRACTS.md "Pairs"): mined partners with MIDAS weights.

One row per (anchor, swapped modality, rank); a split's pairs live in
``DATASET/pairs/{split}/part-{rank:05d}-of-{world:05d}.arrow``, one part per mining
process, each holding a contiguous slice of anchors. ``read_pairs`` joins the parts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from midas_data.errors import MidasDataError, SchemaError, StaleArtifactError, where
from midas_data.features.tables import (
    META_PREFIX,
    Features,
    read_table,
    table_content_sha256,
    table_metadata,
    write_table,
)
from midas_data.loss import hard_weight_from_similarity, normalised_confidences
from midas_data.mining.knn import MiningInputError, resolve_index, search_different_label

PAIRS_DIR = "pairs"
PART_RE = re.compile(r"^part-(\d{5})-of-(\d{5})\.arrow$")
PAIRS_SCHEMA = pa.schema([
    ("anchor_key", pa.string()), ("partner_key", pa.string()),
    ("anchor_row", pa.int64()), ("partner_row", pa.int64()),
    ("modality", pa.string()), ("rank", pa.int32()), ("similarity", pa.float32()),
    ("anchor_label", pa.int64()), ("partner_label", pa.int64()),
    ("anchor_conf", pa.float32()), ("partner_conf", pa.float32()),
    ("anchor_weight", pa.float32()), ("partner_weight", pa.float32()),
    ("hard_weight", pa.float32()),
])


def pairs_dir(dataset_dir: str | os.PathLike, split: str) -> Path:
    return Path(dataset_dir) / PAIRS_DIR / split


def part_path(dataset_dir: str | os.PathLike, split: str, rank: int, world_size: int) -> Path:
    return pairs_dir(dataset_dir, split) / f"part-{rank:05d}-of-{world_size:05d}.arrow"


def check_features(features: Features) -> None:
    """Two or more modalities, and confidences in [0, 1]; errors name modality and row."""
    if len(features.modalities) < 2:
        raise MidasDataError(f"features have modalities {features.modalities}: a misaligned sample "
                             "swaps one modality and keeps another, so at least two are needed")
    for m in features.modalities:
        c = np.asarray(features.confs[m])
        if c.shape != (len(features.keys),):
            raise MiningInputError(f"modality {m!r}: confidences have shape {c.shape}, "
                                   f"expected ({len(features.keys)},)")
        bad = np.flatnonzero(~(np.isfinite(c) & (c >= 0) & (c <= 1)))
        if bad.size:
            row = int(bad[0])
            raise MiningInputError(f"modality {m!r}, row {row}: confidence {c[row]} is not a "
                                   "probability in [0, 1]", row)


def mine_modalities(features: Features, k: int, index: str = "cpu", approx: str | None = None,
                    nlist: int | None = None, nprobe: int | None = None, block_size: int = 16384,
                    queries: np.ndarray | None = None,
                    progress: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{modality: (D float32 [q, k], I int64 [q, k])} from `search_different_label`."""
    return {m: search_different_label(features.feats[m], features.labels, k, index=index,
                                      approx=approx, nlist=nlist, nprobe=nprobe,
                                      block_size=block_size, queries=queries, progress=progress,
                                      name=m)
            for m in features.modalities}


def pairs_table(features: Features, results: dict[str, tuple[np.ndarray, np.ndarray]],
                queries: np.ndarray | None = None) -> pa.Table:
    """Rows for every modality in `results`: modality-major, then anchor, then rank."""
    n = len(features.keys)
    q = np.arange(n, dtype=np.int64) if queries is None else np.asarray(queries, np.int64)
    mods = list(results)
    labels = np.asarray(features.labels, np.int64)
    keys = pa.array(features.keys, pa.string())
    confs = {m: np.asarray(c, np.float64) for m, c in features.confs.items()}
    cols: dict[str, list] = {name: [] for name in PAIRS_SCHEMA.names}
    for mi, m in enumerate(mods):
        D, I = results[m]  # noqa: E741 (FAISS naming)
        k = D.shape[1]
        anchor, partner = np.repeat(q, k), I.reshape(-1).astype(np.int64)
        sim = np.clip(D.reshape(-1), -1.0, 1.0)  # float32 rounding can step past +-1
        a_conf = sum(confs[o][anchor] for o in features.modalities if o != m)  # kept modalities
        p_conf = confs[m][partner]
        w = _swapped_weight(confs, features.modalities, m, anchor, partner)
        cols["anchor_row"].append(anchor)
        cols["partner_row"].append(partner)
        cols["modality"].append(np.full(len(anchor), mi, np.int32))
        cols["rank"].append(np.tile(np.arange(k, dtype=np.int32), len(q)))
        cols["similarity"].append(sim.astype(np.float32))
        cols["anchor_label"].append(labels[anchor])
        cols["partner_label"].append(labels[partner])
        cols["anchor_conf"].append(a_conf.astype(np.float32))
        cols["partner_conf"].append(p_conf.astype(np.float32))
        cols["anchor_weight"].append((1.0 - w).astype(np.float32))
        cols["partner_weight"].append(w.astype(np.float32))
        hard = hard_weight_from_similarity(torch.from_numpy(sim.astype(np.float64))).numpy()
        cols["hard_weight"].append(hard.astype(np.float32))
    arrays = {name: np.concatenate(v) for name, v in cols.items() if v}
    anchor_row, partner_row = arrays["anchor_row"], arrays["partner_row"]
    # dictionary-decode instead of building millions of Python strings
    mod_col = pa.DictionaryArray.from_arrays(pa.array(arrays.pop("modality")),
                                             pa.array(mods, pa.string())).cast(pa.string())
    data = {"anchor_key": keys.take(pa.array(anchor_row)), "partner_key": keys.take(pa.array(partner_row)),
            **{name: pa.array(v) for name, v in arrays.items()}, "modality": mod_col}
    return pa.table({f.name: data[f.name] for f in PAIRS_SCHEMA}, schema=PAIRS_SCHEMA)


def _swapped_weight(confs: dict[str, np.ndarray], modalities: list[str], swapped: str,
                    anchor: np.ndarray, partner: np.ndarray) -> np.ndarray:
    """Normalised confidence of the swapped modality's source (the partner), float64 [N];
    the anchor's kept modalities share the rest (`normalised_confidences`)."""
    src = np.stack([confs[o][partner if o == swapped else anchor] for o in modalities], axis=1)
    w = normalised_confidences(torch.from_numpy(src)).numpy()
    return w[:, modalities.index(swapped)]


def build_pairs(features: Features, k: int = 16, index: str = "cpu", approx: str | None = None,
                nlist: int | None = None, nprobe: int | None = None, block_size: int = 16384,
                queries: np.ndarray | None = None, progress: bool = False,
                config: dict | None = None) -> pa.Table:
    """Mine k different-label partners per anchor (rows `queries`, default all) and modality.

    Returns the pairs table with `midas.*` metadata (fingerprints, k, index, config);
    `write_pairs` adds rank and world size.
    """
    check_features(features)
    device = resolve_index(index)
    results = mine_modalities(features, k, device, approx, nlist, nprobe, block_size, queries,
                              progress)
    return with_metadata(pairs_table(features, results, queries), features, k, device, approx,
                         nlist, nprobe, block_size, config)


def with_metadata(table: pa.Table, features: Features, k: int, device: str, approx, nlist,
                  nprobe, block_size: int, config: dict | None = None) -> pa.Table:
    cfg = {"k": k, "index": device, "approx": approx, "nlist": nlist, "nprobe": nprobe,
           "block_size": block_size, "modalities": features.modalities, **(config or {})}
    meta = {"features_fingerprint": features.fingerprint,
            "dataset_fingerprint": features.metadata.get("dataset_fingerprint", ""),
            "k": str(k), "index": device if approx is None else f"{device}-{approx}",
            "config": json.dumps(cfg, sort_keys=True)}
    return table.replace_schema_metadata({(META_PREFIX + a).encode(): b.encode() for a, b in meta.items()})


def write_pairs(dataset_dir: str | os.PathLike, split: str, table: pa.Table, rank: int = 0,
                world_size: int = 1, metadata: dict[str, str] | None = None) -> Path:
    """Write this process's part atomically, then drop parts of other world sizes.

    Old parts go only once every part of the new world size exists, so a reader always
    finds one complete set.
    """
    if not 0 <= rank < world_size:
        raise MidasDataError(f"rank {rank} is outside world size {world_size}")
    if not table_metadata(table).get("features_fingerprint") and not (metadata or {}).get("features_fingerprint"):
        raise SchemaError("pairs table has no midas.features_fingerprint; build it with build_pairs")
    path = part_path(dataset_dir, split, rank, world_size)
    missing = [c for c in PAIRS_SCHEMA.names if c not in table.column_names]
    if missing:
        raise SchemaError(f"pairs table has no column {missing[0]!r}; build it with build_pairs")
    # a checksum of the values, verified by read_pairs: a flipped bit is never a silent partner
    content = table_content_sha256(table, PAIRS_SCHEMA.names)
    write_table(path, table, {**(metadata or {}), "rank": str(rank), "world_size": str(world_size),
                              "content_sha256": content})
    parts = _parts(pairs_dir(dataset_dir, split))
    if all(r in parts.get(world_size, {}) for r in range(world_size)):
        for stale in (p for w, group in parts.items() if w != world_size for p in group.values()):
            stale.unlink(missing_ok=True)
    return path


def _parts(d: Path) -> dict[int, dict[int, Path]]:
    """{world_size: {rank: path}} of the part files in `d`."""
    out: dict[int, dict[int, Path]] = {}
    for p in sorted(d.glob("part-*-of-*.arrow")) if d.is_dir() else ():
        m = PART_RE.match(p.name)
        if m:
            out.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    return out


def _complete_set(dataset_dir: str | os.PathLike, split: str) -> tuple[int, dict[int, Path]]:
    """(world size, {rank: path}) of the newest complete set of parts; a located error when
    there is none."""
    d = pairs_dir(dataset_dir, split)
    parts = _parts(d)
    if not parts:
        raise MidasDataError(f"{where(file=d)}: no mined pairs for split {split!r}; run "
                             "`midas-data mine-misaligned`")
    complete = {w: g for w, g in parts.items() if all(r in g for r in range(w))}
    if not complete:
        missing = [str(part_path(dataset_dir, split, r, w)) for w, g in parts.items()
                   for r in range(w) if r not in g]
        raise MidasDataError(f"{where(file=d)}: pairs are incomplete, missing {missing[:4]}; "
                             "mining is still running or crashed: rerun `midas-data mine-misaligned`")
    # after a crash between writing a new set and deleting the old one, trust the newest
    world = max(complete, key=lambda w: max(p.stat().st_mtime_ns for p in complete[w].values()))
    return world, complete[world]


def pairs_fingerprint(dataset_dir: str | os.PathLike, split: str) -> str:
    """sha256 over the content checksums of the split's parts (their metadata only; read_pairs
    checks them against the values)."""
    world, parts = _complete_set(dataset_dir, split)
    h = hashlib.sha256()
    for r in range(world):
        try:
            with pa.memory_map(str(parts[r]), "r") as src:
                meta = pa.ipc.open_file(src).schema.metadata or {}
        except (pa.ArrowException, OSError) as e:
            raise MidasDataError(f"{where(file=parts[r])}: not a readable Arrow IPC file ({e}); "
                                 "rerun `midas-data mine-misaligned`") from e
        h.update(meta.get(f"{META_PREFIX}content_sha256".encode(), b"-"))
    return h.hexdigest()


def _check_content(t: pa.Table, meta: dict[str, str], path: Path) -> None:
    want = meta.get("content_sha256")
    if not want:
        raise StaleArtifactError(f"{where(file=path, field='midas.content_sha256')}: pairs part "
                                 "has no content checksum (mined by an older version); rerun "
                                 "`midas-data mine-misaligned`")
    if table_content_sha256(t, PAIRS_SCHEMA.names) != want:
        raise SchemaError(f"{where(file=path, field='midas.content_sha256')}: the values do not "
                          "match the part's checksum (damaged or edited); rerun "
                          "`midas-data mine-misaligned`")


def _check_keys(t: pa.Table, keys: list[str] | None, file: str) -> None:
    """`anchor_key`/`partner_key` must name the rows `anchor_row`/`partner_row` point at:
    the split's index keys when given, else the anchors' own (row, key) pairs (a partner
    row that is no anchor of the table then goes unchecked)."""
    if keys is not None:
        n = len(keys)
        for side in ("anchor", "partner"):
            rows = t.column(f"{side}_row").to_numpy()
            bad = np.flatnonzero((rows < 0) | (rows >= n))
            if bad.size:
                raise SchemaError(f"{where(file=file, field=side + '_row')}: row "
                                  f"{int(rows[bad[0]])} is outside the split's {n} samples; "
                                  "rerun `midas-data mine-misaligned`")
        known_rows, known_keys = np.arange(n), pa.array(keys, pa.string())
    else:
        known_rows, first = np.unique(t.column("anchor_row").to_numpy(), return_index=True)
        known_keys = t.column("anchor_key").combine_chunks().take(pa.array(first))
    for side in ("anchor", "partner"):
        rows = t.column(f"{side}_row").to_numpy()
        pos = np.minimum(np.searchsorted(known_rows, rows), max(len(known_rows) - 1, 0))
        ok = (known_rows[pos] == rows) if len(known_rows) else np.zeros(len(rows), bool)
        have = t.column(f"{side}_key").combine_chunks().filter(pa.array(ok))
        want = known_keys.take(pa.array(pos[ok]))
        diff = np.flatnonzero(~pc.equal(have, want).to_numpy(zero_copy_only=False))
        if diff.size:
            i = int(diff[0])
            row = int(rows[ok][i])
            raise SchemaError(f"{where(file=file, key=have[i].as_py(), field=side + '_row')}: "
                              f"{side}_row {row} is sample {want[i].as_py()!r}, not the "
                              f"{side}_key ({diff.size} rows disagree); the pairs are damaged, "
                              "rerun `midas-data mine-misaligned`")


def read_pairs(dataset_dir: str | os.PathLike, split: str,
               features_fingerprint: str | None = None, keys: list[str] | None = None) -> pa.Table:
    """All parts of the split's pairs as one table (parts in rank order, so anchors ascend).

    Each part's values are checked against its `midas.content_sha256`, and every row's
    `anchor_key`/`partner_key` against the row its `anchor_row`/`partner_row` names (in
    `keys`, the split's index keys, when given). With `features_fingerprint`, pairs mined
    from other features raise StaleArtifactError.
    """
    world, parts = _complete_set(dataset_dir, split)
    tables, first = [], None
    for r in range(world):
        path = parts[r]
        t = read_table(path)
        meta = table_metadata(t)
        missing_cols = [c for c in PAIRS_SCHEMA.names if c not in t.column_names]
        if missing_cols:
            raise SchemaError(f"{where(file=path, field=missing_cols[0])}: column missing; not a "
                              "midas-data pairs part")
        if meta.get("rank") != str(r) or meta.get("world_size") != str(world):
            raise SchemaError(f"{where(file=path, field='midas.rank')}: metadata says rank "
                              f"{meta.get('rank')} of {meta.get('world_size')}, the name says {r} of {world}")
        fp = meta.get("features_fingerprint", "")
        if features_fingerprint is not None and fp != features_fingerprint:
            raise StaleArtifactError(
                f"{where(file=path, field='midas.features_fingerprint')}: pairs were mined from "
                f"features {fp[:12] or '(none)'}, but the features are now "
                f"{features_fingerprint[:12]}; rerun `midas-data mine-misaligned`")
        if first is None:
            first = meta
        elif (fp, meta.get("k")) != (first.get("features_fingerprint"), first.get("k")):
            raise StaleArtifactError(
                f"{where(file=path, field='midas.features_fingerprint')}: this part was mined "
                f"from other features or k than {parts[0].name}; a mining run is in "
                "progress or crashed: rerun `midas-data mine-misaligned`")
        for c in PAIRS_SCHEMA.names:
            if t.column(c).null_count:
                raise SchemaError(f"{where(file=path, field=c)}: holds nulls; rerun "
                                  "`midas-data mine-misaligned`")
        _check_content(t, meta, path)
        tables.append(t.select(PAIRS_SCHEMA.names).cast(PAIRS_SCHEMA))
    out = pa.concat_tables(tables)
    _check_keys(out, keys, ", ".join(str(parts[r]) for r in range(world)))
    first.pop("rank", None)
    first.pop("content_sha256", None)
    return out.replace_schema_metadata({(META_PREFIX + a).encode(): b.encode() for a, b in first.items()})
