"""`midas-data mine-misaligned`: mine different-label partners per split and write pairs.

Reads ``DATASET/features/{split}.arrow`` (refusing features of other shards), mines the k
most similar different-label partners of every anchor in every modality, and writes
``DATASET/pairs/{split}/part-{rank}-of-{world}.arrow``. Under torchrun each rank mines a
contiguous slice of the anchors against the full data and writes its own part.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from midas_data.atomic import write_bytes_atomic, write_text_atomic
from midas_data.dataset.manifest import read_manifest
from midas_data.diskspace import disk_full_guard
from midas_data.distributed import rank_and_world_size
from midas_data.errors import MidasDataError, SchemaError, where
from midas_data.features.tables import Features, read_features, read_table, table_metadata
from midas_data.locking import output_lock
from midas_data.mining.config import MineConfig
from midas_data.mining.knn import MiningInputError, resolve_index
from midas_data.mining.pairs import (
    check_features,
    pairs_dir,
    pairs_table,
    read_pairs,
    with_metadata,
    write_pairs,
)
from midas_data.mining.plan import mine_modality
from midas_data.options import resolve_settings

HIST_BINS = 100  # over [-1, 1]: mined partners crowd near 1, so keep the bins fine


def _barrier() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        return True
    return False


def mine_misaligned(dataset_dir: str | os.PathLike, config: MineConfig | None = None, *,
                    progress: bool = True, **settings: Any) -> dict:
    """Mine pairs for the configured splits; return a summary {dataset, rank, world_size, splits: {...}}.

    `config` holds the settings (`MineConfig`, whose field help says what each does); any of
    its fields may instead, or in addition, be given by name (`k=8, index="auto"`).
    index: one of `INDEX_CHOICES`; approx: None | 'ivf' | 'auto' (`midas_data.mining.plan`:
    the exact search's time is estimated and printed first; with IVF, recall@k against exact
    search on `recall_queries` held-out anchors is measured, reported and stored in the
    pairs' metadata under config.recall_at_k and config.search). report=True writes
    pairs/{split}/report.json, similarity_hist.png and class_matrix.png (rank 0).
    """
    cfg = resolve_settings(MineConfig, config, settings)
    root = Path(dataset_dir)
    manifest = read_manifest(root)
    device = resolve_index(cfg.index)  # resolve once: 'auto' warns once, every split agrees
    rank, world = rank_and_world_size()
    summary: dict = {"dataset": str(root), "rank": rank, "world_size": world, "index": device,
                     "approx": cfg.approx, "k": cfg.k, "splits": {}}
    for split in cfg.splits:
        if split not in manifest["splits"]:
            raise MidasDataError(f"{where(file=root / 'manifest.json', field='splits')}: no split "
                                 f"{split!r}; the dataset has {sorted(manifest['splits'])}")
    # Rank 0 holds the dataset's lock for the whole job; the others start writing only after
    # it has it (the barrier), so two jobs never mix their parts.
    with output_lock(root, "mine-misaligned") if rank == 0 else contextlib.nullcontext():
        _barrier()
        for split in cfg.splits:
            summary["splits"][split] = _mine_split(root, manifest, split, cfg, device,
                                                   progress and rank == 0, rank, world)
    return summary


def _check_against_manifest(f: Features, manifest: dict, split: str, path: Path) -> None:
    count = manifest["splits"][split].get("count")
    if count is not None and count != len(f.keys):
        raise SchemaError(f"{where(file=path, field='key')}: {len(f.keys)} rows, but the manifest "
                          f"lists {count} samples in split {split!r}; rerun `midas-data extract`")
    index_path = path.parent.parent / manifest["splits"][split].get("index", f"index/{split}.arrow")
    if index_path.exists():  # rows must follow the index: partner rows are index rows
        keys = read_table(index_path).column("key").to_pylist()
        if keys != f.keys:
            bad = next((i for i, (a, b) in enumerate(zip(keys, f.keys)) if a != b),
                       min(len(keys), len(f.keys)))
            raise SchemaError(f"{where(file=path, field='key')}: row {bad} does not match "
                              f"{index_path.name} of split {split!r}; rerun `midas-data extract`")
    unknown = [m for m in f.modalities if m not in manifest["modalities"]]
    if unknown:
        raise SchemaError(f"{where(file=path, field='midas.modalities')}: modalities {unknown} are "
                          f"not in the dataset ({list(manifest['modalities'])})")
    n_cls = len(manifest["classes"])
    bad = np.flatnonzero((f.labels < 0) | (f.labels >= n_cls))
    if bad.size:
        r = int(bad[0])
        raise SchemaError(f"{where(file=path, key=f.keys[r], field='label')}: label {f.labels[r]} "
                          f"is outside the dataset's {n_cls} classes")


def _mine_split(root, manifest, split, cfg: MineConfig, device, progress, rank, world) -> dict:
    t0 = time.perf_counter()
    k, approx, nlist, nprobe, block_size = cfg.k, cfg.approx, cfg.nlist, cfg.nprobe, cfg.block_size
    path = root / "features" / f"{split}.arrow"
    if not path.exists():
        raise MidasDataError(f"{where(file=path)}: no features for split {split!r}; run "
                             "`midas-data extract` first")
    f = read_features(path, manifest["fingerprint"])
    _check_against_manifest(f, manifest, split, path)
    present = np.unique(f.labels)
    if len(present) < 2:
        raise MidasDataError(f"{where(file=path, field='label')}: every sample of split {split!r} "
                             f"is class {manifest['classes'][int(present[0])] if len(present) else '?'!r}; "
                             "different-label partners need at least two classes")
    n = len(f.keys)
    lo, hi = rank * n // world, (rank + 1) * n // world
    queries = np.arange(lo, hi, dtype=np.int64)
    try:
        check_features(f)
        results, search = {}, {}
        for mi, m in enumerate(f.modalities):
            D, I, search[m] = mine_modality(  # noqa: E741 (FAISS naming)
                f.feats[m], f.labels, k, device, queries, approx=approx,
                approx_above=cfg.approx_above, nlist=nlist, nprobe=nprobe,
                recall_target=cfg.recall_target, recall_queries=cfg.recall_queries,
                rng=np.random.default_rng([cfg.seed, rank, mi]), block_size=block_size,
                progress=progress, name=m)
            results[m] = (D, I)
    except MiningInputError as e:
        key = f.keys[e.row] if e.row is not None else None
        raise type(e)(f"{where(file=path, key=key)}: {e}", e.row) from e
    used = next((s["approx"] for s in search.values() if s["approx"]), None)
    recall = ({m: s["recall_at_k"] for m, s in search.items() if "recall_at_k" in s} or None)
    table = with_metadata(pairs_table(f, results, queries), f, k, device, used, nlist, nprobe,
                          block_size, {"split": split, "anchors": [lo, hi],
                                       "settings": cfg.to_dict(), "recall_at_k": recall,
                                       "search": {m: _without_timings(s) for m, s in search.items()}})
    with disk_full_guard("mine-misaligned", pairs_dir(root, split), need=table.nbytes):
        part = write_pairs(root, split, table, rank, world)
    synced = _barrier()  # every part exists before rank 0 reads them all for the report
    out = {"path": str(part), "anchors": [lo, hi], "rows": table.num_rows, "k": k,
           "modalities": f.modalities, "features_fingerprint": f.fingerprint,
           "recall_at_k": recall, "approx": used,
           "estimate_exact_s": {m: s.get("estimate_exact_s") for m, s in search.items()}}
    if cfg.report and rank == 0:
        full = read_pairs(root, split, f.fingerprint) if world > 1 and synced else table
        scope = "all parts" if full is not table or world == 1 else f"rank 0 part (anchors {lo}..{hi})"
        with disk_full_guard("mine-misaligned (report)", pairs_dir(root, split)):
            out["report"] = str(write_report(pairs_dir(root, split), full, manifest["classes"],
                                             k, recall, scope))
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def report_stats(table: pa.Table, n_classes: int) -> dict:
    """Per-modality similarity histogram and statistics, and the class -> class partner counts."""
    mod = table.column("modality").combine_chunks().dictionary_encode()
    codes, names = mod.indices.to_numpy(zero_copy_only=False), mod.dictionary.to_pylist()
    sim = table.column("similarity").to_numpy()
    hard = table.column("hard_weight").to_numpy()
    aw = table.column("anchor_weight").to_numpy()
    edges = np.linspace(-1.0, 1.0, HIST_BINS + 1)
    per = {}
    for i, m in enumerate(names):
        s = sim[codes == i].astype(np.float64)
        q05, q50, q95 = np.quantile(s, [0.05, 0.5, 0.95])
        per[m] = {"pairs": int(s.size), "hist": np.histogram(s, edges)[0].tolist(),
                  "mean": float(s.mean()), "std": float(s.std()), "min": float(s.min()),
                  "max": float(s.max()), "p05": float(q05), "median": float(q50), "p95": float(q95),
                  "mean_hard_weight": float(hard[codes == i].mean()),
                  "mean_anchor_weight": float(aw[codes == i].mean())}
    al = table.column("anchor_label").to_numpy()
    pl = table.column("partner_label").to_numpy()
    matrix = np.bincount(al * n_classes + pl, minlength=n_classes * n_classes)
    return {"bin_edges": edges.tolist(), "modalities": per,
            "class_matrix": matrix.reshape(n_classes, n_classes).tolist()}


def write_report(out_dir: Path, table: pa.Table, classes: list[str], k: int,
                 recall: dict | None, scope: str) -> Path:
    """report.json plus similarity_hist.png and class_matrix.png, each written atomically."""
    stats = report_stats(table, len(classes))
    anchors = len(np.unique(table.column("anchor_row").to_numpy()))
    rep = {"scope": scope, "features_fingerprint": table_metadata(table).get("features_fingerprint"),
           "rows": table.num_rows, "anchors": anchors, "k": k, "classes": classes,
           "recall_at_k": recall, **stats}
    path = Path(out_dir) / "report.json"
    write_text_atomic(path, json.dumps(rep, indent=1) + "\n")
    _plots(Path(out_dir), rep)
    return path


def _plots(out_dir: Path, rep: dict) -> None:
    # Figure + Agg canvas directly: no pyplot, so no global backend switch for the caller
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    edges = np.asarray(rep["bin_edges"])
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for m, s in rep["modalities"].items():
        ax.stairs(s["hist"], edges, label=f"{m} (mean {s['mean']:.3f})")
    ax.set(xlabel="cosine similarity of mined partner (swapped modality)", ylabel="pairs",
           title=f"mined partners, k={rep['k']}")
    ax.legend()
    _save(fig, FigureCanvasAgg, out_dir / "similarity_hist.png")

    mat = np.asarray(rep["class_matrix"])
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    im = ax.imshow(mat, cmap="viridis")
    fig.colorbar(im, ax=ax, label="pairs")
    if len(rep["classes"]) <= 30:
        ticks = range(len(rep["classes"]))
        ax.set_xticks(ticks, rep["classes"], rotation=90, fontsize=7)
        ax.set_yticks(ticks, rep["classes"], fontsize=7)
    ax.set(xlabel="partner class", ylabel="anchor class", title="mined partners by class")
    _save(fig, FigureCanvasAgg, out_dir / "class_matrix.png")


def _save(fig, canvas_cls, path: Path) -> None:
    canvas_cls(fig)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    write_bytes_atomic(path, buf.getvalue())


TIMINGS = ("estimate_exact_s", "probe_s", "search_s")


def _without_timings(search: dict) -> dict:
    """The search record as stored in the pairs' metadata: no wall times, so the same inputs
    give byte-identical pairs (a rerun after a crash is checked against that); the summary
    printed by the stage keeps them."""
    return {k: v for k, v in search.items() if k not in TIMINGS}
