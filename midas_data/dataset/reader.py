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
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from midas_data.dataset.formats import MAX_PAYLOAD_BYTES, decode, npy_header_cached
from midas_data.dataset.manifest import KEY_PATTERN, MAX_KEY_CHARS, file_sha256, read_manifest
from midas_data.errors import (
    CorruptShardError,
    MidasDataError,
    SchemaError,
    where,
)
from midas_data.features.tables import read_table

BLOCK = 512
READ_CHUNK_ROWS = 1024  # a batch read holds at most this many samples' bytes at once,
READ_CHUNK_BYTES = 64 << 20  # and at most this many (unless one sample is larger)
# tar header bytes a batch read checks: name (0-99), size (124-135), type flag (156)
_HEADER_FIELDS = np.concatenate([np.arange(100), np.arange(124, 136), [156]])
_OCTAL_SHIFTS = np.arange(30, -1, -3)  # 11 octal digits, most significant first


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
        want = meta["index_sha256"]  # mandatory: read_manifest refuses a manifest without it
        if index_path.is_file() and file_sha256(index_path) != want:
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
        self._key_bytes: np.ndarray | None = None  # keys as a fixed-width byte array
        self._key_len: np.ndarray | None = None
        self._tensor_specs: dict[str, tuple | None] = {}
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
               f"key is not 1..{MAX_KEY_CHARS} letters, digits, '_' and '-'")
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
        """Decode several samples: [{'__key__', 'label', <modality>: value}, ...].

        Same checks and errors as `get` on each sample; read as a batch (`read_batch`), so
        the arrays of a fixed-shape modality are views into one array per modality.
        """
        batch = SplitReader.read_batch(self, rows, modalities)  # this file's bytes, also in subclasses
        keys, labels, inputs = batch["key"], batch["label"].tolist(), batch["inputs"]
        out = []
        for i, k in enumerate(keys):
            d: dict = {"__key__": k, "label": labels[i]}
            for m, v in inputs.items():
                d[m] = v[i]
            out.append(d)
        return out

    def read_batch(self, rows: np.ndarray, modalities: list[str] | None = None) -> dict:
        """Decode several samples into batch arrays: {'key': [str], 'label': int64 [B],
        'inputs': {m: [B, ...] array for a fixed-shape tensor or image modality, else a list}}.

        Each sample's byte range is read with one pread (in shard and offset order), and
        every payload is checked as `get` checks it: tar header name and size, CRC32, and
        for `.npy` the header, parsed once per distinct header and compared byte for byte
        with each payload's, then the data is copied straight into the batch array. Any
        failed check sends the batch through `get_many_per_sample`, which raises the same
        error, naming shard, key and modality, that reading the samples one by one would.
        """
        mods = self._mods(modalities)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n, b = len(self), len(rows)
        bad = (rows < -n) | (rows >= n)
        if bad.any():
            self._row_number(int(rows[np.flatnonzero(bad)[0]]))  # raises IndexError
        rows = np.where(rows < 0, rows + n, rows)
        keys = [self.keys[r] for r in rows.tolist()]
        shard, start, size = self.shard[rows], self.sample_offset[rows], self.sample_size[rows]
        shard_l = shard.tolist()
        fd_of = {sh: self._fd(sh) for sh in set(shard_l)}  # opens each shard once per process
        fds = np.array([fd_of[sh] for sh in shard_l], np.int64)
        in_files = bool((size <= np.array([self._sizes[sh] for sh in shard_l], np.int64)
                         - start).all())
        # tensors decode straight into a batch array, allocated only once the samples'
        # bytes, checked against the shards' real sizes, could hold it (the manifest's
        # shape is not trusted with an allocation); other kinds decode one by one
        held = int(size.sum()) if in_files else 0
        fixed = {m: self._tensor_spec(m, b, held) for m in mods}
        inputs: dict = {m: (np.empty((b, *fixed[m][1]), fixed[m][0]) if fixed[m] else
                            [None] * b) for m in mods}
        spans = [(0, b)] if not in_files or (b <= READ_CHUNK_ROWS and held <= READ_CHUNK_BYTES) \
            else list(_chunks(size))
        for lo, hi in spans:
            sl = slice(lo, hi)
            if not (in_files and self._read_chunk(rows[sl], fds[sl], start[sl], size[sl], mods,
                                                  fixed, inputs, lo)):
                samples = self.get_many_per_sample(rows[sl], mods)
                for m in mods:
                    for i, d in enumerate(samples):
                        inputs[m][lo + i] = d[m]
        for m in mods:
            if not fixed[m] and self._ext[m] != "txt" and _same_shapes(inputs[m]):
                inputs[m] = np.stack(inputs[m])  # images (and clips of one length)
        return {"key": keys, "label": self.labels[rows], "inputs": inputs}

    def _tensor_spec(self, m: str, b: int, held: int) -> tuple[np.dtype, tuple[int, ...], int] | None:
        """(dtype, shape, bytes per sample) of a tensor modality whose batch array of `b`
        samples fits in the `held` bytes read for them, else None."""
        if m not in self._tensor_specs:
            spec = self.manifest["modalities"][m]
            shape = spec.get("shape")
            ok = spec["kind"] == "tensor" and isinstance(shape, list) and all(
                type(d) is int and d >= 0 for d in shape)
            try:
                dtype = np.dtype(spec["dtype"]) if ok else None
            except TypeError:  # not a dtype: the per-sample path names the mismatch
                ok, dtype = False, None
            ok = ok and not dtype.hasobject
            self._tensor_specs[m] = (dtype, tuple(shape), dtype.itemsize * math.prod(shape)) \
                if ok else None
        got = self._tensor_specs[m]
        return got if got is not None and b * got[2] <= held else None

    def _read_chunk(self, rows: np.ndarray, fds: np.ndarray, start: np.ndarray, size: np.ndarray,
                    mods: list[str], fixed: dict, inputs: dict, at: int) -> bool:
        """Read and decode `rows` into inputs[m][at:at + len(rows)]; False, having written
        nothing trustworthy, as soon as a check fails (the caller then reads per sample).
        Byte ranges are known to lie inside the shards (checked by the caller)."""
        b = len(rows)
        if b == 0:
            return True
        # blobs sit in buf in shard and offset order (sequential reads for the page cache
        # and the disk); everything below works in that order, and `order[j]` is the batch
        # position of the j-th blob
        order = np.lexsort((start, fds))
        rows, start, size = rows[order], start[order], size[order]
        ends = np.cumsum(size)
        pos = ends - size
        buf = np.empty(int(ends[-1]), np.uint8)
        mv = memoryview(buf)
        for fd, st, sz, p in zip(fds[order].tolist(), start.tolist(), size.tolist(), pos.tolist()):
            if os.preadv(fd, [mv[p:p + sz]], st) != sz:
                return False  # shrunk since opened: the per-sample path names the modality
        for m in mods:
            off, msize, crc = (a[rows] for a in self.member[m])
            data_at = pos + (off - start)
            step = _stride(data_at)
            if not self._tar_headers_ok(buf, data_at - BLOCK, step, rows, m, msize):
                return False
            for p, sz, c in zip(data_at.tolist(), msize.tolist(), crc.tolist()):
                if zlib.crc32(mv[p:p + sz]) != c:
                    return False
            out = inputs[m]
            if fixed[m]:
                if not self._npy_into(buf, data_at, step, msize, rows, order, m, fixed[m], out, at):
                    return False
                continue
            for j, (p, sz) in enumerate(zip(data_at.tolist(), msize.tolist())):
                try:
                    out[at + int(order[j])] = self._decode(int(rows[j]), m, bytes(mv[p:p + sz]))
                except MidasDataError:
                    return False
        return True

    def key_table(self) -> tuple[np.ndarray, np.ndarray]:
        """The split's keys as one fixed-width byte array and their lengths, which a batch
        read checks tar member names against; built once per process (a DataLoader that
        forks its workers builds it first, and they inherit it instead of each building it)."""
        if self._key_bytes is None:  # keys are ASCII (checked with the index)
            self._key_bytes = np.array(self.keys, dtype="S")
            self._key_len = np.char.str_len(self._key_bytes).astype(np.int64)
        return self._key_bytes, self._key_len

    def _tar_headers_ok(self, buf: np.ndarray, hdr_at: np.ndarray, step: int, rows: np.ndarray,
                        m: str, size: np.ndarray) -> bool:
        """Vectorised `_check_header` for one modality of a batch: each 512-byte header must
        hold the member's name `<key>.<modality>.<ext>` NUL padded (as tar writes it), the
        indexed size as 11 octal digits and NUL, and a regular-file type flag."""
        b = len(rows)
        if step:  # headers at one stride: a strided view instead of a gather
            got = np.ndarray((b, BLOCK), np.uint8, buf, int(hdr_at[0]), (step, 1))
            name, size_field, flag = got[:, :100], got[:, 124:136], got[:, 156]
        else:
            got = buf[hdr_at[:, None] + _HEADER_FIELDS]
            name, size_field, flag = got[:, :100], got[:, 100:112], got[:, 112]
        want_size = (size[:, None] >> _OCTAL_SHIFTS) & 7
        if not ((size_field[:, :11] == want_size + 48).all() and not size_field[:, 11].any()
                and ((flag == 0) | (flag == 48)).all()):
            return False
        key_bytes, key_len = self.key_table()
        suffix = np.frombuffer(f".{m}.{self._ext[m]}".encode(), np.uint8)
        klen = key_len[rows]
        if int(klen.max()) + len(suffix) > 100:
            return False  # a long (GNU long-name) member: checked one by one
        want = np.zeros((b, 100), np.uint8)
        kb = key_bytes[rows]
        want[:, :kb.itemsize] = kb.view(np.uint8).reshape(b, kb.itemsize)
        want[np.arange(b)[:, None], klen[:, None] + np.arange(len(suffix))] = suffix
        return bool((name == want).all())

    def _npy_into(self, buf: np.ndarray, data_at: np.ndarray, step: int, msize: np.ndarray,
                  rows: np.ndarray, order: np.ndarray, m: str, spec: tuple, out: np.ndarray,
                  at: int) -> bool:
        """Decode a batch of `.npy` payloads of one modality into out[at + order[j]].

        The header of the first payload is parsed (cached by its bytes) and must give the
        manifest's dtype and shape in C order; every payload must carry that same header
        byte for byte and exactly the data it describes. A payload with another header is
        decoded on its own and checked against the manifest (`_decode`)."""
        dtype, shape, nbytes = spec
        b = len(rows)
        p0, s0 = int(data_at[0]), int(msize[0])
        try:
            hshape, fortran, hdtype, hlen = npy_header_cached(memoryview(buf)[p0:p0 + s0])
        except ValueError:
            return False
        if fortran or hdtype != dtype or tuple(hshape) != shape or s0 != hlen + nbytes:
            return False  # the per-sample path decodes it, or refuses it naming the field
        head = buf[p0:p0 + hlen]
        flat = out[at:at + b].view(np.uint8).reshape(b, nbytes)
        fits = msize == hlen + nbytes
        if step and fits.all():  # payloads at one stride: strided views, no gathers
            view = np.ndarray((b, hlen + nbytes), np.uint8, buf, p0, (step, 1))
            if (view[:, :hlen] == head).all():
                flat[order] = view[:, hlen:]
                return True
        same = fits & (buf[data_at[:, None] + np.arange(hlen)] == head).all(1)
        mv = memoryview(buf)
        for j in range(b):
            p, i = int(data_at[j]), int(order[j])
            if same[j]:
                flat[i] = buf[p + hlen:p + hlen + nbytes]
                continue
            try:
                value = self._decode(int(rows[j]), m, bytes(mv[p:p + int(msize[j])]))
            except MidasDataError:
                return False
            flat[i] = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        return True

    def batch_of(self, samples: list[dict], modalities: list[str] | None = None) -> dict:
        """`read_batch`'s layout for decoded samples (as `get_many` returns them): arrays of
        one shape are stacked, text and ragged values stay lists."""
        mods = self._mods(modalities)
        inputs: dict = {}
        for m in mods:
            inputs[m] = self._column(m, [d[m] for d in samples])
        return {"key": [d["__key__"] for d in samples],
                "label": np.array([d["label"] for d in samples], dtype=np.int64), "inputs": inputs}

    def _column(self, m: str, values: list):
        """One modality's batch column: arrays of one shape stacked; text and ragged values
        stay a list."""
        return np.stack(values) if self._ext[m] != "txt" and _same_shapes(values) else values

    def get_many_per_sample(self, rows: np.ndarray, modalities: list[str] | None = None) -> list[dict]:
        """`get_many` one sample at a time (one pread each): the reference path, and the one
        whose errors a batch read reports."""
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
        state["_key_bytes"] = state["_key_len"] = None  # rebuilt on first batch read
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


def _stride(at: np.ndarray) -> int:
    """The common positive distance between consecutive positions, or 0 if there is none
    (a single position has stride 0 too: nothing is gained by a view)."""
    if len(at) < 2:
        return 0
    d = np.diff(at)
    return int(d[0]) if d[0] > 0 and (d == d[0]).all() else 0


def _same_shapes(values: list) -> bool:
    """Whether a list holds arrays all of one shape (so it stacks into a batch array)."""
    return bool(values) and all(isinstance(v, np.ndarray) and v.shape == values[0].shape
                                for v in values)


def _chunks(sizes: np.ndarray) -> Iterator[tuple[int, int]]:
    """[lo, hi) spans of consecutive samples of at most READ_CHUNK_ROWS samples and
    READ_CHUNK_BYTES bytes (a sample larger than that gets a span of its own)."""
    ends = np.cumsum(sizes)
    lo = 0
    while lo < len(sizes):
        before = int(ends[lo - 1]) if lo else 0
        hi = int(np.searchsorted(ends, before + READ_CHUNK_BYTES, side="right"))
        hi = min(max(hi, lo + 1), lo + READ_CHUNK_ROWS)
        yield lo, hi
        lo = hi


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
