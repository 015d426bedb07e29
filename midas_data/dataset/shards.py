"""Write a dataset: WebDataset tar shards, an Arrow offset index per split, the manifest.

Shards are plain tars (`<key>.<modality>.<ext>`, `<key>.cls`) that the `webdataset`
package reads as they are. Members are written with fixed metadata (mtime 0, uid 0,
mode 0444) so the same input gives byte-identical shards. The index records, per sample
and modality, the byte offset, size and CRC32 of each member's data, so a reader can
fetch one payload with a single pread and notice a flipped byte.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from midas_data.atomic import atomic_dir
from midas_data.dataset.formats import Encoded, encode_value
from midas_data.dataset.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    KEY_PATTERN,
    MAX_KEY_CHARS,
    MAX_MODALITY_CHARS,
    MODALITY_PATTERN,
    dataset_fingerprint,
    file_sha256,
    write_manifest,
)
from midas_data.dataset.split import SPLITS, stratified_split
from midas_data.diskspace import dir_bytes, disk_full_guard
from midas_data.errors import MidasDataError, SchemaError, where
from midas_data.features.tables import write_table
from midas_data.locking import output_lock
from midas_data.options import SettingError
from midas_data.progress import progress_bar as tqdm

KEY_RE = re.compile(KEY_PATTERN)
MODALITY_RE = re.compile(MODALITY_PATTERN)
RESERVED = {"cls", "key", "label", "split"}


@dataclass
class Sample:
    """A sample before sharding. Payloads are inline values or file paths, loaded lazily."""

    key: str
    label: int | str
    payloads: Mapping[str, object]
    split: str | None = None
    source: str | None = None  # where it came from, for error messages


@dataclass
class _ShardState:
    path: Path
    fileobj: _HashingFile
    hasher: object = field(default_factory=hashlib.sha256)
    count: int = 0


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes what passes through and counts bytes."""

    def __init__(self, f, hasher):
        self._f, self._h, self.pos = f, hasher, 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def write(self, b) -> int:
        self._f.write(b)
        self._h.update(b)
        self.pos += len(b)
        return len(b)

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())  # durable before the manifest (fsynced) can point at it
        self._f.close()
        super().close()


# -- tar members, written directly ----------------------------------------------------------
# Each member is a GNU tar header (what `tarfile` writes with format=GNU_FORMAT for a regular
# file of mode 0444, uid/gid 0, mtime 0 and empty user/group names; names over 100 bytes get
# a `././@LongLink` header first), the data, and NULs to a 512-byte boundary. The archive ends
# with two zero blocks, padded to a 10240-byte record. tests/test_shards.py checks the bytes
# against `tarfile` itself. Writing them here avoids tarfile's per-member TarInfo copy and
# header building, which were the largest cost of a build.
TAR_BLOCK, TAR_RECORD = 512, 20 * 512
_MODE_IDS = b"0000444\0" + b"0000000\0" * 2  # mode, uid, gid
_MTIME = b"00000000000\0"
_AFTER_CHKSUM = (b"0" + bytes(100) + b"ustar  \0" + bytes(32 + 32 + 8 + 8 + 155 + 12))
_CONST_SUM = sum(_MODE_IDS) + sum(_MTIME) + 8 * 32 + sum(_AFTER_CHKSUM)
_LONGLINK = b"././@LongLink"


def _octal(n: int, digits: int) -> bytes:
    if not 0 <= n < 8 ** (digits - 1):
        raise ValueError(f"{n} does not fit a {digits}-byte tar number field")
    return b"%0*o\0" % (digits - 1, n)


def tar_header(name: str, size: int) -> bytes:
    """The header block(s) in front of a regular-file member `name` of `size` bytes."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100:  # GNU long name: a ././@LongLink member carrying the full name first
        long = raw + b"\0"
        pad = -len(long) % TAR_BLOCK
        return (_block(_LONGLINK, len(long), b"0000000\0" * 3, b"L") + long + bytes(pad)
                + _block(raw[:100], size, _MODE_IDS, b"0"))
    return _block(raw, size, _MODE_IDS, b"0")


def _block(name: bytes, size: int, mode_ids: bytes, kind: bytes) -> bytes:
    head = name + bytes(100 - len(name)) + mode_ids + _octal(size, 12) + _MTIME
    tail = kind + _AFTER_CHKSUM[1:]
    chksum = sum(head) + 8 * 32 + sum(tail)
    return head + b"%06o\0 " % chksum + tail


def tar_end(offset: int) -> bytes:
    """The end-of-archive blocks for an archive of `offset` bytes so far, as tarfile pads."""
    end = offset + 2 * TAR_BLOCK
    return bytes(2 * TAR_BLOCK + (-end % TAR_RECORD))


class SplitShardWriter:
    """Writes the shards of one split, rolling to a new shard by sample count or bytes."""

    def __init__(self, root: Path, split: str, max_count: int, max_bytes: int):
        self.root, self.split = root, split
        self.max_count, self.max_bytes = max_count, max_bytes
        self.shards: list[dict] = []
        self.rows: dict[str, list] = {"key": [], "label": [], "shard": [], "offset": [], "size": []}
        self.member_cols: dict[str, list] = {}
        self._cur: _ShardState | None = None

    def _open(self) -> _ShardState:
        rel = Path("shards") / f"{self.split}-{len(self.shards):06d}.tar"
        raw = open(self.root / rel, "wb", buffering=1 << 20)  # noqa: SIM115 - closed in _close
        hasher = hashlib.sha256()
        self.shards.append({"path": str(rel), "split": self.split, "count": 0, "bytes": 0, "sha256": ""})
        return _ShardState(rel, _HashingFile(raw, hasher), hasher)

    def _close(self) -> None:
        cur = self._cur
        if cur is None:
            return
        cur.fileobj.write(tar_end(cur.fileobj.pos))
        cur.fileobj.close()
        meta = self.shards[-1]
        meta.update(count=cur.count, bytes=cur.fileobj.pos, sha256=cur.hasher.hexdigest())
        self._cur = None

    def add(self, key: str, label: int, members: list[tuple[str, Encoded]]) -> None:
        cur = self._cur
        if cur is not None and (cur.count >= self.max_count or cur.fileobj.pos >= self.max_bytes):
            self._close()
            cur = None
        if cur is None:
            cur = self._cur = self._open()
        start = pos = cur.fileobj.pos
        parts = []
        for name, enc in [("cls", _cls(label))] + members:
            data = enc.data
            hdr = tar_header(f"{key}.{name}.{enc.ext}" if name != "cls" else f"{key}.cls", len(data))
            data_off = pos + len(hdr)
            pad = -len(data) % TAR_BLOCK
            parts += (hdr, data, bytes(pad))
            pos = data_off + len(data) + pad
            if name != "cls":
                col = self.member_cols.get(name)
                if col is None:
                    col = self.member_cols[name] = [[], [], []]
                col[0].append(data_off)
                col[1].append(len(data))
                col[2].append(zlib.crc32(data))
        cur.fileobj.write(b"".join(parts))  # one write per sample
        cur.count += 1
        self.rows["key"].append(key)
        self.rows["label"].append(label)
        self.rows["shard"].append(len(self.shards) - 1)
        self.rows["offset"].append(start)
        self.rows["size"].append(pos - start)

    def finish(self, modality_order: list[str]) -> pa.Table:
        self._close()
        cols = {"key": pa.array(self.rows["key"], pa.string()),
                "label": pa.array(self.rows["label"], pa.int64()),
                "shard": pa.array(self.rows["shard"], pa.int32()),
                "offset": pa.array(self.rows["offset"], pa.int64()),
                "size": pa.array(self.rows["size"], pa.int64())}
        for m in modality_order:
            off, size, crc = self.member_cols.get(m, [[], [], []])
            cols[f"{m}.offset"] = pa.array(off, pa.int64())
            cols[f"{m}.size"] = pa.array(size, pa.int64())
            cols[f"{m}.crc32"] = pa.array(crc, pa.uint32())
        return pa.table(cols)


def _cls(label: int) -> Encoded:
    return Encoded("cls", str(label).encode(), "cls", None, None)


def _check_schema(schema: dict, m: str, enc: Encoded, key: str, src: object) -> None:
    """First sample of a modality fixes its schema; later ones must agree."""
    facts = {"kind": enc.kind, "ext": enc.ext, "dtype": enc.dtype,
             "shape": list(enc.shape) if enc.shape is not None else None}
    if enc.kind == "audio" and facts["shape"]:
        facts["shape"] = [facts["shape"][0], None]  # clips may differ in length
    if m not in schema:
        schema[m] = facts
        return
    want = schema[m]
    for fld in ("kind", "ext", "dtype", "shape"):
        if want[fld] != facts[fld]:
            raise SchemaError(f"{where(src, key, m)}: {fld} {facts[fld]} disagrees with "
                              f"{want[fld]} of earlier samples of modality '{m}'")


def build_dataset(samples: Iterable[Sample], out_dir: str | Path, *, classes: list[str] | None = None,
                  modalities: list[str] | None = None, shard_max_count: int = 10_000,
                  shard_max_mb: float = 256.0, split_seed: int = 0,
                  split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
                  overwrite: bool = False, source: dict | None = None, progress: bool = True) -> dict:
    """Shard `samples` into `out_dir` atomically and return the manifest.

    Samples without a split get a seeded stratified split. Labels are class names or
    indices into `classes` (inferred from the labels, sorted, when not given). The output is
    locked for the call (`midas_data.locking`): a second writer waits, then refuses.
    """
    if isinstance(shard_max_count, bool) or not isinstance(shard_max_count, int) or shard_max_count < 1:
        raise SettingError(f"shard_max_count (--shard-samples) must be an integer >= 1, got "
                           f"{shard_max_count!r}")
    if not isinstance(shard_max_mb, int | float) or not shard_max_mb > 0:
        raise SettingError(f"shard_max_mb (--shard-mb) must be > 0, got {shard_max_mb!r}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise SettingError(f"split_seed (--split-seed) must be an integer >= 0, got {split_seed!r}")
    with output_lock(out_dir, "build-shards"):
        return _build_dataset(samples, Path(out_dir), classes, modalities, shard_max_count,
                              shard_max_mb, split_seed, split_fractions, overwrite, source, progress)


def _build_dataset(samples, out_dir: Path, classes, modalities, shard_max_count, shard_max_mb,
                   split_seed, split_fractions, overwrite, source, progress) -> dict:
    if out_dir.exists() and not out_dir.is_dir():
        raise MidasDataError(f"{where(file=out_dir)}: exists and is not a directory; choose another "
                             "output directory")
    if (out_dir / "manifest.json").exists() and not overwrite:
        raise MidasDataError(f"{where(file=out_dir)}: already holds a dataset; pass --overwrite "
                             "to replace it or choose another output directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").exists():
        raise MidasDataError(f"{where(file=out_dir)}: exists and is not empty (and not a dataset); "
                             "choose an empty or new output directory")
    samples = list(samples)
    if not samples:
        raise MidasDataError("the source yielded no samples; check the pipeline's input path")
    class_names, label_idx = _resolve_labels(samples, classes)
    seen: set[str] = set()
    for s in samples:
        if isinstance(s.key, str) and len(s.key) > MAX_KEY_CHARS:
            raise SchemaError(f"{where(s.source, s.key[:40] + '...', 'key')}: key of {len(s.key)} "
                              f"characters; keys may be at most {MAX_KEY_CHARS} (shorten it)")
        if not isinstance(s.key, str) or not KEY_RE.match(s.key):
            raise SchemaError(f"{where(s.source, s.key, 'key')}: keys may hold only letters, digits, "
                              "'_' and '-' (WebDataset splits keys at the first dot)")
        if s.key in seen:
            raise SchemaError(f"{where(s.source, s.key, 'key')}: duplicate key")
        seen.add(s.key)
    order = modalities or list(samples[0].payloads)
    src0 = samples[0].source  # errors about the whole source name where it came from
    if len(set(order)) != len(order):
        raise SchemaError(f"{where(src0, field='modalities')}: modality names repeat in {order}")
    for m in order:
        if not isinstance(m, str) or not MODALITY_RE.match(m) or m in RESERVED:
            raise SchemaError(f"{where(src0, field=m)}: modality names must match [a-z][a-z0-9_]*, "
                              f"be at most {MAX_MODALITY_CHARS} characters and not be one of "
                              f"{sorted(RESERVED)}")
    splits = np.array([s.split for s in samples], dtype=object)
    if any(sp is None for sp in splits):
        if not all(sp is None for sp in splits):
            s = next(s for s in samples if s.split is None)
            raise SchemaError(f"{where(s.source, s.key, 'split')}: this sample has no split but "
                              "others have one; give all or none")
        splits = stratified_split(label_idx, split_fractions, split_seed)
    bad = [i for i, sp in enumerate(splits) if not isinstance(sp, str) or sp not in SPLITS]
    if bad:
        s, names = samples[bad[0]], sorted({str(splits[i]) for i in bad})
        raise SchemaError(f"{where(s.source, s.key, 'split')}: unknown split names {names}; use "
                          f"{list(SPLITS)}")

    schema: dict = {}
    max_bytes = int(shard_max_mb * 1024 * 1024)
    # Past the checks above, an existing out_dir is either a dataset we may replace or empty.
    bar = tqdm(total=len(samples), desc="build-shards", unit="sample", disable=not progress)
    with disk_full_guard("build-shards", out_dir), \
            atomic_dir(out_dir, overwrite=overwrite or out_dir.exists()) as tmp, \
            disk_full_guard("build-shards", out_dir,  # what is written so far, scaled to all
                            need=lambda: dir_bytes(tmp) * len(samples) / max(bar.n, 1)):
        (tmp / "shards").mkdir()
        (tmp / "index").mkdir()
        split_meta, all_shards = {}, []
        for sp in SPLITS:
            members_idx = np.flatnonzero(splits == sp)
            if len(members_idx) == 0:
                continue
            writer = SplitShardWriter(tmp, sp, shard_max_count, max_bytes)
            for i in members_idx:
                s = samples[i]
                missing = [m for m in order if m not in s.payloads or s.payloads[m] is None]
                if missing:
                    raise SchemaError(f"{where(s.source, s.key, missing[0])}: modality missing")
                members = []
                for m in order:
                    enc = encode_value(s.payloads[m], key=s.key, field=m, file=s.source)
                    _check_schema(schema, m, enc, s.key, s.source)
                    members.append((m, enc))
                writer.add(s.key, int(label_idx[i]), members)
                bar.update(1)
            index = writer.finish(order)
            write_table(tmp / "index" / f"{sp}.arrow", index)
            # the index has no checksums of its own: the manifest's digest catches a flipped
            # key, label or offset that the payload CRCs cannot
            split_meta[sp] = {"count": len(members_idx), "index": f"index/{sp}.arrow",
                              "index_sha256": file_sha256(tmp / "index" / f"{sp}.arrow"),
                              "shards": [s["path"] for s in writer.shards]}
            all_shards.extend(writer.shards)
        bar.close()
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "modalities": {m: schema[m] for m in order}, "modality_order": order,
            "classes": class_names, "splits": split_meta, "shards": all_shards,
            "fingerprint": dataset_fingerprint({m: schema[m] for m in order}, class_names,
                                               all_shards, split_meta),
            "split_seed": split_seed, "source": source or {},
        }
        write_manifest(tmp, manifest)
    return manifest


def _resolve_labels(samples: list[Sample], classes: list[str] | None) -> tuple[list[str], np.ndarray]:
    raw = [s.label for s in samples]
    if classes is None:
        if all(isinstance(v, int | np.integer) for v in raw):
            classes = [str(c) for c in range(int(max(raw)) + 1)]
        else:
            names = {str(v) for v in raw}  # integer-like names sort numerically: "2" < "10"
            classes = sorted(names, key=lambda c: (0, int(c), c) if c.isdigit() else (1, 0, c))
    classes = [str(c) for c in classes]
    lookup = {c: i for i, c in enumerate(classes)}
    out = np.empty(len(raw), dtype=np.int64)
    for i, (s, v) in enumerate(zip(samples, raw)):
        if isinstance(v, int | np.integer) and not isinstance(v, bool):
            if not 0 <= int(v) < len(classes):
                raise SchemaError(f"{where(s.source, s.key, 'label')}: class index {v} is outside "
                                  f"the class list (0..{len(classes) - 1})")
            out[i] = int(v)
        elif str(v) in lookup:
            out[i] = lookup[str(v)]
        else:
            raise SchemaError(f"{where(s.source, s.key, 'label')}: unknown label {v!r}; known "
                              f"classes are {classes[:20]}{'...' if len(classes) > 20 else ''}")
    return classes, out
