"""Arrow IPC tables on disk: atomic writes, checked reads, and the features table schema."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from .atomic import atomic_file
from .errors import MidasDataError, SchemaError, StaleArtifactError, where

META_PREFIX = "midas."


def write_table(path: str | os.PathLike, table: pa.Table, metadata: dict[str, str] | None = None) -> None:
    """Write `table` as an Arrow IPC file at `path` atomically, adding `midas.*` metadata."""
    meta = dict(table.schema.metadata or {})
    for k, v in (metadata or {}).items():
        meta[(META_PREFIX + k).encode()] = str(v).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_file(path, "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)


def read_table(path: str | os.PathLike) -> pa.Table:
    """Read an Arrow IPC file fully into memory; a damaged file is a clear error."""
    path = Path(path)
    if not path.exists():
        raise MidasDataError(f"{where(file=path)}: table not found; run the stage that produces it")
    try:
        with pa.memory_map(str(path), "r") as source:
            return pa.ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise MidasDataError(f"{where(file=path)}: not a readable Arrow IPC file ({e}); "
                             "delete it and rerun the stage that wrote it") from e


def table_metadata(table: pa.Table) -> dict[str, str]:
    """The `midas.*` schema metadata of a table, prefix stripped."""
    out = {}
    for k, v in (table.schema.metadata or {}).items():
        k = k.decode()
        if k.startswith(META_PREFIX):
            out[k[len(META_PREFIX):]] = v.decode()
    return out


def fixed_size_column(x: np.ndarray) -> pa.FixedSizeListArray:
    """A [n, d] float32 array as an Arrow fixed_size_list<float32>[d] column (zero-copy)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {x.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def fixed_size_to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Inverse of fixed_size_column: [n, d] float32."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    d = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, d)


@dataclass
class Features:
    """Per-sample features and unimodal confidences of one split, rows in index order."""

    keys: list[str]
    labels: np.ndarray  # int64 [n]
    feats: dict[str, np.ndarray]  # modality -> float32 [n, d_m]
    confs: dict[str, np.ndarray]  # modality -> float32 [n]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def modalities(self) -> list[str]:
        return list(self.feats)

    @property
    def fingerprint(self) -> str:
        return self.metadata.get("features_fingerprint", "")


def features_fingerprint(f: Features, dataset_fingerprint: str) -> str:
    """sha256 over keys, labels, feature and confidence values, and the dataset fingerprint."""
    h = hashlib.sha256(dataset_fingerprint.encode())
    h.update("\n".join(f.keys).encode())
    h.update(np.ascontiguousarray(f.labels, dtype=np.int64).tobytes())
    for m in f.modalities:
        h.update(m.encode())
        h.update(np.ascontiguousarray(f.feats[m], dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(f.confs[m], dtype=np.float32).tobytes())
    return h.hexdigest()


def write_features(path: str | os.PathLike, f: Features, dataset_fingerprint: str,
                   source: str, config: dict | None = None) -> str:
    """Write a features table (see docs/CONTRACTS.md); returns its fingerprint."""
    cols = {"key": pa.array(f.keys, pa.string()), "label": pa.array(np.asarray(f.labels, np.int64))}
    for m in f.modalities:
        cols[f"feat.{m}"] = fixed_size_column(f.feats[m])
    for m in f.modalities:
        cols[f"conf.{m}"] = pa.array(np.asarray(f.confs[m], np.float32))
    fp = features_fingerprint(f, dataset_fingerprint)
    write_table(path, pa.table(cols), {
        "dataset_fingerprint": dataset_fingerprint,
        "features_fingerprint": fp,
        "source": source,
        "modalities": json.dumps(f.modalities),
        "config": json.dumps(config or {}, sort_keys=True),
    })
    return fp


def read_features(path: str | os.PathLike, dataset_fingerprint: str | None = None) -> Features:
    """Read a features table; with `dataset_fingerprint`, refuse one built from other shards."""
    table = read_table(path)
    meta = table_metadata(table)
    for need in ("dataset_fingerprint", "features_fingerprint", "modalities"):
        if need not in meta:
            raise SchemaError(f"{where(file=path, field='midas.' + need)}: missing metadata; "
                              "this is not a midas-data features table")
    if dataset_fingerprint is not None and meta["dataset_fingerprint"] != dataset_fingerprint:
        raise StaleArtifactError(
            f"{where(file=path, field='midas.dataset_fingerprint')}: features were extracted "
            f"from dataset {meta['dataset_fingerprint'][:12]}, but the shards are now "
            f"{dataset_fingerprint[:12]}; rerun `midas-data extract`")
    modalities = json.loads(meta["modalities"])
    feats, confs = {}, {}
    for m in modalities:
        for col in (f"feat.{m}", f"conf.{m}"):
            if col not in table.column_names:
                raise SchemaError(f"{where(file=path, field=col)}: column missing")
        feats[m] = fixed_size_to_numpy(table.column(f"feat.{m}"))
        confs[m] = table.column(f"conf.{m}").to_numpy().astype(np.float32)
    return Features(
        keys=table.column("key").to_pylist(),
        labels=table.column("label").to_numpy().astype(np.int64),
        feats=feats, confs=confs, metadata=meta,
    )
