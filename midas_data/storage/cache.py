"""A bounded local cache of whole shards, shared by every process of one node.

Layout under cache_dir: `shards/<sha256>.tar` (a file is named by its verified digest, so a
name is a proof that its bytes are the manifest's, the same shard used by two datasets is
stored once, and a dataset rebuilt in place can never be served stale bytes), `tmp/`
(downloads in progress, and `.part` reservations of the bytes they will add), `locks/` (one lock file per shard, plus `cache.lock`).

Rules that make sharing safe (DataLoader workers, ranks on one node, threads):
- A shard appears in `shards/` only by an atomic rename of a fully downloaded, verified
  file, so no reader ever sees a partial or corrupted file there.
- Fetching a shard holds that shard's lock: a second process asking for it waits and then
  finds it in place, so a shard is never fetched twice at the same time.
- A reader holds a shared `flock` on the open shard file for as long as it reads it (a
  pin); eviction takes the exclusive lock without waiting and skips a file it cannot get,
  so a shard still being read is never evicted.
- Before a fetch, least-recently-used files (by mtime, touched on each use) are evicted
  until the cached bytes plus the downloads in flight fit in `cache_limit`. If pinned
  shards alone exceed the limit the fetch still proceeds (the limit is then exceeded by
  what readers hold open) rather than deadlock; `stats()` reports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

from midas_data.errors import MidasDataError

DEFAULT_LOCK_TIMEOUT = 3600.0
_PART_RE = re.compile(r"^\.reserve-(\d+)-.*\.(\d+)\.part$")


def default_cache_dir() -> Path:
    """$MIDAS_DATA_CACHE_DIR, else $XDG_CACHE_HOME/midas-data, else ~/.cache/midas-data."""
    env = os.environ.get("MIDAS_DATA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "midas-data"


def parse_size(value: int | str | None) -> int | None:
    """Bytes from an int or a string like '50GB', '512MiB', '1e9'; None = unbounded."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?i?B?)?\s*", str(value))
    if not m:
        raise ValueError(f"cache_limit {value!r} is not a size such as 50GB or 512MiB")
    unit = (m.group(2) or "").upper().rstrip("B")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * mult)


class NoRoom(Exception):
    """The shard does not fit under the limit without evicting shards in use by this run."""


def share_locked(path: Path) -> int | None:
    """A read-only descriptor of `path` holding a shared flock (an evictor takes it
    exclusively), its mtime touched as most recently used; None if the file is not there or
    was replaced between open and lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # evicted between open and lock
            os.close(fd)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used
        return fd
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


class ShardCache:
    """Whole-shard cache: `open(sha256, size, fetch)` returns a pinned read-only descriptor."""

    def __init__(self, cache_dir: str | os.PathLike | None = None,
                 cache_limit: int | str | None = None,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT):
        self.dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.limit = parse_size(cache_limit)
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"cache_limit must be >= 0, got {cache_limit}")
        self.lock_timeout = lock_timeout
        for sub in ("shards", "tmp", "locks"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.fetched_bytes = 0  # bytes this process downloaded into the cache
        self.fetches = 0

    # -- paths ---------------------------------------------------------------------------
    def path(self, sha256: str) -> Path:
        return self.dir / "shards" / f"{sha256}.tar"

    @property
    def tmp_dir(self) -> Path:
        return self.dir / "tmp"

    def _lock(self, name: str) -> FileLock:
        return FileLock(str(self.dir / "locks" / f"{name}.lock"), timeout=self.lock_timeout,
                        thread_local=False, is_singleton=False)

    def contains(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    # -- reading -------------------------------------------------------------------------
    def _try_pin(self, sha256: str, size: int) -> int | None:
        """Open and share-lock the cached file, or None if it is not (or no longer) there."""
        path = self.path(sha256)
        fd = share_locked(path)
        if fd is not None and os.fstat(fd).st_size != size:  # cannot happen through this class
            os.close(fd)
            self._evict_one(path)
            return None
        return fd

    def open(self, sha256: str, size: int, fetch: Callable[[Path], Path],
             name: str = "", keep: frozenset[str] | None = None) -> int:
        """A read-only descriptor of the verified shard, pinned until it is closed.

        fetch(tmp_dir) must return a downloaded file in tmp_dir whose size and sha256 it has
        checked; it is called at most once at a time per shard across processes. With
        `keep` (sha256 digests, e.g. every shard of the dataset being read), those shards are
        never evicted for it: NoRoom is raised instead when it does not fit.
        """
        for _ in range(8):
            fd = self._try_pin(sha256, size)
            if fd is not None:
                return fd
            self.ensure(sha256, size, fetch, name, keep)
        raise MidasDataError(f"{name or sha256}: evicted from the cache at {self.dir} as soon as "
                             "it arrived, again and again; raise cache_limit")

    def ensure(self, sha256: str, size: int, fetch: Callable[[Path], Path], name: str = "",
               keep: frozenset[str] | None = None) -> bool:
        """Fetch the shard into the cache unless it is there; True if this call fetched it.
        keep: as in `open` (NoRoom when it does not fit)."""
        if self.contains(sha256):
            return False
        if keep is not None and not self.fits(size, keep):
            raise NoRoom(name or sha256)
        try:
            with self._lock(sha256):
                if self.contains(sha256):  # another process fetched it while we waited
                    return False
                reservation = self._make_room(size, keep)
                if reservation is None:
                    raise NoRoom(name or sha256)
                try:
                    tmp = fetch(self.tmp_dir)
                    os.replace(tmp, self.path(sha256))
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        reservation.unlink()
                self.fetched_bytes += size
                self.fetches += 1
                return True
        except Timeout as e:
            raise MidasDataError(f"{name or sha256}: waited {self.lock_timeout:.0f}s for another "
                                 f"process fetching it into {self.dir}") from e

    # -- eviction ------------------------------------------------------------------------
    def _entries(self) -> list[tuple[int, int, Path]]:
        out = []
        for p in (self.dir / "shards").glob("*.tar"):
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                out.append((st.st_mtime_ns, st.st_size, p))
        return sorted(out)

    def _in_flight(self) -> int:
        total = 0
        for p in self.tmp_dir.glob(".reserve-*.part"):
            m = _PART_RE.match(p.name)
            if not m:
                continue
            try:
                os.kill(int(m.group(1)), 0)
            except ProcessLookupError:  # its process died mid-fetch: the room is free again
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                continue
            except PermissionError:  # alive, another user's
                pass
            total += int(m.group(2))
        return total

    @staticmethod
    def _evict_one(path: Path) -> bool:
        """Delete `path` if nobody reads it (exclusive lock without waiting)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False  # pinned by a reader
        try:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    os.unlink(path)
            return True
        finally:
            os.close(fd)

    def fits(self, incoming: int, keep: frozenset[str]) -> bool:
        """Whether `incoming` bytes fit under the limit if only shards outside `keep` were
        evicted (a quick estimate without the cache lock)."""
        if self.limit is None:
            return True
        kept = sum(s for _, s, p in self._entries() if p.stem in keep)
        return kept + self._in_flight() + incoming <= self.limit

    def _reserve(self, incoming: int) -> Path:
        """A file in tmp/ whose name carries the bytes a fetch in progress will add, so
        that fetches starting meanwhile in other processes count them."""
        fd, p = tempfile.mkstemp(prefix=f".reserve-{os.getpid()}-", suffix=f".{incoming}.part",
                                 dir=self.tmp_dir)
        os.close(fd)
        return Path(p)

    def _make_room(self, incoming: int, keep: frozenset[str] | None = None) -> Path | None:
        """Evict least-recently-used shards until `incoming` fits and reserve its room
        (the reservation file is returned; delete it once the shard is in place). None,
        with nothing evicted, when it cannot fit without evicting a shard in `keep`."""
        if self.limit is None:
            return self._reserve(incoming)
        with self._lock("cache"):
            entries = self._entries()
            total = sum(s for _, s, _ in entries) + self._in_flight() + incoming
            if keep is not None:
                if total - sum(s for _, s, p in entries if p.stem not in keep) > self.limit:
                    return None
                entries = [e for e in entries if e[2].stem not in keep]
            for _, size, path in entries:
                if total <= self.limit:
                    break
                if self._evict_one(path):
                    total -= size
            over = self.dir / "over-limit"
            if total > self.limit:  # pinned shards hold the rest: trim when they are released
                over.touch()
            else:
                with contextlib.suppress(FileNotFoundError):
                    over.unlink()
            return self._reserve(incoming)

    def release(self, fd: int) -> None:
        """Unpin a descriptor from `open`; if a fetch had to exceed the limit because of
        pinned shards, evict down to the limit now."""
        os.close(fd)
        if self.limit is not None and (self.dir / "over-limit").exists():
            with contextlib.suppress(OSError, Timeout):  # best effort: the next fetch trims too
                reservation = self._make_room(0)
                if reservation is not None:
                    reservation.unlink()

    def stats(self) -> dict:
        entries = self._entries()
        return {"dir": str(self.dir), "limit": self.limit, "files": len(entries),
                "bytes": sum(s for _, s, _ in entries), "fetched_bytes": self.fetched_bytes,
                "fetches": self.fetches}

    def clear(self) -> None:
        """Evict every shard nobody is reading."""
        for _, _, path in self._entries():
            self._evict_one(path)
