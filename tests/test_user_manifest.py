"""pipelines/user_manifest: CSV, JSONL and Parquet manifests of a user's own files."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from midas_data.pipelines import get_pipeline

from midas_data import MidasDataError, SchemaError, UnsafeInputError, build_dataset, open_dataset

CLASSES = ["cat", "dog", "eel"]
SPLITS = ["train", "train", "val", "test"]


def write_manifest(path: Path, rows: list[dict], fmt: str) -> Path:
    """rows of Python values; list values become JSON strings in CSV, native lists elsewhere."""
    path = path.with_suffix("." + fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["key", "label", "a", "b"])
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def project(tmp_path, payload_files):
    """A user's folder: payload files under proj/data, rows referencing them relatively.

    Returns (proj_dir, rows, expected) with expected[key][column] = (bytes or None, decoded).
    """
    proj = tmp_path / "proj"
    payload_files.root = proj / "data"
    rng = np.random.default_rng(11)
    rows, expected = [], {}
    for i in range(12):
        key = f"u{i:02d}"
        feat = rng.standard_normal((2, 3)).astype(np.float32)
        img = rng.integers(0, 256, size=(4, 6), dtype=np.uint8)  # grayscale
        snd = rng.integers(-32768, 32767, size=(2, 50 + i)).astype(np.int16)  # stereo
        text = f"row {i} \u00fcml\u00e4ut"
        fp = payload_files.npy(f"feat/{key}.npy", feat)
        ip = payload_files.png(f"img/{key}.png", img)
        sp = payload_files.wav(f"snd/{key}.wav", snd)
        tp = payload_files.txt(f"txt/{key}.txt", text)
        score = float(i) / 4
        vec = [float(i), -1.5, 2.25]
        rows.append({"key": key, "label": CLASSES[i % 3], "split": SPLITS[i % 4],
                     # one absolute path among the relative ones
                     "feat": str(fp) if i == 5 else str(fp.relative_to(proj)),
                     "img": str(ip.relative_to(proj)), "snd": str(sp.relative_to(proj)),
                     "note": str(tp.relative_to(proj)), "score": score, "vec": vec})
        expected[key] = {
            "feat": (fp.read_bytes(), feat), "img": (ip.read_bytes(), img[:, :, None]),
            "snd": (sp.read_bytes(), snd.astype(np.float32) / 32768.0),
            "note": (tp.read_bytes(), text),
            "score": (None, np.array([score], np.float32)),
            "vec": (None, np.array(vec, np.float32)),
        }
    return proj, rows, expected


FORMATS = ["csv", "jsonl", "parquet"]
MODS = ["feat", "img", "snd", "note", "score", "vec"]


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Run from a folder other than the manifest's, so relative paths can't resolve by luck."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


def build(manifest: Path, out: Path, **kw):
    src = get_pipeline("manifest")(manifest, modalities=kw.pop("modalities", None),
                                   classes=kw.pop("classes", None))
    build_dataset(src["samples"], out, classes=src["classes"], modalities=src["modalities"],
                  source=src["source"], progress=False, **kw)
    return open_dataset(out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_manifest_payloads_round_trip_byte_identical_with_relative_paths_and_splits(
        project, elsewhere, tmp_path, fmt):
    proj, rows, expected = project
    manifest = write_manifest(proj / "samples", rows, fmt)
    ds = build(manifest, tmp_path / "ds", shard_max_count=2)
    assert ds.modalities == MODS
    assert ds.classes == CLASSES
    assert {m: ds.schema[m]["kind"] for m in MODS} == {
        "feat": "tensor", "img": "image", "snd": "audio", "note": "text", "score": "tensor",
        "vec": "tensor"}
    assert ds.manifest["source"]["path"] == str(manifest.resolve())
    split_of = {r["key"]: r["split"] for r in rows}
    label_of = {r["key"]: CLASSES.index(r["label"]) for r in rows}
    seen = []
    for split in ds.splits:
        sr = ds.split(split)
        assert all(split_of[k] == split for k in sr.keys)  # the split column is honoured
        for row, d in enumerate(sr):
            key = d["__key__"]
            assert d["label"] == label_of[key]
            for m in MODS:
                want_bytes, want = expected[key][m]
                if want_bytes is not None:
                    assert sr.read_raw(row, m) == want_bytes, (key, m)
                got = d[m]
                if isinstance(want, str):
                    assert got == want
                else:
                    assert got.dtype == want.dtype and np.array_equal(got, want), (key, m)
            seen.append(key)
    assert sorted(seen) == sorted(expected)
    assert Counter(split_of.values()) == {s: len(ds.split(s)) for s in ds.splits}


@pytest.mark.parametrize("fmt", FORMATS)
def test_manifest_without_split_column_gets_the_seeded_stratified_split(project, tmp_path, fmt):
    proj, rows, _ = project
    rows = [{k: v for k, v in r.items() if k != "split"} for r in rows] * 1
    rows = [dict(r, key=f"{r['key']}-{j}") for j in range(5) for r in rows]  # 20 per class
    manifest = write_manifest(proj / "nosplit", rows, fmt)
    ds = build(manifest, tmp_path / "ds", modalities=["feat", "score"], split_seed=3)
    assert ds.modalities == ["feat", "score"]  # a subset of the columns
    for split, n in (("train", 14), ("val", 2), ("test", 4)):
        assert Counter(ds.split(split).labels.tolist()) == {0: n, 1: n, 2: n}
    again = build(manifest, tmp_path / "ds2", modalities=["feat", "score"], split_seed=3)
    assert again.split("val").keys == ds.split("val").keys


def test_empty_split_cells_mean_no_split(project, tmp_path):
    proj, rows, _ = project
    rows = [dict(r, split="") for r in rows]
    ds = build(write_manifest(proj / "m", rows, "csv"), tmp_path / "ds", modalities=["feat", "vec"])
    assert sum(len(ds.split(s)) for s in ds.splits) == 12


def test_integer_labels_index_the_given_class_list(project, tmp_path):
    proj, rows, _ = project
    rows = [dict(r, label=CLASSES.index(r["label"])) for r in rows]
    classes = ["eel", "dog", "cat"]  # index 0 means "eel" now
    ds = build(write_manifest(proj / "m", rows, "csv"), tmp_path / "ds", classes=classes,
               modalities=["feat", "vec"])
    assert ds.classes == classes
    label_of = {r["key"]: r["label"] for r in rows}
    for s in ds.splits:
        sr = ds.split(s)
        assert [label_of[k] for k in sr.keys] == sr.labels.tolist()


@pytest.mark.parametrize("fmt", FORMATS)
def test_integer_labels_without_class_list_keep_their_value_as_index(tmp_path, fmt):
    rows = [{"key": f"k{i}", "label": i % 12, "a": float(i), "b": [1.0, float(i)]} for i in range(36)]
    ds = build(write_manifest(tmp_path / "m", rows, fmt), tmp_path / "ds")
    assert ds.classes == [str(c) for c in range(12)]
    for s in ds.splits:
        sr = ds.split(s)
        assert sr.labels.tolist() == [int(k[1:]) % 12 for k in sr.keys]


# ------------------------------------------------------------------------------ bad input


def _missing_payload(rows, proj):
    rows[4]["feat"] = "data/feat/nope.npy"
    return SchemaError, [str(proj / "data/feat/nope.npy"), "'u04'", "'feat'", "does not exist"]


def _unknown_label(rows, proj):
    rows[4]["label"] = "zebra"
    return SchemaError, ["samples.", "'u04'", "'label'", "zebra"]


def _shape_disagrees(rows, proj):
    rows[4]["vec"] = [1.0, 2.0]
    return SchemaError, ["samples.", "'u04'", "'vec'", "shape"]


def _bad_inline_json(rows, proj):
    for r in rows:  # inline vectors as JSON text (JSONL too), one of them malformed
        r["vec"] = json.dumps(r["vec"])
    rows[4]["vec"] = "[1.0, 2.0"
    return SchemaError, ["samples.", "'u04'", "'vec'", "JSON"]


def _bad_split_name(rows, proj):
    rows[4]["split"] = "holdout"
    return SchemaError, ["'split'", "holdout"]


def _pickle_path(rows, proj):
    (proj / "data" / "evil.pkl").write_bytes(b"cos\nsystem\n(S'touch PWNED'\ntR.")
    rows[4]["feat"] = "data/evil.pkl"
    return UnsafeInputError, [str(proj / "data/evil.pkl"), "'u04'", "'feat'"]


def _dotted_key(rows, proj):
    rows[4]["key"] = "u04.v2"
    return SchemaError, ["samples.", "'u04.v2'", "'key'"]


def _duplicate_key(rows, proj):
    rows[4]["key"] = "u00"
    return SchemaError, ["samples.", "'u00'", "'key'", "duplicate"]


def _corrupt_png(rows, proj):
    (proj / "data" / "img" / "u04.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return SchemaError, [str(proj / "data/img/u04.png"), "'u04'", "'img'", "cannot decode"]


def _corrupt_wav(rows, proj):
    (proj / "data" / "snd" / "u04.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    return SchemaError, [str(proj / "data/snd/u04.wav"), "'u04'", "'snd'", "cannot decode"]


def _invalid_utf8_txt(rows, proj):
    (proj / "data" / "txt" / "u04.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    return SchemaError, [str(proj / "data/txt/u04.txt"), "'u04'", "'note'", "cannot decode"]


BAD = [_missing_payload, _unknown_label, _shape_disagrees, _bad_inline_json, _bad_split_name,
       _pickle_path, _dotted_key, _duplicate_key, _corrupt_png, _corrupt_wav, _invalid_utf8_txt]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("case", BAD, ids=[f.__name__[1:] for f in BAD])
def test_bad_manifest_rows_are_located_errors_and_write_nothing(
        project, elsewhere, tmp_path, assert_no_partial_output, case, fmt):
    proj, rows, _ = project
    exc, needles = case(rows, proj)
    manifest = write_manifest(proj / "samples", rows, fmt)
    out = tmp_path / "ds"
    with pytest.raises(exc) as info:
        build(manifest, out, classes=CLASSES)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, (needle, msg)
    if "samples." in needles:
        assert str(manifest) in msg
    assert_no_partial_output(out)
    assert not (elsewhere / "PWNED").exists() and not (proj / "PWNED").exists()


def test_empty_cell_names_manifest_key_and_column(project, tmp_path):
    proj, rows, _ = project
    rows[3]["img"] = None
    manifest = write_manifest(proj / "samples", rows, "jsonl")
    with pytest.raises(SchemaError) as info:
        get_pipeline("manifest")(manifest)
    for needle in (str(manifest), "'u03'", "'img'", "empty"):
        assert needle in str(info.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_manifest_with_no_rows_names_the_file(tmp_path, fmt):
    if fmt == "parquet":
        path = tmp_path / "m.parquet"
        pq.write_table(pa.table({"key": pa.array([], pa.string()), "label": pa.array([], pa.string()),
                                 "a": pa.array([], pa.float64()), "b": pa.array([], pa.float64())}), path)
    else:
        path = write_manifest(tmp_path / "m", [], fmt)
    with pytest.raises(MidasDataError) as info:
        get_pipeline("manifest")(path)
    assert str(path) in str(info.value)


def test_missing_required_or_modality_column_is_named(tmp_path):
    rows = [{"key": "a", "lbl": "x", "m1": 1.0, "m2": 2.0}]
    path = write_manifest(tmp_path / "m", rows, "csv")
    with pytest.raises(SchemaError, match="'label'") as info:
        get_pipeline("manifest")(path)
    assert str(path) in str(info.value)
    rows = [{"key": "a", "label": "x", "m1": 1.0, "m2": 2.0}]
    path = write_manifest(tmp_path / "m2", rows, "csv")
    with pytest.raises(SchemaError, match="'m3'"):
        get_pipeline("manifest")(path, modalities=["m1", "m3"])
    with pytest.raises(SchemaError, match="at least two"):
        get_pipeline("manifest")(path, modalities=["m1"])


def test_unreadable_or_unknown_manifest_files_are_named(tmp_path):
    for name, data in (("m.parquet", b"not parquet"), ("m.jsonl", b"{not json\n"),
                       ("m.xlsx", b"PK\x03\x04")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(MidasDataError) as info:
            get_pipeline("manifest")(path)
        assert str(path) in str(info.value), name
    with pytest.raises(MidasDataError, match="does not exist"):
        get_pipeline("manifest")(tmp_path / "absent.csv")
