"""Open a dataset whose root is a URL: a local snapshot of its small files, shards through
the shard cache.

The manifest, the Arrow indexes and the features and pairs tables are small next to the
shards; they are copied into an immutable snapshot directory under
`cache_dir/roots/<url digest>/<content digest>/` (one per manifest and listing of features
and pairs, so a dataset rewritten remotely gets a new snapshot and a reader never mixes
old and new files), and every existing stage reads them as it reads a local dataset.
Shards are read through `RemoteSplitReader`, which fetches each one whole into the shard
cache (verified against the manifest's sha256) before its first read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from midas_data.dataset.manifest import MANIFEST
from midas_data.dataset.reader import Dataset, SplitReader
from midas_data.errors import MidasDataError, UnsafeInputError, where
from midas_data.storage.cache import ShardCache
from midas_data.storage.fetch import FetchError, RetryPolicy, download
from midas_data.storage.prefetch import Prefetcher
from midas_data.storage.urls import filesystem

# The derived tables a snapshot copies besides manifest and indexes; nothing else is fetched.
_EXTRA_RE = re.compile(r"^(features/[a-z]+\.arrow|pairs/[a-z]+/part-\d{5}-of-\d{5}\.arrow"
                       r"|pairs/[a-z]+/report\.json)$")
FAILURE_TTL = 30.0  # seconds a shard that could not be fetched fails fast in this process


class RemoteRoot:
    """A dataset URL, the file system that reads it, and the cache its shards go to."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 cache: ShardCache | None = None, retry: RetryPolicy | None = None):
        self.url = str(url).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.cache = cache or ShardCache()
        self.retry = retry or RetryPolicy()
        self._fs, self.path = filesystem(self.url, self.storage_options, self.retry.timeout)
        self._fs_pid = os.getpid()
        self.snapshots = self.cache.dir / "roots" / hashlib.sha256(self.url.encode()).hexdigest()[:20]

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
        return state

    def url_of(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def fetch_to(self, rel: str, tmp_dir: Path, size: int | None = None,
                 sha256: str | None = None) -> Path:
        """Download `rel` (a path the manifest or the listing names) into tmp_dir, checked."""
        return download(self.fs, f"{self.path}/{rel}", self.url_of(rel), tmp_dir, size, sha256,
                        self.retry)

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
                if rel and _EXTRA_RE.match(rel):
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
        """The local snapshot directory of the current remote state (built if new)."""
        tmp_root = self.snapshots / ".tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = self.fetch_to(MANIFEST, tmp_root)
        try:
            text = tmp.read_bytes()
            try:
                manifest = json.loads(text)
                splits = [s for s in manifest.get("splits", {}) if re.fullmatch(r"[a-z]+", s)]
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise MidasDataError(f"{where(file=self.url_of(MANIFEST))}: manifest is not "
                                     f"valid JSON ({e})") from e
            extras = self._extras(splits)
            key = hashlib.sha256(text + json.dumps(extras).encode()).hexdigest()[:24]
            snap = self.snapshots / key
            if (snap / ".complete").is_file():
                return snap
            with self.cache._lock(f"root-{self.snapshots.name}"):
                if (snap / ".complete").is_file():
                    return snap
                build = Path(tempfile.mkdtemp(prefix=".build-", dir=tmp_root))
                try:
                    (build / MANIFEST).write_bytes(text)
                    for sp, meta in manifest["splits"].items():
                        rel = meta.get("index") if isinstance(meta, dict) else None
                        if not isinstance(rel, str) or rel != f"index/{sp}.arrow":
                            raise UnsafeInputError(f"{where(self.url_of(MANIFEST), field=f'splits.{sp}.index')}: "
                                                   f"{rel!r} is not index/{sp}.arrow; refused")
                        self._place(rel, build, meta.get("index_sha256"))
                    for rel, _ in extras:
                        self._place(rel, build, None)
                    (build / ".complete").write_text(self.url + "\n")
                    if snap.exists():  # an incomplete leftover of a killed process
                        shutil.rmtree(snap, ignore_errors=True)
                    os.replace(build, snap)
                finally:
                    shutil.rmtree(build, ignore_errors=True)
            return snap
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _place(self, rel: str, build: Path, sha256: str | None) -> None:
        dest = build / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.fetch_to(rel, build, None, sha256), dest)


class RemoteSplitReader(SplitReader):
    """A SplitReader whose shards come from the shard cache.

    Each shard is fetched whole before its first read and pinned (a shared lock on the open
    file) while this reader keeps it open; at most `max_open` shards stay open per process
    (one by default: a batch is read shard by shard, so a small cache is not held by pins).
    `get_many` reads a batch shard by shard so the batch needs one shard at a time.
    """

    def __init__(self, root: Path, manifest: dict, split: str, remote: RemoteRoot,
                 prefetch: int = 4, prefetch_threads: int = 2, max_open: int = 1):
        super().__init__(root, manifest, split)
        self.remote = remote
        by_path = {s["path"]: s for s in manifest["shards"]}
        self._shard_rel = list(manifest["splits"][split]["shards"])
        self._shard_sha = [by_path[p]["sha256"] for p in self._shard_rel]
        self.shard_urls = [remote.url_of(p) for p in self._shard_rel]
        # Errors name the URL of a shard, not its place in the snapshot directory.
        self.shard_paths = list(self.shard_urls)
        self.prefetch_depth, self.prefetch_threads = int(prefetch), int(prefetch_threads)
        self.max_open = max(1, int(max_open))
        self._failed: dict[int, tuple[float, FetchError]] = {}
        self._prefetcher: Prefetcher | None = None

    # -- fetching ------------------------------------------------------------------------
    def _fetcher(self, shard: int):
        rel, size, sha = self._shard_rel[shard], int(self.shard_bytes[shard]), self._shard_sha[shard]
        return lambda tmp_dir: self.remote.fetch_to(rel, tmp_dir, size, sha)

    def ensure_cached(self, shard: int) -> bool:
        """Fetch a shard into the cache without opening it (the prefetcher's call)."""
        return self.remote.cache.ensure(self._shard_sha[shard], int(self.shard_bytes[shard]),
                                        self._fetcher(shard), self.shard_urls[shard])

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
        try:
            fd = self.remote.cache.open(self._shard_sha[shard], int(self.shard_bytes[shard]),
                                        self._fetcher(shard), self.shard_urls[shard])
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

    def get_many(self, rows: np.ndarray, modalities: list[str] | None = None) -> list[dict]:
        """As SplitReader.get_many, reading shard by shard (output in the order of `rows`)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        last = False
        if self._prefetcher is not None and self._prefetcher.pid == os.getpid():
            last = self._prefetcher.reading(rows)
        if rows.size == 0:
            return []
        rows = np.array([self._row_number(r) for r in rows], dtype=np.int64)
        shards = self.shard[rows]
        by_shard = np.argsort(shards, kind="stable")
        out: list[dict | None] = [None] * rows.size
        for s in np.unique(shards):
            pos = by_shard[shards[by_shard] == s]
            try:
                self._fd(int(s))
            except FetchError as e:
                raise e.for_key(self.keys[int(rows[pos[0]])]) from e.__cause__
            for p, d in zip(pos, super().get_many(rows[pos], modalities)):
                out[int(p)] = d
        if last:  # the plan is read: hold no pin (a worker may exit without closing)
            self.close()
        return out  # type: ignore[return-value]

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
                 retry: RetryPolicy | None = None, prefetch: int = 4):
        self.remote = RemoteRoot(url, storage_options, ShardCache(cache_dir, cache_limit), retry)
        self.url = self.remote.url
        self.prefetch = prefetch
        super().__init__(self.remote.snapshot())

    @property
    def cache(self) -> ShardCache:
        return self.remote.cache

    def split(self, name: str) -> SplitReader:
        if name not in self._splits:
            self._splits[name] = RemoteSplitReader(self.root, self.manifest, name, self.remote,
                                                   prefetch=self.prefetch)
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
