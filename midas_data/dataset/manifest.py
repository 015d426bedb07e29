"""The dataset manifest: schema, classes, splits, shard list with checksums, fingerprint."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from midas_data.atomic import write_text_atomic
from midas_data.dataset.formats import KINDS, UNSAFE_EXTS
from midas_data.dataset.split import SPLITS
from midas_data.errors import MidasDataError, SchemaError, UnsafeInputError, where

FORMAT_NAME = "midas-data"
# 2: every split's index digest is mandatory and part of the fingerprint. Version 1
# datasets are refused with a message saying to rebuild them.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 256 << 20
MAX_MODALITIES = 1024
MAX_CLASSES = 1 << 20
MAX_SIZE = 1 << 53  # shard sizes and counts: exact in float64, no int64 overflow
# Every path a manifest names is one the builder writes: nothing can point outside the dataset.
SHARD_PATH_RE = re.compile(r"^shards/(train|val|test)-[0-9]{6,9}\.tar\Z")
# One limit on key and modality-name length for the builder, the reader and the verifier (a
# longer key would build but make tar names past what `inspect --verify` reads back).
MAX_KEY_CHARS = 512
MAX_MODALITY_CHARS = 64
KEY_PATTERN = rf"^[A-Za-z0-9_\-]{{1,{MAX_KEY_CHARS}}}$"  # also an RE2 pattern (Arrow compute)
MODALITY_PATTERN = rf"^[a-z][a-z0-9_]{{0,{MAX_MODALITY_CHARS - 1}}}$"
MODALITY_NAME_RE = re.compile(MODALITY_PATTERN)
RESERVED_NAMES = {"cls", "key", "label", "split"}
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def dataset_fingerprint(modalities: dict, classes: list[str], shards: list[dict],
                        splits: dict) -> str:
    """sha256 over the schema, the class list, every shard's checksum, in order, and every
    split's index digest (`splits.<split>.index_sha256`), so a changed index is another dataset."""
    blob = json.dumps({"modalities": modalities, "classes": classes,
                       "shards": [(s["path"], s["sha256"]) for s in shards],
                       "indexes": {sp: meta["index_sha256"] for sp, meta in splits.items()}},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(root: Path, manifest: dict) -> None:
    write_text_atomic(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(root: str | Path) -> dict:
    """Load and sanity-check `root/manifest.json`.

    The manifest may come from anywhere: its structure, types, names and every path it
    holds are checked (paths must be the builder's own `shards/{split}-NNNNNN.tar` and
    `index/{split}.arrow`, so no value can reach outside the dataset directory) before the
    fingerprint is compared.
    """
    path = Path(root) / MANIFEST
    if not path.exists():
        raise MidasDataError(f"{where(file=path)}: no dataset here; run `midas-data build-shards` first")
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise SchemaError(f"{where(file=path)}: {size} bytes is more than a manifest can be "
                              f"({MAX_MANIFEST_BYTES}); not a midas-data manifest")
        m = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise MidasDataError(f"{where(file=path)}: manifest is not valid JSON ({e})") from e
    except OSError as e:
        raise MidasDataError(f"{where(file=path)}: manifest cannot be read ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise SchemaError(f"{where(file=path, field='format')}: not a midas-data manifest")
    if m.get("format_version") == 1:
        raise SchemaError(f"{where(file=path, field='format_version')}: format 1, written by an "
                          "older midas-data whose fingerprint does not cover the index digests; "
                          "rebuild it (`midas-data build-shards ... --out "
                          f"{Path(root)} --overwrite`), then run extract and mine-misaligned again")
    if m.get("format_version") != FORMAT_VERSION:
        raise SchemaError(f"{where(file=path, field='format_version')}: version "
                          f"{m.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    for field in ("modalities", "modality_order", "classes", "splits", "shards", "fingerprint"):
        if field not in m:
            raise SchemaError(f"{where(file=path, field=field)}: missing from manifest")
    _check_structure(m, path)
    expect = dataset_fingerprint(m["modalities"], m["classes"], m["shards"], m["splits"])
    if expect != m["fingerprint"]:
        raise SchemaError(f"{where(file=path, field='fingerprint')}: does not match the manifest's "
                          "own schema and shard list (edited by hand?); rebuild the dataset")
    return m


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _dims(shape: object, n: int, last_free: bool = False) -> bool:
    return isinstance(shape, list) and len(shape) == n and all(
        (d is None and last_free and i == n - 1) or (_is_int(d) and 0 <= d <= MAX_SIZE)
        for i, d in enumerate(shape))


def _schema_ok(spec: dict) -> bool:
    """The facts the builder records per kind: tensor dtype+shape, image uint8 HxWxC,
    audio float32 [channels, None], text neither."""
    kind, dtype, shape = spec["kind"], spec.get("dtype", ...), spec.get("shape", ...)
    if kind == "text":
        return dtype is None and shape is None
    if kind == "image":
        return dtype == "uint8" and _dims(shape, 3) and shape[2] in (1, 3)
    if kind == "audio":
        return dtype == "float32" and _dims(shape, 2, last_free=True)
    if (not isinstance(dtype, str) or dtype == "object"
            or not re.fullmatch(r"[a-z][a-z0-9]*(\[[A-Za-z0-9]+\])?", dtype)):
        return False  # a numpy dtype name (float32, str160, datetime64[ns]); never object
    return isinstance(shape, list) and len(shape) <= 32 and _dims(shape, len(shape))


def _check_structure(m: dict, path: Path) -> None:
    """Types, names, counts and paths of a parsed manifest; a located SchemaError otherwise."""

    def bad(field: str, what: str, exc: type[MidasDataError] = SchemaError) -> None:
        raise exc(f"{where(file=path, field=field)}: {what}; the manifest is damaged or was not "
                  "written by midas-data, rebuild the dataset")

    mods, order = m["modalities"], m["modality_order"]
    if not isinstance(mods, dict) or not 1 <= len(mods) <= MAX_MODALITIES:
        bad("modalities", f"must be an object of 1..{MAX_MODALITIES} modalities")
    if (not isinstance(order, list) or not all(isinstance(x, str) for x in order)
            or order != list(mods)):
        bad("modality_order", "must list the names of `modalities`, in order")
    for name, spec in mods.items():
        if not MODALITY_NAME_RE.match(name) or name in RESERVED_NAMES:
            bad(name, f"modality names must match [a-z][a-z0-9_]*, be at most {MAX_MODALITY_CHARS} "
                      "characters and not be reserved")
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str) or spec["kind"] not in KINDS:
            bad(name, f"kind must be one of {sorted(KINDS)}")
        ext = spec.get("ext")
        if isinstance(ext, str) and ext.lower() in UNSAFE_EXTS:
            bad(name, f"'.{ext}' payloads can execute code when decoded and are refused",
                UnsafeInputError)
        if ext not in KINDS[spec["kind"]]:
            bad(name, f"ext {ext!r} is not one of {list(KINDS[spec['kind']])} for kind {spec['kind']!r}")
        member = spec.get("member")  # tar member suffix of tars indexed in place
        if member is not None and (not isinstance(member, str) or member == "cls"
                                   or not re.fullmatch(r"[a-z0-9_]+(\.[a-z0-9_]+)*", member)
                                   or member.rsplit(".", 1)[-1] != ext):
            bad(name, f"member {member!r} must be a tar member suffix ending in .{ext}")
        if not _schema_ok(spec):
            bad(name, f"dtype {spec.get('dtype')!r} and shape {spec.get('shape')!r} are not a "
                      f"valid schema of a {spec['kind']} modality")
    suffixes = [spec.get("member") or f"{n}.{spec['ext']}" for n, spec in mods.items()]
    if len(set(suffixes)) != len(suffixes):
        bad("modalities", "two modalities name the same tar member")
    classes = m["classes"]
    if (not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES
            or not all(isinstance(c, str) for c in classes)):
        bad("classes", f"must be a list of 1..{MAX_CLASSES} class names")
    shards = m["shards"]
    if not isinstance(shards, list):
        bad("shards", "must be a list")
    seen: set[str] = set()
    for i, s in enumerate(shards):
        fld = f"shards[{i}]"
        if not isinstance(s, dict):
            bad(fld, "must be an object")
        p = s.get("path")
        if not isinstance(p, str) or not SHARD_PATH_RE.match(p):
            bad(fld + ".path", f"{p!r} is not a shard path of this format "
                               "(shards/<split>-NNNNNN.tar); paths outside the dataset are refused",
                UnsafeInputError if isinstance(p, str) and (".." in p or p.startswith("/")) else SchemaError)
        if p in seen:
            bad(fld + ".path", f"{p!r} is listed twice")
        seen.add(p)
        if s.get("split") not in SPLITS or not p.startswith(f"shards/{s.get('split')}-"):
            bad(fld + ".split", f"{s.get('split')!r} is not the split its path names")
        for k in ("count", "bytes"):
            if not _is_int(s.get(k)) or not 0 <= s[k] <= MAX_SIZE:
                bad(f"{fld}.{k}", f"must be an integer in 0..{MAX_SIZE}")
        if not isinstance(s.get("sha256"), str) or not SHA256_RE.match(s["sha256"]):
            bad(fld + ".sha256", "must be a sha256 hex digest")
    splits = m["splits"]
    if not isinstance(splits, dict) or not splits:
        bad("splits", "must be a non-empty object")
    for sp, meta in splits.items():
        fld = f"splits.{sp}"
        if sp not in SPLITS:
            bad(fld, f"unknown split {sp!r} (splits are {list(SPLITS)})", UnsafeInputError
                if "/" in sp or ".." in sp else SchemaError)
        if not isinstance(meta, dict):
            bad(fld, "must be an object")
        if meta.get("index") != f"index/{sp}.arrow":
            idx = meta.get("index")
            bad(fld + ".index", f"{idx!r} is not index/{sp}.arrow; paths outside the dataset are "
                                "refused", UnsafeInputError if isinstance(idx, str) else SchemaError)
        if not isinstance(meta.get("index_sha256"), str) or not SHA256_RE.match(meta["index_sha256"]):
            bad(fld + ".index_sha256", "must be the sha256 hex digest of the index (it is "
                                       "mandatory: without it a changed index would be served)")
        own = [s for s in shards if s["split"] == sp]
        if meta.get("shards") != [s["path"] for s in own]:
            bad(fld + ".shards", "does not list this split's entries of `shards`, in order")
        if not _is_int(meta.get("count")) or meta["count"] != sum(s["count"] for s in own):
            bad(fld + ".count", "is not the sum of its shards' counts")
    orphans = sorted({s["split"] for s in shards} - set(splits))
    if orphans:
        bad("shards", f"holds shards of splits {orphans} that `splits` does not list")
    if not isinstance(m["fingerprint"], str):
        bad("fingerprint", "must be a string")
