"""The extract stage (warm-up and user features) and the cross-fitted linear probes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from midas_data import Sample, build_dataset, open_dataset, read_features
from midas_data.errors import MidasDataError, SchemaError, StaleArtifactError, UnsafeInputError
from midas_data.features.encoders import (
    Standardize,
    UnimodalModel,
    build_encoder,
    embed,
    state_fingerprint,
)
from midas_data.features.extract import MODELS_FILE, extract_features
from midas_data.features.probe import (
    crossfit_confidences,
    crossfit_probes,
    fit_linear_probe,
    stratified_folds,
)
from midas_data.features.tables import read_table, table_metadata

FAST = {"warmup_epochs": 2, "batch_size": 16, "feature_dim": 8, "progress": False, "device": "cpu"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- probes
def _random_wide(n=60, d=300, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, c, n)


def test_probe_confidences_are_out_of_fold_not_in_sample():
    x, y = _random_wide()  # random labels, d >> n: an in-sample probe memorises them
    in_sample = fit_linear_probe(x, y, 3).predict_proba(x)[np.arange(len(y)), y]
    assert in_sample.mean() > 0.95
    assert crossfit_confidences(x, y, 3, folds=5).mean() < 0.45  # chance is 1/3


def test_a_samples_features_never_reach_the_probe_that_scores_its_fold():
    x, y = _random_wide(n=40, d=8)
    folds = stratified_folds(y, 4, seed=0)
    base = crossfit_confidences(x, y, 3, folds=4, seed=0)
    x2 = x.copy()
    x2[0] += 5.0  # only sample 0 changes: its fold-mates are scored by a probe that never saw it
    moved = crossfit_confidences(x2, y, 3, folds=4, seed=0)
    same_fold = (folds == folds[0]) & (np.arange(len(y)) != 0)
    np.testing.assert_array_equal(moved[same_fold], base[same_fold])
    assert not np.allclose(moved[folds != folds[0]], base[folds != folds[0]])


def test_probe_is_deterministic_for_a_seed():
    x, y = _random_wide(n=50, d=20)
    a = crossfit_confidences(x, y, 3, seed=1)
    np.testing.assert_array_equal(a, crossfit_confidences(x, y, 3, seed=1))
    assert not np.array_equal(a, crossfit_confidences(x, y, 3, seed=2))
    assert a.dtype == np.float32 and a.shape == (50,)


def test_informative_features_give_high_confidence(mfeat_source):
    keep = [s for s in mfeat_source["samples"] if int(s.key[-5:]) % 10 == 0]  # 200 real samples
    y = np.array([s.label for s in keep])
    fac = np.stack([s.payloads["fac"] for s in keep])
    mor = np.stack([s.payloads["mor"] for s in keep])
    c_fac, c_mor = crossfit_confidences(fac, y, 10), crossfit_confidences(mor, y, 10)
    assert c_fac.mean() > 0.75 and c_fac.mean() > c_mor.mean() + 0.1


def test_stratified_folds_balance_every_class():
    y = np.repeat(np.arange(4), [10, 7, 5, 3])
    f = stratified_folds(y, 5, seed=0)
    sizes = np.bincount(f, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for c in range(4):
        per = np.bincount(f[y == c], minlength=5)
        assert per.max() - per.min() <= 1
    with pytest.raises(ValueError, match="folds >= 2"):
        stratified_folds(y, 1)


def test_probe_refuses_nan_and_bad_labels():
    x, y = _random_wide(n=20, d=4)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        crossfit_confidences(x, y, 3)
    with pytest.raises(ValueError, match="labels"):
        crossfit_confidences(np.zeros((20, 4), np.float32), y + 5, 3)


# ---------------------------------------------------------------- warm-up
def test_warmup_writes_the_contract_schema_in_index_order(tiny_dataset):
    summary = extract_features(tiny_dataset, **FAST)
    ds = open_dataset(tiny_dataset)
    assert set(summary["splits"]) == {"train", "val", "test"}
    for sp in ("train", "val", "test"):
        path = tiny_dataset / "features" / f"{sp}.arrow"
        table = read_table(path)
        assert table.column_names == ["key", "label", "feat.fac", "feat.mor", "conf.fac", "conf.mor"]
        assert table.schema.field("feat.fac").type == pa.list_(pa.float32(), 8)
        assert table.schema.field("conf.mor").type == pa.float32()
        meta = table_metadata(table)
        assert meta["source"] == "warmup" and json.loads(meta["modalities"]) == ["fac", "mor"]
        f = read_features(path, ds.fingerprint)
        sr = ds.split(sp)
        assert f.keys == sr.keys
        np.testing.assert_array_equal(f.labels, sr.labels)
        for m in ("fac", "mor"):
            assert f.feats[m].shape == (len(sr), 8) and np.isfinite(f.feats[m]).all()
            assert ((f.confs[m] > 0) & (f.confs[m] <= 1)).all()
    cfg = json.loads(meta["config"])
    assert cfg["encoders"]["fac"]["name"] == "mlp" and cfg["epochs"] == 2 and cfg["seed"] == 0
    assert len(cfg["encoders"]["fac"]["standardize"]["mean"]) == 216


def test_warmup_models_reload_and_reproduce_the_stored_features(tiny_dataset):
    extract_features(tiny_dataset, **FAST)
    ds = open_dataset(tiny_dataset)
    saved = torch.load(tiny_dataset / "features" / MODELS_FILE, weights_only=True)
    f = read_features(tiny_dataset / "features" / "val.arrow", ds.fingerprint)
    cfg = json.loads(f.metadata["config"])
    assert saved["dataset_fingerprint"] == ds.fingerprint
    x = torch.from_numpy(np.stack([s["fac"] for s in ds.split("val")]).astype(np.float32))
    state = saved["models"]["fac"]
    assert state_fingerprint(state) == cfg["model_fingerprint"]["fac"]
    enc = torch.nn.Sequential(Standardize(torch.zeros(216), torch.ones(216)),
                              build_encoder("mlp", (216,), 8))
    model = UnimodalModel(enc, 8, len(ds.classes))
    model.load_state_dict(state)
    feats, conf = embed(model, x, f.labels)
    np.testing.assert_allclose(feats, f.feats["fac"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(conf, f.confs["fac"], rtol=1e-6, atol=1e-6)


def test_warmup_is_deterministic_for_a_seed(tiny_dataset):
    def fps(seed):
        s = extract_features(tiny_dataset, seed=seed, **FAST)
        return {sp: v["features_fingerprint"] for sp, v in s["splits"].items()}, s["config"]["model_fingerprint"]

    first = fps(0)
    assert fps(0) == first
    assert fps(1)[0]["train"] != first[0]["train"]


def test_warmup_on_real_mfeat_finds_the_weak_modality(make_tiny_dataset):
    root = make_tiny_dataset(per_class=20)
    s = extract_features(root, warmup_epochs=8, lr=1e-2, batch_size=32, progress=False)
    conf = s["splits"]["test"]["mean_conf"]
    assert conf["fac"] > 0.7 and conf["fac"] > conf["mor"]


def test_stale_dataset_fingerprint_is_rejected(tiny_dataset, make_tiny_dataset, tmp_path):
    extract_features(tiny_dataset, splits=("train",), **FAST)
    other = open_dataset(make_tiny_dataset(tmp_path / "other", split_seed=1))
    with pytest.raises(StaleArtifactError, match="rerun `midas-data extract`"):
        read_features(tiny_dataset / "features" / "train.arrow", other.fingerprint)


def test_images_and_audio_warm_up_with_default_encoders(tmp_path, payload_files):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(24):
        label = i % 2
        img = payload_files.png(f"im{i}.png", rng.integers(0, 50, (8, 8)) + 150 * label)
        wav = payload_files.wav(f"au{i}.wav", rng.integers(-2000, 2000, 700 + 10 * i))
        samples.append(Sample(f"s{i:03d}", label, {"image": img, "audio": wav}))
    root = tmp_path / "av"
    build_dataset(samples, root, progress=False)
    s = extract_features(root, warmup_epochs=1, batch_size=8, feature_dim=8, progress=False)
    assert s["config"]["encoders"]["image"]["name"] == "small_cnn"
    assert s["config"]["encoders"]["image"]["input_shape"] == [1, 8, 8]
    assert s["config"]["encoders"]["audio"]["name"] == "resnet18"
    assert s["config"]["encoders"]["audio"]["input_shape"][:2] == [1, 257]
    assert s["feature_dims"] == {"image": 8, "audio": 8}


def test_text_modalities_need_user_features(tmp_path):
    samples = [Sample(f"s{i}", i % 2, {"v": np.full(3, i, np.float32), "t": f"word {i}"}) for i in range(20)]
    build_dataset(samples, tmp_path / "txt", progress=False)
    with pytest.raises(MidasDataError, match="source='user'"):
        extract_features(tmp_path / "txt", **FAST)


# ---------------------------------------------------------------- user features
def _all_keys(root: Path) -> tuple[list[str], np.ndarray]:
    ds = open_dataset(root)
    keys = [k for sp in ds.splits for k in ds.split(sp).keys]
    labels = np.concatenate([ds.split(sp).labels for sp in ds.splits])
    return keys, labels


def _user_arrays(root: Path, seed: int = 0) -> dict:
    """fac: pure noise, 300-d (more dims than train samples); mor: label one-hot plus noise."""
    keys, labels = _all_keys(root)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(keys))  # the file's row order differs from the dataset's
    noise = rng.normal(size=(len(keys), 300)).astype(np.float32)
    info = np.eye(10, dtype=np.float32)[labels] * 5 + rng.normal(size=(len(keys), 10)).astype(np.float32)
    return {"key": np.array(keys)[order], "fac": noise[order], "feat.mor": info[order]}


@pytest.mark.parametrize("fmt", ["npz", "arrow", "parquet"])
def test_user_features_are_matched_by_key_with_out_of_fold_confidences(tiny_dataset, tmp_path, fmt):
    arrays = _user_arrays(tiny_dataset)
    path = tmp_path / f"user.{fmt}"
    if fmt == "npz":
        np.savez(path, **arrays)
    else:
        table = pa.table({"key": arrays["key"].tolist(), "fac": list(arrays["fac"]),
                          "feat.mor": pa.FixedSizeListArray.from_arrays(arrays["feat.mor"].ravel(), 10)})
        _write_table(path, table)
    s = extract_features(tiny_dataset, source="user", features_file=path, progress=False)
    ds = open_dataset(tiny_dataset)
    row = {k: i for i, k in enumerate(arrays["key"])}
    for sp in ("train", "val", "test"):
        f = read_features(tiny_dataset / "features" / f"{sp}.arrow", ds.fingerprint)
        assert f.metadata["source"] == "user" and f.keys == ds.split(sp).keys
        idx = [row[k] for k in f.keys]
        np.testing.assert_array_equal(f.feats["fac"], arrays["fac"][idx])
        np.testing.assert_array_equal(f.feats["mor"], arrays["feat.mor"][idx])
        assert f.confs["fac"].mean() < 0.3, "noise features must not look confident (in-sample ~1)"
        assert f.confs["mor"].mean() > 0.8
    assert s["feature_dims"] == {"fac": 300, "mor": 10}
    assert s["config"]["probe"]["train"] == "out-of-fold"


def _write_table(path: Path, table: pa.Table) -> None:
    if path.suffix == ".parquet":
        pq.write_table(table, path)
        return
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)


def test_user_train_confidences_match_the_crossfit_probe(tiny_dataset, tmp_path):
    arrays = _user_arrays(tiny_dataset)
    np.savez(tmp_path / "u.npz", **arrays)
    extract_features(tiny_dataset, source="user", features_file=tmp_path / "u.npz", seed=3, progress=False)
    f = read_features(tiny_dataset / "features" / "train.arrow")
    expect, _ = crossfit_probes(f.feats["mor"], f.labels, 10, folds=5, seed=3)
    np.testing.assert_array_equal(f.confs["mor"], expect)


def _bad(tiny_dataset, tmp_path, arrays, match, exc=SchemaError, name="bad.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    with pytest.raises(exc, match=match) as info:
        extract_features(tiny_dataset, source="user", features_file=path, progress=False)
    assert str(path) in str(info.value)
    return str(info.value)


def test_user_features_missing_a_sample_is_an_error(tiny_dataset, tmp_path):
    a = _user_arrays(tiny_dataset)
    test_key = open_dataset(tiny_dataset).split("test").keys[0]
    keep = a["key"] != test_key
    msg = _bad(tiny_dataset, tmp_path, {k: v[keep] for k, v in a.items()}, "has no features")
    assert test_key in msg and "test" in msg


def test_user_features_with_an_unknown_key_is_an_error(tiny_dataset, tmp_path):
    a = _user_arrays(tiny_dataset)
    a["key"] = a["key"].astype(object)
    a["key"][5] = "not-a-sample"
    a["key"] = a["key"].astype(str)
    _bad(tiny_dataset, tmp_path, a, "'not-a-sample'.*not a sample")


def test_user_features_with_nan_name_key_and_field(tiny_dataset, tmp_path):
    a = _user_arrays(tiny_dataset)
    a["feat.mor"][7, 2] = np.inf
    _bad(tiny_dataset, tmp_path, a, rf"key '{a['key'][7]}', field 'feat.mor'.*NaN or inf")


def test_user_features_missing_a_modality_is_an_error(tiny_dataset, tmp_path):
    a = _user_arrays(tiny_dataset)
    del a["feat.mor"]
    _bad(tiny_dataset, tmp_path, a, "field 'mor'.*modality missing")


def test_user_features_with_duplicate_keys_is_an_error(tiny_dataset, tmp_path):
    a = _user_arrays(tiny_dataset)
    a["key"][3] = a["key"][4]
    _bad(tiny_dataset, tmp_path, a, "duplicate key")


def test_user_features_with_rows_of_different_dimension_is_an_error(tiny_dataset, tmp_path):
    a = _user_arrays(tiny_dataset)
    rows = [r.tolist() for r in a["fac"]]
    rows[9] = rows[9][:-1]
    table = pa.table({"key": a["key"].tolist(), "fac": rows, "mor": list(a["feat.mor"])})
    path = tmp_path / "ragged.arrow"
    _write_table(path, table)
    with pytest.raises(SchemaError, match=rf"key '{a['key'][9]}', field 'fac'.*299 values"):
        extract_features(tiny_dataset, source="user", features_file=path, progress=False)


def test_user_features_refuse_pickled_npz_and_unknown_formats(tiny_dataset, tmp_path):
    a = _user_arrays(tiny_dataset)
    a["key"] = a["key"].astype(object)
    _bad(tiny_dataset, tmp_path, a, "pickle", exc=UnsafeInputError)
    (tmp_path / "f.csv").write_text("key,fac\n")
    with pytest.raises(MidasDataError, match="unsupported features file"):
        extract_features(tiny_dataset, source="user", features_file=tmp_path / "f.csv", progress=False)
    with pytest.raises(MidasDataError, match="features_file"):
        extract_features(tiny_dataset, source="user", progress=False)


# ---------------------------------------------------------------- settings: CLI, API, artifacts
def test_cli_and_python_api_take_the_same_settings_and_record_them(tiny_dataset):
    from click.testing import CliRunner

    from midas_data.cli import main
    from midas_data.features.config import ExtractConfig

    r = CliRunner().invoke(main, ["extract", str(tiny_dataset), "--warmup-epochs", "2",
                                  "--batch-size", "16", "--feature-dim", "8", "--device", "cpu",
                                  "--splits", "train,val", "--quiet"])
    assert r.exit_code == 0, r.output
    want = ExtractConfig(warmup_epochs=2, batch_size=16, feature_dim=8, device="cpu",
                         splits=("train", "val"))
    meta = table_metadata(read_table(tiny_dataset / "features" / "train.arrow"))
    cfg = json.loads(meta["config"])
    assert cfg["settings"] == want.to_dict() and cfg["settings"]["num_threads"] == 1
    assert cfg["torch_threads"] == 1
    fp_cli = meta["features_fingerprint"]
    by_keywords = extract_features(tiny_dataset, warmup_epochs=2, batch_size=16, feature_dim=8,
                                   device="cpu", splits=("train", "val"), progress=False)
    by_config = extract_features(tiny_dataset, want, progress=False)
    assert by_keywords["splits"]["train"]["features_fingerprint"] == fp_cli
    assert by_config["splits"]["train"]["features_fingerprint"] == fp_cli
    assert by_config["config"]["settings"] == want.to_dict()


def test_bad_extract_settings_are_refused_before_any_work(tiny_dataset):
    from click.testing import CliRunner

    from midas_data.cli import main
    from midas_data.options import SettingError

    for args, needle in ((["--threads", "-1"], "-1 is not in the range x>=0"),
                         (["--optimizer", "lbfgs"], "'lbfgs' is not one of"),
                         (["--lr", "0"], "0.0 is not in the range x>0")):
        r = CliRunner().invoke(main, ["extract", str(tiny_dataset), *args, "--quiet"])
        assert r.exit_code == 2 and needle in r.output, r.output
    with pytest.raises(SettingError, match="ExtractConfig.optimizer='lbfgs'"):
        extract_features(tiny_dataset, optimizer="lbfgs", progress=False)
    with pytest.raises(TypeError, match="warmup_epoch"):
        extract_features(tiny_dataset, warmup_epoch=2, progress=False)
    assert not (tiny_dataset / "features").exists()


def test_mine_cli_records_its_settings_in_the_pairs(tiny_dataset):
    from click.testing import CliRunner

    from midas_data.cli import main
    from midas_data.mining.config import MineConfig

    extract_features(tiny_dataset, splits=("train",), **FAST)
    r = CliRunner().invoke(main, ["mine-misaligned", str(tiny_dataset), "--k", "0", "--quiet"])
    assert r.exit_code == 2 and "0 is not in the range x>=1" in r.output, r.output
    r = CliRunner().invoke(main, ["mine-misaligned", str(tiny_dataset), "--k", "3", "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["k"] == 3
    part = tiny_dataset / "pairs" / "train" / "part-00000-of-00001.arrow"
    cfg = json.loads(table_metadata(read_table(part))["config"])
    assert cfg["settings"] == MineConfig(k=3).to_dict() and cfg["k"] == 3
