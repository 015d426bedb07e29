"""Pairs table: columns, MIDAS weights, fingerprints, multi-part reads; the mine stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from midas_data.dataset.reader import open_dataset
from midas_data.errors import MidasDataError, StaleArtifactError
from midas_data.features.tables import Features, read_features, table_metadata, write_features
from midas_data.mining.knn import MiningInputError
from midas_data.mining.pairs import (
    PAIRS_SCHEMA,
    build_pairs,
    part_path,
    read_pairs,
    write_pairs,
)
from midas_data.mining.stage import mine_misaligned

MFEAT = Path(__file__).resolve().parents[1] / "pipelines" / "data" / "mfeat.npz"
SORT = [("modality", "ascending"), ("anchor_row", "ascending"), ("rank", "ascending")]


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def mfeat_features(tmp_path: Path, n_per_class: int = 30, views=("fac", "mor", "kar"),
                   dataset_fp: str = "d" * 64, seed: int = 0) -> Features:
    """Real mfeat views (a class-stratified subset) with random confidences, written and re-read."""
    with np.load(MFEAT, allow_pickle=False) as z:
        y = z["label"]
        rows = np.concatenate([np.flatnonzero(y == c)[:n_per_class] for c in range(10)])
        feats = {v: z[v][rows] for v in views}
    rng = np.random.default_rng(seed)
    confs = {v: rng.uniform(0.01, 1, len(rows)).astype(np.float32) for v in views}
    f = Features([f"s{r:04d}" for r in rows], y[rows].astype(np.int64), feats, confs)
    path = tmp_path / "features" / "train.arrow"
    write_features(path, f, dataset_fp, "user")
    return read_features(path, dataset_fp)


@pytest.fixture
def feats(tmp_path) -> Features:
    return mfeat_features(tmp_path)


def cosine(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_columns_order_and_weights(feats):
    k = 4
    t = build_pairs(feats, k)
    assert t.schema.remove_metadata() == PAIRS_SCHEMA
    n, mods = len(feats.keys), feats.modalities
    assert t.num_rows == n * k * len(mods)
    c = {name: t.column(name).to_numpy(zero_copy_only=False) for name in t.column_names}
    # modality-major, then anchor, then rank
    assert list(c["modality"]) == [m for m in mods for _ in range(n * k)]
    assert (c["anchor_row"] == np.tile(np.repeat(np.arange(n), k), len(mods))).all()
    assert (c["rank"] == np.tile(np.arange(k), n * len(mods))).all()
    keys = np.array(feats.keys)
    assert (c["anchor_key"] == keys[c["anchor_row"]]).all()
    assert (c["partner_key"] == keys[c["partner_row"]]).all()
    assert (c["anchor_label"] == feats.labels[c["anchor_row"]]).all()
    assert (c["partner_label"] == feats.labels[c["partner_row"]]).all()
    assert (c["anchor_label"] != c["partner_label"]).all()
    for m in mods:
        sel = c["modality"] == m
        a, p = c["anchor_row"][sel], c["partner_row"][sel]
        np.testing.assert_allclose(c["similarity"][sel],
                                   cosine(feats.feats[m][a], feats.feats[m][p]), atol=1e-5)
        kept = sum(feats.confs[o][a].astype(np.float64) for o in mods if o != m)
        np.testing.assert_allclose(c["anchor_conf"][sel], kept, rtol=1e-6)
        np.testing.assert_allclose(c["partner_conf"][sel], feats.confs[m][p], rtol=1e-6)
        w = kept / (kept + feats.confs[m][p])
        np.testing.assert_allclose(c["anchor_weight"][sel], w, rtol=1e-5)
    np.testing.assert_allclose(c["partner_weight"], 1 - c["anchor_weight"], atol=1e-6)
    np.testing.assert_allclose(c["hard_weight"], 1 + (c["similarity"] + 1) / 2, atol=1e-6)
    assert (c["hard_weight"] >= 1).all() and (c["hard_weight"] <= 2).all()
    sims = c["similarity"].reshape(len(mods), n, k)
    assert (np.diff(sims, axis=2) <= 0).all()


def test_metadata_records_fingerprints_and_config(feats):
    meta = table_metadata(build_pairs(feats, 3, config={"split": "train"}))
    assert meta["features_fingerprint"] == feats.fingerprint and len(feats.fingerprint) == 64
    assert meta["dataset_fingerprint"] == "d" * 64
    assert meta["k"] == "3" and meta["index"] == "cpu"
    cfg = json.loads(meta["config"])
    assert cfg["k"] == 3 and cfg["modalities"] == feats.modalities and cfg["split"] == "train"
    assert table_metadata(build_pairs(feats, 3, approx="ivf", nlist=2))["index"] == "cpu-ivf"


def test_zero_confidences_split_evenly(feats):
    """No evidence: every modality's source weighs 1/M (normalised_confidences' zero-row
    rule), so with three views the anchor's two kept views get 2/3 and the partner 1/3."""
    for m in feats.modalities:
        feats.confs[m][:] = 0
    t = build_pairs(feats, 2)
    m = len(feats.modalities)
    assert m == 3
    assert np.allclose(t.column("anchor_weight").to_numpy(), (m - 1) / m)
    assert np.allclose(t.column("partner_weight").to_numpy(), 1 / m)


def test_bad_features(feats):
    feats.confs["mor"][7] = np.nan
    with pytest.raises(MiningInputError, match="modality 'mor', row 7: confidence"):
        build_pairs(feats, 2)
    one = Features(feats.keys, feats.labels, {"fac": feats.feats["fac"]}, {"fac": feats.confs["fac"]})
    with pytest.raises(MidasDataError, match="at least two"):
        build_pairs(one, 2)


def test_write_read_roundtrip(tmp_path, feats):
    t = build_pairs(feats, 3)
    path = write_pairs(tmp_path, "train", t)
    assert path == tmp_path / "pairs" / "train" / "part-00000-of-00001.arrow"
    back = read_pairs(tmp_path, "train", feats.fingerprint)
    assert back.equals(t)
    meta = table_metadata(back)
    assert meta["world_size"] == "1" and meta["features_fingerprint"] == feats.fingerprint
    assert not list(path.parent.glob(".*.tmp"))


def test_multi_part_reads_as_one_table(tmp_path, feats):
    whole = build_pairs(feats, 3)
    n, world = len(feats.keys), 3
    for r in range(world):
        q = np.arange(r * n // world, (r + 1) * n // world)
        write_pairs(tmp_path, "train", build_pairs(feats, 3, queries=q), r, world)
    back = read_pairs(tmp_path, "train", feats.fingerprint)
    assert back.num_rows == whole.num_rows
    assert back.sort_by(SORT).equals(whole.sort_by(SORT))
    anchors = back.column("anchor_row").to_numpy()  # parts in rank order: anchors ascend
    assert (np.diff(anchors[back.column("modality").to_numpy(zero_copy_only=False) == "fac"]) >= 0).all()


def test_missing_part_and_no_pairs(tmp_path, feats):
    with pytest.raises(MidasDataError, match="no mined pairs.*mine-misaligned"):
        read_pairs(tmp_path, "train")
    write_pairs(tmp_path, "train", build_pairs(feats, 2, queries=np.arange(10)), 0, 2)
    with pytest.raises(MidasDataError, match="part-00001-of-00002.arrow"):
        read_pairs(tmp_path, "train")


def test_stale_features_fingerprint_names_the_file(tmp_path, feats):
    write_pairs(tmp_path, "train", build_pairs(feats, 2))
    with pytest.raises(StaleArtifactError, match="part-00000-of-00001.arrow.*mine-misaligned"):
        read_pairs(tmp_path, "train", "f" * 64)


def test_parts_from_different_features_are_refused(tmp_path, feats):
    n = len(feats.keys)
    write_pairs(tmp_path, "train", build_pairs(feats, 2, queries=np.arange(n // 2)), 0, 2)
    feats.confs["fac"][0] = 0.5
    other = Features(feats.keys, feats.labels, feats.feats, feats.confs,
                     {**feats.metadata, "features_fingerprint": "e" * 64})
    write_pairs(tmp_path, "train", build_pairs(other, 2, queries=np.arange(n // 2, n)), 1, 2)
    with pytest.raises(StaleArtifactError, match="part-00001-of-00002"):
        read_pairs(tmp_path, "train")


def test_other_world_size_parts_go_once_the_new_set_is_complete(tmp_path, feats):
    n = len(feats.keys)
    write_pairs(tmp_path, "train", build_pairs(feats, 2), 0, 1)
    write_pairs(tmp_path, "train", build_pairs(feats, 2, queries=np.arange(n // 2)), 0, 2)
    assert part_path(tmp_path, "train", 0, 1).exists()  # new set incomplete: old set stays
    assert read_pairs(tmp_path, "train").num_rows == n * 2 * 3
    write_pairs(tmp_path, "train", build_pairs(feats, 2, queries=np.arange(n // 2, n)), 1, 2)
    assert not part_path(tmp_path, "train", 0, 1).exists()
    assert table_metadata(read_pairs(tmp_path, "train"))["world_size"] == "2"


# -- the stage --------------------------------------------------------------------------
@pytest.fixture
def dataset(tiny_dataset) -> Path:
    """The tiny mfeat dataset (fac + mor) with features written for its train and val splits."""
    ds = open_dataset(tiny_dataset)
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        sr = ds.split(split)
        rows = [sr.get(i) for i in range(len(sr))]
        f = Features(list(sr.keys), sr.labels.copy(),
                     {m: np.stack([r[m] for r in rows]).astype(np.float32).reshape(len(sr), -1)
                      for m in ds.modalities},
                     {m: rng.uniform(0.05, 1, len(sr)).astype(np.float32) for m in ds.modalities})
        write_features(tiny_dataset / "features" / f"{split}.arrow", f, ds.fingerprint, "user")
    return tiny_dataset


def test_stage_writes_pairs_and_report(dataset):
    s = mine_misaligned(dataset, splits=("train", "val"), k=3, report=True, progress=False)
    assert s["world_size"] == 1 and s["index"] == "cpu"
    f = read_features(dataset / "features" / "train.arrow")
    t = read_pairs(dataset, "train", f.fingerprint)
    assert t.num_rows == s["splits"]["train"]["rows"] == len(f.keys) * 3 * 2
    d = dataset / "pairs" / "train"
    rep = json.loads((d / "report.json").read_text())
    assert rep["scope"] == "all parts" and rep["anchors"] == len(f.keys)
    mat = np.array(rep["class_matrix"])
    assert mat.sum() == t.num_rows and np.trace(mat) == 0
    assert sum(rep["modalities"]["fac"]["hist"]) == t.num_rows // 2
    for png in ("similarity_hist.png", "class_matrix.png"):
        assert (d / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_pairs(dataset, "val").num_rows == s["splits"]["val"]["rows"]


def test_stage_ranks_from_torchrun_env(dataset, monkeypatch):
    single = mine_misaligned(dataset, k=3, progress=False)
    whole = read_pairs(dataset, "train")
    for r in range(2):
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("WORLD_SIZE", "2")
        s = mine_misaligned(dataset, k=3, progress=False)
        assert s["rank"] == r and Path(s["splits"]["train"]["path"]).name == f"part-{r:05d}-of-00002.arrow"
    assert not Path(single["splits"]["train"]["path"]).exists()  # the world-1 part is gone
    assert read_pairs(dataset, "train").sort_by(SORT).equals(whole.sort_by(SORT))


def test_stage_ivf_reports_recall(dataset):
    s = mine_misaligned(dataset, k=3, approx="ivf", nlist=2, nprobe=9, report=True, progress=False)
    recall = s["splits"]["train"]["recall_at_k"]
    assert set(recall) == {"fac", "mor"} and all(0 <= v <= 1 for v in recall.values())
    rep = json.loads((dataset / "pairs" / "train" / "report.json").read_text())
    assert rep["recall_at_k"] == recall


def test_stage_errors(dataset, tmp_path):
    with pytest.raises(MidasDataError, match="no split 'nope'"):
        mine_misaligned(dataset, splits=("nope",), progress=False)
    with pytest.raises(MidasDataError, match=r"features[/\\]test.arrow.*midas-data extract"):
        mine_misaligned(dataset, splits=("test",), progress=False)
    # features of other shards
    path = dataset / "features" / "train.arrow"
    f = read_features(path)
    write_features(path, f, "0" * 64, "user")
    with pytest.raises(StaleArtifactError, match="rerun `midas-data extract`"):
        mine_misaligned(dataset, progress=False)
    # a NaN feature: the error names the file and the sample key
    ds_fp = open_dataset(dataset).fingerprint
    f.feats["mor"] = f.feats["mor"].copy()
    f.feats["mor"][5, 0] = np.nan
    write_features(path, f, ds_fp, "user")
    with pytest.raises(MidasDataError, match=rf"train.arrow, key '{f.keys[5]}'.*'mor', row 5"):
        mine_misaligned(dataset, progress=False)
    with pytest.raises(MidasDataError, match="build-shards"):
        mine_misaligned(tmp_path / "nothing", progress=False)


def test_stage_checks_rows_against_manifest(dataset):
    path = dataset / "features" / "train.arrow"
    f = read_features(path)
    short = Features(f.keys[:-1], f.labels[:-1], {m: v[:-1] for m, v in f.feats.items()},
                     {m: v[:-1] for m, v in f.confs.items()})
    write_features(path, short, open_dataset(dataset).fingerprint, "user")
    with pytest.raises(MidasDataError, match="manifest lists"):
        mine_misaligned(dataset, progress=False)
    swapped = Features(f.keys[::-1], f.labels[::-1], {m: v[::-1] for m, v in f.feats.items()},
                       {m: v[::-1] for m, v in f.confs.items()})
    write_features(path, swapped, open_dataset(dataset).fingerprint, "user")
    with pytest.raises(MidasDataError, match="train.arrow, field 'key': row 0 does not match"):
        mine_misaligned(dataset, progress=False)

