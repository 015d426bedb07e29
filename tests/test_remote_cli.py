"""`midas-data inspect` and `midas-data train` on an http:// root served from 127.0.0.1."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from midas_data.cli import main
from tests.remote_servers import FaultyHTTPServer


@pytest.fixture
def served_tiny(make_tiny_dataset, tmp_path):
    make_tiny_dataset(tmp_path / "www" / "tiny")
    srv = FaultyHTTPServer(tmp_path / "www").start()
    yield srv, tmp_path / "www" / "tiny"
    srv.stop()


def test_inspect_and_train_accept_an_http_root(served_tiny, tmp_path, monkeypatch):
    srv, local = served_tiny
    monkeypatch.setenv("MIDAS_DATA_CACHE_DIR", str(tmp_path / "cache"))
    url = srv.url + "/tiny"
    runner = CliRunner()
    res = runner.invoke(main, ["inspect", url, "--verify"])
    assert res.exit_code == 0, res.output
    assert f"dataset {url}" in res.output and "verify: OK" in res.output
    local_res = runner.invoke(main, ["inspect", str(local)])
    assert local_res.output.splitlines()[2:] == res.output.splitlines()[2:-1]
    res = runner.invoke(main, ["train", url, str(tmp_path / "run"), "--method", "joint",
                               "--epochs", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["dataset"] == url and results["epochs_run"] == 1
    assert len(list((tmp_path / "cache" / "shards").glob("*.tar"))) >= 3


def test_a_missing_local_directory_is_still_refused(tmp_path):
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "nope")])
    assert res.exit_code != 0 and "does not exist" in res.output


def test_extract_and_mine_on_an_s3_root_upload_features_and_pairs(make_tiny_dataset, tmp_path,
                                                                   monkeypatch):
    from midas_data import open_dataset
    from midas_data.stream.dataset import MidasDataset
    from tests.remote_servers import moto_s3, upload

    local = make_tiny_dataset(tmp_path / "tiny")
    with moto_s3() as (endpoint, opts):
        upload(local, "s3://work/tiny", opts)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("MIDAS_DATA_CACHE_DIR", str(tmp_path / "cache"))
        runner = CliRunner()
        res = runner.invoke(main, ["extract", "s3://work/tiny", "--warmup-epochs", "1",
                                   "--quiet"])
        assert res.exit_code == 0, res.output
        res = runner.invoke(main, ["mine-misaligned", "s3://work/tiny", "--k", "4", "--quiet"])
        assert res.exit_code == 0, res.output
        ds = open_dataset("s3://work/tiny", storage_options=opts, cache_dir=tmp_path / "c2")
        assert (ds.root / "features" / "train.arrow").is_file()
        assert list((ds.root / "pairs" / "train").glob("part-*.arrow"))
        stream = MidasDataset(ds, batch_size=8, policy="mined")
        keys = [k for b in stream for k, v in zip(b["key"], b["valid"].tolist() if "valid" in b
                                                   else [True] * len(b["key"])) if v]
        assert sorted(keys) == sorted(ds.split("train").keys)
