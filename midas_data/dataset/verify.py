"""Full verification of a built dataset: every shard against the manifest and the index.

`verify_dataset` is what `Dataset.verify()` and `midas-data inspect --verify` run. It checks
each shard's size and sha256, reads every indexed payload as a reader would (tar header and
CRC), compares each tensor's .npy header with the manifest, and walks every tar header
itself (`walk_tar`: bounded reads, no `tarfile` extraction, links and paths refused), so a
member the index does not know is reported too. Problems are returned, never raised.
"""

from __future__ import annotations

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
    out = []
    for row in rows:
        for m in sr.modalities:
            try:
                sr.read_raw(int(row), m)
            except CorruptShardError as e:
                out.append(str(e))
    expected = {}
    for row in rows:
        key = sr.keys[row]
        expected[f"{key}.cls"] = (row, None)
        for m in sr.modalities:
            expected[sr.member_name(int(row), m)] = (row, m)
    found = set()
    try:
        for name, data_off, size, cls_data in walk_tar(path):
            if name not in expected:
                out.append(f"{where(file=path, key=name)}: unexpected tar member (not in the "
                           "index); refused")
                continue
            found.add(name)
            row, m = expected[name]
            if m is None:
                if cls_data != str(int(sr.labels[row])).encode():
                    out.append(f"{where(path, sr.keys[row], 'label')}: .cls member holds "
                               f"{cls_data[:20]!r}, the index says {int(sr.labels[row])}")
            elif (data_off, size) != (int(sr.member[m][0][row]), int(sr.member[m][1][row])):
                out.append(f"{where(path, sr.keys[row], m)}: tar member at offset {data_off} "
                           f"({size} bytes) is not where the index points")
            elif schema[m]["kind"] == "tensor":
                problem = check_npy_header(schema, sr, int(row), m)
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


def walk_tar(path: str | os.PathLike) -> Iterator[tuple[str, int, int, bytes | None]]:
    """Yield (name, data offset, size, data if a `.cls` member) for each member of a shard.

    Reads headers only (one 512-byte pread each), never trusts a size past the end of the
    file, never extracts, and refuses what our shards never hold: links, directories,
    devices, pax headers, names with '/', '..' or an absolute path, names that are not
    `<key>.<modality>.<ext>` or `<key>.cls`. Errors are CorruptShardError/UnsafeInputError
    naming the file and the offset.
    """
    path = Path(path)
    with open(path, "rb") as f:
        fd = f.fileno()
        end = os.fstat(fd).st_size
        pos, longname = 0, None
        while True:
            if pos + BLOCK > end:
                raise CorruptShardError(f"{where(file=path)}: tar ends without its end-of-archive "
                                        f"blocks at offset {pos} (truncated?)")
            hdr = os.pread(fd, BLOCK, pos)
            if hdr == bytes(BLOCK):
                return
            try:
                ti = tarfile.TarInfo.frombuf(hdr, "utf-8", "surrogateescape")
            except tarfile.HeaderError as e:
                raise CorruptShardError(f"{where(file=path)}: damaged tar header at offset {pos} "
                                        f"({e})") from e
            data_off, size = pos + BLOCK, ti.size
            if size < 0 or size > end - data_off:
                raise CorruptShardError(f"{where(file=path)}: tar header at offset {pos} claims "
                                        f"{size} bytes, past the end of the file")
            pos = data_off + -(-size // BLOCK) * BLOCK
            if ti.type == tarfile.GNUTYPE_LONGNAME:
                if size > MAX_LONGNAME:
                    raise CorruptShardError(f"{where(file=path)}: long-name header at offset "
                                            f"{data_off - BLOCK} claims {size} bytes")
                longname = os.pread(fd, size, data_off).split(b"\0", 1)[0].decode(
                    "utf-8", "surrogateescape")
                continue
            name, longname = (longname if longname is not None else ti.name), None
            if ti.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                raise UnsafeInputError(f"{where(file=path, key=name)}: tar member of type "
                                       f"{ti.type!r} (link, directory, device or pax header) at "
                                       f"offset {data_off - BLOCK} refused; shards hold regular "
                                       "files only")
            if name.startswith("/") or "/" in name or ".." in name or not MEMBER_RE.match(name):
                raise UnsafeInputError(f"{where(file=path, key=name)}: tar member name is not "
                                       "<key>.<modality>.<ext>; refused (paths, '..' and "
                                       "absolute names are never valid)")
            cls = os.pread(fd, min(size, 32), data_off) if name.endswith(".cls") else None
            yield name, data_off, size, cls
