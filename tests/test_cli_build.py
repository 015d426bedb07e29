"""`midas-data build-shards` and `midas-data inspect [--verify]` on the command line."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from midas_data import open_dataset
from midas_data.cli import main


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def mfeat_ds(tmp_path_factory) -> Path:
    """All of mfeat (2000 samples), fac+kar+mor, shards of at most 300 samples. Read-only."""
    out = tmp_path_factory.mktemp("cli") / "mfeat"
    r = cli("build-shards", "--out", out, "--modalities", "fac,kar,mor", "--shard-samples", "300",
            "--quiet")
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.output
    return out


def test_build_shards_honours_modalities_and_shard_samples(mfeat_ds):
    ds = open_dataset(mfeat_ds)
    assert ds.modalities == ["fac", "kar", "mor"]
    assert [ds.schema[m]["shape"] for m in ds.modalities] == [[216], [64], [6]]
    assert {s: len(ds.split(s)) for s in ds.splits} == {"train": 1400, "val": 200, "test": 400}
    for split in ds.splits:
        shards = [s for s in ds.manifest["shards"] if s["split"] == split]
        assert len(shards) == math.ceil(len(ds.split(split)) / 300)
        assert all(s["count"] <= 300 for s in shards)
        assert sum(s["count"] for s in shards) == len(ds.split(split))
    assert ds.manifest["source"]["pipeline"] == "mfeat"
    assert ds.verify() == []


def test_inspect_prints_counts_per_split_and_class(mfeat_ds):
    r = cli("inspect", mfeat_ds)
    assert r.exit_code == 0, r.output
    lines = {ln.split()[1]: ln for ln in r.output.splitlines() if ln.startswith("split ")}
    assert set(lines) == {"train", "val", "test"}
    for split, total, per_class, shards in (("train", 1400, 140, 5), ("val", 200, 20, 1),
                                            ("test", 400, 40, 2)):
        assert re.search(rf"\b{total} samples in {shards} shard", lines[split]), lines[split]
        assert lines[split].endswith("per class " + " ".join(f"{c}:{per_class}" for c in range(10)))
    for m in ("fac", "kar", "mor"):
        assert re.search(rf"^\s+{m}\s+kind=tensor", r.output, re.M)
    assert "verify" not in r.output


def test_inspect_verify_passes_on_a_clean_dataset(mfeat_ds):
    r = cli("inspect", mfeat_ds, "--verify")
    assert r.exit_code == 0, r.output
    assert "verify: OK" in r.output


def test_inspect_verify_exits_nonzero_naming_shard_and_key_of_a_flipped_byte(mfeat_ds, tmp_path):
    ds_dir = tmp_path / "copy"
    shutil.copytree(mfeat_ds, ds_dir)
    sr = open_dataset(ds_dir).split("test")
    row = len(sr) - 3
    shard = sr.shard_paths[int(sr.shard[row])]
    with open(shard, "r+b") as f:
        off = int(sr.member["kar"][0][row]) + 40
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 1]))
    r = cli("inspect", ds_dir, "--verify")
    assert r.exit_code != 0
    assert "problem" in r.output
    assert shard.name in r.output and repr(sr.keys[row]) in r.output and "'kar'" in r.output


def test_inspect_of_a_folder_without_dataset_exits_2(tmp_path):
    r = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert r.exit_code == 2
    assert "no dataset here" in r.output


def test_build_shards_refuses_an_existing_dataset_unless_overwrite(mfeat_ds, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(mfeat_ds, out)
    before = (out / "manifest.json").read_bytes()
    r = CliRunner().invoke(main, ["build-shards", "--out", str(out), "--modalities", "pix,mor",
                                  "--quiet"])
    assert r.exit_code == 2
    assert "already holds a dataset" in r.output and "--overwrite" in r.output
    assert (out / "manifest.json").read_bytes() == before
    r = cli("build-shards", "--out", out, "--modalities", "pix,mor", "--overwrite", "--quiet",
            "--split-seed", "4")
    assert r.exit_code == 0, r.output
    ds = open_dataset(out)
    assert ds.modalities == ["pix", "mor"] and ds.manifest["split_seed"] == 4
    assert len(ds.manifest["shards"]) == 3  # default shard size: one per split
    assert ds.verify() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


@pytest.mark.parametrize("mods, needle", [("fac,nope", "unknown mfeat view"),
                                          ("fac", "at least two")])
def test_build_shards_bad_modalities_exit_2_and_write_nothing(tmp_path, mods, needle):
    out = tmp_path / "ds"
    r = CliRunner().invoke(main, ["build-shards", "--out", str(out), "--modalities", mods, "--quiet"])
    assert r.exit_code == 2 and needle in r.output
    assert not out.exists()


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def user_csv(tmp_path, payload_files):
    payload_files.root = tmp_path / "user" / "arrays"
    rows = []
    for i in range(30):
        p = payload_files.npy(f"x{i}.npy", np.full((2, 2), i, np.float64))
        rows.append({"key": f"r{i}", "label": ["neg", "pos"][i % 2], "x": f"arrays/{p.name}",
                     "y": json.dumps([i, i + 1, i + 2]), "z": i * 0.5})
    return _write_csv(tmp_path / "user" / "samples.csv", rows)


def test_build_shards_from_a_manifest(user_csv, tmp_path):
    out = tmp_path / "ds"
    r = cli("build-shards", "--manifest", user_csv, "--out", out, "--modalities", "x,y",
            "--classes", "pos,neg", "--shard-samples", "5", "--quiet")
    assert r.exit_code == 0, r.output
    ds = open_dataset(out)
    assert ds.modalities == ["x", "y"] and ds.classes == ["pos", "neg"]
    assert ds.schema["x"]["dtype"] == "float64" and ds.schema["y"]["shape"] == [3]
    assert len(ds.manifest["shards"]) >= 4
    assert ds.manifest["source"] == {"pipeline": "manifest", "path": str(user_csv.resolve())}
    for split in ds.splits:
        for d in ds.split(split):
            i = int(d["__key__"][1:])
            assert d["label"] == (0 if i % 2 else 1)
            assert np.array_equal(d["x"], np.full((2, 2), i, np.float64))
            assert np.array_equal(d["y"], np.array([i, i + 1, i + 2], np.float32))
    r = cli("inspect", out)
    assert "per class pos:" in r.output


def test_build_shards_from_a_manifest_with_a_bad_row_exits_2_naming_it(user_csv, tmp_path):
    (user_csv.parent / "arrays" / "x7.npy").unlink()
    out = tmp_path / "ds"
    r = CliRunner().invoke(main, ["build-shards", "--manifest", str(user_csv), "--out", str(out),
                                  "--quiet"])
    assert r.exit_code == 2
    assert "x7.npy" in r.output and "'r7'" in r.output and "'x'" in r.output
    assert not out.exists() and not list(tmp_path.glob(".ds.*"))


def test_console_script_is_installed_and_runs(mfeat_ds):
    exe = Path(sys.executable).parent / "midas-data"
    r = subprocess.run([str(exe), "inspect", str(mfeat_ds), "--verify"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "verify: OK" in r.stdout
