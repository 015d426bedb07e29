"""A user's own data: a CSV, JSONL or Parquet manifest with one row per sample.

Columns: `key`, `label`, optional `split` (train/val/test), and one column per modality
holding a file path (.npy, .png/.jpg, .wav, .txt; relative paths are resolved against the
manifest's folder) or an inline value (a number, a JSON list such as "[0.1, 2.0]", text).

Paths must stay inside the manifest's folder (no '..', absolute paths or symlinks leading
out) unless `allow_outside_paths=True`; a value that looks like a path (a '/' or a file-name
extension, no spaces) with an extension that is not a payload type is refused rather than
stored as text. Labels and keys must be UTF-8 text (a Parquet binary column is decoded).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow as pa

from midas_data.dataset.formats import EXT_TO_KIND, UNSAFE_EXTS
from midas_data.dataset.shards import Sample
from midas_data.errors import MidasDataError, SchemaError, UnsafeInputError, where

MAX_COLUMNS = 1024  # a manifest with millions of columns is refused before it is parsed
MAX_HEADER_BYTES = 1 << 20
REQUIRED = ("key", "label")


def _read_table(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, "rb") as f:
                header = f.readline(MAX_HEADER_BYTES + 1)
            if len(header) > MAX_HEADER_BYTES or header.count(b",") >= MAX_COLUMNS:
                raise SchemaError(f"{where(file=path)}: header has more than {MAX_COLUMNS} columns "
                                  "or exceeds 1 MiB; is this really a sample manifest?")
            from pyarrow import csv

            return csv.read_csv(path, convert_options=csv.ConvertOptions(
                column_types={"key": pa.string(), "split": pa.string()}, strings_can_be_null=True))
        if suffix in (".jsonl", ".ndjson", ".json"):
            from pyarrow import json as pajson

            _check_jsonl_columns(path)
            return pajson.read_json(path)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            if len(pq.read_schema(path)) > MAX_COLUMNS:
                raise SchemaError(f"{where(file=path)}: more than {MAX_COLUMNS} columns")
            return pq.read_table(path)
    except FileNotFoundError as e:
        raise MidasDataError(f"{where(file=path)}: manifest file does not exist") from e
    except (pa.ArrowException, OSError) as e:
        raise SchemaError(f"{where(file=path)}: cannot parse manifest ({e})") from e
    raise SchemaError(f"{where(file=path)}: manifest must be .csv, .jsonl or .parquet")


def _check_jsonl_columns(path: Path) -> None:
    """Refuse, before Arrow parses it, a JSONL manifest whose rows name more than MAX_COLUMNS
    distinct fields or hold JSON objects (Arrow would make a column of every field of every
    row, nulls included: a few MB of crafted JSON can take minutes and gigabytes)."""
    import json

    names: set[str] = set()
    with open(path, "rb") as f:
        for lineno, line in enumerate(iter(lambda: f.readline(MAX_HEADER_BYTES + 1), b""), 1):
            if len(line) > MAX_HEADER_BYTES:
                raise SchemaError(f"{where(path, f'line {lineno}')}: a row longer than 1 MiB; is "
                                  "this really a sample manifest?")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise SchemaError(f"{where(path, f'line {lineno}')}: not a JSON object ({e})") from e
            if not isinstance(row, dict):
                raise SchemaError(f"{where(path, f'line {lineno}')}: each line must be a JSON object")
            nested = [k for k, v in row.items() if isinstance(v, dict)]
            if nested:
                raise SchemaError(f"{where(path, f'line {lineno}', nested[0])}: cells hold numbers, "
                                  "strings or lists, not JSON objects")
            names.update(row)
            if len(names) > MAX_COLUMNS:
                raise SchemaError(f"{where(path, f'line {lineno}')}: rows name more than "
                                  f"{MAX_COLUMNS} distinct columns; is this really a sample manifest?")


def read_manifest_file(manifest: str | Path, modalities: list[str] | None = None,
                       classes: list[str] | None = None, *, allow_outside_paths: bool = False) -> dict:
    """Samples described by a manifest file, payload paths resolved but not yet loaded."""
    path = Path(manifest)
    table = _read_table(path)
    try:
        table.column_names  # noqa: B018 - Arrow decodes the names only now
    except UnicodeDecodeError as e:
        raise SchemaError(f"{where(file=path)}: column names are not UTF-8 ({e})") from e
    if table.num_columns > MAX_COLUMNS:
        raise SchemaError(f"{where(file=path)}: {table.num_columns} columns exceed {MAX_COLUMNS}")
    if table.num_rows == 0:
        raise SchemaError(f"{where(file=path)}: manifest has no rows; nothing to build")
    for col in REQUIRED:
        if col not in table.column_names:
            raise SchemaError(f"{where(file=path, field=col)}: required column missing")
    mods = list(modalities or [c for c in table.column_names if c not in ("key", "label", "split")])
    missing = [m for m in mods if m not in table.column_names]
    if missing:
        raise SchemaError(f"{where(file=path, field=missing[0])}: modality column missing")
    if len(mods) < 2:
        raise SchemaError(f"{where(file=path)}: MIDAS needs at least two modality columns, found {mods}")
    base = path.parent
    real_base = os.path.realpath(base)
    rows = table.to_pylist()
    samples = []
    for i, row in enumerate(rows):
        key = _text(row["key"], path, i, "key")
        label = row["label"]
        if key is None or label is None:
            raise SchemaError(f"{where(path, f'row {i + 1}', 'key' if key is None else 'label')}: empty")
        label = _text(label, path, i, "label")
        split = _text(row.get("split"), path, i, "split")
        payloads = {}
        for m in mods:
            v = row[m]
            if v is None:
                raise SchemaError(f"{where(path, key, m)}: modality missing (empty cell)")
            if isinstance(v, str) and _looks_like_path(v):
                v = _payload_path(v, base, real_base, allow_outside_paths, path, key, m)
            payloads[m] = v
        label = int(label) if isinstance(label, int) and classes is not None else str(label)
        samples.append(Sample(key=str(key), label=label, payloads=payloads,
                              split=split or None, source=str(path)))
    return {"samples": samples, "classes": classes, "modalities": mods,
            "source": {"pipeline": "manifest", "path": str(path.resolve())}}


def _text(value: object, path: Path, i: int, field: str) -> object:
    """A binary cell (a non-UTF-8 CSV column, a Parquet binary column) decoded as UTF-8, or a
    located error with the row number; other values as they are."""
    if not isinstance(value, bytes | bytearray):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise SchemaError(f"{where(path, f'row {i + 1}', field)}: {bytes(value)[:40]!r} is not "
                          f"UTF-8 text ({e.reason} at byte {e.start}); save the manifest as "
                          "UTF-8") from None


_PATHLIKE = re.compile(r"^\S+\.[A-Za-z0-9]{1,8}$")


def _looks_like_path(v: str) -> bool:
    """A path separator, or one word ending in an extension with a letter ('a.png', 'x.npz');
    never a number ('3.14') or a sentence."""
    if "/" in v or "\\" in v:
        return not v.strip().startswith("[")  # an inline JSON list is no path
    ext = Path(v).suffix.lstrip(".")
    return bool(_PATHLIKE.match(v)) and any(c.isalpha() for c in ext)


def _payload_path(v: str, base: Path, real_base: str, allow_outside: bool, manifest: Path,
                  key: str, field: str) -> Path:
    """A payload path resolved against the manifest's folder: a supported extension, and
    inside the folder (symlinks followed) unless allowed."""
    p = Path(v)
    p = p if p.is_absolute() else base / p
    ext = p.suffix.lower().lstrip(".")
    if ext not in EXT_TO_KIND and ext not in UNSAFE_EXTS:  # unsafe ones are refused on encode
        raise SchemaError(f"{where(manifest, key, field)}: {v!r} looks like a file path, but "
                          f"'.{ext}' is not a payload type ({', '.join(sorted(EXT_TO_KIND))}); "
                          "fix the extension, or write text with at least one space")
    real = os.path.realpath(p)
    if not allow_outside and os.path.commonpath([real, real_base]) != real_base:
        raise UnsafeInputError(f"{where(manifest, key, field)}: {v!r} leads outside the manifest's "
                               f"folder {real_base} (to {real}); move the file under that folder "
                               "or pass --allow-outside-paths")
    return p
