"""Property-based corruption of every input the readers take: manifest.json, tar shards,
Arrow index and features tables, CSV/JSONL user manifests.

Each example damages one file of a small dataset of every modality kind (bit flips,
truncation, overwritten or deleted spans, reordered / missing / duplicated tar members,
Arrow columns of the wrong type, dropped, permuted or nulled, JSON values replaced by any
JSON), optionally re-signed (checksums and fingerprints recomputed, as a forger would),
and then reads everything through every path: open_dataset, SplitReader.get / get_many /
iteration, MidasDataset, read_features, Dataset.verify. Every case must end in

- data delivered correctly (payloads and labels equal to the originals), or
- a MidasDataError (KeyError for an unknown key) whose message names the damaged file,

never another exception from deep inside a dependency, never silently different data.
Un-signed damage to a shard or an index must also be reported by verify().

Example counts are fixed and small (derandomized), so the suite stays fast and repeatable.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tarfile
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import wav_bytes
from crafting import resign
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from midas_data import MidasDataError, Sample, build_dataset, open_dataset, read_features
from midas_data.features.tables import Features, write_features

COUNTS: Counter = Counter()
# CI: a fixed, small, derandomized run. MIDAS_FUZZ_EXAMPLES=N gives N random examples per test
# (a soak: `MIDAS_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py`).
_SOAK = int(os.environ.get("MIDAS_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int) -> settings:
    return settings(max_examples=_SOAK or examples, deadline=None, derandomize=not _SOAK,
                    database=None, suppress_health_check=list(HealthCheck))


CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    total = sum(v for k, v in COUNTS.items() if k.startswith("tried:"))
    print(f"\nfuzz: {total} corruptions tried; " + ", ".join(f"{k}={v}" for k, v in sorted(COUNTS.items())))


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class Pristine(tuple):
    """(root, expected); a short repr keeps hypothesis' failure reports readable."""

    def __repr__(self) -> str:
        return f"Pristine({self[0]})"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, dict]:
    """10 samples of four modality kinds; train in two shards; a features table for train."""
    root = tmp_path_factory.mktemp("fuzz") / "ds"
    src = tmp_path_factory.mktemp("fuzz-src")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(10):
        img, wav = src / f"i{i}.png", src / f"w{i}.wav"
        img.write_bytes(_png(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)))
        wav.write_bytes(wav_bytes(rng.integers(-3000, 3000, 40).astype(np.int16)))
        split = "train" if i < 6 else ("val" if i < 8 else "test")
        samples.append(Sample(f"k{i}", CLASSES[i % 3], {
            "vec": rng.standard_normal(3).astype(np.float32), "img": img, "aud": wav,
            "txt": f"sample {i} \u00e9"}, split=split))
    build_dataset(samples, root, classes=CLASSES, shard_max_count=3, progress=False)
    ds = open_dataset(root)
    expected = {}
    for sp in ds.splits:
        sr = ds.split(sp)
        expected[sp] = {"keys": list(sr.keys), "labels": sr.labels.tolist(),
                        "samples": {sr.keys[i]: sr.get(i) for i in range(len(sr))}}
    sr = ds.split("train")
    feats = Features(list(sr.keys), sr.labels.copy(),
                     {m: rng.standard_normal((len(sr), 3)).astype(np.float32) for m in ds.modalities},
                     {m: rng.random(len(sr)).astype(np.float32) for m in ds.modalities})
    write_features(root / "features" / "train.arrow", feats, ds.fingerprint, "user")
    expected["features"] = feats
    return Pristine((root, expected))


@pytest.fixture
def workdir(tmp_path) -> Path:
    return tmp_path


class Case:
    """One corrupted copy of the pristine dataset."""

    def __init__(self, pristine, workdir: Path, target: str):
        self.src, self.expected = pristine
        COUNTS["n"] += 1
        self.root = workdir / f"c{COUNTS['n']}"
        shutil.copytree(self.src, self.root)
        self.target = target
        self.path = self.root / target
        self.resigned = False

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# ----------------------------------------------------------------------------- the oracle


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and np.array_equal(a, b))
    return a == b


def _clear(e: BaseException, case: Case) -> None:
    """A clear error: our type, naming the damaged file (any dataset file once re-signed,
    since a forged file is then blamed where the inconsistency shows)."""
    if not isinstance(e, MidasDataError | KeyError):
        raise AssertionError(f"{case.target}: bare {type(e).__name__} from a dependency:\n"
                             + "".join(traceback.format_exception(e))) from e
    msg = str(e)
    names = [case.path.name]
    if case.resigned or case.target == "manifest.json":
        names += [str(case.root)]
    assert any(n in msg for n in names), (case.target, names, msg)
    COUNTS["clear errors"] += 1


def _check_sample(d: dict, split: str, case: Case, labels_trusted: bool) -> None:
    want = case.expected[split]["samples"].get(d["__key__"])
    assert want is not None, (case.target, "delivered an unknown key", d["__key__"])
    for m, v in want.items():
        if m == "label" and not labels_trusted:
            continue
        assert _same(d[m], v), (case.target, d["__key__"], m, "silently different data")
    COUNTS["samples delivered intact"] += 1


def exercise(case: Case) -> None:
    """Read everything through every path; apply the oracle to each outcome."""
    # a forger may relabel (labels are content); everything else must still be exact
    labels_trusted = not (case.resigned and (case.target == "manifest.json"
                                             or case.target.startswith("index/")))
    try:
        ds = open_dataset(case.root)
    except Exception as e:  # noqa: BLE001 - the oracle decides
        _clear(e, case)
        return
    for sp in ds.splits:
        assert sp in case.expected, (case.target, "unknown split", sp)
        try:
            sr = ds.split(sp)
        except Exception as e:  # noqa: BLE001
            _clear(e, case)
            continue
        if labels_trusted and not case.resigned:
            assert sr.keys == case.expected[sp]["keys"], case.target
            assert sr.labels.tolist() == case.expected[sp]["labels"], case.target
        for row in range(len(sr)):
            try:
                _check_sample(sr.get(row), sp, case, labels_trusted)
            except Exception as e:  # noqa: BLE001
                _clear(e, case)
        for how in ("get_many", "iter"):
            try:
                got = sr.get_many(np.arange(len(sr))) if how == "get_many" else list(sr)
                for d in got:
                    _check_sample(d, sp, case, labels_trusted)
            except Exception as e:  # noqa: BLE001
                _clear(e, case)
    _exercise_features(case, ds)
    _exercise_stream(case, ds, labels_trusted)
    problems = ds.verify()  # never raises
    pristine_bytes = (case.src / case.target).read_bytes()
    changed = not case.path.exists() or case.path.read_bytes() != pristine_bytes
    if changed and not case.resigned and case.target.startswith(("shards/", "index/")):
        assert problems, (case.target, "verify missed the damage")
    if problems:
        COUNTS["verify reports"] += 1


def _exercise_features(case: Case, ds) -> None:
    path = case.root / "features" / "train.arrow"
    want = case.expected["features"]
    try:
        f = read_features(path, ds.fingerprint)
    except Exception as e:  # noqa: BLE001
        _clear(e, case)
        return
    assert f.keys == want.keys and np.array_equal(f.labels, want.labels), case.target
    for m in want.modalities:
        assert np.array_equal(f.feats[m], want.feats[m]), (case.target, m)
        assert np.array_equal(f.confs[m], want.confs[m]), (case.target, m)


def _exercise_stream(case: Case, ds, labels_trusted: bool) -> None:
    if "train" not in ds.splits:
        return
    from midas_data.stream.dataset import MidasDataset

    try:
        for batch in MidasDataset(case.root, "train", batch_size=2, policy="random", seed=1):
            for b, key in enumerate(batch["key"]):
                want = case.expected["train"]["samples"][key]
                if labels_trusted:
                    assert int(batch["label"][b]) == want["label"], case.target
                for m in ("vec", "img", "aud"):
                    assert np.array_equal(batch["inputs"][m][b].numpy(), want[m]), (case.target, m)
                assert batch["inputs"]["txt"][b] == want["txt"], case.target
            if "conf" in batch:
                rows = [case.expected["features"].keys.index(k) for k in batch["key"]]
                for j, m in enumerate(ds.modalities):
                    assert np.array_equal(batch["conf"][:, j].numpy(),
                                          case.expected["features"].confs[m][rows]), case.target
    except Exception as e:  # noqa: BLE001
        _clear(e, case)


# ----------------------------------------------------------------------------- byte mutations


@st.composite
def byte_mutation(draw, size: int):
    kind = draw(st.sampled_from(["flip", "flips", "truncate", "overwrite", "zero", "delete", "insert"]))
    pos = draw(st.integers(0, max(size - 1, 0)))
    if kind == "flip":
        return kind, pos, 1 << draw(st.integers(0, 7))
    if kind == "flips":
        return kind, sorted(draw(st.lists(st.integers(0, size - 1), min_size=2, max_size=8))), 0
    if kind == "truncate":
        return kind, pos, 0
    if kind in ("overwrite", "insert"):
        return kind, pos, draw(st.binary(min_size=1, max_size=64))
    return kind, pos, draw(st.integers(1, 2048))


def apply_bytes(data: bytes, mutation) -> bytes:
    kind, pos, arg = mutation
    b = bytearray(data)
    if kind == "flip":
        b[pos] ^= arg
    elif kind == "flips":
        for p in pos:
            b[p] ^= 0xFF
    elif kind == "truncate":
        del b[pos:]
    elif kind == "overwrite":
        b[pos:pos + len(arg)] = arg
    elif kind == "insert":
        b[pos:pos] = arg
    elif kind == "zero":
        b[pos:pos + arg] = bytes(len(b[pos:pos + arg]))
    else:
        del b[pos:pos + arg]
    return bytes(b)


DATASET_FILES = ["manifest.json", "shards/train-000000.tar", "shards/train-000001.tar",
                 "shards/val-000000.tar", "index/train.arrow", "index/test.arrow",
                 "features/train.arrow"]


@fuzz(100)
@given(data=st.data())
def test_byte_corruption_of_any_dataset_file(pristine, workdir, data):
    target = data.draw(st.sampled_from(DATASET_FILES), label="file")
    case = Case(pristine, workdir, target)
    try:
        raw = case.path.read_bytes()
        mutation = data.draw(byte_mutation(len(raw)), label="mutation")
        case.path.write_bytes(apply_bytes(raw, mutation))
        if target != "features/train.arrow" and data.draw(st.booleans(), label="resign"):
            case.resigned = True
            resign(case.root)
        COUNTS[f"tried:bytes:{target.split('/')[0]}"] += 1
        exercise(case)
    finally:
        case.cleanup()


# ----------------------------------------------------------------------------- tar structure


def _members(raw: bytes) -> tuple[list[bytes], int]:
    """Each member's header-and-data blocks, and the end of the last one."""
    blocks = []
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        for m in tf.getmembers():
            end = m.offset_data + -(-m.size // 512) * 512
            blocks.append(raw[m.offset:end])
    return blocks, end


@fuzz(50)
@given(data=st.data())
def test_tar_member_reordering_loss_and_duplication(pristine, workdir, data):
    target = data.draw(st.sampled_from(["shards/train-000000.tar", "shards/train-000001.tar",
                                        "shards/test-000000.tar"]), label="shard")
    case = Case(pristine, workdir, target)
    try:
        blocks, end = _members(case.path.read_bytes())
        op = data.draw(st.sampled_from(["permute", "drop", "duplicate", "swap-two"]), label="op")
        if op == "permute":
            blocks = data.draw(st.permutations(blocks), label="order")
        elif op == "drop":
            del blocks[data.draw(st.integers(0, len(blocks) - 1), label="which")]
        elif op == "duplicate":
            i = data.draw(st.integers(0, len(blocks) - 1), label="which")
            blocks.insert(data.draw(st.integers(0, len(blocks)), label="where"), blocks[i])
        else:
            i, j = data.draw(st.lists(st.integers(0, len(blocks) - 1), min_size=2, max_size=2,
                                      unique=True), label="pair")
            blocks[i], blocks[j] = blocks[j], blocks[i]
        body = b"".join(blocks) + bytes(1024)
        case.path.write_bytes(body + bytes(-len(body) % 10240))
        case.resigned = data.draw(st.booleans(), label="resign")
        if case.resigned:
            resign(case.root)
        COUNTS[f"tried:tar:{op}"] += 1
        exercise(case)
    finally:
        case.cleanup()


# ----------------------------------------------------------------------------- Arrow tables

CASTS = [pa.float64(), pa.string(), pa.int8(), pa.uint64(), pa.large_string(), pa.binary(),
         pa.float32(), pa.int32(), pa.list_(pa.float32()), pa.bool_()]


def _read(path: Path) -> pa.Table:
    return pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()


def _write(path: Path, table: pa.Table) -> None:
    with open(path, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)


def _cast(col: pa.ChunkedArray, typ: pa.DataType) -> pa.ChunkedArray:
    try:
        return pc.cast(col, typ, safe=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # e.g. a list to a number: strings
        return pa.chunked_array([pa.array([repr(v) for v in col.to_pylist()], pa.large_string())])


@fuzz(60)
@given(data=st.data())
def test_arrow_tables_with_wrong_types_and_shapes(pristine, workdir, data):
    target = data.draw(st.sampled_from(["index/train.arrow", "index/val.arrow",
                                        "features/train.arrow"]), label="table")
    case = Case(pristine, workdir, target)
    try:
        t = _read(case.path)
        op = data.draw(st.sampled_from(["cast", "drop", "permute", "null", "slice", "metadata",
                                        "swap-columns"]), label="op")
        i = data.draw(st.integers(0, t.num_columns - 1), label="column")
        name = t.column_names[i]
        if op == "cast":
            typ = data.draw(st.sampled_from(CASTS), label="type")
            col = _cast(t.column(i), typ)
            t = t.set_column(i, pa.field(name, col.type), col)
        elif op == "drop":
            t = t.remove_column(i)
        elif op == "permute":
            order = data.draw(st.permutations(range(t.num_rows)), label="order")
            t = t.take(pa.array(order))
        elif op == "null":
            row = data.draw(st.integers(0, t.num_rows - 1), label="row")
            mask = pa.array([r == row for r in range(t.num_rows)])
            col = pc.if_else(mask, pa.scalar(None, t.column(i).type), t.column(i))
            t = t.set_column(i, t.schema.field(i), col)
        elif op == "slice":
            t = t.slice(0, data.draw(st.integers(0, t.num_rows - 1), label="rows"))
        elif op == "metadata":
            meta = dict(t.schema.metadata or {})
            if meta:
                k = data.draw(st.sampled_from(sorted(meta)), label="key")
                if data.draw(st.booleans(), label="delete"):
                    del meta[k]
                else:
                    meta[k] = data.draw(st.binary(max_size=40), label="value")
            t = t.replace_schema_metadata(meta)
        else:
            j = data.draw(st.integers(0, t.num_columns - 1), label="other")
            names = list(t.column_names)
            names[i], names[j] = names[j], names[i]
            t = t.rename_columns(names)
        _write(case.path, t)
        case.resigned = target.startswith("index/") and data.draw(st.booleans(), label="resign")
        if case.resigned:
            resign(case.root)
        COUNTS[f"tried:arrow:{op}"] += 1
        exercise(case)
    finally:
        case.cleanup()


# ----------------------------------------------------------------------------- manifest.json

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
    | st.sampled_from(["../../etc/passwd", "/etc/passwd", "index/train.arrow", "shards/x.tar",
                       "tensor", "pyd", "train", "", "npy", "png"]),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@fuzz(60)
@given(data=st.data())
def test_manifest_values_replaced_by_any_json(pristine, workdir, data):
    case = Case(pristine, workdir, "manifest.json")
    try:
        m = json.loads(case.path.read_text())
        paths = [p for p in _paths(m) if p]
        path = data.draw(st.sampled_from(paths), label="path")
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        op = data.draw(st.sampled_from(["replace", "delete"] + (["rename"] if isinstance(parent, dict) else [])),
                       label="op")
        if op == "replace":
            parent[path[-1]] = data.draw(json_values, label="value")
        elif op == "delete":
            del parent[path[-1]]
        else:
            parent[data.draw(st.text(max_size=10), label="name")] = parent.pop(path[-1])
        case.resigned = data.draw(st.booleans(), label="resign")
        if case.resigned:
            resign(case.root, m)
        else:
            case.path.write_text(json.dumps(m))
        COUNTS["tried:manifest-json:" + op] += 1
        exercise(case)
    finally:
        case.cleanup()


# ----------------------------------------------------------------------------- user manifests

cell_values = st.one_of(
    st.text(max_size=30), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "[1, 2]", "[1, [2]]", "[1,", "[\"a\", 1]", "data/missing.npy", "../x.pkl",
                     "data/evil.pyd", "/etc/passwd", "data/u0.npy", "x.png", "[1e999, 2]",
                     "[" * 50, "null", "NaN", "train", "holdout", "u1", "a.b"]),
    st.lists(st.floats(allow_nan=False, width=32), max_size=4))


def _user_project(root: Path) -> tuple[list[dict], dict]:
    (root / "data").mkdir(parents=True)
    rows, expected = [], {}
    for i in range(8):
        vec = np.arange(3, dtype=np.float32) * (i + 1)
        np.save(root / "data" / f"u{i}.npy", vec, allow_pickle=False)
        inline = [float(i), 0.5]
        rows.append({"key": f"u{i}", "label": CLASSES[i % 2], "a": f"data/u{i}.npy",
                     "b": inline, "split": ["train", "train", "val", "test"][i % 4]})
        expected[f"u{i}"] = {"label": CLASSES[i % 2], "a": vec, "b": np.asarray(inline, np.float32)}
    return rows, expected


def _write_user(path: Path, rows: list[dict]) -> list[bytes]:
    if path.suffix == ".csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
        text = buf.getvalue()
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text)
    return text.encode().splitlines()


@fuzz(60)
@given(data=st.data())
def test_user_manifests_cells_and_bytes(workdir, data):
    from midas_data.pipelines.user_manifest import read_manifest_file

    COUNTS["n"] += 1
    proj = workdir / f"u{COUNTS['n']}"
    try:
        rows, expected = _user_project(proj)
        (proj / "data" / "evil.pyd").write_bytes(b"cos\nsystem\n(S'touch PWNED'\ntR.")
        fmt = data.draw(st.sampled_from(["csv", "jsonl"]), label="format")
        path = proj / f"m.{fmt}"
        mode = data.draw(st.sampled_from(["cell", "bytes"]), label="mode")
        touched: set[str] = set()
        if mode == "cell":
            for _ in range(data.draw(st.integers(1, 3), label="cells")):
                r = data.draw(st.integers(0, len(rows) - 1), label="row")
                col = data.draw(st.sampled_from(["key", "label", "a", "b", "split"]), label="col")
                touched.add(f"u{r}")
                rows[r][col] = data.draw(cell_values, label="value")
            lines = _write_user(path, rows)
            header_ok = True
        else:
            lines = _write_user(path, rows)
            raw = path.read_bytes()
            path.write_bytes(apply_bytes(raw, data.draw(byte_mutation(len(raw)), label="mutation")))
            new_lines = path.read_bytes().splitlines()
            header_ok = fmt == "jsonl" or (bool(new_lines) and new_lines[0] == lines[0])
            intact = set(new_lines)
            body = lines[1:] if fmt == "csv" else lines
            touched = {e for e, line in zip(expected, body) if line not in intact}
        COUNTS[f"tried:user-manifest:{fmt}:{mode}"] += 1
        out = proj / "out"
        try:
            src = read_manifest_file(path)
            build_dataset(src["samples"], out, classes=src["classes"], modalities=src["modalities"],
                          progress=False)
        except Exception as e:  # noqa: BLE001
            if not isinstance(e, MidasDataError | KeyError):
                raise AssertionError(f"bare {type(e).__name__}:\n"
                                     + "".join(traceback.format_exception(e))) from e
            assert str(proj) in str(e), str(e)  # names the manifest or the payload file
            COUNTS["clear errors"] += 1
            assert not out.exists()
            return
        ds = open_dataset(out)
        assert ds.verify() == []
        for sp in ds.splits:
            sr = ds.split(sp)
            for d in sr:
                want = expected.get(d["__key__"])
                if want is None or d["__key__"] in touched or not header_ok:
                    continue
                assert ds.classes[d["label"]] == want["label"], d["__key__"]
                for m in ("a", "b"):
                    assert np.array_equal(d[m], want[m]), (d["__key__"], m)
                COUNTS["samples delivered intact"] += 1
    finally:
        shutil.rmtree(proj, ignore_errors=True)


# ----------------------------------------------------------------------------- pairs tables


@pytest.fixture(scope="module")
def pristine_pairs(pristine, tmp_path_factory) -> Pristine:
    pytest.importorskip("faiss")
    from midas_data.mining.stage import mine_misaligned

    root = tmp_path_factory.mktemp("fuzz-pairs") / "ds"
    shutil.copytree(pristine[0], root)
    mine_misaligned(root, splits=("train",), k=2, progress=False)
    from midas_data.mining.pairs import read_pairs

    return Pristine((root, {**pristine[1], "pairs": read_pairs(root, "train")}))


@settings(parent=fuzz(30), phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(data=st.data())
def test_pairs_tables_corrupted(pristine_pairs, workdir, data):
    from midas_data.mining.pairs import read_pairs
    from midas_data.stream.dataset import MidasDataset

    target = "pairs/train/part-00000-of-00001.arrow"
    case = Case(pristine_pairs, workdir, target)
    try:
        if data.draw(st.booleans(), label="bytes"):
            raw = case.path.read_bytes()
            case.path.write_bytes(apply_bytes(raw, data.draw(byte_mutation(len(raw)), label="mutation")))
        else:
            t = _read(case.path)
            i = data.draw(st.integers(0, t.num_columns - 1), label="column")
            vals = t.column(i).to_pylist()
            vals[data.draw(st.integers(0, len(vals) - 1), label="row")] = data.draw(
                st.sampled_from([-1, 1 << 40, 0, None]), label="value")
            try:
                col = pa.array(vals, t.schema.field(i).type)
            except (pa.ArrowInvalid, OverflowError, TypeError):
                col = pa.array([None if v is None else repr(v) for v in vals])
            _write(case.path, t.set_column(i, pa.field(t.column_names[i], col.type), col))
        COUNTS["tried:pairs"] += 1
        try:
            t = read_pairs(case.root, "train")
            assert t.equals(case.expected["pairs"]) or t.num_rows == case.expected["pairs"].num_rows
        except Exception as e:  # noqa: BLE001
            _clear(e, case)
        try:
            for _ in MidasDataset(case.root, "train", batch_size=2, policy="mined", seed=0):
                pass
        except Exception as e:  # noqa: BLE001
            _clear(e, case)
    finally:
        case.cleanup()
