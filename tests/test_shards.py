"""build_dataset + open_dataset: round trip, determinism, splits, bad input, atomicity, damage."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from crafting import npy_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import midas_data.dataset.shards as shards_mod
from midas_data import (
    CorruptShardError,
    MidasDataError,
    Sample,
    SchemaError,
    UnsafeInputError,
    build_dataset,
    open_dataset,
)
from midas_data.dataset.split import stratified_split

CLASSES = ["cat", "dog", "eel"]
MODS = ["vec", "mat", "img", "snd", "txt"]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def mixed(payload_files):
    """30 samples (10 per class) with one payload of each kind, plus what each must read back as.

    Returns (samples, expected) with expected[key][modality] = (stored bytes, decoded value).
    """
    rng = np.random.default_rng(7)
    samples, expected = [], {}
    for i in range(30):
        key = f"s-{i:03d}"
        vec = rng.standard_normal(8).astype(np.float32)
        mat = rng.integers(-3000, 3000, size=(3, 4)).astype(np.int16)
        img = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
        snd = rng.integers(-32768, 32767, size=100 + 7 * i).astype(np.int16)  # lengths vary
        text = f"sample {i}: caf\u00e9 \u2713\n"
        paths = {"mat": payload_files.npy(f"m/{key}.npy", mat),
                 "img": payload_files.png(f"i/{key}.png", img),
                 "snd": payload_files.wav(f"a/{key}.wav", snd),
                 "txt": payload_files.txt(f"t/{key}.txt", text)}
        samples.append(Sample(key, CLASSES[i % 3], {"vec": vec, **paths}, source="mixed-fixture"))
        expected[key] = {
            "vec": (npy_bytes(vec), vec),
            "mat": (paths["mat"].read_bytes(), mat),
            "img": (paths["img"].read_bytes(), img),
            "snd": (paths["snd"].read_bytes(), (snd.astype(np.float32) / 32768.0)[None, :]),
            "txt": (paths["txt"].read_bytes(), text),
        }
    return samples, expected


def build_mixed(samples, out, **kw):
    kw.setdefault("shard_max_count", 4)
    return build_dataset(samples, out, classes=CLASSES, modalities=MODS, progress=False, **kw)


def assert_decoded_equal(got, want, modality):
    if isinstance(want, str):
        assert got == want, modality
    else:
        assert got.dtype == want.dtype and got.shape == want.shape, modality
        assert np.array_equal(got, want), modality


# ---------------------------------------------------------------------------- round trip


def test_round_trip_bytes_and_values_identical_via_iteration_random_access_and_get_many(
        tmp_path, mixed):
    samples, expected = mixed
    manifest = build_mixed(samples, tmp_path / "ds")
    assert len(manifest["shards"]) > 3  # several shards per split
    ds = open_dataset(tmp_path / "ds")
    assert ds.modalities == MODS and ds.classes == CLASSES
    assert {m: ds.schema[m]["kind"] for m in MODS} == {
        "vec": "tensor", "mat": "tensor", "img": "image", "snd": "audio", "txt": "text"}
    label_of = {s.key: CLASSES.index(s.label) for s in samples}
    seen = []
    for split in ds.splits:
        sr = ds.split(split)
        # raw stored bytes == source bytes
        for row, key in enumerate(sr.keys):
            for m in MODS:
                assert sr.read_raw(row, m) == expected[key][m][0], (key, m)
        # sequential iteration, in index order
        iterated = list(sr)
        assert [d["__key__"] for d in iterated] == sr.keys
        for d in iterated:
            assert d["label"] == label_of[d["__key__"]]
            for m in MODS:
                assert_decoded_equal(d[m], expected[d["__key__"]][m][1], m)
        # random access by key, in a shuffled order
        for key in np.random.default_rng(0).permutation(sr.keys):
            d = sr.get(str(key))
            assert d["__key__"] == key and d["label"] == label_of[key]
            for m in MODS:
                assert_decoded_equal(d[m], expected[key][m][1], m)
        # batched access in a shuffled order
        rows = np.random.default_rng(1).permutation(len(sr))
        for row, d in zip(rows, sr.get_many(rows)):
            assert d["__key__"] == sr.keys[row]
            for m in MODS:
                assert_decoded_equal(d[m], expected[d["__key__"]][m][1], m)
        assert np.array_equal(sr.rows_for_keys(sr.keys), np.arange(len(sr)))
        seen += sr.keys
    assert sorted(seen) == sorted(expected)
    assert ds.verify() == []


def test_shards_are_readable_by_the_webdataset_package(tmp_path, mixed):
    import webdataset as wds

    samples, expected = mixed
    build_mixed(samples, tmp_path / "ds")
    ds = open_dataset(tmp_path / "ds")
    ext = {m: ds.schema[m]["ext"] for m in MODS}
    for split in ds.splits:
        sr = ds.split(split)
        urls = [str(p) for p in sr.shard_paths]
        got = list(wds.WebDataset(urls, shardshuffle=False))
        assert [d["__key__"] for d in got] == sr.keys
        for d, label in zip(got, sr.labels):
            assert d["cls"] == str(int(label)).encode()
            assert {k for k in d if not k.startswith("__")} == {"cls"} | {f"{m}.{ext[m]}" for m in MODS}
            for m in MODS:
                assert d[f"{m}.{ext[m]}"] == expected[d["__key__"]][m][0]


_DTYPES = st.sampled_from(["float32", "float64", "float16", "int8", "uint8", "int16", "int32",
                           "int64", "uint64", "bool", "complex64"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), dtype=_DTYPES,
       shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
def test_any_numeric_tensor_round_trips_bit_exactly(tmp_path_factory, data, dtype, shape):
    arrays = [data.draw(hnp.arrays(np.dtype(dtype), shape)) for _ in range(3)]
    out = tmp_path_factory.mktemp("hyp") / "ds"
    build_dataset([Sample(f"k{i}", i % 2, {"x": a}, split="train") for i, a in enumerate(arrays)],
                  out, classes=["a", "b"], progress=False)
    sr = open_dataset(out).split("train")
    for i, a in enumerate(arrays):
        assert sr.read_raw(i, "x") == npy_bytes(a)
        got = sr.get(f"k{i}")["x"]
        assert got.dtype == a.dtype and got.shape == a.shape and got.tobytes() == a.tobytes()


# ------------------------------------------------------------------ determinism and splits


def test_two_builds_of_the_same_input_are_byte_identical(tmp_path, mixed):
    samples, _ = mixed
    m1 = build_mixed(samples, tmp_path / "a")
    m2 = build_mixed(samples, tmp_path / "b")
    a, b = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert sorted(a) == sorted(b)
    assert any(p.startswith("shards/") for p in a) and any(p.startswith("index/") for p in a)
    for path in a:
        assert a[path] == b[path], path
    assert m1["fingerprint"] == m2["fingerprint"]
    # a rebuild over the top (overwrite) is identical too
    build_mixed(samples, tmp_path / "a", overwrite=True)
    assert snapshot(tmp_path / "a") == b


def test_builds_in_separate_processes_are_byte_identical(tmp_path, make_tiny_dataset):
    make_tiny_dataset(tmp_path / "here")
    script = (
        "import sys; sys.path.insert(0, sys.argv[2])\n"
        "from conftest import tiny_samples\n"
        "from midas_data.pipelines import get_pipeline\n"
        "from midas_data import build_dataset\n"
        "src = get_pipeline('mfeat')(modalities=['fac', 'mor'])\n"
        "build_dataset(tiny_samples(src, 10, ('fac', 'mor')), sys.argv[1], classes=src['classes'],\n"
        "              modalities=['fac', 'mor'], shard_max_count=16, split_seed=0,\n"
        "              source={'pipeline': 'mfeat', 'subset': 10}, progress=False)\n")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "there"), str(Path(__file__).parent)],
                   check=True, env=env, cwd=tmp_path)
    assert snapshot(tmp_path / "here") == snapshot(tmp_path / "there")


def test_stratified_split_is_70_10_20_within_every_class():
    labels = np.repeat([0, 1, 2, 3], [50, 20, 30, 10])
    rng = np.random.default_rng(3)
    labels = labels[rng.permutation(len(labels))]
    splits = stratified_split(labels, seed=5)
    want = {50: (35, 5, 10), 20: (14, 2, 4), 30: (21, 3, 6), 10: (7, 1, 2)}
    for c in range(4):
        n = int(np.sum(labels == c))
        got = Counter(splits[labels == c])
        assert (got["train"], got["val"], got["test"]) == want[n], c


def test_stratified_split_is_seeded():
    labels = np.repeat(np.arange(5), 40)
    a, b = stratified_split(labels, seed=1), stratified_split(labels, seed=1)
    c = stratified_split(labels, seed=2)
    assert list(a) == list(b)
    assert list(a) != list(c)
    for s in (a, c):  # a different seed changes membership, not the per-class proportions
        assert Counter(s[labels == 0]) == Counter({"train": 28, "val": 4, "test": 8})


def test_built_dataset_splits_each_class_70_10_20_and_records_the_seed(make_tiny_dataset, tmp_path):
    root = make_tiny_dataset(tmp_path / "s0", per_class=20, split_seed=0)
    ds = open_dataset(root)
    assert ds.manifest["split_seed"] == 0
    for split, n in (("train", 14), ("val", 2), ("test", 4)):
        assert Counter(ds.split(split).labels.tolist()) == {c: n for c in range(10)}, split
    other = open_dataset(make_tiny_dataset(tmp_path / "s1", per_class=20, split_seed=1))
    assert other.manifest["split_seed"] == 1
    assert set(other.split("train").keys) != set(ds.split("train").keys)
    again = open_dataset(make_tiny_dataset(tmp_path / "s0b", per_class=20, split_seed=0))
    assert again.split("train").keys == ds.split("train").keys


def test_given_splits_are_kept_and_mixing_given_and_missing_splits_is_refused(tmp_path):
    xs = [Sample(f"k{i}", i % 2, {"a": np.full(2, i, np.float32)}, split=["train", "val", "test"][i % 3])
          for i in range(12)]
    build_dataset(xs, tmp_path / "ds", progress=False)
    ds = open_dataset(tmp_path / "ds")
    for s in xs:
        assert s.key in ds.split(s.split).keys
    xs[4] = Sample("k4", 0, {"a": np.zeros(2, np.float32)}, split=None)
    with pytest.raises(SchemaError, match="split"):
        build_dataset(xs, tmp_path / "ds2", progress=False)


def test_integer_like_class_names_are_ordered_numerically(tmp_path):
    xs = [Sample(f"k{i}", str(i % 12), {"a": np.zeros(2, np.float32)}, split="train") for i in range(24)]
    m = build_dataset(xs, tmp_path / "ds", progress=False)
    assert m["classes"] == [str(c) for c in range(12)]
    sr = open_dataset(tmp_path / "ds").split("train")
    assert [int(m["classes"][y]) for y in sr.labels] == [i % 12 for i in range(24)]


# ------------------------------------------------------------------------------ bad input


class _Evil:
    """Unpickling this creates `marker`: proof that a payload was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


SRC = "my-source.jsonl"


def _base_samples(payload_files, n=12):
    out = []
    for i in range(n):
        b = payload_files.npy(f"b/k{i}.npy", np.arange(3, dtype=np.int32) + i)
        out.append(Sample(f"k{i}", CLASSES[i % 3], {"a": np.full(4, i, np.float32), "b": b}, source=SRC))
    return out


def _replace(samples, i, **kw):
    s = samples[i]
    fields = {"key": s.key, "label": s.label, "payloads": dict(s.payloads), "split": s.split,
              "source": s.source}
    fields.update(kw)
    samples[i] = Sample(**fields)


def _payload(samples, i, m, value):
    _replace(samples, i, payloads={**samples[i].payloads, m: value})


def _bad_missing_file(xs, pf):
    _payload(xs, 7, "b", pf.root / "gone" / "k7.npy")
    return SchemaError, ["gone/k7.npy", "'k7'", "'b'", "does not exist"]


def _bad_corrupt_npy(xs, pf):
    p = pf.root / "bad" / "k7.npy"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"\x93NUMPY\x01\x00garbage that is not a header")
    _payload(xs, 7, "b", p)
    return SchemaError, ["bad/k7.npy", "'k7'", "'b'", "cannot decode"]


def _bad_pickled_npy(xs, pf):
    evil = np.array([_Evil(str(pf.root / "UNPICKLED")), 1], dtype=object)
    _payload(xs, 7, "b", pf.npy("evil/k7.npy", evil, allow_pickle=True))
    return SchemaError, ["evil/k7.npy", "'k7'", "'b'", "cannot decode"]


def _bad_inline_object_array(xs, pf):
    _payload(xs, 7, "a", np.array([_Evil(str(pf.root / "UNPICKLED")), 1], dtype=object))
    return SchemaError, [SRC, "'k7'", "'a'", "object arrays"]


def _bad_unsafe_extension(xs, pf):
    p = pf.root / "k7.pkl"
    p.write_bytes(b"not even read")
    _payload(xs, 7, "b", p)
    return UnsafeInputError, ["k7.pkl", "'k7'", "'b'", "refused"]


def _bad_shape(xs, pf):
    _payload(xs, 7, "a", np.zeros(5, np.float32))
    return SchemaError, [SRC, "'k7'", "'a'", "shape"]


def _bad_shape_from_file(xs, pf):
    _payload(xs, 7, "b", pf.npy("wide/k7.npy", np.arange(4, dtype=np.int32)))
    return SchemaError, [SRC, "'k7'", "'b'", "shape"]


def _bad_dtype(xs, pf):
    _payload(xs, 7, "a", np.zeros(4, np.float64))
    return SchemaError, [SRC, "'k7'", "'a'", "dtype"]


def _bad_ragged_list(xs, pf):
    _payload(xs, 7, "a", [[1.0, 2.0], [3.0]])
    return SchemaError, [SRC, "'k7'", "'a'", "rectangular"]


def _bad_missing_modality(xs, pf):
    _replace(xs, 7, payloads={"a": xs[7].payloads["a"]})
    return SchemaError, [SRC, "'k7'", "'b'", "missing"]


def _bad_label_index(xs, pf):
    _replace(xs, 7, label=3)
    return SchemaError, [SRC, "'k7'", "'label'", "outside the class list"]


def _bad_label_name(xs, pf):
    _replace(xs, 7, label="zebra")
    return SchemaError, [SRC, "'k7'", "'label'", "unknown label 'zebra'"]


def _bad_duplicate_key(xs, pf):
    _replace(xs, 7, key="k3")
    return SchemaError, [SRC, "'k3'", "'key'", "duplicate"]


def _bad_dotted_key(xs, pf):
    _replace(xs, 7, key="k7.v2")
    return SchemaError, [SRC, "'k7.v2'", "'key'", "dot"]


BAD = [_bad_missing_file, _bad_corrupt_npy, _bad_pickled_npy, _bad_inline_object_array,
       _bad_unsafe_extension, _bad_shape, _bad_shape_from_file, _bad_dtype, _bad_ragged_list,
       _bad_missing_modality, _bad_label_index, _bad_label_name, _bad_duplicate_key, _bad_dotted_key]


@pytest.mark.parametrize("existing", [False, True], ids=["fresh-out", "over-existing"])
@pytest.mark.parametrize("case", BAD, ids=[f.__name__[5:] for f in BAD])
def test_bad_input_is_a_located_error_and_writes_nothing(tmp_path, payload_files, assert_no_partial_output,
                                                         case, existing):
    out = tmp_path / "ds"
    if existing:
        build_dataset(_base_samples(payload_files), out, classes=CLASSES, progress=False)
        before = snapshot(out)
    xs = _base_samples(payload_files)
    exc, needles = case(xs, payload_files)
    with pytest.raises(exc) as info:
        build_dataset(xs, out, classes=CLASSES, progress=False, overwrite=existing, shard_max_count=2)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert not (payload_files.root / "UNPICKLED").exists()
    if existing:
        assert snapshot(out) == before
        assert open_dataset(out).verify() == []
        assert not list(tmp_path.glob(".ds.*"))
    else:
        assert_no_partial_output(out)


def test_empty_source_is_refused_and_writes_nothing(tmp_path, assert_no_partial_output):
    with pytest.raises(MidasDataError, match="no samples"):
        build_dataset([], tmp_path / "ds", progress=False)
    assert_no_partial_output(tmp_path / "ds")


def test_repeated_or_reserved_modality_names_are_refused(tmp_path, payload_files, assert_no_partial_output):
    xs = _base_samples(payload_files)
    with pytest.raises(SchemaError, match="repeat"):
        build_dataset(xs, tmp_path / "ds", modalities=["a", "a"], progress=False)
    with pytest.raises(SchemaError, match="modality names"):
        build_dataset([Sample("k", 0, {"cls": np.zeros(1)})], tmp_path / "ds", progress=False)
    assert_no_partial_output(tmp_path / "ds")


# ----------------------------------------------------------------- existing output directory


def test_existing_dataset_is_refused_unless_overwrite_which_replaces_it(tmp_path, make_tiny_dataset):
    out = make_tiny_dataset(tmp_path / "ds", modalities=("fac", "mor"))
    before = snapshot(out)
    with pytest.raises(MidasDataError, match="already holds a dataset") as info:
        make_tiny_dataset(out, modalities=("kar", "mor"))
    assert str(out) in str(info.value)
    assert snapshot(out) == before
    make_tiny_dataset(out, modalities=("kar", "mor"), overwrite=True)
    ds = open_dataset(out)
    assert ds.modalities == ["kar", "mor"] and ds.verify() == []
    assert ds.split("train").get(0)["kar"].shape == (64,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no .old/.tmp left behind


def test_existing_empty_directory_is_used(tmp_path, make_tiny_dataset):
    (tmp_path / "ds").mkdir()
    make_tiny_dataset(tmp_path / "ds")
    assert open_dataset(tmp_path / "ds").verify() == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_non_dataset_directory_or_file_is_never_replaced(tmp_path, make_tiny_dataset, overwrite):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(MidasDataError, match="not empty"):
        make_tiny_dataset(tmp_path / "home", overwrite=overwrite)
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(MidasDataError, match="not a directory"):
        make_tiny_dataset(tmp_path / "afile", overwrite=overwrite)
    assert (tmp_path / "afile").read_text() == "x"


# --------------------------------------------------------------------------- interruption


class _Exploding(Mapping):
    """Payloads whose lookup fails, like a network filesystem going away mid-build."""

    def __init__(self, payloads):
        self._p = payloads

    def __getitem__(self, m):
        raise OSError(f"I/O error reading {m}")

    def __iter__(self):
        return iter(self._p)

    def __len__(self):
        return len(self._p)


def _observe_reader(out: Path, old_fingerprint: str | None) -> None:
    """What a reader sees while a build is in flight: nothing, or the old complete dataset."""
    if old_fingerprint is None:
        with pytest.raises(MidasDataError, match="no dataset here"):
            open_dataset(out)
    else:
        ds = open_dataset(out)
        assert ds.fingerprint == old_fingerprint and ds.verify() == []
        assert sum(len(ds.split(s)) for s in ds.splits) == 100


@pytest.mark.parametrize("existing", [False, True], ids=["fresh-out", "over-existing"])
def test_payload_failing_mid_build_leaves_nothing_and_rerun_succeeds(
        tmp_path, mfeat_source, select_tiny_samples, make_tiny_dataset, assert_no_partial_output,
        existing):
    tiny_samples = select_tiny_samples
    out = tmp_path / "ds"
    old = open_dataset(make_tiny_dataset(out)).fingerprint if existing else None
    before = snapshot(out) if existing else None
    xs = tiny_samples(mfeat_source, per_class=30)
    xs[200] = Sample(xs[200].key, xs[200].label, _Exploding(xs[200].payloads))
    with pytest.raises(OSError, match="I/O error"):
        build_dataset(xs, out, classes=mfeat_source["classes"], modalities=["fac", "mor"],
                      shard_max_count=16, overwrite=existing, progress=False)
    if existing:
        assert snapshot(out) == before
        _observe_reader(out, old)
    else:
        assert_no_partial_output(out)
    xs = tiny_samples(mfeat_source, per_class=30)
    build_dataset(xs, out, classes=mfeat_source["classes"], modalities=["fac", "mor"],
                  shard_max_count=16, overwrite=existing, progress=False)
    ds = open_dataset(out)
    assert sum(len(ds.split(s)) for s in ds.splits) == 300 and ds.verify() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


@pytest.mark.parametrize("existing", [False, True], ids=["fresh-out", "over-existing"])
def test_keyboard_interrupt_mid_build_is_invisible_to_readers_and_rerun_succeeds(
        tmp_path, monkeypatch, make_tiny_dataset, assert_no_partial_output, existing):
    out = tmp_path / "ds"
    old = open_dataset(make_tiny_dataset(out)).fingerprint if existing else None
    before = snapshot(out) if existing else None
    real_add = shards_mod.SplitShardWriter.add
    calls = {"n": 0}

    def add_then_interrupt(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 150:
            _observe_reader(out, old)  # a reader during the build
            raise KeyboardInterrupt
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(shards_mod.SplitShardWriter, "add", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        make_tiny_dataset(out, per_class=30, overwrite=existing)
    assert calls["n"] == 150
    if existing:
        assert snapshot(out) == before
        _observe_reader(out, old)
    else:
        assert_no_partial_output(out)
    monkeypatch.setattr(shards_mod.SplitShardWriter, "add", real_add)
    make_tiny_dataset(out, per_class=30, overwrite=existing)
    ds = open_dataset(out)
    assert sum(len(ds.split(s)) for s in ds.splits) == 300 and ds.verify() == []


def test_temp_dirs_of_a_killed_build_are_cleaned_by_the_rerun(tmp_path, make_tiny_dataset):
    for stale in (".ds.k1ll3d.tmp", ".ds.old.tmp"):  # what SIGKILL mid-build/mid-swap leaves
        (tmp_path / stale / "shards").mkdir(parents=True)
        (tmp_path / stale / "shards" / "train-000000.tar").write_bytes(b"half")
    make_tiny_dataset(tmp_path / "ds")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert open_dataset(tmp_path / "ds").verify() == []


# ------------------------------------------------------------------------------- damage


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def _assert_names(msg: str, *needles: str) -> None:
    for n in needles:
        assert n in msg, (n, msg)


def test_flipped_payload_byte_is_reported_by_verify_and_raised_by_readers(tiny_dataset):
    sr = open_dataset(tiny_dataset).split("train")
    row = int(np.flatnonzero(sr.shard == 1)[3])
    key, shard = sr.keys[row], sr.shard_paths[1]
    _flip(shard, int(sr.member["fac"][0][row]) + 17)

    ds = open_dataset(tiny_dataset)
    problems = ds.verify()
    assert problems
    _assert_names("\n".join(problems), shard.name, repr(key), "'fac'")
    assert all(shard.name in p for p in problems)  # no other shard is blamed

    sr = ds.split("train")
    with pytest.raises(CorruptShardError) as info:
        sr.get(key)
    _assert_names(str(info.value), shard.name, repr(key), "'fac'")
    with pytest.raises(CorruptShardError) as info:
        list(sr)
    _assert_names(str(info.value), shard.name, repr(key), "'fac'")
    with pytest.raises(CorruptShardError):
        sr.read_raw(row, "fac")
    # the other modality of that sample, and samples elsewhere, still read
    assert sr.get(key, modalities=["mor"])["mor"].shape == (6,)
    assert sr.get(int(np.flatnonzero(sr.shard == 0)[0]))["fac"].shape == (216,)


def test_flipped_tar_header_byte_is_reported_by_verify(tiny_dataset):
    sr = open_dataset(tiny_dataset).split("val")
    shard = sr.shard_paths[0]
    _flip(shard, int(sr.sample_offset[0]) + 3)  # inside the first member's name
    problems = open_dataset(tiny_dataset).verify()
    assert problems and all(shard.name in p for p in problems)
    assert any("sha256" in p for p in problems)


def test_truncated_shard_is_reported_by_verify_and_raised_by_readers(tiny_dataset):
    sr = open_dataset(tiny_dataset).split("train")
    last = len(sr) - 1
    key, shard = sr.keys[last], sr.shard_paths[int(sr.shard[last])]
    cut = int(sr.member["mor"][0][last]) + 5  # into the last sample's last payload
    os.truncate(shard, cut)

    ds = open_dataset(tiny_dataset)
    problems = "\n".join(ds.verify())
    _assert_names(problems, shard.name, "truncated", repr(key), "'mor'")

    sr = ds.split("train")
    with pytest.raises(CorruptShardError) as info:
        sr.get(key)
    _assert_names(str(info.value), shard.name, repr(key), "'mor'", "truncated")
    with pytest.raises(CorruptShardError) as info:
        list(sr)
    _assert_names(str(info.value), shard.name, repr(key), "'mor'")
    assert sr.get(key, modalities=["fac"])["fac"].shape == (216,)  # fac lies before the cut
    assert len(sr.get_many(np.arange(last))) == last  # every other sample reads


def test_deleted_shard_is_reported(tiny_dataset):
    sr = open_dataset(tiny_dataset).split("test")
    shard = sr.shard_paths[0]
    shard.unlink()
    ds = open_dataset(tiny_dataset)
    assert any(shard.name in p and "missing" in p for p in ds.verify())
    with pytest.raises(CorruptShardError, match=shard.name):
        ds.split("test").get(0)


def test_tar_members_have_fixed_metadata(tiny_dataset):
    sr = open_dataset(tiny_dataset).split("train")
    with tarfile.open(sr.shard_paths[0]) as tf:
        members = tf.getmembers()
    assert members and all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o444
                           for m in members)
    assert [m.name for m in members[:3]] == [f"{sr.keys[0]}.cls", f"{sr.keys[0]}.fac.npy",
                                             f"{sr.keys[0]}.mor.npy"]


# ------------------------------------------------------------------ writer: tar bytes by hand


def _tarinfo_bytes(name: str, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o444, 0, 0, "", ""
    return ti.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


@pytest.mark.parametrize("name", ["k.cls", "s-001.vec.npy", "a" * 96 + ".npy", "b" * 100,
                                  "c" * 101, "d" * 300 + ".x.npy", "e" * 511 + ".f"])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 4224, 8 ** 11 - 1])
def test_tar_header_is_byte_identical_to_tarfile(name, size):
    assert shards_mod.tar_header(name, size) == _tarinfo_bytes(name, size)


@pytest.mark.parametrize("size", [-1, 8 ** 11])
def test_tar_header_refuses_a_size_its_field_cannot_hold(size):
    with pytest.raises(ValueError, match="does not fit"):
        shards_mod.tar_header("k.x.npy", size)


@pytest.mark.parametrize("n_members", [0, 1, 3, 19, 20, 21])
def test_tar_end_pads_like_tarfile(n_members):
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(n_members):
            data = bytes(range(i % 7)) * 100
            ti = tarfile.TarInfo(f"k{i}.x.npy")
            ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o444, 0, 0, "", ""
            tf.addfile(ti, io.BytesIO(data))
        body = buf.tell()
    ours = b"".join(_tarinfo_bytes(f"k{i}.x.npy", len(bytes(range(i % 7)) * 100))
                    + bytes(range(i % 7)) * 100 + bytes(-len(bytes(range(i % 7)) * 100) % 512)
                    for i in range(n_members))
    assert len(ours) == body
    assert ours + shards_mod.tar_end(len(ours)) == buf.getvalue()


def test_shards_are_byte_identical_to_tarfile_writing_the_same_members(tmp_path, mixed):
    """The hand-written tar stream equals what the previous tarfile-based writer wrote:
    each shard rebuilt with tarfile from the index and the stored payloads, byte for byte
    (long keys, which need GNU long-name headers, included)."""
    import io

    samples, _ = mixed
    rng = np.random.default_rng(0)
    longs = [Sample("L" * (95 + i), CLASSES[i % 3], {m: s.payloads[m] for m in MODS},
                    source="long-keys") for i, s in enumerate(samples[:8])]
    for s in longs:
        s.payloads = {**s.payloads, "vec": rng.standard_normal(8).astype(np.float32)}
    build_mixed(samples + longs, tmp_path / "ds", shard_max_count=5)
    ds = open_dataset(tmp_path / "ds")
    checked = 0
    for split in ds.splits:
        sr = ds.split(split)
        for shard_no, path in enumerate(sr.shard_paths):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
                for row in np.flatnonzero(sr.shard == shard_no):
                    members = [(f"{sr.keys[row]}.cls", str(int(sr.labels[row])).encode())]
                    members += [(sr.member_name(int(row), m), sr.read_raw(int(row), m)) for m in MODS]
                    for name, data in members:
                        ti = tarfile.TarInfo(name)
                        ti.size, ti.mtime, ti.mode = len(data), 0, 0o444
                        ti.uid = ti.gid = 0
                        ti.uname = ti.gname = ""
                        tf.addfile(ti, io.BytesIO(data))
            assert path.read_bytes() == buf.getvalue(), path
            checked += 1
    assert checked >= 8
    assert any(len(k) > 100 for k in ds.split("train").keys + ds.split("test").keys
               + ds.split("val").keys)
    assert ds.verify() == []


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<i2", ">u8", "?", "<c16", "|u1"])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3), (1, 1, 5)])
def test_encoded_npy_bytes_equal_np_save_on_first_and_cached_use(dtype, shape):
    from midas_data.dataset.formats import encode_array

    rng = np.random.default_rng(1)
    for _ in range(3):  # the first call writes the header with np.save, later ones reuse it
        x = (rng.standard_normal(shape) * 100).astype(dtype)
        enc = encode_array(x)
        assert enc.data == npy_bytes(x)
        assert (enc.dtype, tuple(enc.shape)) == (np.dtype(dtype).name, shape)


# ------------------------------------------------------------------ batch reads


def test_read_batch_equals_reading_sample_by_sample(tmp_path, mixed):
    samples, expected = mixed
    build_mixed(samples, tmp_path / "ds")
    sr = open_dataset(tmp_path / "ds").split("train")
    rng = np.random.default_rng(3)
    rows = np.concatenate([rng.permutation(len(sr)), [0, 0, -1, -len(sr)]])  # repeats, negatives
    batch = sr.read_batch(rows)
    one_by_one = sr.get_many_per_sample(rows)
    assert batch["key"] == [d["__key__"] for d in one_by_one]
    assert batch["label"].dtype == np.int64
    assert batch["label"].tolist() == [d["label"] for d in one_by_one]
    for m in ("vec", "mat", "img"):  # fixed shapes: one batch array
        assert isinstance(batch["inputs"][m], np.ndarray) and len(batch["inputs"][m]) == len(rows)
    for i, d in enumerate(one_by_one):
        for m in MODS:
            assert_decoded_equal(batch["inputs"][m][i], d[m], m)
            assert_decoded_equal(d[m], expected[d["__key__"]][m][1], m)
    many = sr.get_many(rows)
    for a, b in zip(many, one_by_one):
        assert a["__key__"] == b["__key__"] and a["label"] == b["label"]
        for m in MODS:
            assert_decoded_equal(a[m], b[m], m)
    empty = sr.read_batch(np.array([], np.int64))
    assert empty["key"] == [] and empty["inputs"]["vec"].shape == (0, 8)
    with pytest.raises(IndexError, match="outside split"):
        sr.read_batch([0, len(sr)])


def test_read_batch_spans_chunks_and_shards(tmp_path, monkeypatch):
    import midas_data.dataset.reader as reader_mod

    rng = np.random.default_rng(5)
    x = rng.standard_normal((50, 6)).astype(np.float32)
    build_dataset([Sample(f"k{i:02d}", i % 2, {"x": x[i]}, split="train") for i in range(50)],
                  tmp_path / "ds", classes=["a", "b"], shard_max_count=7, progress=False)
    monkeypatch.setattr(reader_mod, "READ_CHUNK_ROWS", 4)
    sr = open_dataset(tmp_path / "ds").split("train")
    rows = rng.permutation(50)
    got = sr.read_batch(rows)["inputs"]["x"]
    np.testing.assert_array_equal(got, x[rows])
    monkeypatch.setattr(reader_mod, "READ_CHUNK_BYTES", 1)  # every sample its own chunk
    np.testing.assert_array_equal(sr.read_batch(rows)["inputs"]["x"], x[rows])


def _vec_dataset(out: Path, n: int = 12) -> tuple[Path, np.ndarray]:
    x = np.random.default_rng(2).standard_normal((n, 4)).astype(np.float32)
    build_dataset([Sample(f"v{i:02d}", i % 2, {"vec": x[i]}, split="train") for i in range(n)],
                  out, classes=["a", "b"], shard_max_count=n, progress=False)
    return out, x


def test_npy_header_cache_returns_numpys_parse_for_each_distinct_header():
    from midas_data.dataset import formats

    seen = []
    for x in [np.zeros(3, np.float32), np.zeros(4, np.float32), np.ones((2, 3), ">i2"),
              np.arange(5.0), np.zeros((), np.uint8)]:
        for version in ((1, 0), (2, 0)):
            import io

            buf = io.BytesIO()
            np.lib.format.write_array(buf, x, version=version)
            data = buf.getvalue()
            hit = formats.npy_header_cached(data)
            assert hit == formats.npy_header(data)
            assert formats.npy_header_cached(data + b"tail") == hit  # keyed by the header only
            seen.append(hit)
    # format 1.0 and 2.0 headers of an array are different bytes with the same meaning;
    # different arrays never share a parse
    assert len({(s, d.str) for s, _, d, _ in seen}) == len(seen) // 2
    with pytest.raises(ValueError, match="magic"):
        formats.npy_header_cached(b"\x93NUMPX" + bytes(20))
    with pytest.raises(ValueError, match="version"):
        formats.npy_header_cached(b"\x93NUMPY\x03\x00" + bytes(20))
    with pytest.raises(ValueError, match="claims"):
        formats.npy_header_cached(npy_bytes(np.zeros(3, np.float32))[:30])


def test_batch_read_decodes_a_payload_whose_header_is_spelled_differently(tmp_path):
    """A payload of the manifest's dtype and shape under another header (format 2.0) is not
    the cached header: it is decoded on its own, to the right values."""
    import io

    from crafting import plant_payload, resign

    root, x = _vec_dataset(tmp_path / "ds")
    other = np.arange(4, dtype=np.float32) * 7
    buf = io.BytesIO()
    np.lib.format.write_array(buf, other, version=(2, 0))
    key, _ = plant_payload(root, "train", "vec", buf.getvalue())
    resign(root)
    sr = open_dataset(root).split("train")
    row = sr.row(key)
    got = sr.read_batch(np.arange(len(sr)))["inputs"]["vec"]
    want = x.copy()
    want[row] = other
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(sr.get(key)["vec"], other)


@pytest.mark.parametrize("bad", ["dtype", "shape", "fortran"])
def test_batch_read_refuses_a_payload_of_another_dtype_or_shape_naming_it(tmp_path, bad):
    from crafting import plant_payload, resign

    root, _ = _vec_dataset(tmp_path / "ds")
    arr = {"dtype": np.zeros(4, np.float64), "shape": np.zeros(5, np.float32),
           "fortran": np.asfortranarray(np.zeros((2, 2), np.float32))}[bad]
    key, shard = plant_payload(root, "train", "vec", npy_bytes(arr))
    resign(root)
    sr = open_dataset(root).split("train")
    for read in (lambda: sr.read_batch(np.arange(len(sr))), lambda: sr.get_many(np.arange(len(sr))),
                 lambda: sr.read_batch([sr.row(key), 0])):
        with pytest.raises(SchemaError) as info:
            read()
        _assert_names(str(info.value), shard.name, repr(key), "'vec'", "manifest says")


@pytest.mark.parametrize("where_", ["data", "npy header", "tar name", "tar size"])
def test_batch_read_detects_a_flipped_byte_in_any_part_of_a_payload(tmp_path, where_):
    root, _ = _vec_dataset(tmp_path / "ds")
    sr = open_dataset(root).split("train")
    row = 5
    off = int(sr.member["vec"][0][row])
    pos = {"data": off + 128 + 3, "npy header": off + 20, "tar name": off - 512 + 1,
           "tar size": off - 512 + 124 + 10}[where_]
    shard = sr.shard_paths[int(sr.shard[row])]
    raw = bytearray(shard.read_bytes())
    raw[pos] ^= 0x04
    shard.write_bytes(bytes(raw))
    sr = open_dataset(root).split("train")
    with pytest.raises(CorruptShardError) as info:
        sr.read_batch(np.arange(len(sr))[::-1])
    _assert_names(str(info.value), shard.name, repr(sr.keys[row]), "'vec'")
    assert ("checksum" in str(info.value)) == (where_ in ("data", "npy header"))
    good = np.array([r for r in range(len(sr)) if r != row])
    assert len(sr.read_batch(good)["key"]) == len(good)  # the others still read


# ------------------------------------------------------------------ worker queue transport


def test_packed_batches_unpack_to_equal_tensors_through_pickle():
    import pickle

    import torch

    from midas_data.dataset.transport import PackedBatch, pack_batch, unpack_batch

    batch = {"key": ["a", "b"], "label": torch.tensor([1, 2]),
             "inputs": {"x": torch.randn(2, 3, 5)[:, :, ::2], "t": ["s1", "s2"],
                        "h": torch.randn(2, 4).to(torch.bfloat16)},
             "mask": torch.tensor([True, False]), "scalar": torch.tensor(3.5, dtype=torch.float64),
             "empty": torch.zeros(0, 7), "nan": torch.tensor([float("nan"), 1.0]),
             "pair": (torch.arange(3, dtype=torch.int16), 4), "stream_state": {"offset": 64}}
    packed = pickle.loads(pickle.dumps(pack_batch(batch)))
    assert isinstance(packed, PackedBatch)
    got = unpack_batch(packed)

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return (a.dtype == b.dtype and a.shape == b.shape
                    and torch.equal(torch.nan_to_num(a.float()), torch.nan_to_num(b.float()))
                    and bool((a.float().isnan() == b.float().isnan()).all()))
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list | tuple):
            return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
        return a == b

    assert same(got, batch)
    assert got["inputs"]["x"].untyped_storage().data_ptr() == got["label"].untyped_storage().data_ptr()
    got["label"][0] = 9  # writable
    assert unpack_batch(batch) is batch  # a batch made in-process passes through


def test_packed_batches_cross_dataloader_workers(tmp_path):
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from midas_data.dataset.transport import pack_batch, unpack_batch

    class Batches(IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            for i in range(info.id, 6, info.num_workers):
                yield pack_batch({"i": i, "x": torch.full((4, 3), float(i)), "k": [str(i)] * 4})

    got = sorted((unpack_batch(b) for b in DataLoader(Batches(), batch_size=None, num_workers=2)),
                 key=lambda b: b["i"])
    assert [b["i"] for b in got] == list(range(6))
    for b in got:
        assert torch.equal(b["x"], torch.full((4, 3), float(b["i"]))) and b["k"] == [str(b["i"])] * 4


def test_torch_batch_of_a_batch_read_equals_collate_of_samples(tmp_path, mixed):
    import torch

    from midas_data import collate
    from midas_data.dataset.transport import torch_batch

    samples, _ = mixed
    build_mixed(samples, tmp_path / "ds")
    sr = open_dataset(tmp_path / "ds").split("train")
    rows = np.random.default_rng(4).permutation(len(sr))
    mods = ["vec", "mat", "img", "txt"]  # the fixed shapes and text (ragged audio cannot stack)
    got = torch_batch(sr.read_batch(rows, mods))
    want = collate(sr.get_many_per_sample(rows, mods), mods)
    assert got["key"] == want["key"] and torch.equal(got["label"], want["label"])
    assert got["label"].dtype == torch.int64
    for m in mods:
        if m == "txt":
            assert got["inputs"][m] == want["inputs"][m]
        else:
            assert got["inputs"][m].dtype == want["inputs"][m].dtype
            assert torch.equal(got["inputs"][m], want["inputs"][m])


def test_pinning_a_packed_batch_pins_its_one_buffer(monkeypatch):
    import torch

    from midas_data.dataset.transport import pack_batch, unpack_batch

    pinned = []

    def fake_pin(self, *args):  # CPU-only torch cannot pin: record what would be pinned
        out = self.clone()
        pinned.append(out)
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    packed = pack_batch({"x": torch.arange(6.0).reshape(2, 3), "y": torch.tensor([1, 2])})
    got = unpack_batch(torch.utils.data._utils.pin_memory.pin_memory(packed))
    assert len(pinned) == 1  # one buffer, not one call per tensor
    for t in got.values():
        assert t.untyped_storage().data_ptr() == pinned[0].untyped_storage().data_ptr()
    assert torch.equal(got["x"], torch.arange(6.0).reshape(2, 3))
