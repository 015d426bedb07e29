"""Read a dataset: schema, random access by key through the offset index, sequential iteration.

Every payload read is checked against the CRC32 recorded in the index, so a flipped byte
or a truncated shard is an error that names the shard, key and modality, never silent
wrong data. File handles are opened lazily per process and read with pread, so a reader
can be shared with forked DataLoader workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import CorruptShardError, MidasDataError, SchemaError, where
from .formats import decode
from .manifest import read_manifest
from .tables import read_table


class SplitReader:
    """One split of a dataset: `len`, `keys`, `labels`, `get(row or key)`, iteration."""

    def __init__(self, root: Path, manifest: dict, split: str):
        if split not in manifest["splits"]:
            raise MidasDataError(f"{where(file=root / 'manifest.json', field='splits')}: no split "
                                 f"{split!r}; the dataset has {sorted(manifest['splits'])}")
        self.root, self.manifest, self.split = root, manifest, split
        self.modalities: list[str] = list(manifest["modality_order"])
        meta = manifest["splits"][split]
        self.shard_paths = [root / p for p in meta["shards"]]
        index_path = root / meta["index"]
        t = read_table(index_path)
        need = ["key", "label", "shard", "offset", "size"]
        need += [f"{m}.{c}" for m in self.modalities for c in ("offset", "size", "crc32")]
        missing = [c for c in need if c not in t.column_names]
        if missing:
            raise SchemaError(f"{where(file=index_path, field=missing[0])}: index column missing")
        self.keys: list[str] = t.column("key").to_pylist()
        if len(self.keys) != meta["count"]:
            raise SchemaError(f"{where(file=index_path)}: {len(self.keys)} rows but the manifest "
                              f"says {meta['count']}; the dataset is incomplete, rebuild it")
        self.labels = t.column("label").to_numpy().astype(np.int64)
        self.shard = t.column("shard").to_numpy().astype(np.int64)
        self.sample_offset = t.column("offset").to_numpy().astype(np.int64)
        self.sample_size = t.column("size").to_numpy().astype(np.int64)
        self.member = {m: (t.column(f"{m}.offset").to_numpy().astype(np.int64),
                           t.column(f"{m}.size").to_numpy().astype(np.int64),
                           t.column(f"{m}.crc32").to_numpy().astype(np.int64))
                       for m in self.modalities}
        self._row_of: dict[str, int] | None = None
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.keys)

    def row(self, key: str) -> int:
        if self._row_of is None:
            self._row_of = {k: i for i, k in enumerate(self.keys)}
        if key not in self._row_of:
            raise KeyError(f"key {key!r} is not in split {self.split!r} of {self.root}")
        return self._row_of[key]

    def rows_for_keys(self, keys: list[str]) -> np.ndarray:
        return np.array([self.row(k) for k in keys], dtype=np.int64)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: descriptors are shared, open our own
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            path = self.shard_paths[shard]
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise CorruptShardError(f"{where(file=path)}: shard cannot be opened ({e})") from e
            self._fds[shard] = fd
        return fd

    def _pread(self, shard: int, offset: int, size: int, key: str, field: str) -> bytes:
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise CorruptShardError(f"{where(self.shard_paths[shard], key, field)}: shard is "
                                    f"truncated (wanted {size} bytes at offset {offset}, got {len(data)})")
        return data

    def read_raw(self, row: int, modality: str) -> bytes:
        """The stored bytes of one payload, CRC-checked."""
        off, size, crc = (a[row] for a in self.member[modality])
        key = self.keys[row]
        data = self._pread(int(self.shard[row]), int(off), int(size), key, modality)
        self._check_crc(data, int(crc), row, modality)
        return data

    def _check_crc(self, data: bytes | memoryview, crc: int, row: int, modality: str) -> None:
        if zlib.crc32(data) != crc:
            raise CorruptShardError(f"{where(self.shard_paths[self.shard[row]], self.keys[row], modality)}: "
                                    "payload checksum mismatch (flipped bytes in the shard)")

    def _decode(self, row: int, modality: str, data: bytes) -> np.ndarray | str:
        spec = self.manifest["modalities"][modality]
        return decode(spec["kind"], spec["ext"], data, file=self.shard_paths[self.shard[row]],
                      key=self.keys[row], field=modality)

    def get(self, item: int | str, modalities: list[str] | None = None) -> dict:
        """Decode one sample by row number or key: {'__key__', 'label', <modality>: value}."""
        row = self.row(item) if isinstance(item, str) else int(item)
        out: dict = {"__key__": self.keys[row], "label": int(self.labels[row])}
        for m in modalities or self.modalities:
            out[m] = self._decode(row, m, self.read_raw(row, m))
        return out

    def get_many(self, rows: np.ndarray, modalities: list[str] | None = None) -> list[dict]:
        """Decode several samples, each with one pread of its whole byte range."""
        mods = modalities or self.modalities
        out = []
        for row in np.asarray(rows, dtype=np.int64):
            row = int(row)
            start, size = int(self.sample_offset[row]), int(self.sample_size[row])
            blob = memoryview(os.pread(self._fd(int(self.shard[row])), size, start))
            d: dict = {"__key__": self.keys[row], "label": int(self.labels[row])}
            if len(blob) != size:  # truncated shard: per-member reads name the modality cut off
                d.update((m, self._decode(row, m, self.read_raw(row, m))) for m in mods)
                out.append(d)
                continue
            for m in mods:
                off, sz, crc = (int(a[row]) for a in self.member[m])
                data = blob[off - start: off - start + sz]
                self._check_crc(data, crc, row, m)
                d[m] = self._decode(row, m, bytes(data))
            out.append(d)
        return out

    def __iter__(self) -> Iterator[dict]:
        for lo in range(0, len(self), 256):
            yield from self.get_many(np.arange(lo, min(lo + 256, len(self))))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            with contextlib.suppress(OSError):
                self.close()


class Dataset:
    """A built dataset directory (see docs/CONTRACTS.md)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.modalities: list[str] = list(self.manifest["modality_order"])
        self.classes: list[str] = list(self.manifest["classes"])
        self.fingerprint: str = self.manifest["fingerprint"]
        self._splits: dict[str, SplitReader] = {}

    @property
    def schema(self) -> dict:
        return self.manifest["modalities"]

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def split(self, name: str) -> SplitReader:
        if name not in self._splits:
            self._splits[name] = SplitReader(self.root, self.manifest, name)
        return self._splits[name]

    def verify(self, progress: bool = False) -> list[str]:
        """Check every shard's size, sha256 and tar structure; return the problems found."""
        problems = []
        for s in self.manifest["shards"]:
            path = self.root / s["path"]
            if not path.exists():
                problems.append(f"{where(file=path)}: shard missing")
                continue
            size = path.stat().st_size
            if size != s["bytes"]:
                problems.append(f"{where(file=path)}: {size} bytes, manifest says {s['bytes']} (truncated?)")
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != s["sha256"]:
                problems.append(f"{where(file=path)}: sha256 mismatch (corrupted bytes)")
                problems.extend(self._locate_damage(s["split"], path))
        return problems

    def _locate_damage(self, split: str, path: Path) -> list[str]:
        """Name the keys whose payloads no longer match their checksums."""
        sr = self.split(split)
        shard_no = [str(p) for p in sr.shard_paths].index(str(path))
        out = []
        for row in np.flatnonzero(sr.shard == shard_no):
            for m in sr.modalities:
                try:
                    sr.read_raw(int(row), m)
                except CorruptShardError as e:
                    out.append(str(e))
        try:
            with tarfile.open(path) as tf:
                tf.getmembers()
        except (tarfile.TarError, OSError) as e:
            out.append(f"{where(file=path)}: tar structure damaged ({e})")
        return out


def open_dataset(path: str | Path) -> Dataset:
    """Open a dataset directory written by `midas-data build-shards`."""
    return Dataset(path)
