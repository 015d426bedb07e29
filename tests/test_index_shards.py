"""`index-shards` over tars written by plain `webdataset.ShardWriter` (.jpg, .json, .cls
members): the stream yields exactly the tars' samples, bad samples are skipped and listed
(or refused with strict), splits by pattern or fraction, local and http:// tars."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from midas_data import MidasDataError, SchemaError, open_dataset
from midas_data.cli import main
from midas_data.dataset.index_shards import index_shards
from midas_data.stream.dataset import MidasDataset, MidasLoader
from tests.remote_servers import FaultyHTTPServer

CLASSES = ["cat", "dog", "eel"]


def _jpg(rng, size=(6, 8)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> tuple[Path, dict]:
    """Four tars of 10 samples; 3 are broken (no jpg, no label, another image size)."""
    root = tmp_path_factory.mktemp("wds")
    rng = np.random.default_rng(0)
    info = {"good": [], "bad": {}}
    with wds.ShardWriter(str(root / "data-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(40):
            key = f"sample{i:04d}"
            c = i % 3
            rec = {"__key__": key, "jpg": _jpg(rng), "cls": str(c).encode(),
                   "json": json.dumps({"category": CLASSES[c], "i": i}).encode()}
            if i == 5:
                del rec["jpg"]
                info["bad"][key] = "missing"
            elif i == 17:
                del rec["cls"]
                rec["json"] = b"{}"
                info["bad"][key] = "label"
            elif i == 33:
                rec["jpg"] = _jpg(rng, (7, 8))
                info["bad"][key] = "shape"
            else:
                info["good"].append(key)
            sink.write(rec)
    return root, info


def _plain_webdataset(urls: list[str]) -> dict[str, tuple[np.ndarray, int]]:
    out = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        if "jpg" in s and "cls" in s:
            img = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
            out[s["__key__"]] = (img, int(s["cls"]))
    return out


def test_stream_yields_exactly_the_samples_of_the_tars(tars, tmp_path):
    root, info = tars
    m = index_shards(str(root / "data-{000000..000003}.tar"), tmp_path / "ds",
                     modalities={"image": "jpg"}, label="cls", classes=None)
    assert m["source"]["skipped_count"] == 3
    assert sorted(k for v in m["source"]["skipped"].values() for k in v) == sorted(info["bad"])
    ref = _plain_webdataset([str(root / f"data-{i:06d}.tar") for i in range(4)])
    ref = {k: v for k, v in ref.items() if k in info["good"]}
    ds = MidasDataset(tmp_path / "ds", batch_size=4, policy="none")
    seen = {}
    for b in MidasLoader(ds, num_workers=2):
        valid = b["valid"].tolist() if "valid" in b else [True] * len(b["key"])
        for j, k in enumerate(b["key"]):
            if not valid[j]:  # a fill row (a repeat padding the last step)
                continue
            assert k not in seen
            seen[k] = (b["inputs"]["image"][j].numpy(), int(b["label"][j]))
    assert sorted(seen) == sorted(info["good"])
    for k, (img, label) in seen.items():
        assert np.array_equal(img, ref[k][0]) and label == ref[k][1]
    sr = open_dataset(tmp_path / "ds").split("train")
    assert sr.manifest["modalities"]["image"]["member"] == "jpg"
    assert sr.manifest["modalities"]["image"]["shape"] == [6, 8, 3]


def test_label_from_a_json_field_and_splits_by_pattern(tars, tmp_path):
    root, info = tars
    m = index_shards([str(root / "data-{000000..000003}.tar")], tmp_path / "ds",
                     modalities={"image": "jpg"}, label="json:category",
                     split_patterns={"train": "data-00000[01].tar", "val": "data-000002.tar",
                                     "test": "data-000003.tar"})
    assert m["classes"] == CLASSES
    assert {sp: v["count"] for sp, v in m["splits"].items()} == {"train": 18, "val": 10, "test": 9}
    ds = open_dataset(tmp_path / "ds")
    val = ds.split("val")
    assert val.keys == [f"sample{i:04d}" for i in range(20, 30)]
    assert [CLASSES[x] for x in val.labels] == [CLASSES[i % 3] for i in range(20, 30)]


def test_split_fractions_take_whole_tars(tars, tmp_path):
    root, _ = tars
    m = index_shards(str(root / "data-{000000..000003}.tar"), tmp_path / "ds",
                     modalities={"image": "jpg"}, split_fractions={"val": 0.25, "test": 0.25})
    assert [len(v["shards"]) for v in m["splits"].values()] == [2, 1, 1]


def test_strict_refuses_the_first_bad_sample(tars, tmp_path):
    root, _ = tars
    with pytest.raises(SchemaError, match="sample0005.*modality 'image' missing"):
        index_shards(str(root / "data-000000.tar"), tmp_path / "ds",
                     modalities={"image": "jpg"}, strict=True)
    assert not (tmp_path / "ds").exists()


def test_bad_arguments_are_clear_errors(tars, tmp_path):
    root, _ = tars
    with pytest.raises(SchemaError, match="member extension 'exe'"):
        index_shards(str(root / "data-000000.tar"), tmp_path / "a", modalities={"image": "exe"})
    with pytest.raises(MidasDataError, match="matches no split pattern"):
        index_shards(str(root / "data-{000000..000001}.tar"), tmp_path / "b",
                     modalities={"image": "jpg"}, split_patterns={"train": "data-000000.tar"})
    with pytest.raises(MidasDataError, match="shard not found"):
        index_shards(str(root / "nope.tar"), tmp_path / "c", modalities={"image": "jpg"})


def test_cli_indexes_http_tars_and_the_result_streams_over_http(tars, tmp_path):
    root, info = tars
    srv = FaultyHTTPServer(root).start()
    try:
        out = tmp_path / "www" / "ds"
        res = CliRunner().invoke(main, [
            "index-shards", srv.url + "/data-{000000..000003}.tar", "--out", str(out),
            "--modality", "image=jpg", "--label", "json:category"])
        assert res.exit_code == 0, res.output
        assert "skipped 3" in res.output
    finally:
        srv.stop()
    srv = FaultyHTTPServer(tmp_path / "www").start()
    try:
        ds = MidasDataset(srv.url + "/ds", batch_size=8, policy="random",
                          cache_dir=tmp_path / "cache")
        keys = [k for b in MidasLoader(ds) for k, v in zip(b["key"], b["valid"].tolist()
                                                            if "valid" in b else [True] * len(b["key"])) if v]
        assert sorted(keys) == sorted(info["good"])
    finally:
        srv.stop()
