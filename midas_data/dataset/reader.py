"""Read a dataset: schema, random access by key through the offset index, sequential iteration.

Every payload read is checked against the CRC32 recorded in the index, so a flipped byte
or a truncated shard is an error that names the shard, key and modality, never silent
wrong data. File handles are opened lazily per process and read with pread, so a reader
can be shared with forked DataLoader workers.

Nothing here trusts its input: the index is checked against the manifest's digest and its
offsets against the shards' sizes before any read, each payload read also reads the tar
header in front of it and refuses one that does not name `<key>.<modality>.<ext>` with the
indexed size, and decoding never unpickles (formats.decode). Full verification of every
shard is `midas_data.dataset.verify`.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from midas_data.dataset.formats import MAX_PAYLOAD_BYTES, decode
from midas_data.dataset.manifest import file_sha256, read_manifest
from midas_data.errors import (
    CorruptShardError,
    MidasDataError,
    SchemaError,
    where,
)
from midas_data.features.tables import read_table

BLOCK = 512
KEY_PATTERN = r"^[A-Za-z0-9_\-]+$"


class SplitReader:
    """One split of a dataset: `len`, `keys`, `labels`, `get(row or key)`, iteration."""

    def __init__(self, root: Path, manifest: dict, split: str):
        if split not in manifest["splits"]:
            raise MidasDataError(f"{where(file=root / 'manifest.json', field='splits')}: no split "
                                 f"{split!r}; the dataset has {sorted(manifest['splits'])}")
        self.root, self.manifest, self.split = root, manifest, split
        self.modalities: list[str] = list(manifest["modality_order"])
        self._ext = {m: manifest["modalities"][m]["ext"] for m in self.modalities}
        # tar member suffix: `<modality>.<ext>` as build-shards writes it, or the manifest's own
        # `member` for tars indexed in place (index-shards: `<key>.jpg`)
        self._suffix = {m: manifest["modalities"][m].get("member") or f"{m}.{self._ext[m]}"
                        for m in self.modalities}
        meta = manifest["splits"][split]
        self.shard_paths = [root / p for p in meta["shards"]]
        by_path = {s["path"]: s for s in manifest["shards"]}
        self.shard_bytes = np.array([by_path[p]["bytes"] for p in meta["shards"]], np.int64)
        self.index_path = index_path = root / meta["index"]
        want = meta.get("index_sha256")
        if want is not None and index_path.is_file() and file_sha256(index_path) != want:
            raise CorruptShardError(f"{where(file=index_path)}: sha256 does not match the manifest "
                                    "(the index is damaged or from another build); rebuild the dataset")
        t = read_table(index_path)
        need = ["key", "label", "shard", "offset", "size"]
        need += [f"{m}.{c}" for m in self.modalities for c in ("offset", "size", "crc32")]
        missing = [c for c in need if c not in t.column_names]
        if missing:
            raise SchemaError(f"{where(file=index_path, field=missing[0])}: index column missing")
        for c in need:
            col = t.column(c)
            is_str = pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
            if not (is_str if c == "key" else pa.types.is_integer(col.type)):
                raise SchemaError(f"{where(file=index_path, field=c)}: index column has type "
                                  f"{col.type}, expected {'string' if c == 'key' else 'integers'}")
            if col.null_count:
                raise SchemaError(f"{where(file=index_path, field=c)}: index column holds nulls")
        if t.num_rows != meta["count"]:
            raise SchemaError(f"{where(file=index_path)}: {t.num_rows} rows but the manifest "
                              f"says {meta['count']}; the dataset is incomplete, rebuild it")
        self.keys: list[str] = t.column("key").to_pylist()
        self.labels = t.column("label").to_numpy().astype(np.int64)
        self.shard = t.column("shard").to_numpy().astype(np.int64)
        self.sample_offset = t.column("offset").to_numpy().astype(np.int64)
        self.sample_size = t.column("size").to_numpy().astype(np.int64)
        self.member = {m: (t.column(f"{m}.offset").to_numpy().astype(np.int64),
                           t.column(f"{m}.size").to_numpy().astype(np.int64),
                           t.column(f"{m}.crc32").to_numpy().astype(np.int64))
                       for m in self.modalities}
        self._check_index(t)
        self._row_of: dict[str, int] | None = None
        self._fds: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self._pid = os.getpid()

    def _check_index(self, t: pa.Table) -> None:
        """Refuse an index whose rows could not have come from these shards: bad keys or
        labels, offsets outside the shard or outside their sample, absurd sizes."""
        path, n = self.index_path, len(self.keys)

        def refuse(bad: np.ndarray, field: str, what: str) -> None:
            rows = np.flatnonzero(bad)
            if rows.size:
                r = int(rows[0])
                raise SchemaError(f"{where(path, self.keys[r], field)}: {what} (row {r}, "
                                  f"{rows.size} rows affected); the index does not describe its "
                                  "shards, rebuild the dataset")

        good_key = pc.match_substring_regex(t.column("key"), KEY_PATTERN)
        refuse(~good_key.to_numpy(zero_copy_only=False).astype(bool), "key",
               "key is not letters, digits, '_' and '-'")
        if n and pc.count_distinct(t.column("key")).as_py() != n:
            seen: set[str] = set()
            dup = np.array([k in seen or seen.add(k) is not None for k in self.keys])
            refuse(dup, "key", "duplicate key")
        refuse((self.labels < 0) | (self.labels >= len(self.manifest["classes"])), "label",
               f"label outside the {len(self.manifest['classes'])} classes")
        refuse((self.shard < 0) | (self.shard >= len(self.shard_paths)), "shard",
               f"shard number outside the split's {len(self.shard_paths)} shards")
        counts = np.bincount(self.shard, minlength=len(self.shard_paths))
        by_path = {s["path"]: s for s in self.manifest["shards"]}
        want = [by_path[p]["count"] for p in self.manifest["splits"][self.split]["shards"]]
        refuse(counts[self.shard] != np.asarray(want, np.int64)[self.shard], "shard",
               "sample count of the shard disagrees with the manifest")
        soff, ssize, limit = self.sample_offset, self.sample_size, self.shard_bytes[self.shard]
        refuse((soff < 0) | (soff % BLOCK != 0) | (ssize < 2 * BLOCK) | (ssize > limit - soff),
               "offset", "sample byte range lies outside its shard")
        for m in self.modalities:
            off, size, crc = self.member[m]
            refuse((off < soff + BLOCK) | (off % BLOCK != 0) | (size < 0)
                   | (size > MAX_PAYLOAD_BYTES) | (size > soff + ssize - off), m,
                   "payload byte range lies outside its sample")
            refuse((crc < 0) | (crc > 0xFFFFFFFF), m, "crc32 is not a 32-bit value")

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
            self._fds, self._sizes, self._pid = {}, {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            path = self.shard_paths[shard]
            try:
                fd = os.open(path, os.O_RDONLY)
                self._sizes[shard] = os.fstat(fd).st_size
            except OSError as e:
                raise CorruptShardError(f"{where(file=path)}: shard cannot be opened ({e})") from e
            self._fds[shard] = fd
        return fd

    def _pread(self, shard: int, offset: int, size: int, key: str, field: str) -> bytes:
        fd = self._fd(shard)
        have = self._sizes[shard] - offset
        data = os.pread(fd, size, offset) if size <= have else b""  # never allocate past EOF
        if len(data) != size:
            raise CorruptShardError(f"{where(self.shard_paths[shard], key, field)}: shard is "
                                    f"truncated (wanted {size} bytes at offset {offset}, got "
                                    f"{max(0, min(size, have))})")
        return data

    def member_name(self, row: int, modality: str) -> str:
        """The tar member name of a payload: `<key>.<modality>.<ext>`."""
        return f"{self.keys[row]}.{self._suffix[modality]}"

    def _check_header(self, hdr: bytes | memoryview, row: int, modality: str, size: int) -> None:
        """The tar header in front of a payload must name it and give the indexed size."""
        want = self.member_name(row, modality).encode()[:100]
        name = bytes(hdr[:100]).split(b"\0", 1)[0]
        if name != want or bytes(hdr[124:136]) != b"%011o\0" % size or hdr[156] not in (0, 48):
            raise CorruptShardError(
                f"{where(self.shard_paths[self.shard[row]], self.keys[row], modality)}: the tar "
                f"header in front of the payload names {name[:120]!r}, expected {want!r} of "
                f"{size} bytes (damaged header, or an index that does not match the shard)")

    def read_raw(self, row: int, modality: str) -> bytes:
        """The stored bytes of one payload, CRC-checked, after its tar header."""
        off, size, crc = (int(a[row]) for a in self.member[modality])
        key = self.keys[row]
        data = self._pread(int(self.shard[row]), off - BLOCK, size + BLOCK, key, modality)
        self._check_header(data, row, modality, size)
        data = data[BLOCK:]
        self._check_crc(data, crc, row, modality)
        return data

    def _check_crc(self, data: bytes | memoryview, crc: int, row: int, modality: str) -> None:
        if zlib.crc32(data) != crc:
            raise CorruptShardError(f"{where(self.shard_paths[self.shard[row]], self.keys[row], modality)}: "
                                    "payload checksum mismatch (flipped bytes in the shard)")

    def _decode(self, row: int, modality: str, data: bytes) -> np.ndarray | str:
        spec = self.manifest["modalities"][modality]
        file, key = self.shard_paths[self.shard[row]], self.keys[row]
        value = decode(spec["kind"], spec["ext"], data, file=file, key=key, field=modality)
        if spec["kind"] in ("tensor", "image"):
            if value.dtype.name != spec["dtype"] or list(value.shape) != spec["shape"]:
                raise SchemaError(f"{where(file, key, modality)}: payload is {value.dtype.name} "
                                  f"{list(value.shape)}, the manifest says {spec['dtype']} {spec['shape']}")
        elif spec["kind"] == "audio" and spec["shape"] and value.shape[0] != spec["shape"][0]:
            raise SchemaError(f"{where(file, key, modality)}: {value.shape[0]} audio channels, the "
                              f"manifest says {spec['shape'][0]}")
        return value

    def get(self, item: int | str, modalities: list[str] | None = None) -> dict:
        """Decode one sample by row number or key: {'__key__', 'label', <modality>: value}."""
        row = self.row(item) if isinstance(item, str) else self._row_number(item)
        out: dict = {"__key__": self.keys[row], "label": int(self.labels[row])}
        for m in self._mods(modalities):
            out[m] = self._decode(row, m, self.read_raw(row, m))
        return out

    def _row_number(self, item: object) -> int:
        row = int(item)
        if -len(self) <= row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} is outside split {self.split!r} of {self.root} "
                             f"({len(self)} samples)")
        return row

    def _mods(self, modalities: list[str] | None) -> list[str]:
        mods = list(modalities or self.modalities)
        unknown = [m for m in mods if m not in self.member]
        if unknown:
            raise SchemaError(f"{where(self.root / 'manifest.json', field=unknown[0])}: no such "
                              f"modality; the dataset has {self.modalities}")
        return mods

    def get_many(self, rows: np.ndarray, modalities: list[str] | None = None) -> list[dict]:
        """Decode several samples, each with one pread of its whole byte range."""
        mods = self._mods(modalities)
        out = []
        for row in np.asarray(rows, dtype=np.int64):
            row = self._row_number(row)
            shard = int(self.shard[row])
            start, size = int(self.sample_offset[row]), int(self.sample_size[row])
            fd = self._fd(shard)
            blob = memoryview(os.pread(fd, size, start) if size <= self._sizes[shard] - start else b"")
            d: dict = {"__key__": self.keys[row], "label": int(self.labels[row])}
            if len(blob) != size:  # truncated shard: per-member reads name the modality cut off
                d.update((m, self._decode(row, m, self.read_raw(row, m))) for m in mods)
                out.append(d)
                continue
            for m in mods:
                off, sz, crc = (int(a[row]) for a in self.member[m])
                self._check_header(blob[off - start - BLOCK: off - start], row, m, sz)
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
        self._fds, self._sizes = {}, {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"], state["_sizes"] = {}, {}
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
        """Check every shard against the manifest and the index; return the problems found
        (an empty list: the dataset is exactly as built). See `midas_data.dataset.verify`."""
        from midas_data.dataset.verify import verify_dataset  # verify imports this module

        return verify_dataset(self, progress)


def open_dataset(path: str | Path, **remote) -> Dataset:
    """Open a dataset directory written by `midas-data build-shards`, or a URL (s3://, gs://,
    https://...; `remote` options: storage_options, cache_dir, cache_limit, retry, prefetch,
    see midas_data.storage.remote.RemoteDataset)."""
    from midas_data.storage.urls import is_remote, local_path

    if isinstance(path, Dataset):  # already open (a remote root staged for writing, say)
        return path
    if is_remote(path):
        from midas_data.storage.remote import RemoteDataset

        return RemoteDataset(str(path), **remote)
    return Dataset(local_path(path))
