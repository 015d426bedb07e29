"""The shard cache on its own: LRU eviction under the limit, pins, one fetch at a time across
processes, no partial file ever visible, sizes, and which errors are retried."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from midas_data.storage.cache import NoRoom, ShardCache, default_cache_dir, parse_size
from midas_data.storage.fetch import RetryPolicy, download, is_transient

SIZE = 1000


def _blob(i: int) -> tuple[bytes, str]:
    data = bytes([i % 256]) * SIZE
    return data, hashlib.sha256(data).hexdigest()


def _fetcher(data: bytes, calls: list | None = None):
    def fetch(tmp_dir: Path) -> Path:
        if calls is not None:
            calls.append(1)
        p = tmp_dir / f".t-{os.getpid()}-{time.monotonic_ns()}.download"
        p.write_bytes(data)
        return p
    return fetch


def _read(fd: int) -> bytes:
    return os.pread(fd, SIZE, 0)


def test_least_recently_used_shards_are_evicted_to_stay_under_the_limit(tmp_path):
    cache = ShardCache(tmp_path, cache_limit=2 * SIZE)
    blobs = [_blob(i) for i in range(4)]
    for data, sha in blobs[:2]:
        cache.release(cache.open(sha, SIZE, _fetcher(data)))
        time.sleep(0.01)
    cache.release(cache.open(blobs[0][1], SIZE, _fetcher(b"unused")))  # 0 is now the newest
    time.sleep(0.01)
    cache.release(cache.open(blobs[2][1], SIZE, _fetcher(blobs[2][0])))
    assert cache.contains(blobs[0][1]) and cache.contains(blobs[2][1])
    assert not cache.contains(blobs[1][1]), "the least recently used shard should go"
    assert cache.stats()["bytes"] <= 2 * SIZE


def test_a_pinned_shard_is_never_evicted_and_the_cache_trims_when_it_is_released(tmp_path):
    cache = ShardCache(tmp_path, cache_limit=SIZE)
    (a, sa), (b, sb), (c, sc) = _blob(1), _blob(2), _blob(3)
    pinned = cache.open(sa, SIZE, _fetcher(a))
    cache.release(cache.open(sb, SIZE, _fetcher(b)))
    fd = cache.open(sc, SIZE, _fetcher(c))
    assert cache.contains(sa) and _read(pinned) == a, "a shard being read was evicted"
    assert _read(fd) == c
    cache.release(fd)
    cache.release(pinned)  # over the limit only because of the pin: trimmed now
    assert cache.stats()["bytes"] <= SIZE


def test_shards_of_the_dataset_being_read_are_kept_and_others_evicted(tmp_path):
    cache = ShardCache(tmp_path, cache_limit=2 * SIZE)
    (a, sa), (b, sb), (c, sc), (d, sd) = (_blob(i) for i in range(4))
    cache.release(cache.open(sa, SIZE, _fetcher(a)))  # another dataset's shard
    keep = frozenset({sb, sc, sd})
    cache.release(cache.open(sb, SIZE, _fetcher(b), keep=keep))
    cache.release(cache.open(sc, SIZE, _fetcher(c), keep=keep))  # evicts a, not b
    assert not cache.contains(sa) and cache.contains(sb) and cache.contains(sc)
    calls: list = []
    with pytest.raises(NoRoom):
        cache.open(sd, SIZE, _fetcher(d, calls), keep=keep)
    assert calls == [] and cache.contains(sb) and cache.contains(sc)


def _worker(cache_dir: str, data: bytes, sha: str, counter: str, out: str) -> None:
    cache = ShardCache(cache_dir)

    def fetch(tmp_dir: Path) -> Path:
        with open(counter, "a") as f:
            f.write("x")
        time.sleep(0.3)  # a slow download: the others must wait, not fetch again
        return _fetcher(data)(tmp_dir)

    fd = cache.open(sha, len(data), fetch)
    Path(out).write_bytes(os.pread(fd, len(data), 0))


def test_processes_sharing_a_cache_fetch_a_shard_once(tmp_path):
    data, sha = _blob(7)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "c"), data, sha,
                                               str(tmp_path / "count"), str(tmp_path / f"o{i}")))
             for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert (tmp_path / "count").read_text() == "x", "the shard was fetched more than once"
    assert all((tmp_path / f"o{i}").read_bytes() == data for i in range(4))


def test_a_wrong_sized_file_in_the_cache_is_refused_and_fetched_again(tmp_path):
    cache = ShardCache(tmp_path)
    data, sha = _blob(9)
    cache.path(sha).write_bytes(data[:-1])
    calls: list = []
    fd = cache.open(sha, SIZE, _fetcher(data, calls))
    assert _read(fd) == data and calls == [1]


class _DroppingFile:
    """A remote file whose body breaks off after its first chunk."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, n: int) -> bytes:
        if self.pos:
            raise ConnectionResetError("peer reset")
        self.pos = 1
        return self.data[: len(self.data) // 2]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _FS:
    protocol = ("fake",)

    def __init__(self, data: bytes, drops: int):
        self.data, self.drops, self.opens = data, drops, 0

    def open(self, path, mode="rb", **kw):
        self.opens += 1
        if self.opens <= self.drops:
            return _DroppingFile(self.data)
        import io
        return io.BytesIO(self.data)


def test_a_download_that_breaks_off_is_retried_and_leaves_no_partial_file(tmp_path):
    data, sha = _blob(5)
    fs = _FS(data, drops=2)
    slept: list = []
    policy = RetryPolicy(attempts=3, backoff=0.5, max_backoff=4.0)
    got = download(fs, "p", "fake://p", tmp_path, SIZE, sha, policy, sleep=slept.append)
    assert got.read_bytes() == data and fs.opens == 3
    assert len(slept) == 2 and all(0 <= s <= 4.0 for s in slept), "backoff with jitter, bounded"
    assert [p for p in tmp_path.iterdir() if p != got] == []
    fs = _FS(data, drops=9)
    with pytest.raises(Exception, match="fake://p: cannot fetch .*3 tries"):
        download(fs, "p", "fake://p", tmp_path / "t2", SIZE, sha, policy, sleep=slept.append)
    assert fs.opens == 3 and list((tmp_path / "t2").iterdir()) == []


class _Status(Exception):
    def __init__(self, status):
        super().__init__(status)
        self.status = status


@pytest.mark.parametrize("err,transient", [
    (_Status(503), True), (_Status(500), True), (_Status(429), True), (_Status(408), True),
    (_Status(404), False), (_Status(403), False), (TimeoutError(), True),
    (ConnectionResetError(), True), (FileNotFoundError(), False), (PermissionError(), False),
    (ValueError("bug"), False)])
def test_which_errors_are_retried(err, transient):
    assert is_transient(err) is transient


def test_sizes_and_the_default_cache_dir(monkeypatch, tmp_path):
    assert parse_size("50GB") == 50 * 10**9 and parse_size("512MiB") == 512 * 2**20
    assert parse_size(None) is None and parse_size(123) == 123
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
    monkeypatch.setenv("MIDAS_DATA_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("MIDAS_DATA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "midas-data"


def test_a_protocol_without_its_package_names_the_extra_to_install(tmp_path):
    import importlib.util

    from midas_data import MidasDataError, open_dataset
    from midas_data.storage.urls import is_remote

    assert is_remote("s3://b/x") and is_remote("https://h/x") and is_remote("gs://b/x")
    assert not is_remote("data/x") and not is_remote(tmp_path) and not is_remote("file:///x")
    with pytest.raises(MidasDataError, match="foo://bucket/x: cannot open foo:// roots"):
        open_dataset("foo://bucket/x", cache_dir=tmp_path)
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(MidasDataError, match=r"pip install 'midas-data\[gcs\]'"):
            open_dataset("gs://bucket/x", cache_dir=tmp_path)
