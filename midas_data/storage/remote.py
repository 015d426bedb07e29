"""Open a dataset whose root is a URL: a local snapshot of its small files, shards through
the shard cache.

The manifest, the Arrow indexes and the features and pairs tables are small next to the
shards; they are copied into an immutable snapshot directory under
`cache_dir/roots/<url digest>/<key>/`, and every existing stage reads them as it reads a
local dataset. A root written by midas-data is versioned (see `midas_data.storage.layout`):
its manifest names the version and maps each file to the folder that holds it, so the key is
the version and the files are read from where the map says. A flat root (a dataset copied
with any tool) is keyed by its manifest and a listing of its features and pairs tables, so
a dataset rewritten in place gets a new snapshot too; a reader never mixes old and new files.
A reader pins its snapshot (a shared lock on its `.complete` file) while it is open; beyond
the newest `keep_snapshots` per URL, snapshots nobody pins are deleted when a new one is
made. Shards are read through `RemoteSplitReader`, which fetches each one whole into the
shard cache (verified against the manifest's sha256) before its first read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from midas_data.dataset.manifest import MANIFEST
from midas_data.dataset.reader import Dataset, SplitReader
from midas_data.errors import MidasDataError, UnsafeInputError, where
from midas_data.storage.cache import NoRoom, ShardCache, share_locked
from midas_data.storage.fetch import FetchError, RetryPolicy, download, read_ranges
from midas_data.storage.layout import EXTRA_RE, Layout, split_manifest
from midas_data.storage.prefetch import Prefetcher
from midas_data.storage.urls import filesystem

FAILURE_TTL = 30.0  # seconds a shard that could not be fetched fails fast in this process
FETCH_MODES = ("auto", "shard", "range")
DEFAULT_KEEP_SNAPSHOTS = 2  # per URL: the current version and the one before it
_LAYOUT = ".layout.json"


class RemoteRoot:
    """A dataset URL, the file system that reads it, and the cache its shards go to."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 cache: ShardCache | None = None, retry: RetryPolicy | None = None,
                 keep_snapshots: int = DEFAULT_KEEP_SNAPSHOTS):
        self.url = str(url).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.cache = cache or ShardCache()
        self.retry = retry or RetryPolicy()
        if keep_snapshots < 1:
            raise ValueError(f"keep_snapshots must be >= 1, got {keep_snapshots}")
        self.keep_snapshots = int(keep_snapshots)
        self._fs, self.path = filesystem(self.url, self.storage_options, self.retry.timeout)
        self._fs_pid = os.getpid()
        self.snapshots = self.cache.dir / "roots" / hashlib.sha256(self.url.encode()).hexdigest()[:20]
        # Where each file of the snapshot's version lives (flat until snapshot() reads it).
        self.layout = Layout("", None)
        self._pin: int | None = None

    @property
    def fs(self):
        """The fsspec file system, made anew in a forked process (async file systems such as
        HTTP and S3 are not fork-safe)."""
        if self._fs is None or self._fs_pid != os.getpid():
            self._fs, _ = filesystem(self.url, self.storage_options, self.retry.timeout)
            self._fs_pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fs"] = None  # rebuilt on first use where it is unpickled
        state["_pin"] = None  # the process that opened the snapshot holds the pin
        return state

    def __del__(self) -> None:
        self.unpin()

    def location(self, rel: str) -> str:
        """Where a dataset-relative path of the opened version lives, relative to the root."""
        return rel if rel == MANIFEST else self.layout.where(rel)

    def url_of(self, rel: str) -> str:
        return f"{self.url}/{self.location(rel)}"

    def fetch_to(self, rel: str, tmp_dir: Path, size: int | None = None,
                 sha256: str | None = None) -> Path:
        """Download `rel` (a path the manifest or the listing names) into tmp_dir, checked."""
        return download(self.fs, f"{self.path}/{self.location(rel)}", self.url_of(rel), tmp_dir,
                        size, sha256, self.retry)

    # -- pins and eviction of snapshots --------------------------------------------------
    def _try_pin(self, snap: Path) -> bool:
        """Share-lock snap/.complete (held until unpin) if the snapshot is still there."""
        fd = share_locked(snap / ".complete")
        if fd is None:
            return False
        self.unpin()
        self._pin = fd
        return True

    def unpin(self) -> None:
        fd, self._pin = getattr(self, "_pin", None), None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _evict_snapshots(self, current: Path) -> list[Path]:
        """Delete this URL's snapshots beyond the newest `keep_snapshots` that no reader pins,
        and builds a killed process left behind. Called under the URL's root lock."""
        tmp_root = self.snapshots / ".tmp"
        for pattern in (".build-*", ".evict-*"):  # both happen under the lock we hold
            for left in tmp_root.glob(pattern):
                shutil.rmtree(left, ignore_errors=True)
        found = []
        for d in self.snapshots.iterdir():
            if d.name.startswith(".") or d == current or not d.is_dir():
                continue
            try:
                found.append(((d / ".complete").stat().st_mtime_ns, d))
            except FileNotFoundError:
                found.append((-1, d))  # never completed: nobody can have opened it
        found.sort(reverse=True)
        evicted = []
        for _, d in found[self.keep_snapshots - 1:]:
            fd = None
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(d / ".complete", os.O_RDONLY)
            try:
                if fd is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live reader holds it
                gone = Path(tempfile.mkdtemp(prefix=".evict-", dir=tmp_root))
                os.replace(d, gone / "snap")  # vanishes at once for new readers
            finally:
                if fd is not None:
                    os.close(fd)
            shutil.rmtree(gone, ignore_errors=True)
            evicted.append(d)
        return evicted

    def _extras(self, splits: list[str]) -> list[tuple[str, str]]:
        """(relative path, version tag) of the features and pairs tables present remotely."""
        found: dict[str, str] = {}
        for sub in ("features", "pairs"):
            try:
                listing = self.fs.find(f"{self.path}/{sub}", detail=True)
            except (FileNotFoundError, OSError, ValueError):
                listing = {}
            for full, info in listing.items():
                rel = full[len(self.path) + 1:] if full.startswith(self.path + "/") else None
                if rel is None and full.startswith(self.url + "/"):
                    rel = full[len(self.url) + 1:]
                if rel and EXTRA_RE.match(rel):
                    found[rel] = json.dumps([info.get("size"), str(info.get("ETag") or info.get("etag")
                                             or info.get("LastModified") or info.get("mtime") or "")])
        for sp in splits:  # file systems that cannot list (plain HTTP) still find the features
            rel = f"features/{sp}.arrow"
            if rel not in found:
                with contextlib.suppress(FileNotFoundError, OSError, ValueError):
                    info = self.fs.info(f"{self.path}/{rel}")
                    found[rel] = json.dumps([info.get("size"), str(info.get("ETag") or "")])
        return sorted(found.items())

    def snapshot(self) -> Path:
        """The local snapshot directory of the current remote state (built if new), pinned
        by this object until `unpin`; sets `layout` to the version's map."""
        tmp_root = self.snapshots / ".tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        for _ in range(8):  # a snapshot evicted between finding and pinning it: look again
            tmp = self.fetch_to(MANIFEST, tmp_root)
            try:
                snap = self._snapshot_of(tmp.read_bytes(), tmp_root)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            if snap is not None:
                info = json.loads((snap / _LAYOUT).read_text())
                self.layout = Layout(info["version"], info["files"], info["previous"])
                return snap
        raise MidasDataError(f"{self.url}: its snapshot under {self.snapshots} was deleted as "
                             "soon as it was made, again and again; is another process clearing "
                             "the cache?")

    def _snapshot_of(self, text: bytes, tmp_root: Path) -> Path | None:
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise AttributeError("not a JSON object")
            manifest, layout = split_manifest(raw, self.url_of(MANIFEST))
            splits = [s for s in manifest.get("splits", {}) if re.fullmatch(r"[a-z]+", s)]
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise MidasDataError(f"{where(file=self.url_of(MANIFEST))}: manifest is not "
                                 f"valid JSON ({e})") from e
        if layout.flat:  # no map: list what is there; the key covers the listing
            extras = self._extras(splits)
            # (salted: snapshots made before they held a layout file are not reused)
            key = hashlib.sha256(text + json.dumps(extras).encode() + b"layout-1").hexdigest()[:24]
            extra_files = [rel for rel, _ in extras]
        else:  # the version names everything it holds
            key = f"{layout.version}-{hashlib.sha256(text).hexdigest()[:12]}"
            extra_files = sorted(rel for rel in layout.files or {} if EXTRA_RE.match(rel))
        snap = self.snapshots / key
        if (snap / ".complete").is_file() and self._try_pin(snap):
            return snap
        with self.cache._lock(f"root-{self.snapshots.name}"):
            if (snap / ".complete").is_file():
                return snap if self._try_pin(snap) else None
            build = Path(tempfile.mkdtemp(prefix=".build-", dir=tmp_root))
            try:
                # The dataset's own manifest (without the layout section), as on local disk.
                (build / MANIFEST).write_bytes(text if layout.flat else
                                               (json.dumps(manifest, indent=2) + "\n").encode())
                self.layout = layout
                files = {}
                for sp, meta in manifest["splits"].items():
                    rel = meta.get("index") if isinstance(meta, dict) else None
                    if not isinstance(rel, str) or rel != f"index/{sp}.arrow":
                        raise UnsafeInputError(f"{where(self.url_of(MANIFEST), field=f'splits.{sp}.index')}: "
                                               f"{rel!r} is not index/{sp}.arrow; refused")
                    self._place(rel, build, meta.get("index_sha256"))
                    files[rel] = ""
                for rel in extra_files:
                    self._place(rel, build, None)
                    files[rel] = ""
                if layout.flat:  # what a stage publishing over this root maps to the root
                    files.update((s["path"], "") for s in manifest.get("shards", [])
                                 if isinstance(s, dict) and isinstance(s.get("path"), str))
                (build / _LAYOUT).write_text(json.dumps(
                    {"version": layout.version, "files": files if layout.flat else layout.files,
                     "previous": layout.previous}))
                (build / ".complete").write_text(self.url + "\n")
                if snap.exists():  # an incomplete leftover of a killed process
                    shutil.rmtree(snap, ignore_errors=True)
                os.replace(build, snap)
            finally:
                shutil.rmtree(build, ignore_errors=True)
            pinned = self._try_pin(snap)
            self._evict_snapshots(snap)
            return snap if pinned else None

    def _place(self, rel: str, build: Path, sha256: str | None) -> None:
        dest = build / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.fetch_to(rel, build, None, sha256), dest)


class RemoteSplitReader(SplitReader):
    """A SplitReader whose shards come from the shard cache, or by range reads.

    fetch="shard": each shard is fetched whole before its first read (least-recently-used
    shards evicted to stay under the cache limit) and pinned (a shared lock on the open
    file) while this reader keeps it open; with a cache_limit at most `max_open` shards stay
    open per process (one by default: `get_many` reads a batch shard by shard, so pins hold
    little), without one every shard read stays open, as on local disk.
    fetch="range": nothing is cached; each sample's byte range (from the index) is read
    with an HTTP Range / S3 ranged GET, a batch's ranges concurrently.
    fetch="auto" (default): whole shards while they fit in the cache without evicting one
    of this dataset's shards (other datasets' shards are evicted least recently used
    first), range reads for the rest. An epoch visits shards in
    random order, so with a cache smaller than the split this keeps a fixed part of it
    resident and reads only the rest each epoch: about (1 - cache/split) of the split's
    bytes per epoch, the least any cache policy achieves on a uniform random order, where
    whole-shard LRU would fetch nearly every shard once per batch.
    Every payload is checked the same way on both paths (tar header, CRC32).
    """

    def __init__(self, root: Path, manifest: dict, split: str, remote: RemoteRoot,
                 prefetch: int = 4, prefetch_threads: int = 2, max_open: int = 1,
                 fetch: str = "auto"):
        super().__init__(root, manifest, split)
        if fetch not in FETCH_MODES:
            raise ValueError(f"fetch must be one of {FETCH_MODES}, got {fetch!r}")
        self.remote, self.fetch = remote, fetch
        self._keep = frozenset(s["sha256"] for s in manifest["shards"])
        self.range_bytes = 0  # bytes this process read by range
        by_path = {s["path"]: s for s in manifest["shards"]}
        self._shard_rel = list(manifest["splits"][split]["shards"])
        self._shard_sha = [by_path[p]["sha256"] for p in self._shard_rel]
        self.shard_urls = [remote.url_of(p) for p in self._shard_rel]
        # Errors name the URL of a shard, not its place in the snapshot directory.
        self.shard_paths = list(self.shard_urls)
        self.prefetch_depth, self.prefetch_threads = int(prefetch), int(prefetch_threads)
        # An unbounded cache never evicts, so pins cost nothing: keep every shard open.
        self.max_open = (max(1, len(self.shard_paths)) if remote.cache.limit is None
                         else max(1, int(max_open)))
        self._failed: dict[int, tuple[float, FetchError]] = {}
        self._prefetcher: Prefetcher | None = None

    # -- fetching ------------------------------------------------------------------------
    def _fetcher(self, shard: int):
        rel, size, sha = self._shard_rel[shard], int(self.shard_bytes[shard]), self._shard_sha[shard]

        def fetch(tmp_dir: Path) -> Path:
            # Called under the shard's lock: a thread that waited there while another one's
            # fetch of it failed reports that failure instead of trying again at once.
            if self.recently_failed(shard):
                raise self._failed[shard][1]
            return self.remote.fetch_to(rel, tmp_dir, size, sha)

        return fetch

    def _keep_set(self) -> frozenset[str] | None:
        return self._keep if self.fetch == "auto" else None

    def ensure_cached(self, shard: int) -> bool:
        """Fetch a shard into the cache without opening it (the prefetcher's call)."""
        if self.fetch == "range":
            return False
        try:
            return self.remote.cache.ensure(self._shard_sha[shard], int(self.shard_bytes[shard]),
                                            self._fetcher(shard), self.shard_urls[shard],
                                            self._keep_set())
        except NoRoom:
            return False

    def recently_failed(self, shard: int) -> bool:
        """A fetch of this shard failed less than FAILURE_TTL seconds ago in this process."""
        failed = self._failed.get(shard)
        return failed is not None and time.monotonic() - failed[0] < FAILURE_TTL

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: descriptors and threads are the parent's
            self._fds, self._sizes, self._pid = OrderedDict(), {}, os.getpid()
            self._prefetcher, self._failed = None, {}
        if not isinstance(self._fds, OrderedDict):
            self._fds = OrderedDict(self._fds)
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        if self.recently_failed(shard):
            raise self._failed[shard][1]
        while len(self._fds) >= self.max_open:  # unpin the least recently read shard first,
            _, old = self._fds.popitem(last=False)  # so the fetch below may evict it
            self.remote.cache.release(old)
        if self.fetch == "range":
            raise NoRoom(self.shard_urls[shard])
        try:
            fd = self.remote.cache.open(self._shard_sha[shard], int(self.shard_bytes[shard]),
                                        self._fetcher(shard), self.shard_urls[shard],
                                        self._keep_set())
        except FetchError as e:
            self._failed[shard] = (time.monotonic(), e)
            raise
        self._failed.pop(shard, None)
        self._fds[shard] = fd
        self._sizes[shard] = int(self.shard_bytes[shard])
        return fd

    def _pread(self, shard: int, offset: int, size: int, key: str, field: str) -> bytes:
        try:
            return super()._pread(shard, offset, size, key, field)
        except FetchError as e:
            raise e.for_key(key) from e.__cause__
        except NoRoom:
            return self._ranges(shard, [offset], [offset + size], key)[0]

    def _ranges(self, shard: int, starts: list[int], ends: list[int], key: str) -> list[bytes]:
        if self.recently_failed(shard):
            raise self._failed[shard][1].for_key(key)
        url = self.shard_urls[shard]
        try:
            rel = self.remote.location(self._shard_rel[shard])
            out = read_ranges(self.remote.fs, f"{self.remote.path}/{rel}",
                              url, starts, ends, self.remote.retry)
        except FetchError as e:
            self._failed[shard] = (time.monotonic(), e)
            raise e.for_key(key) from e.__cause__
        self.range_bytes += sum(len(b) for b in out)
        return out

    def _get_by_range(self, shard: int, rows: np.ndarray, mods: list[str]) -> list[dict]:
        """Decode samples of one shard from range reads of their byte ranges (each payload's
        tar header and CRC32 checked, as SplitReader.get_many does on a local file)."""
        starts = [int(self.sample_offset[r]) for r in rows]
        ends = [s + int(self.sample_size[r]) for s, r in zip(starts, rows)]
        blobs = self._ranges(shard, starts, ends, self.keys[int(rows[0])])
        out = []
        for row, start, blob in zip(rows, starts, blobs):
            row, blob = int(row), memoryview(blob)
            d: dict = {"__key__": self.keys[row], "label": int(self.labels[row])}
            for m in mods:
                off, sz, crc = (int(a[row]) for a in self.member[m])
                self._check_header(blob[off - start - 512: off - start], row, m, sz)
                data = blob[off - start: off - start + sz]
                self._check_crc(data, crc, row, m)
                d[m] = self._decode(row, m, bytes(data))
            out.append(d)
        return out

    @contextlib.contextmanager
    def _reading(self, rows: np.ndarray) -> Iterator[None]:
        """A read of `rows`: moves the prefetcher's window to it, and once the last planned
        batch is read holds no pin (a worker may exit without closing)."""
        last = False
        if self._prefetcher is not None and self._prefetcher.pid == os.getpid():
            last = self._prefetcher.reading(rows)
        try:
            yield
        finally:
            if last:
                self.close()

    def _from_shard(self, shard: int, rows: np.ndarray, local: Callable, by_range: Callable):
        """`local(rows)` on the shard pinned in the cache, or `by_range(rows)` when the cache
        has no room for it; a fetch failure names the first row's key."""
        def read():
            self._fd(shard)
            return local(rows)

        try:
            return self._in_shard(read, rows[0])
        except NoRoom:
            return by_range(rows)

    def _in_shard(self, read: Callable, row: int):
        """Run a local read; a fetch failure names the key of `row`."""
        try:
            return read()
        except FetchError as e:
            raise e.for_key(self.keys[int(row)]) from e.__cause__

    def get_many(self, rows: np.ndarray, modalities: list[str] | None = None) -> list[dict]:
        """As SplitReader.get_many, reading shard by shard (output in the order of `rows`)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        with self._reading(rows):
            rows = np.array([self._row_number(r) for r in rows.tolist()], dtype=np.int64)
            mods = self._mods(modalities)
            shards = self.shard[rows]
            out: list[dict | None] = [None] * rows.size
            for s in np.unique(shards).tolist():
                pos = np.flatnonzero(shards == s)
                got = self._from_shard(s, rows[pos], lambda r: super(RemoteSplitReader, self).get_many(r, mods),
                                       lambda r, s=s: self._get_by_range(s, r, mods))
                for p, d in zip(pos.tolist(), got):
                    out[p] = d
            return out  # type: ignore[return-value]

    def read_batch(self, rows: np.ndarray, modalities: list[str] | None = None) -> dict:
        """As SplitReader.read_batch (same layout, same checks), shards from the cache or
        read by range, with the prefetch bookkeeping of `get_many`.

        When every shard of the batch can be held open at once (an unbounded cache keeps
        them all), the whole batch goes through the local batch decoder in one call;
        otherwise shard by shard (one shard pinned at a time, so a bounded cache may evict
        the others), each shard's rows batch-decoded, or read by range when the cache has
        no room, and placed back in the order of `rows`."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        with self._reading(rows):
            rows = np.array([self._row_number(r) for r in rows.tolist()], dtype=np.int64)
            mods = self._mods(modalities)
            shards = self.shard[rows]
            uniq = np.unique(shards).tolist()
            if not uniq or (self.fetch != "range" and len(uniq) <= self.max_open
                            and self._open_all(uniq, rows, shards)):
                return self._in_shard(lambda: super(RemoteSplitReader, self).read_batch(rows, mods),
                                      rows[0] if len(rows) else 0)
            parts = []
            for s in uniq:
                pos = np.flatnonzero(shards == s)
                parts.append((pos, self._from_shard(
                    s, rows[pos], lambda r: super(RemoteSplitReader, self).read_batch(r, mods),
                    lambda r, s=s: self.batch_of(self._get_by_range(s, r, mods), mods))))
            return self._assemble(parts, len(rows), mods)

    def _open_all(self, shards: list[int], rows: np.ndarray, of_row: np.ndarray) -> bool:
        """Pin every shard of a batch; False (pinning none beyond the cache's room) when the
        cache cannot hold one of them."""
        for s in shards:
            try:
                self._in_shard(lambda s=s: self._fd(int(s)), rows[np.flatnonzero(of_row == s)[0]])
            except NoRoom:
                return False
        return True

    def _assemble(self, parts: list[tuple[np.ndarray, dict]], b: int, mods: list[str]) -> dict:
        """One batch from per-shard batches: part i's rows go to positions parts[i][0]."""
        keys: list = [None] * b
        labels = np.empty(b, np.int64)
        inputs: dict = {}
        for pos, part in parts:
            for p, k in zip(pos.tolist(), part["key"]):
                keys[p] = k
            labels[pos] = part["label"]
        for m in mods:
            vals = [part["inputs"][m] for _, part in parts]
            if all(isinstance(v, np.ndarray) for v in vals) and len({(v.dtype, v.shape[1:]) for v in vals}) == 1:
                out = np.empty((b, *vals[0].shape[1:]), vals[0].dtype)
                for (pos, _), v in zip(parts, vals):
                    out[pos] = v
                inputs[m] = out
            else:  # text, ragged values, or shapes that differ between shards: as batch_of does
                items: list = [None] * b
                for (pos, _), v in zip(parts, vals):
                    for p, x in zip(pos.tolist(), v):
                        items[p] = x
                inputs[m] = self._column(m, items)
        return {"key": keys, "label": labels, "inputs": inputs}

    def plan_reads(self, batches: list[np.ndarray]) -> None:
        """The rows of the batches this process will read next, in order: fetch their shards
        ahead in the background (at most `prefetch` shards ahead of the reads)."""
        if self._prefetcher is not None:
            self._prefetcher.stop()
            self._prefetcher = None
        if self.prefetch_depth <= 0 or not batches:
            return
        self._prefetcher = Prefetcher(self, batches, self.prefetch_depth, self.prefetch_threads)

    def close(self) -> None:
        if self._prefetcher is not None and self._prefetcher.pid == os.getpid():
            self._prefetcher.stop()
        self._prefetcher = None
        fds, self._fds, self._sizes = self._fds, OrderedDict(), {}
        for fd in fds.values():
            self.remote.cache.release(fd)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_prefetcher"], state["_failed"] = None, {}
        return state


class RemoteDataset(Dataset):
    """A dataset opened from a URL; `root` is its local snapshot, `url` the remote root."""

    def __init__(self, url: str, *, storage_options: dict[str, Any] | None = None,
                 cache_dir: str | os.PathLike | None = None, cache_limit: int | str | None = None,
                 retry: RetryPolicy | None = None, prefetch: int = 4, fetch: str = "auto",
                 workdir: str | os.PathLike | None = None,
                 keep_snapshots: int = DEFAULT_KEEP_SNAPSHOTS):
        """workdir: a new directory to copy the snapshot into and use as `root`, for stages
        that write beside the manifest (features, pairs) before uploading; without it
        `root` is the shared, read-only snapshot, pinned until `close()`.
        keep_snapshots: snapshots of this URL kept in the cache besides those readers pin."""
        if fetch not in FETCH_MODES:
            raise ValueError(f"fetch must be one of {FETCH_MODES}, got {fetch!r}")
        self.remote = RemoteRoot(url, storage_options, ShardCache(cache_dir, cache_limit), retry,
                                 keep_snapshots)
        self.url = self.remote.url
        self.prefetch, self.fetch = prefetch, fetch
        root = self.remote.snapshot()
        if workdir is not None:
            root = Path(shutil.copytree(root, workdir, ignore=shutil.ignore_patterns(".complete")))
            self.remote.unpin()  # a private copy: the shared snapshot may go
        super().__init__(root)

    @property
    def version(self) -> str:
        """The id of the remote version this dataset reads ("" for a flat root)."""
        return self.remote.layout.version

    def close(self) -> None:
        """Release the shards this process holds open and the pin on the snapshot."""
        for sr in self._splits.values():
            sr.close()
        self.remote.unpin()

    @property
    def cache(self) -> ShardCache:
        return self.remote.cache

    def split(self, name: str) -> SplitReader:
        if name not in self._splits:
            self._splits[name] = RemoteSplitReader(self.root, self.manifest, name, self.remote,
                                                   prefetch=self.prefetch, fetch=self.fetch)
        return self._splits[name]

    def verify(self, progress: bool = False) -> list[str]:
        """Fetch every shard (each checked against its size and sha256 on arrival), then read
        every indexed payload (tar header and CRC). Needs room for one shard at a time."""
        problems: list[str] = []
        for sp in self.splits:
            try:
                sr = self.split(sp)
            except MidasDataError as e:
                problems.append(str(e))
                continue
            sr.fetch = "shard"  # whole shards: the sha256 check covers every byte
            for shard in range(len(sr.shard_paths)):
                try:
                    sr._fd(shard)
                except MidasDataError as e:
                    problems.append(str(e))
                    continue
                for row in np.flatnonzero(sr.shard == shard):
                    for m in sr.modalities:
                        try:
                            sr.read_raw(int(row), m)
                        except MidasDataError as e:
                            problems.append(str(e))
        return problems
