"""Writing remote roots: build-shards --out s3://... builds locally and uploads, manifest
last; replacing a dataset never lets a reader take new bytes for old ones."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from midas_data import MidasDataError, Sample, build_dataset, open_dataset
from midas_data.cli import main
from midas_data.storage import FetchError, RetryPolicy
from midas_data.storage.publish import publish
from tests.remote_servers import moto_s3

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
    res = CliRunner().invoke(main, ["build-shards", "--out", "s3://out/mfeat", "--quiet"])
    assert res.exit_code != 0 and "already holds a dataset" in res.output


def test_replacing_a_dataset_never_serves_new_bytes_as_old(s3, tmp_path):
    old, new = _build(tmp_path / "old", 0), _build(tmp_path / "new", 1)
    publish(old, "s3://out/ds", s3)
    with pytest.raises(MidasDataError, match="already holds a dataset"):
        publish(new, "s3://out/ds", s3)
    reader = open_dataset("s3://out/ds", storage_options=s3, cache_dir=tmp_path / "c",
                          retry=FAST).split("train")
    first = reader.get_many(np.arange(8))  # shard 0 now cached
    publish(new, "s3://out/ds", s3, overwrite=True)
    assert [d["__key__"] for d in reader.get_many(np.arange(8))] == [d["__key__"] for d in first]
    with pytest.raises(FetchError, match="s3://out/ds/shards/train-000001.tar.*sha256"):
        reader.get_many(np.arange(8, 16))  # the old manifest's shard 1 is gone
    fresh = open_dataset("s3://out/ds", storage_options=s3, cache_dir=tmp_path / "c")
    want = open_dataset(new).split("train").get_many(np.arange(30))
    got = fresh.split("train").get_many(np.arange(30))
    assert all(np.array_equal(g["a"], w["a"]) for g, w in zip(got, want))


def test_an_interrupted_upload_is_never_taken_for_a_dataset(s3, tmp_path, monkeypatch):
    import midas_data.storage.publish as pub

    publish(_build(tmp_path / "old", 0), "s3://out/cut", s3)
    calls, real_filesystem = [], pub.filesystem

    def flaky_filesystem(*args, **kw):
        fs, root = real_filesystem(*args, **kw)
        real = fs.put_file

        def put_file(lpath, rpath, *a, **k):
            calls.append(rpath)
            if "index/" in rpath:
                raise PermissionError("access denied mid-upload")
            return real(lpath, rpath, *a, **k)

        fs.put_file = put_file
        return fs, root

    monkeypatch.setattr(pub, "filesystem", flaky_filesystem)
    with pytest.raises(FetchError, match="index/train.arrow"):
        publish(_build(tmp_path / "new", 1), "s3://out/cut", s3, overwrite=True)
    monkeypatch.undo()
    assert not any(c.endswith("manifest.json") for c in calls)
    with pytest.raises(MidasDataError, match="manifest.json"):
        open_dataset("s3://out/cut", storage_options=s3, cache_dir=tmp_path / "c", retry=FAST)
