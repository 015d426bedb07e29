"""Hand-made inputs for the safety and fuzz tests: tar members, pickle bombs, decompression
bombs, and `resign`, which makes an edited dataset self-consistent again.

An attacker controls every file of a dataset they hand over, checksums and fingerprints
included. `resign(root)` recomputes what the builder would have written (shard sizes and
sha256, index digests, fingerprint) after a test has planted something, so the planted
thing is what the reader must refuse, not a checksum it happens to trip over first.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from midas_data.dataset.manifest import dataset_fingerprint, file_sha256

BLOCK = 512


class Bomb:
    """Unpickling this creates `marker` (it calls `open(marker, "w")`): proof of execution."""

    def __init__(self, marker: str | Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_bomb(marker: str | Path) -> bytes:
    return pickle.dumps(Bomb(marker), protocol=2)


def npy_object_bomb(marker: str | Path) -> bytes:
    """A well-formed `.npy` of dtype object whose element is a pickle bomb."""
    buf = io.BytesIO()
    np.save(buf, np.array([Bomb(marker), 1], dtype=object), allow_pickle=True)
    return buf.getvalue()


def npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def npy_huge_header(shape=(1_000_000, 1_000_000), dtype="<f8") -> bytes:
    """A `.npy` whose header claims `shape` (8 TB by default) followed by 16 bytes of data."""
    header = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {tuple(shape)}, }}"
    header = header.ljust(118) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(16)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height RGB pixels, with one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _png_chunk(b"IEND", b""))


def wav_claiming(frames: int, channels: int = 1, width: int = 2) -> bytes:
    """A WAV whose data chunk claims `frames` frames but holds 16 bytes."""
    data_size = min(frames * channels * width, 0xFFFFFFFF)
    fmt = struct.pack("<HHIIHH", 1, channels, 8000, 8000 * channels * width, channels * width, 8 * width)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", data_size)
    return b"RIFF" + struct.pack("<I", min(len(body) + data_size, 0xFFFFFFFF)) + body + bytes(16)


def tar_member(name: str, data: bytes = b"", *, type: bytes = tarfile.REGTYPE, linkname: str = "",
               size: int | None = None) -> bytes:
    """Header(s) and padded data of one tar member; `size` may lie about len(data)."""
    ti = tarfile.TarInfo(name)
    ti.size = len(data) if size is None else size
    ti.type, ti.linkname, ti.mtime, ti.mode = type, linkname, 0, 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    hdr = ti.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape")
    return hdr + data + bytes(-len(data) % BLOCK)


def archive_end(path: Path) -> int:
    """Offset of the end-of-archive blocks of one of our shards (after its last member)."""
    with tarfile.open(path) as tf:
        last = tf.getmembers()[-1]
    return last.offset_data + -(-last.size // BLOCK) * BLOCK


def append_members(path: Path, *members: bytes) -> list[int]:
    """Insert members before the end-of-archive blocks; return their header offsets."""
    raw = path.read_bytes()
    end = archive_end(path)
    offsets, pos = [], end
    for m in members:
        offsets.append(pos)
        pos += len(m)
    body = raw[:end] + b"".join(members) + bytes(2 * BLOCK)
    path.write_bytes(body + bytes(-len(body) % 10240))
    return offsets


def read_index(root: Path, split: str) -> pa.Table:
    """The index table, copied into memory (not memory-mapped: tests rewrite the file)."""
    data = (root / "index" / f"{split}.arrow").read_bytes()
    return pa.ipc.open_file(pa.BufferReader(data)).read_all()


def write_index(root: Path, split: str, table: pa.Table) -> None:
    path = root / "index" / f"{split}.arrow"
    with open(path, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)


def set_index_value(root: Path, split: str, column: str, row: int, value) -> None:
    t = read_index(root, split)
    vals = t.column(column).to_pylist()
    vals[row] = value
    i = t.column_names.index(column)
    try:
        col = pa.array(vals, t.schema.field(i).type)
    except (OverflowError, pa.ArrowInvalid):  # e.g. a negative crc32: an attacker uses int64
        col = pa.array(vals)
    write_index(root, split, t.set_column(i, pa.field(column, col.type), col))


def plant_payload(root: Path, split: str, modality: str, data: bytes, name: str | None = None,
                  shard: int = 0) -> tuple[str, Path]:
    """Append a member holding `data` to a shard and point the index entry of that shard's
    last sample at it (offset, size, CRC, and the sample's byte range), as a forger would.
    The member is named `name` (default `<key>.<modality>.npy`). Returns (key, shard path)."""
    t = read_index(root, split)
    rows = np.flatnonzero(t.column("shard").to_numpy() == shard)
    row = int(rows[-1])
    key = t.column("key")[row].as_py()
    path = root / manifest(root)["splits"][split]["shards"][shard]
    (hdr,) = append_members(path, tar_member(name or f"{key}.{modality}.npy", data))
    start = t.column("offset")[row].as_py()
    set_index_value(root, split, f"{modality}.offset", row, hdr + BLOCK)
    set_index_value(root, split, f"{modality}.size", row, len(data))
    set_index_value(root, split, f"{modality}.crc32", row, zlib.crc32(data))
    set_index_value(root, split, "size", row, hdr + BLOCK + len(data) - start)
    return key, path


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def write_manifest(root: Path, m: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(m, indent=2))


def resign(root: Path, m: dict | None = None) -> dict:
    """Recompute shard sizes and digests, index digests and the fingerprint, as far as the
    manifest's structure allows (a test may have broken it on purpose), and write it."""
    if m is None:
        try:
            m = manifest(root)
        except (ValueError, RecursionError):  # not JSON any more: nothing to re-sign
            return {}
    try:
        for s in m["shards"]:
            p = root / s["path"]
            if p.is_file():
                s["bytes"], s["sha256"] = p.stat().st_size, file_sha256(p)
        for meta in m["splits"].values():
            p = root / meta["index"]
            if p.is_file():
                meta["index_sha256"] = file_sha256(p)
        m["fingerprint"] = dataset_fingerprint(m["modalities"], m["classes"], m["shards"],
                                               m["splits"])
    except (KeyError, TypeError, AttributeError, OSError, ValueError):
        pass  # a manifest broken on purpose: leave the rest as it is
    write_manifest(root, m)
    return m
