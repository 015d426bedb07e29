"""The dataset manifest: schema, classes, splits, shard list with checksums, fingerprint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .atomic import write_text_atomic
from .errors import MidasDataError, SchemaError, where

FORMAT_NAME = "midas-data"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def dataset_fingerprint(modalities: dict, classes: list[str], shards: list[dict]) -> str:
    """sha256 over the schema, the class list and every shard's checksum, in order."""
    blob = json.dumps({"modalities": modalities, "classes": classes,
                       "shards": [(s["path"], s["sha256"]) for s in shards]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_manifest(root: Path, manifest: dict) -> None:
    write_text_atomic(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(root: str | Path) -> dict:
    """Load and sanity-check `root/manifest.json`."""
    path = Path(root) / MANIFEST
    if not path.exists():
        raise MidasDataError(f"{where(file=path)}: no dataset here; run `midas-data build-shards` first")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MidasDataError(f"{where(file=path)}: manifest is not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise SchemaError(f"{where(file=path, field='format')}: not a midas-data manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise SchemaError(f"{where(file=path, field='format_version')}: version "
                          f"{m.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    for field in ("modalities", "modality_order", "classes", "splits", "shards", "fingerprint"):
        if field not in m:
            raise SchemaError(f"{where(file=path, field=field)}: missing from manifest")
    expect = dataset_fingerprint(m["modalities"], m["classes"], m["shards"])
    if expect != m["fingerprint"]:
        raise SchemaError(f"{where(file=path, field='fingerprint')}: does not match the manifest's "
                          "own schema and shard list (edited by hand?); rebuild the dataset")
    return m
