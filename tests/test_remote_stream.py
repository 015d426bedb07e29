"""Remote roots: the stream contract on s3:// (a moto server) and http:// (a local server
with Range support), a cold and a warm cache, a cache smaller than the dataset, and faults
(dropped connections, 503 bursts, flipped bytes, a hanging server). Every server listens on
127.0.0.1 and is started and stopped by the fixtures here."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from midas_data import CorruptShardError, Sample, build_dataset, open_dataset
from midas_data.dataset.inspect import describe
from midas_data.storage import FetchError, RetryPolicy
from midas_data.stream.dataset import MidasDataset, MidasLoader
from tests.remote_servers import FaultyHTTPServer, gcs_emulator, moto_s3, upload, upload_gcs

N = 61
FAST = RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.05, timeout=1.0)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """A directory holding `ds/`: 61 samples in nine shards of at most 7."""
    top = tmp_path_factory.mktemp("served")
    rng = np.random.default_rng(0)
    samples = [Sample(f"s{i:04d}", int(i % 5), {"a": rng.normal(size=4).astype(np.float32),
                                                 "b": rng.normal(size=3).astype(np.float32)},
                      split="train") for i in range(N)]
    build_dataset(samples, top / "ds", shard_max_count=7, progress=False)
    return top


@pytest.fixture(scope="module")
def http(served):
    srv = FaultyHTTPServer(served, hang_s=4.0).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def s3(served):
    with moto_s3() as (_, opts):
        upload(served / "ds", "s3://midas/ds", opts)
        yield "s3://midas/ds", opts


@pytest.fixture(scope="module")
def gcs(served):
    import importlib.util

    if importlib.util.find_spec("gcsfs") is None:
        pytest.skip("gs:// needs gcsfs: pip install 'midas-data[gcs]'")
    if importlib.util.find_spec("gcp_storage_emulator") is None:
        pytest.skip("the GCS emulator is not installed: pip install gcp-storage-emulator")
    with gcs_emulator("midas") as opts:
        upload_gcs(served / "ds", "gs://midas/ds", opts)
        yield "gs://midas/ds", opts


def _shard_path(root: Path, i: int) -> Path:
    return root / "ds" / "shards" / f"train-{i:06d}.tar"


def _real(batch: dict) -> list[str]:
    """Keys of a batch's real rows (a stream that pads its last step marks fill rows, repeats
    of real samples, with valid == False)."""
    valid = batch.get("valid")
    return list(batch["key"]) if valid is None else [
        k for k, v in zip(batch["key"], valid.tolist()) if v]


def _keys_per_rank(root, world: int, workers: int, epoch: int = 0, batch_size: int = 4,
                   **kw) -> list[list[list[str]]]:
    out = []
    for rank in range(world):
        ds = MidasDataset(root, batch_size=batch_size, rank=rank, world_size=world, **kw)
        ds.set_epoch(epoch)
        out.append([_real(b) for b in MidasLoader(ds, num_workers=workers)])
    return out


def _cache_files(cache: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in (cache / "shards").glob("*.tar")}


def _no_partial_files(cache: Path, settle_s: float = 10.0) -> bool:
    """No download or reservation left in tmp/, once background prefetches (which go on
    fetching other shards after an epoch stops with an error) have finished."""
    import time

    deadline = time.monotonic() + settle_s
    while True:
        left = list((cache / "tmp").glob("*.part")) + list((cache / "tmp").glob("*.download"))
        if not left or time.monotonic() > deadline:
            return not left
        time.sleep(0.05)


@pytest.mark.parametrize("scheme", ["s3", "http"])
def test_remote_root_reads_the_same_samples_as_local(served, http, s3, scheme, tmp_path):
    url, opts = s3 if scheme == "s3" else (http.url + "/ds", None)
    remote = open_dataset(url, storage_options=opts, cache_dir=tmp_path)
    local = open_dataset(served / "ds")
    assert remote.url == url and remote.manifest == local.manifest
    a, b = remote.split("train"), local.split("train")
    got, want = a.get_many(np.arange(N)), b.get_many(np.arange(N))
    assert [g["__key__"] for g in got] == [w["__key__"] for w in want]
    for g, w in zip(got, want):
        assert np.array_equal(g["a"], w["a"]) and np.array_equal(g["b"], w["b"])
    assert a.get("s0042")["label"] == b.get("s0042")["label"]
    text, problems = describe(url, verify=True) if scheme == "http" else ("", [])
    assert problems == []


_LOCAL_ORDER: dict[int, list] = {}


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_s3_root_delivers_every_item_once_cold_and_warm(served, s3, world, workers, tmp_path):
    url, opts = s3
    # The oracle: the local root without workers (the order does not depend on the worker
    # count), made once per world size so the matrix stays cheap.
    if world not in _LOCAL_ORDER:
        _LOCAL_ORDER[world] = _keys_per_rank(served / "ds", world, 0)
    want = _LOCAL_ORDER[world]
    cold = _keys_per_rank(url, world, workers, storage_options=opts, cache_dir=tmp_path)
    keys = [k for batches in cold for b in batches for k in b]
    assert len(keys) == len(set(keys)) == N, "duplicate or missing samples"
    assert len({len(b) for b in cold}) == 1, "unequal batch counts per rank"
    assert cold == want, "the remote root changed the order"
    fetched = _cache_files(tmp_path)
    assert len(fetched) == 9
    warm = _keys_per_rank(url, world, workers, storage_options=opts, cache_dir=tmp_path)
    assert warm == want
    assert _cache_files(tmp_path) == fetched, "a warm epoch fetched shards again"


def test_gs_root_delivers_every_item_once_and_publishes_versions(served, gcs, tmp_path):
    from midas_data.storage.publish import publish

    url, opts = gcs
    want = _keys_per_rank(served / "ds", 2, 1)
    got = _keys_per_rank(url, 2, 1, storage_options=opts, cache_dir=tmp_path)
    keys = [k for batches in got for b in batches for k in b]
    assert len(keys) == len(set(keys)) == N and got == want
    assert len(_cache_files(tmp_path)) == 9
    local = open_dataset(served / "ds").split("train").get_many(np.arange(N))
    # a version published over the flat root: a reader of the flat one still reads it whole
    old = open_dataset(url, storage_options=opts, cache_dir=tmp_path / "c", prefetch=0)
    publish(served / "ds", url, opts, overwrite=True)
    for ds in (old, open_dataset(url, storage_options=opts, cache_dir=tmp_path / "c2")):
        got = ds.split("train").get_many(np.arange(N))
        assert all(np.array_equal(g["a"], w["a"]) for g, w in zip(got, local))
    assert ds.version and not old.version
    publish(served / "ds", url, opts, overwrite=True)  # the flat version falls out: collected
    import gcsfs.core

    fs = gcsfs.core.GCSFileSystem(**opts)
    assert not fs.exists("midas/ds/shards/train-000000.tar")
    assert len(fs.ls("midas/ds/versions")) == 2


@pytest.mark.parametrize("old_world,new_world,new_workers", [(2, 3, 2), (3, 1, 0)])
def test_resume_on_s3_root_gives_identical_remaining_sequence(served, s3, old_world, new_world,
                                                              new_workers, tmp_path):
    url, opts = s3
    batch = 4
    full = [k for b in _keys_per_rank(served / "ds", 1, 0, epoch=2)[0] for k in b]
    loaders = [MidasLoader(MidasDataset(url, batch_size=batch, rank=r, world_size=old_world,
                                        storage_options=opts, cache_dir=tmp_path))
               for r in range(old_world)]
    for ld in loaders:
        ld.dataset.set_epoch(2)
    iters = [iter(ld) for ld in loaders]
    consumed = [k for _ in range(2) for it in iters for k in _real(next(it))]
    state = json.loads(json.dumps(loaders[0].state_dict()))
    shutil.rmtree(tmp_path / "shards")  # resume on another node: a cold cache
    resumed = _keys_per_rank(url, new_world, new_workers, epoch=2, batch_size=batch,
                             storage_options=opts, cache_dir=tmp_path / "other")
    resumed = []
    for r in range(new_world):
        ds = MidasDataset(url, batch_size=batch, rank=r, world_size=new_world,
                          storage_options=opts, cache_dir=tmp_path / "other")
        ds.load_state_dict(state)
        resumed.append([_real(b) for b in MidasLoader(ds, num_workers=new_workers)])
    assert len({len(b) for b in resumed}) == 1
    rest = [k for step in range(len(resumed[0])) for r in range(new_world)
            for k in resumed[r][step]]
    assert consumed + rest == full


@pytest.mark.parametrize("fetch,bounded", [("shard", False), ("shard", True), ("auto", True),
                                           ("range", False)])
def test_remote_read_batch_equals_the_local_batch(served, http, tmp_path, fetch, bounded):
    """Whole batch decoded at once (all shards held open), shard by shard (a bounded cache
    pins one shard at a time) or by range: the same keys, labels and arrays as on disk."""
    limit = 3 * max(_shard_path(served, i).stat().st_size for i in range(9)) if bounded else None
    remote = open_dataset(http.url + "/ds", cache_dir=tmp_path, cache_limit=limit, fetch=fetch,
                          prefetch=0).split("train")
    local = open_dataset(served / "ds").split("train")
    rng = np.random.default_rng(3)
    for rows in (rng.permutation(N)[:23], np.array([5, -1, 0]), np.array([], np.int64)):
        got, want = remote.read_batch(rows), local.read_batch(rows)
        assert got["key"] == want["key"] and np.array_equal(got["label"], want["label"])
        for m in ("a", "b"):
            assert got["inputs"][m].shape == want["inputs"][m].shape
            assert np.array_equal(got["inputs"][m], want["inputs"][m])


@pytest.mark.parametrize("fetch", ["shard", "auto", "range"])
def test_cache_limit_smaller_than_the_dataset(served, http, tmp_path, fetch):
    sizes = [_shard_path(served, i).stat().st_size for i in range(9)]
    limit = 5 * max(sizes)  # 9 shards: the dataset does not fit
    served_per_epoch = []
    for epoch in range(2):
        http.reset()
        ds = open_dataset(http.url + "/ds", cache_dir=tmp_path, cache_limit=limit, fetch=fetch)
        got = _keys_per_rank(ds, 2, 2, epoch=epoch)
        assert got == _keys_per_rank(served / "ds", 2, 2, epoch=epoch), "order changed"
        served_per_epoch.append(http.shard_bytes())
        held = sum(p.stat().st_size for p in (tmp_path / "shards").glob("*.tar"))
        assert held <= limit, f"cache holds {held} bytes, limit {limit}"
        assert _no_partial_files(tmp_path)
    cached = len(_cache_files(tmp_path))
    if fetch == "shard":  # LRU over a random order: shards are fetched again and again
        assert served_per_epoch[-1] > sum(sizes), "nothing was evicted: the test does not bite"
    elif fetch == "range":  # nothing cached; each epoch reads about the samples' bytes
        assert cached == 0 and served_per_epoch[-1] < sum(sizes)
    else:  # a resident part stays, the rest is read by range each epoch
        assert 1 <= cached <= 5
        assert served_per_epoch[-1] < sum(sizes) - cached * min(sizes) + 512 * N
        assert served_per_epoch[-1] < served_per_epoch[0]


def test_ranks_and_workers_sharing_a_cold_cache_fetch_each_shard_once(served, http, tmp_path):
    http.reset()
    results: dict[int, list] = {}

    def run(rank: int) -> None:
        ds = MidasDataset(http.url + "/ds", batch_size=4, rank=rank, world_size=2,
                          cache_dir=tmp_path)
        results[rank] = [_real(b) for b in MidasLoader(ds, num_workers=2)]

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results[0], results[1]] == _keys_per_rank(served / "ds", 2, 2)
    gets = http.shard_gets()
    assert len(gets) == 9 and set(gets.values()) == {1}, f"shards fetched twice: {gets}"


# -- faults ------------------------------------------------------------------------------
def _faulty_epoch(http, tmp_path, faults: dict[int, list[str]], retry=FAST, **kw):
    http.reset()
    for i, queue in faults.items():
        http.faults[f"/ds/shards/train-{i:06d}.tar"] = list(queue)
    ds = open_dataset(http.url + "/ds", cache_dir=tmp_path, retry=retry)
    stream = MidasDataset(ds, batch_size=4, **kw)
    return [b for b in MidasLoader(stream, num_workers=0)]


@pytest.mark.parametrize("fault", [["drop", "drop"], ["503", "503", "503"], ["flip"], ["hang"]])
def test_transient_faults_are_retried_and_the_epoch_completes(served, http, tmp_path, fault):
    batches = _faulty_epoch(http, tmp_path, {3: fault, 5: fault})
    assert [_real(b) for b in batches] == _keys_per_rank(served / "ds", 1, 0)[0]
    gets = http.shard_gets()
    assert gets["/ds/shards/train-000003.tar"] == len(fault) + 1
    assert _no_partial_files(tmp_path) and len(_cache_files(tmp_path)) == 9


def _shard_keys(served: Path, i: int) -> set[str]:
    sr = open_dataset(served / "ds").split("train")
    return {k for k, s in zip(sr.keys, sr.shard) if s == i}


@pytest.mark.parametrize("fault,what", [(["always-503"], "still failing after 4 tries"),
                                        (["always-flip"], "sha256"),
                                        (["always-hang"], "still failing after 4 tries")])
def test_persistent_faults_stop_with_an_error_naming_url_and_key(served, http, tmp_path, fault,
                                                                  what):
    with pytest.raises(FetchError) as e:
        _faulty_epoch(http, tmp_path, {4: fault})
    msg = str(e.value)
    assert f"{http.url}/ds/shards/train-000004.tar" in msg and what in msg
    assert any(f"key {k!r}" in msg for k in _shard_keys(served, 4)), msg
    assert isinstance(e.value, CorruptShardError)
    sha = open_dataset(served / "ds").manifest["shards"][4]["sha256"]
    assert not (tmp_path / "shards" / f"{sha}.tar").exists(), "a bad shard reached the cache"
    assert _no_partial_files(tmp_path)


def test_on_error_skip_skips_and_reports_the_keys_it_cannot_fetch(served, http, tmp_path):
    batches = _faulty_epoch(http, tmp_path, {4: ["always-503"]}, on_error="skip")
    skipped = [k for b in batches for k in b["skipped"]]
    got = [k for b in batches for k in _real(b)]
    assert set(skipped) == _shard_keys(served, 4)
    assert sorted(got + skipped) == sorted(f"s{i:04d}" for i in range(N))
    # the failure is remembered for a while: neither the prefetcher nor later samples of the
    # shard tried it again, so the server saw exactly one bounded round of tries
    assert http.shard_gets()["/ds/shards/train-000004.tar"] == FAST.attempts


def test_flipped_byte_in_stored_s3_object_never_reaches_the_cache(served, s3, tmp_path):
    url, opts = s3
    bad = tmp_path / "bad"
    shutil.copytree(served / "ds", bad)
    p = bad / "shards" / "train-000002.tar"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    upload(bad, "s3://midas/bad", opts)
    ds = open_dataset("s3://midas/bad", storage_options=opts, cache_dir=tmp_path / "c",
                      retry=FAST)
    sr = ds.split("train")
    row = int(np.flatnonzero(sr.shard == 2)[0])
    with pytest.raises(FetchError, match="s3://midas/bad/shards/train-000002.tar.*sha256"):
        sr.get_many(np.array([row]))
    assert len(sr.get_many(np.flatnonzero(sr.shard != 2))) == N - len(_shard_keys(served, 2))
    sha = ds.manifest["shards"][2]["sha256"]
    assert not (tmp_path / "c" / "shards" / f"{sha}.tar").exists()


def test_prefetch_fetches_the_next_batches_shards_before_they_are_read(served, http, tmp_path):
    import time

    http.reset()
    ds = open_dataset(http.url + "/ds", cache_dir=tmp_path, prefetch=4)
    stream = MidasDataset(ds, batch_size=2, shuffle=False, policy="none")  # rows in order
    it = iter(stream)
    first = next(it)  # rows 0-1: shard 0 only
    assert _real(first) == ["s0000", "s0001"]
    deadline = time.monotonic() + 20
    while len(_cache_files(tmp_path)) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    # shards 1-4 hold rows read only by later batches: the prefetcher brought them
    assert len(_cache_files(tmp_path)) == 5, _cache_files(tmp_path)
    rest = [k for b in it for k in _real(b)]
    assert [*_real(first), *rest] == [f"s{i:04d}" for i in range(N)]
    assert set(http.shard_gets().values()) == {1}
