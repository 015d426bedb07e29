"""`index-shards` over tars written by plain `webdataset.ShardWriter` (.jpg, .json, .cls
members): the stream yields exactly the tars' samples, bad samples are skipped and listed
(or refused with strict), splits by pattern or fraction, local and http:// tars."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
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
from tests.crafting import append_members, resign, tar_member
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


# -- verification of indexed datasets ---------------------------------------------------------

def _indexed(tars, tmp_path, label="cls", prepare=None) -> Path:
    """A dataset indexed in place from copies of the fixture's tars (each test may damage its
    own); `prepare(tar_paths)` edits the copies before they are indexed."""
    root, _ = tars
    src = tmp_path / "tars"
    src.mkdir(parents=True)
    for p in sorted(root.glob("data-*.tar")):
        shutil.copyfile(p, src / p.name)
    if prepare is not None:
        prepare(sorted(src.glob("data-*.tar")))
    index_shards(str(src / "data-{000000..000003}.tar"), tmp_path / "ds",
                 modalities={"image": "jpg"}, label=label)
    return tmp_path / "ds"


def _pax_headers(path: Path) -> list[tuple[int, bytes]]:
    """(header offset, records) of each pax extended header of a tar, in order."""
    raw, out, pos = path.read_bytes(), [], 0
    while pos + 512 <= len(raw) and raw[pos:pos + 512] != bytes(512):
        hdr = raw[pos:pos + 512]
        size = int(hdr[124:136].split(b"\0")[0] or b"0", 8)
        if hdr[156:157] == b"x":
            out.append((pos, raw[pos + 512: pos + 512 + size]))
        pos += 512 + -(-size // 512) * 512
    return out


def _rewrite_pax(path: Path, at: int, records: bytes) -> None:
    """Replace the records of the pax header at `at` by others of the same length."""
    raw = bytearray(path.read_bytes())
    old = raw[at + 512: at + 512 + len(records)]
    assert len(old) == len(records) and old.endswith(b"\n")
    raw[at + 512: at + 512 + len(records)] = records
    path.write_bytes(bytes(raw))


def test_verify_passes_on_tars_indexed_from_shardwriter(tars, tmp_path):
    ds = _indexed(tars, tmp_path)
    shard = ds / "shards" / "train-000000.tar"
    assert _pax_headers(shard), "ShardWriter tars carry pax headers; the test needs them"
    res = CliRunner().invoke(main, ["inspect", str(ds), "--verify"])
    assert res.exit_code == 0, res.output
    assert "verify: OK" in res.output
    # the same tars with the label from the .json: no .cls expected, the .json field checked
    ds2 = _indexed(tars, tmp_path / "json", label="json:category")
    assert open_dataset(ds2).verify() == []


def test_verify_compares_the_label_member_with_the_index(tars, tmp_path):
    """Only the member the label came from is checked: a .cls that disagrees is reported
    when the label is from .cls, and so is a .json field when the label is from the .json."""
    ds = _indexed(tars, tmp_path, label="json:category")
    m = json.loads((ds / "manifest.json").read_text())
    assert m["source"]["label"] == "json:category"
    shard = ds / "shards" / "train-000000.tar"
    raw = shard.read_bytes()
    assert raw.count(b'{"category": "cat", "i": 0}') == 1
    shard.write_bytes(raw.replace(b'{"category": "cat", "i": 0}', b'{"category": "dog", "i": 0}'))
    resign(ds)
    problems = "\n".join(open_dataset(ds).verify())
    assert "sample0000" in problems and ".json label 'dog'" in problems, problems


def test_verify_reports_a_flipped_payload_byte_and_a_truncated_tar(tars, tmp_path):
    ds = _indexed(tars, tmp_path)
    sr = open_dataset(ds).split("train")
    off = int(sr.member["image"][0][3])
    shard = ds / "shards" / "train-000000.tar"
    raw = bytearray(shard.read_bytes())
    raw[off + 100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    problems = "\n".join(open_dataset(ds).verify())
    assert "sha256 mismatch" in problems and "checksum mismatch" in problems, problems
    assert sr.keys[3] in problems

    shard2 = ds / "shards" / "train-000001.tar"
    shard2.write_bytes(shard2.read_bytes()[:4000])
    problems = "\n".join(open_dataset(ds).verify())
    assert "train-000001.tar" in problems and "truncated" in problems, problems


@pytest.mark.parametrize("member", [
    tar_member("evil.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
    tar_member("../evil.jpg", b"x"),
    tar_member("/abs.jpg", b"x"),
])
def test_verify_refuses_links_and_paths_in_an_indexed_tar(tars, tmp_path, member):
    """index-shards skips such members (never a payload), verification still refuses them."""
    ds = _indexed(tars, tmp_path, prepare=lambda paths: append_members(paths[0], member))
    problems = "\n".join(open_dataset(ds).verify())
    assert "train-000000.tar" in problems and "refused" in problems, problems
    assert "sha256" not in problems  # the tar is as indexed: only its member is the problem


def test_verify_bounds_and_checks_pax_headers(tars, tmp_path, monkeypatch):
    """A pax header's own size past the end or over the bound, a `size` record past the end,
    and a `path` record that escapes are reported; the pax data is never trusted."""
    from midas_data.dataset import verify

    ds = _indexed(tars, tmp_path)
    shard = ds / "shards" / "train-000000.tar"
    pristine = shard.read_bytes()
    at, records = _pax_headers(shard)[2]
    n = len(records)
    first = len(_pax_headers(shard)[0][1])

    def problems_after(edit) -> str:
        shard.write_bytes(pristine)
        edit()
        resign(ds)
        return "\n".join(open_dataset(ds).verify())

    def absurd_header_size():
        raw = bytearray(shard.read_bytes())
        raw[at + 124: at + 136] = b"%011o\0" % (8 << 30)
        raw[at + 148: at + 156] = b" " * 8
        raw[at + 148: at + 156] = b"%06o\0 " % sum(raw[at: at + 512])
        shard.write_bytes(bytes(raw))

    p = problems_after(absurd_header_size)
    assert f"offset {at} claims {8 << 30} bytes" in p, p
    monkeypatch.setattr(verify, "MAX_PAX_BYTES", first - 1)
    p = problems_after(lambda: None)
    assert f"pax header at offset 0 claims {first} bytes, more than {first - 1}" in p, p
    monkeypatch.undo()

    def record(key: str, value: str) -> bytes:
        body = f" {key}={value}\n"
        width = len(str(n))
        value += "0" * (n - width - len(body))  # pad the value to keep the header's size
        return f"{n} {key}={value}\n".encode()

    p = problems_after(lambda: _rewrite_pax(shard, at, record("size", "9")))
    assert "past the end of the file" in p, p
    p = problems_after(lambda: _rewrite_pax(shard, at, record("size", "x")))
    assert "not a number" in p, p
    p = problems_after(lambda: _rewrite_pax(shard, at, record("path", "../x.jpg.")))
    assert "'../x.jpg." in p and "refused" in p, p
    p = problems_after(lambda: _rewrite_pax(shard, at, b"99 mtime=1" + b"0" * (n - 11) + b"\n"))
    assert "damaged pax header" in p, p
    assert problems_after(lambda: None) == ""
