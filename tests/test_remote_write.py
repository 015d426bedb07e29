"""Writing remote roots: build-shards --out s3://... builds locally and publishes a version,
manifest last. A replace (finished, under way or interrupted) leaves the previous version
readable and complete; a reader never mixes versions nor takes new bytes for old ones; old
versions and old snapshots are deleted only beyond what is kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from midas_data import MidasDataError, Sample, build_dataset, open_dataset
from midas_data.cli import main
from midas_data.storage import FetchError, RetryPolicy
from midas_data.storage.publish import publish, remote_stage
from midas_data.stream.dataset import MidasDataset, MidasLoader
from tests.remote_servers import moto_s3, upload

FAST = RetryPolicy(attempts=2, backoff=0.01, max_backoff=0.02, timeout=2.0)


@pytest.fixture(scope="module")
def s3():
    import boto3

    with moto_s3() as (endpoint, opts):
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing"
                     ).create_bucket(Bucket="out")
        yield opts


def _build(root, seed: int, n: int = 30):
    rng = np.random.default_rng(seed)
    samples = [Sample(f"k{i:03d}", i % 3, {"a": rng.normal(size=5).astype(np.float32)},
                      split="train") for i in range(n)]
    build_dataset(samples, root, shard_max_count=8, progress=False)
    return root


def test_build_shards_to_s3_uploads_a_readable_dataset(s3, tmp_path, monkeypatch):
    for k, v in {"AWS_ENDPOINT_URL": s3["endpoint_url"], "MIDAS_DATA_CACHE_DIR":
                 str(tmp_path / "cache")}.items():
        monkeypatch.setenv(k, v)
    res = CliRunner().invoke(main, ["build-shards", "--out", "s3://out/mfeat", "--modalities",
                                    "fac,mor", "--shard-samples", "500", "--quiet"])
    assert res.exit_code == 0, res.output
    ds = open_dataset("s3://out/mfeat", storage_options=s3)
    assert ds.splits == ["train", "val", "test"] and ds.verify() == []
    assert ds.version and ds.remote.url_of("index/train.arrow").startswith(
        f"s3://out/mfeat/versions/{ds.version}/")
    res = CliRunner().invoke(main, ["inspect", "s3://out/mfeat", "--verify"])
    assert res.exit_code == 0 and "verify: OK" in res.output, res.output
    res = CliRunner().invoke(main, ["build-shards", "--out", "s3://out/mfeat", "--quiet"])
    assert res.exit_code != 0 and "already holds a dataset" in res.output


def _values(root) -> dict[str, np.ndarray]:
    """key -> payload of every sample of a local dataset (the oracle)."""
    sr = open_dataset(root).split("train")
    return {d["__key__"]: d["a"] for d in sr.get_many(np.arange(len(sr)))}


def _epoch(stream) -> dict[str, np.ndarray]:
    """key -> payload as one epoch of a stream delivers them (each key at most once)."""
    out: dict[str, np.ndarray] = {}
    for b in stream:
        for k, a in zip(b["key"], b["inputs"]["a"].numpy()):
            assert k not in out, f"{k} delivered twice"
            out[k] = a
    return out


def _same(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def _versions(s3, url: str) -> set[str]:
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    fs.invalidate_cache()
    path = url[len("s3://"):]
    return {p.rsplit("/", 1)[-1] for p in fs.ls(f"{path}/versions")} if fs.exists(
        f"{path}/versions") else set()


def _root_version(s3, url: str) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    fs.invalidate_cache()
    return json.loads(fs.cat_file(f"{url[len('s3://'):]}/manifest.json"))["remote_layout"]["version"]


def _hook_puts(monkeypatch, on_put):
    """Call on_put(remote path) after (or, raising, instead of) each upload of a publish."""
    import midas_data.storage.publish as pub

    real_filesystem = pub.filesystem

    def hooked(*args, **kw):
        fs, root = real_filesystem(*args, **kw)
        real_put, real_pipe = fs.put_file, fs.pipe_file

        def put_file(lpath, rpath, *a, **k):
            on_put(rpath, before=True)
            out = real_put(lpath, rpath, *a, **k)
            on_put(rpath, before=False)
            return out

        def pipe_file(rpath, data, *a, **k):
            on_put(rpath, before=True)
            out = real_pipe(rpath, data, *a, **k)
            on_put(rpath, before=False)
            return out

        fs.put_file, fs.pipe_file = put_file, pipe_file
        return fs, root

    monkeypatch.setattr(pub, "filesystem", hooked)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_reader_of_v1_streams_an_exact_epoch_while_v2_is_published(s3, tmp_path, monkeypatch,
                                                                      workers):
    v1, v2 = _build(tmp_path / "v1", 0), _build(tmp_path / "v2", 1)
    want1, want2 = _values(v1), _values(v2)
    assert want1.keys() == want2.keys() and not _same(want1, want2)  # same keys, new bytes
    url = f"s3://out/live{workers}"
    publish(v1, url, s3)
    # A cold cache and no prefetch: every shard of v1 is fetched after the publish began.
    stream = MidasDataset(open_dataset(url, storage_options=s3, cache_dir=tmp_path / "c",
                                       prefetch=0), batch_size=4, policy="none")
    it = iter(MidasLoader(stream, num_workers=workers))
    delivered: list[tuple[str, np.ndarray]] = []
    mid_publish: list[dict] = []

    def step(rpath: str, before: bool) -> None:
        if before:
            return
        b = next(it, None)  # the reader goes on between uploads
        if b is not None:
            delivered.extend(zip(b["key"], b["inputs"]["a"].numpy()))
        if not rpath.endswith("/manifest.json") and not mid_publish:  # a fresh reader meanwhile
            fresh = MidasDataset(url, batch_size=4, policy="none",
                                 storage_options=s3, cache_dir=tmp_path / "c2")
            mid_publish.append(_epoch(fresh))

    _hook_puts(monkeypatch, step)
    publish(v2, url, s3, overwrite=True)
    monkeypatch.undo()
    assert 0 < len(delivered) < len(want1), "the publish did not happen mid-epoch"
    for b in it:
        delivered.extend(zip(b["key"], b["inputs"]["a"].numpy()))
    got = dict(delivered)
    assert len(got) == len(delivered), "a sample was delivered twice"
    assert _same(got, want1), "the v1 reader's epoch was not exactly v1"
    assert mid_publish and _same(mid_publish[0], want1), "v1 was not whole during the publish"
    after = MidasDataset(url, batch_size=4, policy="none", storage_options=s3,
                         cache_dir=tmp_path / "c")
    assert _same(_epoch(after), want2), "a reader opened after the publish did not get v2"


def test_an_interrupted_publish_leaves_the_previous_version_readable(s3, tmp_path, monkeypatch):
    v1, v2 = _build(tmp_path / "v1", 0), _build(tmp_path / "v2", 1)
    first = publish(v1, "s3://out/cut", s3)
    uploads = []

    def fail_after_three(rpath: str, before: bool) -> None:
        if before and len(uploads) == 3:
            raise PermissionError("access denied mid-upload")
        if not before:
            uploads.append(rpath)

    _hook_puts(monkeypatch, fail_after_three)
    with pytest.raises(FetchError, match="access denied"):
        publish(v2, "s3://out/cut", s3, overwrite=True)
    monkeypatch.undo()
    assert len(uploads) == 3 and _root_version(s3, "s3://out/cut") == first
    fresh = MidasDataset("s3://out/cut", batch_size=4, policy="none", storage_options=s3,
                         cache_dir=tmp_path / "c")
    assert _same(_epoch(fresh), _values(v1)), "v1 is not whole after an interrupted publish"
    assert len(_versions(s3, "s3://out/cut")) == 2  # v1 and the leftover of the cut upload
    second = publish(v2, "s3://out/cut", s3, overwrite=True)
    assert _versions(s3, "s3://out/cut") == {first, second}, "the leftover was not collected"
    fresh = MidasDataset("s3://out/cut", batch_size=4, policy="none", storage_options=s3,
                         cache_dir=tmp_path / "c")
    assert _same(_epoch(fresh), _values(v2))


@pytest.mark.parametrize("keep", [0, 1, 2])
def test_old_versions_are_collected_beyond_keep_versions(s3, tmp_path, keep):
    url = f"s3://out/gc{keep}"
    builds = [_build(tmp_path / f"v{i}", i) for i in range(4)]
    ids, readers = [], []
    for i, b in enumerate(builds):
        ids.append(publish(b, url, s3, overwrite=True, keep_versions=keep))
        assert _versions(s3, url) == set(ids[-(keep + 1):]), f"after publish {i}"
        readers.append(open_dataset(url, storage_options=s3, cache_dir=tmp_path / f"c{i}",
                                    prefetch=0))
        assert readers[-1].version == ids[-1]
        sr = readers[-1].split("train")
        assert _same({d["__key__"]: d["a"] for d in sr.get_many(np.arange(len(sr)))},
                     _values(b))
    # readers of the kept versions behind the current one still read every shard (cold)
    for back in range(1, keep + 1):
        sr = readers[-1 - back].split("train")
        got = {d["__key__"]: d["a"] for d in sr.get_many(np.arange(len(sr)))}
        assert _same(got, _values(builds[-1 - back]))


def test_a_flat_root_is_replaced_without_a_gap_then_collected(s3, tmp_path):
    v1, v2 = _build(tmp_path / "v1", 0), _build(tmp_path / "v2", 1)
    upload(v1, "s3://out/flat", s3)  # as `aws s3 sync` would: no versions
    old = open_dataset("s3://out/flat", storage_options=s3, cache_dir=tmp_path / "c", prefetch=0)
    assert old.version == ""
    publish(v2, "s3://out/flat", s3, overwrite=True)
    sr = old.split("train")  # nothing cached yet: every shard comes from the flat files
    assert _same({d["__key__"]: d["a"] for d in sr.get_many(np.arange(len(sr)))}, _values(v1))
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    assert fs.exists("out/flat/shards/train-000000.tar")  # the previous version is kept
    publish(v1, "s3://out/flat", s3, overwrite=True)
    fs.invalidate_cache()
    assert not fs.exists("out/flat/shards/train-000000.tar"), "the flat files were not collected"
    assert len(_versions(s3, "s3://out/flat")) == 2
    fresh = open_dataset("s3://out/flat", storage_options=s3, cache_dir=tmp_path / "c")
    sr = fresh.split("train")
    assert _same({d["__key__"]: d["a"] for d in sr.get_many(np.arange(len(sr)))}, _values(v1))


def test_a_stage_uploads_only_what_it_wrote_and_maps_the_rest(s3, tmp_path, monkeypatch):
    first = publish(_build(tmp_path / "v1", 0), "s3://out/stage", s3)
    reader = open_dataset("s3://out/stage", storage_options=s3, cache_dir=tmp_path / "c",
                          prefetch=0)
    uploads: list[str] = []
    _hook_puts(monkeypatch, lambda rpath, before: None if before else uploads.append(rpath))
    with remote_stage("s3://out/stage", ("features",), storage_options=s3) as ds:
        (ds.root / "features").mkdir()
        (ds.root / "features" / "train.arrow").write_bytes(b"a stage's table")
    monkeypatch.undo()
    data = [u for u in uploads if not u.endswith("manifest.json")]
    assert len(data) == 1 and data[0].endswith("/features/train.arrow"), uploads
    fresh = open_dataset("s3://out/stage", storage_options=s3, cache_dir=tmp_path / "c2")
    assert fresh.version not in ("", first)
    assert (fresh.root / "features" / "train.arrow").read_bytes() == b"a stage's table"
    assert fresh.remote.location("shards/train-000000.tar") == \
        f"versions/{first}/shards/train-000000.tar"
    assert not (reader.root / "features").exists()  # the old snapshot never changes
    for r in (reader, fresh):  # both read every shard, cold, from v1's folder
        sr = r.split("train")
        assert _same({d["__key__"]: d["a"] for d in sr.get_many(np.arange(len(sr)))},
                     _values(tmp_path / "v1"))
    # a second stage removing the table maps it out again, still uploading no shard
    with remote_stage("s3://out/stage", ("features",), storage_options=s3) as ds:
        (ds.root / "features" / "train.arrow").unlink()
    again = open_dataset("s3://out/stage", storage_options=s3, cache_dir=tmp_path / "c3")
    assert not (again.root / "features").exists()
    # v1's folder stays: the current version still maps its shards there
    assert _versions(s3, "s3://out/stage") == {first, fresh.version, again.version}


def test_a_flat_root_rewritten_in_place_never_serves_new_bytes_as_old(s3, tmp_path):
    """Another tool overwriting a flat root in place: the reader's sha256 check catches it."""
    old, new = _build(tmp_path / "old", 0), _build(tmp_path / "new", 1)
    upload(old, "s3://out/inplace", s3)
    reader = open_dataset("s3://out/inplace", storage_options=s3, cache_dir=tmp_path / "c",
                          retry=FAST, prefetch=0).split("train")
    first = reader.get_many(np.arange(8))  # shard 0 now cached
    upload(new, "s3://out/inplace", s3)
    assert [d["__key__"] for d in reader.get_many(np.arange(8))] == [d["__key__"] for d in first]
    with pytest.raises(FetchError, match="s3://out/inplace/shards/train-000001.tar.*sha256"):
        reader.get_many(np.arange(8, 16))  # the old manifest's shard 1 was replaced
    fresh = open_dataset("s3://out/inplace", storage_options=s3, cache_dir=tmp_path / "c")
    want = open_dataset(new).split("train").get_many(np.arange(30))
    got = fresh.split("train").get_many(np.arange(30))
    assert all(np.array_equal(g["a"], w["a"]) for g, w in zip(got, want))


def test_publish_refuses_to_replace_without_overwrite(s3, tmp_path):
    publish(_build(tmp_path / "v1", 0), "s3://out/refuse", s3)
    with pytest.raises(MidasDataError, match="already holds a dataset"):
        publish(_build(tmp_path / "v2", 1), "s3://out/refuse", s3)


def test_old_snapshots_are_evicted_unless_a_reader_holds_them(s3, tmp_path):
    url, cache = "s3://out/snaps", tmp_path / "c"
    publish(_build(tmp_path / "v0", 0), url, s3)
    held = open_dataset(url, storage_options=s3, cache_dir=cache, keep_snapshots=1)
    held_root = held.root
    opened = []
    for i in range(1, 4):
        publish(_build(tmp_path / f"v{i}", i), url, s3, overwrite=True, keep_versions=3)
        ds = open_dataset(url, storage_options=s3, cache_dir=cache, keep_snapshots=1)
        opened.append(ds.root)
        ds.close()
    snaps = {p for p in held_root.parent.iterdir() if not p.name.startswith(".")}
    assert snaps == {held_root, opened[-1]}, "an unpinned old snapshot stayed, or a held one went"
    sr = held.split("train")  # the held snapshot still serves its reader
    assert len(sr.get_many(np.arange(len(sr)))) == 30
    held.close()
    publish(_build(tmp_path / "v4", 4), url, s3, overwrite=True, keep_versions=3)
    last = open_dataset(url, storage_options=s3, cache_dir=cache, keep_snapshots=1)
    assert {p for p in held_root.parent.iterdir() if not p.name.startswith(".")} == {last.root}
    last.close()


@pytest.mark.parametrize("section,field", [
    ({"layout": 2}, "remote_layout.layout"),
    ({"layout": 1, "version": "../x", "files": {}}, "remote_layout.version"),
    ({"layout": 1, "version": "20261201T000000000000Z-0000abcd",
      "files": {"../../etc/passwd": ""}}, "remote_layout.files.../../etc/passwd"),
    ({"layout": 1, "version": "20261201T000000000000Z-0000abcd",
      "files": {"shards/train-000000.tar": "/abs"}}, "remote_layout.files.shards/train-000000.tar"),
    ({"layout": 1, "version": "20261201T000000000000Z-0000abcd", "files": {},
      "previous": ["nope"]}, "remote_layout.previous"),
    # a trailing newline ("$" would have let it in) would reach folder names
    ({"layout": 1, "version": "20261201T000000000000Z-0000abcd\n", "files": {}},
     "remote_layout.version"),
    ({"layout": 1, "version": "20261201T000000000000Z-0000abcd",
      "files": {"shards/train-000000.tar\n": ""}}, r"remote_layout.files.shards/train-000000.tar\n"),
])
def test_a_layout_pointing_anywhere_else_is_refused_naming_the_field(section, field):
    import re

    from midas_data.errors import UnsafeInputError
    from midas_data.storage.layout import split_manifest

    with pytest.raises(UnsafeInputError,
                       match=re.escape(f"file s3://b/d/manifest.json, field '{field}'")):
        split_manifest({"format": "midas-data", "remote_layout": section},
                       "s3://b/d/manifest.json")


def test_a_snapshot_pinned_by_another_process_is_not_evicted(s3, tmp_path):
    import subprocess
    import sys

    url, cache = "s3://out/pinproc", tmp_path / "c"
    publish(_build(tmp_path / "v0", 0), url, s3)
    code = ("import sys, json; from midas_data import open_dataset; "
            "ds = open_dataset(sys.argv[1], storage_options=json.loads(sys.argv[2]), "
            "cache_dir=sys.argv[3], keep_snapshots=1); print(ds.root, flush=True); "
            "sys.stdin.read()")  # holds the dataset open until its stdin closes
    proc = subprocess.Popen([sys.executable, "-c", code, url, json.dumps(s3), str(cache)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        held = proc.stdout.readline().strip()
        assert held, "the reader process did not open the dataset"
        for i in (1, 2):
            publish(_build(tmp_path / f"v{i}", i), url, s3, overwrite=True, keep_versions=3)
            newest = open_dataset(url, storage_options=s3, cache_dir=cache, keep_snapshots=1)
            newest.close()
        snaps = {str(p) for p in newest.root.parent.iterdir() if not p.name.startswith(".")}
        assert snaps == {held, str(newest.root)}
    finally:
        proc.stdin.close()
        proc.wait(60)
    publish(_build(tmp_path / "v3", 3), url, s3, overwrite=True, keep_versions=3)
    last = open_dataset(url, storage_options=s3, cache_dir=cache, keep_snapshots=1)
    assert [p for p in last.root.parent.iterdir() if not p.name.startswith(".")] == [last.root]
    last.close()


def test_a_failed_collection_still_publishes_and_the_next_publish_collects(s3, tmp_path,
                                                                           monkeypatch):
    import midas_data.storage.publish as pub

    url = "s3://out/gcfail"
    ids = [publish(_build(tmp_path / "v0", 0), url, s3)]

    def broken(*a, **k):
        raise ConnectionError("delete refused")

    monkeypatch.setattr(pub, "collect_garbage", broken)
    for i in (1, 2):
        with pytest.warns(UserWarning, match="is published, but deleting old versions failed"):
            ids.append(publish(_build(tmp_path / f"v{i}", i), url, s3, overwrite=True))
    monkeypatch.undo()
    assert _root_version(s3, url) == ids[-1] and _versions(s3, url) == set(ids)
    ids.append(publish(_build(tmp_path / "v3", 3), url, s3, overwrite=True))
    assert _versions(s3, url) == set(ids[-2:])


def test_a_flat_manifest_cannot_name_other_root_files_for_collection():
    """The files of a flat root are deleted once its version is collected: only names a
    dataset of this format holds are taken from its manifest."""
    from midas_data.storage.layout import flat_files

    class NoListing:
        def find(self, path):
            raise FileNotFoundError(path)

    manifest = {"shards": [{"path": "shards/train-000000.tar"}, {"path": "notes/important.bin"},
                           {"path": "shards/train-000001.tar\n"}],
                "splits": {"train": {"index": "index/train.arrow"},
                           "val": {"index": "keep/me.arrow"}}}
    assert flat_files(NoListing(), "b/d", manifest) == {"shards/train-000000.tar": "",
                                                        "index/train.arrow": ""}
