"""Untrusted shards, tables and manifests: nothing runs code, nothing escapes the dataset
directory, nothing exhausts memory or time.

- Pickle bombs (a payload whose unpickling creates a marker file) planted in shards, user
  manifests, user feature files and checkpoints are refused, never executed, on every
  reading path: SplitReader.get / get_many / iteration, MidasDataset, Dataset.verify,
  build-shards, extract, trainer checkpoints. A tripwire makes any call to pickle a failure.
- The source tree holds no unsafe loader call (AST scan).
- Paths named by a manifest or an index cannot leave the dataset; tar members that are
  links, absolute paths or '..' are refused.
- Crafted headers claiming gigabytes (tar, .npy, PNG, WAV, index sizes, manifests with
  huge column counts) end in a specific, fast error, also under a 1.5 GiB address-space limit.

Datasets are edited and then re-signed (tests/crafting.resign): the attacker controls the
checksums too, so the planted thing itself must be refused.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from crafting import (
    Bomb,
    append_members,
    manifest,
    npy_bytes,
    npy_huge_header,
    npy_object_bomb,
    pickle_bomb,
    plant_payload,
    png_claiming,
    read_index,
    resign,
    set_index_value,
    tar_member,
    wav_claiming,
    write_index,
    write_manifest,
)

from midas_data import (
    CorruptShardError,
    MidasDataError,
    Sample,
    SchemaError,
    UnsafeInputError,
    build_dataset,
    open_dataset,
)
from midas_data.dataset.formats import decode
from midas_data.dataset.verify import walk_tar

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b"]
FAST = 2.0  # seconds: every crafted input must be refused within this


def _samples() -> list[Sample]:
    out = []
    for i in range(12):
        split = "train" if i < 8 else "test"
        out.append(Sample(f"s{i:02d}", CLASSES[i % 2], {
            "vec": np.arange(4, dtype=np.float32) + i,
            "ids": np.array([i, i + 1, i + 2], dtype=np.int32)}, split=split))
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety") / "ds"
    build_dataset(_samples(), root, classes=CLASSES, shard_max_count=4, progress=False)
    return root


@pytest.fixture
def ds(pristine, tmp_path) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(pristine, root)
    return root


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "EXECUTED"


@pytest.fixture
def no_pickle(monkeypatch):
    """Any unpickling during the test is a failure (and would not run the bomb)."""

    def tripwire(*a, **k):
        raise AssertionError("pickle was called on a reading path")

    for mod in (pickle, sys.modules["_pickle"]):
        monkeypatch.setattr(mod, "load", tripwire)
        monkeypatch.setattr(mod, "loads", tripwire)


def _expected(pristine: Path, split: str = "train") -> dict[str, dict]:
    sr = open_dataset(pristine).split(split)
    return {sr.keys[i]: sr.get(i) for i in range(len(sr))}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a)


READERS = ["get", "get_key", "get_many", "iter", "stream"]


def _read(root: Path, how: str, split: str = "train") -> list[dict]:
    """All samples of `split` through one reading path, as dicts of numpy values."""
    if how == "stream":
        from midas_data.stream.dataset import MidasDataset

        out = []
        for batch in MidasDataset(root, split, batch_size=4, policy="random", seed=0):
            for b, key in enumerate(batch["key"]):
                if not batch["valid"][b]:
                    continue  # a fill row: a repeat padding the epoch's last batch
                d = {"__key__": key, "label": int(batch["label"][b])}
                d.update((m, batch["inputs"][m][b].numpy()) for m in batch["inputs"])
                out.append(d)
        return out
    sr = open_dataset(root).split(split)
    if how == "get":
        return [sr.get(i) for i in range(len(sr))]
    if how == "get_key":
        return [sr.get(k) for k in list(sr.keys)]
    if how == "get_many":
        return sr.get_many(np.arange(len(sr)))
    return list(sr)


def _assert_names(msg: str, *needles: str) -> None:
    for n in needles:
        assert n in msg, (n, msg)


def _assert_refused(root: Path, exc: type[Exception], *needles: str, split: str = "train") -> None:
    """Every reading path raises `exc` naming `needles`; verify reports the same damage."""
    for how in READERS:
        t0 = time.perf_counter()
        with pytest.raises(exc) as info:
            _read(root, how, split)
        assert time.perf_counter() - t0 < FAST, how
        _assert_names(str(info.value), *needles)
    problems = "\n".join(open_dataset(root).verify())
    assert problems, "verify found nothing"


def _assert_delivers(root: Path, pristine: Path, split: str = "train") -> None:
    want = _expected(pristine, split)
    for how in READERS:
        got = _read(root, how, split)
        assert sorted(d["__key__"] for d in got) == sorted(want), how
        for d in got:
            assert _same(d, want[d["__key__"]]), (how, d["__key__"])


# ------------------------------------------------------------------------------ pickle bombs


def test_the_bomb_is_live(marker):
    """Control: the payloads used below do run code when unpickled."""
    pickle.loads(pickle_bomb(marker))
    assert marker.exists()
    marker.unlink()
    np.load(__import__("io").BytesIO(npy_object_bomb(marker)), allow_pickle=True)
    assert marker.exists()


def test_planted_pickle_members_are_never_read_and_verify_refuses_them(ds, pristine, marker,
                                                                        no_pickle):
    shard = ds / "shards" / "train-000000.tar"
    append_members(shard, tar_member("s00.vec.pyd", pickle_bomb(marker)),
                   tar_member("s00.x.pickle", pickle_bomb(marker)))
    resign(ds)
    _assert_delivers(ds, pristine)
    problems = open_dataset(ds).verify()
    for name in ("s00.vec.pyd", "s00.x.pickle"):
        assert any(name in p and "refused" in p and shard.name in p for p in problems), problems
    assert not marker.exists()


def test_index_pointing_at_a_pickle_member_is_refused(ds, marker, no_pickle):
    key, shard = plant_payload(ds, "train", "vec", pickle_bomb(marker), name="s03.vec.pyd")
    resign(ds)
    _assert_refused(ds, CorruptShardError, shard.name, repr(key), "'vec'", "s03.vec.pyd")
    assert not marker.exists()


@pytest.mark.parametrize("payload", ["raw-pickle", "object-npy"])
def test_pickle_under_an_npy_name_is_refused(ds, marker, no_pickle, payload):
    bomb = pickle_bomb(marker) if payload == "raw-pickle" else npy_object_bomb(marker)
    key, shard = plant_payload(ds, "train", "vec", bomb)
    resign(ds)
    _assert_refused(ds, SchemaError, shard.name, repr(key), "'vec'", "cannot decode")
    problems = "\n".join(open_dataset(ds).verify())
    _assert_names(problems, shard.name, repr(key), "'vec'")
    assert not marker.exists()


@pytest.mark.parametrize("edit,exc", [
    ({"ext": "pyd"}, UnsafeInputError), ({"ext": "pickle"}, UnsafeInputError),
    ({"kind": "pickle"}, SchemaError), ({"ext": "pt"}, UnsafeInputError)])
def test_manifest_declaring_a_pickle_format_is_refused(ds, edit, exc):
    m = manifest(ds)
    m["modalities"]["vec"].update(edit)
    resign(ds, m)
    with pytest.raises(exc) as info:
        open_dataset(ds)
    _assert_names(str(info.value), "manifest.json", "'vec'")


def _user_rows(proj: Path, n: int = 8) -> list[dict]:
    (proj / "data").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        p = proj / "data" / f"u{i}.npy"
        p.write_bytes(npy_bytes(np.full(3, i, np.float32)))
        rows.append({"key": f"u{i}", "label": CLASSES[i % 2], "a": f"data/u{i}.npy", "b": f"[{i}, 1.5]"})
    return rows


def _write_csv(path: Path, rows: list[dict]) -> Path:
    lines = [",".join(rows[0])] + [",".join(f'"{v}"' for v in r.values()) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("ext", ["pkl", "pyd", "pickle", "pth"])
def test_user_manifest_naming_a_pickle_file_is_refused(tmp_path, marker, no_pickle, ext,
                                                       assert_no_partial_output):
    from midas_data.pipelines.user_manifest import read_manifest_file

    proj = tmp_path / "proj"
    rows = _user_rows(proj)
    (proj / "data" / f"evil.{ext}").write_bytes(pickle_bomb(marker))
    rows[3]["a"] = f"data/evil.{ext}"
    src = read_manifest_file(_write_csv(proj / "m.csv", rows))
    with pytest.raises(UnsafeInputError) as info:
        build_dataset(src["samples"], tmp_path / "out", progress=False)
    _assert_names(str(info.value), f"evil.{ext}", "'u3'", "'a'", "refused")
    assert_no_partial_output(tmp_path / "out")
    assert not marker.exists()


def test_user_manifest_naming_a_pickled_npy_is_refused(tmp_path, marker, no_pickle,
                                                       assert_no_partial_output):
    from midas_data.pipelines.user_manifest import read_manifest_file

    proj = tmp_path / "proj"
    rows = _user_rows(proj)
    (proj / "data" / "evil.npy").write_bytes(npy_object_bomb(marker))
    rows[5]["a"] = "data/evil.npy"
    src = read_manifest_file(_write_csv(proj / "m.csv", rows))
    with pytest.raises(SchemaError) as info:
        build_dataset(src["samples"], tmp_path / "out", progress=False)
    _assert_names(str(info.value), "evil.npy", "'u5'", "'a'", "cannot decode")
    assert_no_partial_output(tmp_path / "out")
    assert not marker.exists()


def test_cli_build_shards_refuses_a_pickle_payload(tmp_path, marker):
    proj = tmp_path / "proj"
    rows = _user_rows(proj)
    (proj / "data" / "evil.pyd").write_bytes(pickle_bomb(marker))
    rows[2]["a"] = "data/evil.pyd"
    csv = _write_csv(proj / "m.csv", rows)
    cli = Path(sys.executable).with_name("midas-data")
    r = subprocess.run([str(cli), "build-shards", "--manifest", str(csv), "--out",
                        str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    _assert_names(r.stderr, "error:", "evil.pyd", "'u2'", "refused")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() and not marker.exists()


@pytest.mark.parametrize("how", ["object-array", "pickle-file"])
def test_user_features_npz_with_pickles_is_refused(pristine, tmp_path, marker, no_pickle, how):
    from midas_data.features.extract import extract_features, load_user_features

    keys = open_dataset(pristine).split("train").keys + open_dataset(pristine).split("test").keys
    path = tmp_path / "feats.npz"
    if how == "object-array":
        bombs = np.array([Bomb(marker)] + [0] * (len(keys) - 1), dtype=object)
        with open(path, "wb") as f:
            np.savez(f, key=np.array(keys), vec=bombs, ids=np.zeros((len(keys), 2), np.float32))
    else:
        path.write_bytes(pickle_bomb(marker))
    with pytest.raises(UnsafeInputError) as info:
        load_user_features(path, ["vec", "ids"])
    _assert_names(str(info.value), "feats.npz", "pickle")
    root = tmp_path / "ds"
    shutil.copytree(pristine, root)
    with pytest.raises(UnsafeInputError):
        extract_features(root, source="user", features_file=path, progress=False)
    assert not (root / "features").exists()
    assert not marker.exists()


def test_a_pickle_bomb_checkpoint_is_refused(tmp_path, marker):
    from midas_data.trainers import artifacts

    path = tmp_path / "last.pt"
    torch.save({"format_version": 1, "model": Bomb(marker)}, path)
    with pytest.raises(MidasDataError) as info:  # refused as unpicklable, named, no unsafe advice
        artifacts.load_checkpoint(path)
    assert isinstance(info.value.__context__, pickle.UnpicklingError)
    assert str(path) in str(info.value) and "weights_only" not in str(info.value)
    assert not marker.exists()


# ------------------------------------------------------------------------------ source scan

SCANNED = ["midas_data", "pipelines", "trainers", "bench"]
OWN_TESTS = ["tests/test_safety.py", "tests/test_fuzz.py", "tests/test_crash_safety.py",
             "tests/crash_harness.py", "tests/crafting.py"]
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"),
              ("_pickle", "load"), ("_pickle", "loads"), ("cPickle", "load"), ("dill", "load"),
              ("dill", "loads"), ("joblib", "load"), ("pd", "read_pickle"),
              ("pandas", "read_pickle"), ("yaml", "unsafe_load"), ("marshal", "loads")}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<not a constant>"
    return None


def unsafe_calls(source: str, filename: str) -> list[str]:
    """Unsafe loader calls in `source`: torch.load without weights_only=True, np.load without
    allow_pickle=False, any unpickler, tar extraction, eval/exec, yaml.load without a safe
    loader, and `from X import load`-style imports of those loaders."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "numpy", "pickle", "_pickle"):
            for a in node.names:
                if a.name in ("load", "loads", "Unpickler"):
                    out.append(f"{where}: from {node.module} import {a.name}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        parts = tuple(name.rsplit(".", 1)) if "." in name else ("", name)
        if name == "torch.load" and _kw(node, "weights_only") is not True:
            out.append(f"{where}: torch.load without weights_only=True")
        elif name in ("np.load", "numpy.load") and _kw(node, "allow_pickle") is not False:
            out.append(f"{where}: {name} without allow_pickle=False")
        elif parts in UNPICKLERS or name.endswith("read_pickle"):
            out.append(f"{where}: {name}")
        elif parts[1] == "extractall" or (parts[1] == "extract" and any(
                t in parts[0].lower() for t in ("tar", "tf", "zip", "archive"))):
            out.append(f"{where}: {name} (archive extraction writes files named by the archive)")
        elif name in ("eval", "exec"):
            out.append(f"{where}: {name}")
        elif name == "yaml.load" and "Safe" not in ast.unparse(node):
            out.append(f"{where}: yaml.load without SafeLoader")
    return out


def test_scanner_catches_unsafe_calls():
    bad = ("import torch, numpy as np, pickle\nfrom pickle import loads\n"
           "torch.load(p)\ntorch.load(p, weights_only=False)\nnp.load(p)\n"
           "np.load(p, allow_pickle=True)\npickle.loads(b)\ntf.extractall('.')\neval('1')\n")
    assert len(unsafe_calls(bad, "bad.py")) == 8
    good = "torch.load(p, weights_only=True)\nnp.load(p, allow_pickle=False)\nmodel.eval()\n"
    assert unsafe_calls(good, "good.py") == []


def test_source_tree_has_no_unsafe_loader_calls():
    files = [p for d in SCANNED for p in sorted((REPO / d).rglob("*.py"))]
    files += [REPO / f for f in OWN_TESTS if (REPO / f).exists()]
    assert len(files) > 20
    found = []
    for p in files:
        found += unsafe_calls(p.read_text(), str(p.relative_to(REPO)))
    # the controls above deliberately unpickle a bomb; nothing else may
    found = [f for f in found if not (f.startswith("tests/test_safety.py") and
                                      ("pickle.loads" in f or "allow_pickle" in f))]
    assert found == []


def test_readers_never_import_webdataset(pristine):
    code = ("import sys; from midas_data import open_dataset; from midas_data.stream.dataset import "
            "MidasDataset; ds = open_dataset(sys.argv[1]); sr = ds.split('train'); list(sr); "
            "sr.get_many([0, 1]); ds.verify(); list(MidasDataset(sys.argv[1], 'train', batch_size=4)); "
            "print('webdataset' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(pristine)], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.stdout.strip() == "False", r.stderr


# ------------------------------------------------------------------------------ path containment


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "shards/../../x.tar",
                                  "shards/train-000000.tar/../../../x.tar"])
def test_manifest_shard_paths_outside_the_dataset_are_refused(ds, path):
    m = manifest(ds)
    old = m["shards"][0]["path"]
    m["shards"][0]["path"] = path
    sp = m["shards"][0]["split"]
    m["splits"][sp]["shards"] = [path if p == old else p for p in m["splits"][sp]["shards"]]
    resign(ds, m)
    with pytest.raises(UnsafeInputError if ".." in path or path.startswith("/") else SchemaError) as info:
        open_dataset(ds)
    _assert_names(str(info.value), "manifest.json", "shards[0].path", "outside the dataset")


@pytest.mark.parametrize("index", ["../index/train.arrow", "/tmp/train.arrow", "index/../../x.arrow",
                                   "index/test.arrow"])
def test_manifest_index_paths_outside_the_dataset_are_refused(ds, index):
    m = manifest(ds)
    m["splits"]["train"]["index"] = index
    resign(ds, m)
    with pytest.raises(UnsafeInputError) as info:
        open_dataset(ds)
    _assert_names(str(info.value), "manifest.json", "splits.train.index", "outside the dataset")


def test_split_and_modality_names_cannot_escape(ds):
    m = manifest(ds)
    m["splits"]["../../evil"] = m["splits"].pop("test")
    resign(ds, m)
    with pytest.raises(UnsafeInputError) as info:
        open_dataset(ds)
    _assert_names(str(info.value), "manifest.json", "../../evil")
    m = manifest(ds)
    m["splits"]["test"] = m["splits"].pop("../../evil")
    m["modalities"] = {("../x" if k == "vec" else k): v for k, v in m["modalities"].items()}
    m["modality_order"] = list(m["modalities"])
    resign(ds, m)
    with pytest.raises(SchemaError) as info:
        open_dataset(ds)
    _assert_names(str(info.value), "manifest.json", "'../x'", "modality names")


def test_builder_refuses_escaping_keys_splits_and_modalities(tmp_path, assert_no_partial_output):
    out = tmp_path / "out"
    for bad in (Sample("../x", 0, {"a": np.zeros(2, np.float32)}, split="train"),
                Sample("x", 0, {"a": np.zeros(2, np.float32)}, split="../../train"),
                Sample("x", 0, {"../a": np.zeros(2, np.float32)}, split="train")):
        with pytest.raises(SchemaError):
            build_dataset([bad], out, classes=["c"], progress=False)
        assert_no_partial_output(out)


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "dotdot", "absolute", "directory",
                                  "nested", "device"])
def test_links_and_escaping_tar_members_are_refused(ds, pristine, tmp_path, kind):
    members = {
        "symlink": tar_member("s00.vec.npy", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
        "hardlink": tar_member("s01.vec.npy", type=tarfile.LNKTYPE, linkname="../../escape"),
        "dotdot": tar_member("../../escape.vec.npy", b"x"),
        "absolute": tar_member("/tmp/escape.vec.npy", b"x"),
        "directory": tar_member("s00", type=tarfile.DIRTYPE),
        "nested": tar_member("sub/s00.vec.npy", b"x"),
        "device": tar_member("s00.vec.npy", type=tarfile.CHRTYPE),
    }
    shard = ds / "shards" / "train-000000.tar"
    append_members(shard, members[kind])
    resign(ds)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    _assert_delivers(ds, pristine)  # random access never looks at the planted member
    problems = "\n".join(open_dataset(ds).verify())
    _assert_names(problems, shard.name, "refused")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written anywhere
    assert not Path("/tmp/escape.vec.npy").exists()


def test_index_pointing_outside_its_shard_is_refused(ds):
    size = (ds / "shards" / "train-000000.tar").stat().st_size
    key = read_index(ds, "train").column("key")[0].as_py()
    for column, value, field in [("vec.offset", size + 512, "'vec'"), ("vec.offset", -512, "'vec'"),
                                 ("vec.size", 1 << 40, "'vec'"), ("offset", size, "'offset'"),
                                 ("size", 1 << 50, "'offset'"), ("shard", 7, "'shard'"),
                                 ("label", 5, "'label'"), ("key", "../../x", "'key'"),
                                 ("vec.crc32", -1, "'vec'")]:
        root = ds.parent / f"edit-{column}-{value}"
        shutil.copytree(ds, root)
        set_index_value(root, "train", column, 0, value)
        resign(root)
        t0 = time.perf_counter()
        with pytest.raises(SchemaError) as info:
            open_dataset(root).split("train")
        assert time.perf_counter() - t0 < FAST
        _assert_names(str(info.value), "train.arrow", field, "rebuild")
        if column != "key":
            _assert_names(str(info.value), repr(key))


def test_member_whose_header_names_another_key_is_refused(ds):
    """The index of sample 0 pointed at sample 1's payload, CRC and all: the header differs."""
    t = read_index(ds, "train")
    key0 = t.column("key")[0].as_py()
    for c in ("vec.offset", "vec.size", "vec.crc32"):
        set_index_value(ds, "train", c, 0, t.column(c)[1].as_py())
    set_index_value(ds, "train", "size", 0, t.column("size")[0].as_py() + t.column("size")[1].as_py())
    resign(ds)
    _assert_refused(ds, CorruptShardError, "train-000000.tar", repr(key0), "'vec'", "header")


def test_damaged_index_and_unknown_splits_in_verify_and_extract(ds, tmp_path):
    from midas_data.features.extract import extract_features

    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(MidasDataError, match="none of"):
        extract_features(ds, splits=("../../evil",), progress=False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    # an index edited without updating the manifest digest
    set_index_value(ds, "train", "label", 0, 1 - read_index(ds, "train").column("label")[0].as_py())
    with pytest.raises(CorruptShardError) as info:
        open_dataset(ds).split("train")
    _assert_names(str(info.value), "train.arrow", "sha256")
    assert any("train.arrow" in p for p in open_dataset(ds).verify())


def test_mining_refuses_unknown_split_names(ds):
    mine_stage = pytest.importorskip("midas_data.mining.stage")
    with pytest.raises(MidasDataError, match="no split"):
        mine_stage.mine_misaligned(ds, splits=["../../evil"], progress=False)
    assert not (ds / "pairs").exists()


# ------------------------------------------------------------------------------ resource limits

DECODE_BOMBS = {
    "npy-8TB-header": ("tensor", "npy", lambda: npy_huge_header(), "header claims shape"),
    "npy-negative-shape": ("tensor", "npy", lambda: npy_huge_header((-1, 4)), "negative shape"),
    "npy-object": ("tensor", "npy", lambda: npy_object_bomb("/nonexistent/x"), "refused"),
    "png-100k-x-100k": ("image", "png", lambda: png_claiming(100_000, 100_000), "exceeds"),
    "png-9k-x-9k": ("image", "png", lambda: png_claiming(9_000, 9_000), "exceeds"),
    "png-as-jpg": ("image", "jpg", lambda: png_claiming(4, 4), "cannot decode"),
    "wav-4G-frames": ("audio", "wav", lambda: wav_claiming(1 << 31), "more frames than allowed"),
}


@pytest.mark.parametrize("case", sorted(DECODE_BOMBS))
def test_decoding_bombs_fail_fast(case):
    kind, ext, make, needle = DECODE_BOMBS[case]
    data = make()
    t0 = time.perf_counter()
    with pytest.raises(SchemaError) as info:
        decode(kind, ext, data, file="f.tar", key="k", field="m")
    assert time.perf_counter() - t0 < FAST
    _assert_names(str(info.value), "f.tar", "'k'", "'m'", needle)


def test_npy_bomb_inside_a_shard_fails_fast_on_every_reader(ds):
    key, shard = plant_payload(ds, "train", "vec", npy_huge_header())
    resign(ds)
    _assert_refused(ds, SchemaError, shard.name, repr(key), "'vec'", "header claims shape")


@pytest.mark.parametrize("member", ["8GB", "longname-1GB", "negative"])
def test_tar_headers_claiming_gigabytes_are_refused_by_verify(ds, pristine, member):
    shard = ds / "shards" / "train-000000.tar"
    if member == "8GB":
        planted = tar_member("s00.vec.npy", b"", size=8 << 30)
    elif member == "longname-1GB":
        planted = tar_member("././@LongLink", b"", type=tarfile.GNUTYPE_LONGNAME, size=1 << 30)
    else:
        planted = tar_member("s00.vec.npy", b"")
        planted = planted[:124] + b"-0000000001\x00" + planted[136:148] + b"        " + planted[156:]
        chk = sum(planted[:512])
        planted = planted[:148] + b"%06o\x00 " % chk + planted[156:]
    append_members(shard, planted)
    resign(ds)
    t0 = time.perf_counter()
    problems = "\n".join(open_dataset(ds).verify())
    assert time.perf_counter() - t0 < FAST
    _assert_names(problems, shard.name)
    assert "claims" in problems or "damaged tar header" in problems, problems
    with pytest.raises(CorruptShardError):
        list(walk_tar(shard))
    _assert_delivers(ds, pristine)


def test_huge_manifest_sizes_never_allocate(ds, pristine):
    """Shard sizes in the manifest are not in its fingerprint: a manifest claiming a 1 PB
    shard, with an index whose sample sizes claim 512 TB, reads correctly and verify says so."""
    m = manifest(ds)
    m["shards"][0]["bytes"] = 1 << 50
    write_manifest(ds, m)
    t = read_index(ds, "train")
    i = t.column_names.index("size")
    rows = np.flatnonzero(t.column("shard").to_numpy() == 0)
    sizes = t.column("size").to_numpy().copy()
    sizes[rows[0]] = 1 << 49
    write_index(ds, "train", t.set_column(i, t.schema.field(i), pa.array(sizes)))
    resign_keep = manifest(ds)
    from midas_data.dataset.manifest import file_sha256
    resign_keep["splits"]["train"]["index_sha256"] = file_sha256(ds / "index" / "train.arrow")
    from midas_data.dataset.manifest import dataset_fingerprint  # the digest is in the fingerprint
    resign_keep["fingerprint"] = dataset_fingerprint(
        resign_keep["modalities"], resign_keep["classes"], resign_keep["shards"], resign_keep["splits"])
    write_manifest(ds, resign_keep)
    t0 = time.perf_counter()
    _assert_delivers(ds, pristine)
    problems = "\n".join(open_dataset(ds).verify())
    assert time.perf_counter() - t0 < 4 * FAST
    _assert_names(problems, "train-000000.tar", "manifest says 1125899906842624")


def test_huge_user_manifests_fail_fast(tmp_path):
    from midas_data.pipelines.user_manifest import read_manifest_file

    cases = {}
    cases["wide.csv"] = "key,label," + ",".join(f"c{i}" for i in range(1_000_000)) + "\nk,a\n"
    cases["wide-line.jsonl"] = "{" + ",".join(f'"c{i}":1' for i in range(200_000)) + "}\n"
    cases["many-lines.jsonl"] = "".join(
        json.dumps({"key": f"k{j}", "label": "a", **{f"c{j}_{i}": 1 for i in range(64)}}) + "\n"
        for j in range(40))
    cases["nested.jsonl"] = json.dumps({"key": "k", "label": "a", "a": {f"x{i}": 1 for i in range(10)}}) + "\n"
    cases["deep.jsonl"] = "[" * 100_000 + "\n"
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    pq.write_table(pa.table({f"c{i}": [1] for i in range(2000)}), tmp_path / "wide.parquet")
    for name in [*cases, "wide.parquet"]:
        t0 = time.perf_counter()
        with pytest.raises(SchemaError) as info:
            read_manifest_file(tmp_path / name)
        assert time.perf_counter() - t0 < FAST, name
        _assert_names(str(info.value), name)


@pytest.mark.parametrize("case", ["20k-modalities", "deep-nesting", "huge-count", "wrong-types"])
def test_hostile_manifest_json_fails_fast(ds, case):
    m = manifest(ds)
    if case == "20k-modalities":
        spec = m["modalities"]["vec"]
        m["modalities"] = {f"m{i}": spec for i in range(20_000)}
        m["modality_order"] = list(m["modalities"])
        resign(ds, m)
    elif case == "deep-nesting":
        (ds / "manifest.json").write_text('{"format": "midas-data", "x": ' + "[" * 200_000)
    elif case == "huge-count":
        m["shards"][0]["count"] = 10**30
        resign(ds, m)
    else:
        m["splits"] = [1, 2, 3]
        resign(ds, m)
    t0 = time.perf_counter()
    with pytest.raises(MidasDataError) as info:
        open_dataset(ds)
    assert time.perf_counter() - t0 < FAST
    _assert_names(str(info.value), "manifest.json")


BOUNDED_SCRIPT = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
sys.path.insert(0, sys.argv[1])
import crafting
from midas_data.dataset.formats import decode
from midas_data.dataset.verify import walk_tar
from midas_data import open_dataset
from midas_data.pipelines.user_manifest import read_manifest_file
out = []
def run(name, fn):
    t0 = time.perf_counter()
    try:
        fn()
        out.append([name, "no error", time.perf_counter() - t0])
    except Exception as e:
        out.append([name, f"{type(e).__name__}: {e}"[:300], time.perf_counter() - t0])
run("npy", lambda: decode("tensor", "npy", crafting.npy_huge_header()))
run("png", lambda: decode("image", "png", crafting.png_claiming(100_000, 100_000)))
run("wav", lambda: decode("audio", "wav", crafting.wav_claiming(1 << 31)))
run("tar", lambda: list(walk_tar(sys.argv[2])))
run("csv", lambda: read_manifest_file(sys.argv[3]))
run("index", lambda: open_dataset(sys.argv[4]).split("train"))
print(json.dumps(out))
"""


def test_crafted_inputs_are_refused_within_bounded_memory(ds, tmp_path):
    """The same bombs under a 1.5 GiB address-space limit: each fails with its own
    specific message (an attempted big allocation would show up as MemoryError)."""
    tar = tmp_path / "big.tar"
    tar.write_bytes(tar_member("k.vec.npy", b"", size=64 << 30) + bytes(1024))
    csv = tmp_path / "wide.csv"
    csv.write_text("key,label," + ",".join(f"c{i}" for i in range(300_000)) + "\n")
    set_index_value(ds, "train", "vec.size", 0, 1 << 40)
    resign(ds)
    r = subprocess.run([sys.executable, "-c", BOUNDED_SCRIPT, str(REPO / "tests"), str(tar), str(csv),
                        str(ds)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    results = {name: (msg, secs) for name, msg, secs in json.loads(r.stdout)}
    want = {"npy": "header claims shape", "png": "DecompressionBombError", "wav": "more frames",
            "tar": "past the end of the file", "csv": "more than 1024 columns",
            "index": "payload byte range lies outside"}
    for name, needle in want.items():
        msg, secs = results[name]
        assert needle in msg and "MemoryError" not in msg, (name, msg)
        assert secs < FAST, (name, secs)

