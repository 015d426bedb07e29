"""Full verification of a built dataset: every shard against the manifest and the index.

`verify_dataset` is what `Dataset.verify()` and `midas-data inspect --verify` run. It checks
each shard's size and sha256, reads every indexed payload as a reader would (tar header and
CRC), compares each tensor's .npy header with the manifest, and walks every tar header
itself (`walk_tar`: bounded reads, no `tarfile` extraction, links and paths refused), so a
member the index does not know is reported too. Problems are returned, never raised.

A dataset `index-shards` made over tars the user already had (its manifest gives each
modality's `member` suffix and records `source.indexed_from`) is checked as strictly as its
tars allow: the same sizes, hashes, payload headers, CRCs and .npy headers, but the walk
accepts pax headers (bounded, parsed here, `path` and `size` honoured as any tar reader
would), member names other than `<key>.<modality>.<ext>` and members the index does not use
(the `.json` of a sample, a skipped sample), and expects the `.cls` member only where the
label came from it (`source.label`). A `.json` label is compared with the index instead.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from midas_data.dataset.formats import npy_header
from midas_data.dataset.manifest import MAX_KEY_CHARS, MAX_MODALITY_CHARS, file_sha256
from midas_data.dataset.reader import BLOCK, SplitReader
from midas_data.errors import CorruptShardError, MidasDataError, UnsafeInputError, where

if TYPE_CHECKING:
    from midas_data.dataset.reader import Dataset

MEMBER_RE = re.compile(r"^[A-Za-z0-9_\-]+\.(cls|[a-z][a-z0-9_]*\.[a-z0-9]+)$")
# the longest member name the builder writes, `<key>.<modality>.<ext>`, with room to spare
MAX_LONGNAME = max(64 << 10, MAX_KEY_CHARS + MAX_MODALITY_CHARS + 64)
# pax extended headers of indexed tars: a long path and a few numbers; more is refused, unread
MAX_PAX_BYTES = 1 << 20
# the largest `.json` member whose label is compared (index-shards reads no more either)
MAX_LABEL_JSON_BYTES = 1 << 20
_JSON_LABEL = object()  # marks a `.json` member that carries the label in `expected`


def indexed_in_place(manifest: dict) -> bool:
    """Whether the dataset was made by `index-shards` over existing tars (its modalities
    name their member suffix, or its source lists the tars it was indexed from)."""
    src = manifest.get("source")
    return (any("member" in spec for spec in manifest["modalities"].values())
            or (isinstance(src, dict) and "indexed_from" in src))


def label_source(manifest: dict) -> str | None:
    """Where each sample's label lives in the tar: "cls" (the `.cls` member, always so for
    `build-shards`), "json:<field>[.<field>...]" (a field of the `.json` member), or None
    when an indexed manifest does not say (then no label member is expected)."""
    if not indexed_in_place(manifest):
        return "cls"
    src = manifest.get("source")
    label = src.get("label") if isinstance(src, dict) else None
    if label == "cls" or (isinstance(label, str)
                          and re.fullmatch(r"json:[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", label)):
        return label
    return None


def verify_dataset(ds: Dataset, progress: bool = False) -> list[str]:
    """Check every shard's size, sha256 and tar structure against the index; return the
    problems found (an empty list: the dataset is exactly as built)."""
    problems = []
    readers: dict[str, SplitReader | None] = {}
    for sp in ds.splits:
        try:
            readers[sp] = ds.split(sp)
        except MidasDataError as e:
            readers[sp] = None
            problems.append(str(e))
    for s in ds.manifest["shards"]:
        path = ds.root / s["path"]
        if not path.is_file():
            problems.append(f"{where(file=path)}: shard missing")
            continue
        size = path.stat().st_size
        if size != s["bytes"]:
            problems.append(f"{where(file=path)}: {size} bytes, manifest says {s['bytes']} (truncated?)")
        if file_sha256(path) != s["sha256"]:
            problems.append(f"{where(file=path)}: sha256 mismatch (corrupted bytes)")
        sr = readers.get(s["split"])
        if sr is not None:
            problems.extend(check_shard(ds.schema, sr, path))
    return problems


def check_shard(schema: dict, sr: SplitReader, path: Path) -> list[str]:
    """Check every indexed payload of one shard (tar header and CRC, as a read would),
    then walk the shard's tar headers and compare them with the index."""
    shard_no = [str(p) for p in sr.shard_paths].index(str(path))
    rows = np.flatnonzero(sr.shard == shard_no)
    indexed, label_src = indexed_in_place(sr.manifest), label_source(sr.manifest)
    out = []
    for row in rows:
        for m in sr.modalities:
            try:
                sr.read_raw(int(row), m)
            except CorruptShardError as e:
                out.append(str(e))
    expected: dict[str, tuple[int, object]] = {}
    for row in rows:
        key = sr.keys[row]
        if label_src == "cls":
            expected[f"{key}.cls"] = (row, None)
        elif label_src is not None:  # json:<field>: the label index-shards read
            expected[f"{key}.json"] = (row, _JSON_LABEL)
        for m in sr.modalities:
            expected[sr.member_name(int(row), m)] = (row, m)
    found = set()
    try:
        for name, data_off, size, cls_data in walk_tar(path, indexed=indexed):
            if name not in expected:
                if not indexed:  # indexed tars may hold what the index does not use
                    out.append(f"{where(file=path, key=name)}: unexpected tar member (not in "
                               "the index); refused")
                continue
            found.add(name)
            row, m = expected[name]
            if m is None:
                problem = _check_cls(sr, int(row), path, cls_data, indexed)
            elif m is _JSON_LABEL:
                problem = _check_json_label(sr, int(row), path, data_off, size, label_src)
            elif (data_off, size) != (int(sr.member[m][0][row]), int(sr.member[m][1][row])):
                problem = (f"{where(path, sr.keys[row], m)}: tar member at offset {data_off} "
                           f"({size} bytes) is not where the index points")
            elif schema[m]["kind"] == "tensor":
                problem = check_npy_header(schema, sr, int(row), m)
            else:
                problem = None
            if problem:
                out.append(problem)
    except MidasDataError as e:
        out.append(str(e))
    else:
        missing = [n for n in expected if n not in found]
        if missing:
            out.append(f"{where(file=path, key=missing[0])}: {len(missing)} indexed tar "
                       "member(s) missing from the shard")
    return out


def _check_cls(sr: SplitReader, row: int, path: Path, data: bytes | None, indexed: bool
               ) -> str | None:
    """The `.cls` member must hold the indexed label: exactly its digits as build-shards
    writes them, or (an indexed tar) an integer as index-shards parsed it."""
    want = int(sr.labels[row])
    data = data or b""
    if indexed:
        text = data.decode("utf-8", "replace").strip()
        ok = bool(re.fullmatch(r"-?[0-9]+", text)) and int(text) == want
    else:
        ok = data == str(want).encode()
    if ok:
        return None
    return (f"{where(path, sr.keys[row], 'label')}: .cls member holds {data[:20]!r}, the index "
            f"says {want}")


def _check_json_label(sr: SplitReader, row: int, path: Path, data_off: int, size: int,
                      label_src: str | None) -> str | None:
    """The `.json` field the label was read from must still give the indexed label."""
    fld = (label_src or "json:").split(":", 1)[1]
    loc = where(path, sr.keys[row], "json:" + fld)
    if size > MAX_LABEL_JSON_BYTES:
        return f"{loc}: .json member of {size} bytes, over {MAX_LABEL_JSON_BYTES}; not read"
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), size, data_off)
    try:
        value = json.loads(data)
        for part in fld.split("."):
            value = value[part]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError) as e:
        return f"{loc}: the label field is gone from the .json member ({type(e).__name__})"
    want = int(sr.labels[row])
    classes = sr.manifest["classes"]
    if isinstance(value, bool) or not isinstance(value, int | str):
        ok = False
    elif isinstance(value, int):
        ok = value == want
    else:
        ok = 0 <= want < len(classes) and classes[want] == value
    if ok:
        return None
    return (f"{loc}: .json label {str(value)[:40]!r}, the index says {want} "
            f"({classes[want] if 0 <= want < len(classes) else '?'!r})")


def check_npy_header(schema: dict, sr: SplitReader, row: int, m: str) -> str | None:
    """A tensor payload's .npy header must give the manifest's dtype and shape (read
    from the first bytes only; object arrays, pickles in disguise, are reported)."""
    off, size, _ = (int(a[row]) for a in sr.member[m])
    try:
        prefix = sr._pread(int(sr.shard[row]), off, min(size, 4096), sr.keys[row], m)
        shape, _, dtype, _ = npy_header(prefix)
    except CorruptShardError as e:
        return str(e)
    except Exception as e:  # damaged or hostile header: report, never raise
        return f"{where(sr.shard_paths[sr.shard[row]], sr.keys[row], m)}: bad .npy header ({e})"
    spec = schema[m]
    if dtype.name != spec["dtype"] or list(shape) != spec["shape"]:
        return (f"{where(sr.shard_paths[sr.shard[row]], sr.keys[row], m)}: .npy header says "
                f"{dtype} {list(shape)}, the manifest says {spec['dtype']} {spec['shape']}")
    return None


def walk_tar(path: str | os.PathLike, indexed: bool = False
             ) -> Iterator[tuple[str, int, int, bytes | None]]:
    """Yield (name, data offset, size, data if a `.cls` member) for each member of a shard.

    Reads headers only (one 512-byte pread each), never trusts a size past the end of the
    file, never extracts, and refuses what our shards never hold: links, directories,
    devices, pax headers, names with '/', '..' or an absolute path, names that are not
    `<key>.<modality>.<ext>` or `<key>.cls`. Errors are CorruptShardError/UnsafeInputError
    naming the file and the offset.

    indexed=True walks tars index-shards indexed in place (written by other tools): pax
    headers are read (at most MAX_PAX_BYTES each), a per-member `path` or `size` record is
    used as the member's name or size, as `tarfile` and webdataset use it (so a hostile
    `path` is refused like any name), a global header that sets them is refused, and any
    regular-file name without '/', '\\', '..' or NUL is accepted.
    """
    path = Path(path)
    with open(path, "rb") as f:
        fd = f.fileno()
        end = os.fstat(fd).st_size
        pos, longname = 0, None
        pax: dict[str, str] = {}  # records of the pax header in front of the next member
        while True:
            if pos + BLOCK > end:
                raise CorruptShardError(f"{where(file=path)}: tar ends without its end-of-archive "
                                        f"blocks at offset {pos} (truncated?)")
            hdr = os.pread(fd, BLOCK, pos)
            if hdr == bytes(BLOCK):
                if pax or longname is not None:
                    raise CorruptShardError(f"{where(file=path)}: the archive ends at offset {pos} "
                                            "right after a pax or long-name header (truncated?)")
                return
            try:
                ti = tarfile.TarInfo.frombuf(hdr, "utf-8", "surrogateescape")
            except tarfile.HeaderError as e:
                raise CorruptShardError(f"{where(file=path)}: damaged tar header at offset {pos} "
                                        f"({e})") from e
            hdr_off, data_off, size = pos, pos + BLOCK, ti.size
            is_pax = indexed and ti.type in (tarfile.XHDTYPE, tarfile.XGLTYPE)
            if not is_pax and "size" in pax:
                size = _pax_size(pax["size"], path, hdr_off)
            if size < 0 or size > end - data_off:
                raise CorruptShardError(f"{where(file=path)}: tar header at offset {hdr_off} "
                                        f"claims {size} bytes, past the end of the file")
            pos = data_off + -(-size // BLOCK) * BLOCK
            if is_pax:
                if size > MAX_PAX_BYTES:
                    raise CorruptShardError(f"{where(file=path)}: pax header at offset {hdr_off} "
                                            f"claims {size} bytes, more than {MAX_PAX_BYTES}; "
                                            "refused unread")
                records = _pax_records(os.pread(fd, size, data_off), path, hdr_off)
                if ti.type == tarfile.XGLTYPE:
                    if {"path", "size"} & set(records):
                        raise UnsafeInputError(f"{where(file=path)}: global pax header at offset "
                                               f"{hdr_off} sets the path or size of every member "
                                               "that follows; refused")
                else:
                    pax.update(records)
                continue
            if ti.type == tarfile.GNUTYPE_LONGNAME:
                if size > MAX_LONGNAME:
                    raise CorruptShardError(f"{where(file=path)}: long-name header at offset "
                                            f"{hdr_off} claims {size} bytes")
                longname = os.pread(fd, size, data_off).split(b"\0", 1)[0].decode(
                    "utf-8", "surrogateescape")
                continue
            name = pax.get("path", longname if longname is not None else ti.name)
            pax, longname = {}, None
            if ti.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                raise UnsafeInputError(f"{where(file=path, key=name)}: tar member of type "
                                       f"{ti.type!r} (link, directory, device or pax header) at "
                                       f"offset {hdr_off} refused; shards hold regular "
                                       "files only")
            unsafe = (not name or name.startswith("/") or "/" in name or ".." in name
                      or "\\" in name or "\0" in name)
            if unsafe or (not indexed and not MEMBER_RE.match(name)):
                raise UnsafeInputError(f"{where(file=path, key=name)}: tar member name is not "
                                       "<key>.<modality>.<ext>; refused (paths, '..' and "
                                       "absolute names are never valid)")
            cls = os.pread(fd, min(size, 32), data_off) if name.endswith(".cls") else None
            yield name, data_off, size, cls


def _pax_records(buf: bytes, path: Path, offset: int) -> dict[str, str]:
    """The `<length> <key>=<value>\\n` records of a pax header's data (POSIX.1-2001)."""
    out, i, stop = {}, 0, len(buf.rstrip(b"\0"))  # NUL padding after the records is allowed
    while i < stop:
        sp = buf.find(b" ", i, i + 21)
        n = int(buf[i:sp]) if sp > i and buf[i:sp].isdigit() else 0
        rec = buf[i: i + n]
        eq = rec.find(b"=", sp - i + 1)
        if n <= sp - i + 2 or len(rec) != n or not rec.endswith(b"\n") or eq < 0:
            raise CorruptShardError(f"{where(file=path)}: damaged pax header at offset {offset} "
                                    f"(bad record at byte {i})")
        key = rec[sp - i + 1: eq].decode("utf-8", "surrogateescape")
        out[key] = rec[eq + 1: -1].decode("utf-8", "surrogateescape")
        i += n
    return out


def _pax_size(value: str, path: Path, offset: int) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 20:
        raise CorruptShardError(f"{where(file=path)}: pax header in front of offset {offset} "
                                f"gives size {value[:30]!r}, not a number")
    return int(value)
