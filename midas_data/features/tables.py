"""Arrow IPC tables on disk: atomic writes, checked reads, and the features table schema."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from midas_data.atomic import atomic_file
from midas_data.errors import MidasDataError, SchemaError, StaleArtifactError, where

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
    """Read an Arrow IPC file fully into memory; a damaged file is a clear error.

    The file is fully validated (offsets, UTF-8, lengths) before anything reads a value, so
    a damaged or crafted file cannot make Arrow read outside its buffers.
    """
    path = Path(path)
    if not path.exists():
        raise MidasDataError(f"{where(file=path)}: table not found; run the stage that produces it")
    try:
        with pa.memory_map(str(path), "r") as source:
            table = pa.ipc.open_file(source).read_all()
        table.validate(full=True)
        for k, v in (table.schema.metadata or {}).items():
            k.decode(), v.decode()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise MidasDataError(f"{where(file=path)}: not a readable Arrow IPC file ({e}); "
                             "delete it and rerun the stage that wrote it") from e
    return table


def _array_bytes(arr: pa.Array) -> list:
    """The values of a null-free fixed-width or string array as buffers, independent of
    chunking and slicing: the data for fixed width; lengths, then the bytes, for strings."""
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t):
        width = np.int64 if pa.types.is_large_string(t) else np.int32
        offsets = np.frombuffer(arr.buffers()[1], width)[arr.offset: arr.offset + len(arr) + 1]
        lo, hi = (int(offsets[0]), int(offsets[-1])) if len(offsets) else (0, 0)
        data = arr.buffers()[2]
        return [np.diff(offsets).astype(np.int64), b"" if data is None else memoryview(data)[lo:hi]]
    if pa.types.is_fixed_size_list(t):
        return _array_bytes(arr.flatten())
    return [np.ascontiguousarray(arr.to_numpy(zero_copy_only=False))]


def table_content_sha256(table: pa.Table, columns: list[str] | None = None) -> str:
    """sha256 over the names, types and values of `columns` (default all), in order: a
    checksum of what a reader gets, the same however the table is chunked. Columns must be
    null-free (nulls are refused by the readers before this)."""
    h = hashlib.sha256()
    for name in columns or table.column_names:
        col = table.column(name)
        h.update(f"{name}:{col.type}:{len(col)}\n".encode())
        if col.null_count:
            h.update(b"nulls" + np.asarray(col.is_null().to_numpy(zero_copy_only=False)).tobytes())
        for part in _array_bytes(col.combine_chunks()):
            h.update(part)
    return h.hexdigest()


def table_metadata(table: pa.Table) -> dict[str, str]:
    """The `midas.*` schema metadata of a table, prefix stripped."""
    out = {}
    for k, v in (table.schema.metadata or {}).items():
        k = k.decode("utf-8", "replace")
        if k.startswith(META_PREFIX):
            out[k[len(META_PREFIX):]] = v.decode("utf-8", "replace")
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
    """Read a features table; with `dataset_fingerprint`, refuse one built from other shards.

    The stored `midas.features_fingerprint` is recomputed from the values read, so a damaged
    table is an error, never silently different features.
    """
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
    try:
        modalities = json.loads(meta["modalities"])
    except (ValueError, RecursionError) as e:
        raise SchemaError(f"{where(file=path, field='midas.modalities')}: not JSON ({e})") from e
    if (not isinstance(modalities, list) or not modalities
            or not all(isinstance(m, str) for m in modalities) or len(set(modalities)) != len(modalities)):
        raise SchemaError(f"{where(file=path, field='midas.modalities')}: not a list of modality names")
    for col, ok, what in (("key", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string"),
                          ("label", pa.types.is_integer, "integer")):
        if col not in table.column_names:
            raise SchemaError(f"{where(file=path, field=col)}: column missing")
        if not ok(table.schema.field(col).type):
            raise SchemaError(f"{where(file=path, field=col)}: type {table.schema.field(col).type}, "
                              f"expected {what}")
    feats, confs = {}, {}
    for m in modalities:
        for col in (f"feat.{m}", f"conf.{m}"):
            if col not in table.column_names:
                raise SchemaError(f"{where(file=path, field=col)}: column missing")
        ft, ct = table.schema.field(f"feat.{m}").type, table.schema.field(f"conf.{m}").type
        if not (pa.types.is_fixed_size_list(ft) and pa.types.is_floating(ft.value_type)):
            raise SchemaError(f"{where(file=path, field=f'feat.{m}')}: type {ft}, expected "
                              "fixed_size_list<float32>")
        if not pa.types.is_floating(ct):
            raise SchemaError(f"{where(file=path, field=f'conf.{m}')}: type {ct}, expected float32")
        for col in (f"feat.{m}", f"conf.{m}"):
            c = table.column(col)
            if c.null_count or (pa.types.is_fixed_size_list(c.type)
                                and pc.list_flatten(c).null_count):
                raise SchemaError(f"{where(file=path, field=col)}: holds nulls")
        feats[m] = fixed_size_to_numpy(table.column(f"feat.{m}"))
        confs[m] = table.column(f"conf.{m}").to_numpy().astype(np.float32)
    for col in ("key", "label"):
        if table.column(col).null_count:
            raise SchemaError(f"{where(file=path, field=col)}: holds nulls")
    f = Features(
        keys=table.column("key").to_pylist(),
        labels=table.column("label").to_numpy().astype(np.int64),
        feats=feats, confs=confs, metadata=meta,
    )
    if features_fingerprint(f, meta["dataset_fingerprint"]) != meta["features_fingerprint"]:
        raise SchemaError(f"{where(file=path, field='midas.features_fingerprint')}: the values do not "
                          "match the table's own fingerprint (damaged or edited); rerun "
                          "`midas-data extract`")
    return f
