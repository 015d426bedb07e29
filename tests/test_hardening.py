"""A hostile or careless user: concurrent writers, full disks, damaged checkpoints, resuming on
other data, edited pairs and indexes, odd labels, long keys, out-of-range options, one class,
paths leading out of the manifest's folder, and progress bars in log files.

Each case ends in correct results, or in a one-line `error: ...` (exit status 2, no traceback
unless --debug) that names the file and says what to do, with every good artifact intact.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_samples
from crafting import manifest as read_manifest_json
from crafting import read_index, resign, set_index_value, write_manifest

from midas_data import MidasDataError, Sample, build_dataset, open_dataset
from midas_data.cli import main
from midas_data.dataset.manifest import MAX_KEY_CHARS
from midas_data.errors import SchemaError, StaleArtifactError
from midas_data.features.extract import extract_features
from midas_data.features.tables import META_PREFIX, read_features, table_content_sha256
from midas_data.locking import OWNER_FILE, lock_path, owner_is_gone
from midas_data.mining.pairs import PAIRS_SCHEMA, part_path, read_pairs
from midas_data.mining.stage import mine_misaligned

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLI = str(Path(sys.executable).with_name("midas-data"))
TRAIN = ["--epochs", "2", "--warmup-epochs", "1", "--batch-size", "32", "--device", "cpu",
         "--optimizer", "adam", "--lr", "0.01", "--quiet"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_clean_error(r, *names: str, code: int = 2) -> str:
    """Exit status `code`, an `error:` line naming each of `names`, no traceback."""
    out = r.output if hasattr(r, "output") else r.stderr
    exit_code = r.exit_code if hasattr(r, "exit_code") else r.returncode
    assert exit_code == code, out
    assert "Traceback" not in out, out
    line = next((ln for ln in out.splitlines() if ln.startswith("error: ")), None)
    assert line is not None, out
    for n in names:
        assert n in line, (n, line)
    return line


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def build_tiny(out: Path, source: dict, split_seed: int = 0, per_class: int = 10) -> Path:
    build_dataset(tiny_samples(source, per_class), out, classes=source["classes"],
                  modalities=["fac", "mor"], shard_max_count=16, split_seed=split_seed,
                  progress=False)
    return out


@pytest.fixture(scope="module")
def mined(tmp_path_factory, mfeat_source) -> Path:
    """A tiny dataset with features (1 warm-up epoch) and k=4 pairs of the train split.
    Read-only: tests copy it."""
    root = build_tiny(tmp_path_factory.mktemp("hard") / "ds", mfeat_source)
    extract_features(root, warmup_epochs=1, feature_dim=8, progress=False)
    mine_misaligned(root, k=4, progress=False)
    return root


@pytest.fixture
def ds(mined, tmp_path) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(mined, root)
    return root


# ------------------------------------------------------------------ 1. two writers on one output
HOLD = """
import sys, time
from midas_data.locking import output_lock
with output_lock(sys.argv[1], "test holder"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold_lock(target: Path, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(target), str(seconds)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


@pytest.mark.parametrize("command", ["build-shards", "extract", "mine-misaligned"])
def test_a_second_writer_refuses_while_another_holds_the_output(ds, command, tmp_path):
    holder = _hold_lock(ds, 60)
    try:
        before = snapshot(ds)
        args = {"build-shards": ["build-shards", "--modalities", "fac,mor", "--out", ds,
                                 "--overwrite", "--quiet"],
                "extract": ["extract", ds, "--warmup-epochs", "1", "--device", "cpu", "--quiet"],
                "mine-misaligned": ["mine-misaligned", ds, "--quiet"]}[command]
        env = {**os.environ, "MIDAS_DATA_LOCK_WAIT": "0.5", "OMP_NUM_THREADS": "1"}
        r = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, env=env,
                           timeout=120)
        assert_clean_error(r, str(ds), "another midas-data run", f"pid {holder.pid}",
                           "MIDAS_DATA_LOCK_WAIT")
        assert snapshot(ds) == before  # nothing of the holder's output touched
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_dies_with_its_process_and_a_waiting_writer_proceeds(ds):
    holder = _hold_lock(ds, 2)  # lets go after 2 s; the writer waits up to 60 s
    env = {**os.environ, "MIDAS_DATA_LOCK_WAIT": "60", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([CLI, "mine-misaligned", str(ds), "--k", "3", "--quiet"],
                       capture_output=True, text=True, env=env, timeout=120)
    holder.wait()
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["k"] == 3
    assert read_pairs(ds, "train").num_rows == 70 * 2 * 3
    holder = _hold_lock(ds, 60)
    holder.kill()  # kill -9: the OS drops the lock with the process
    holder.wait()
    mine_misaligned(ds, k=2, progress=False)


def test_two_concurrent_builds_into_one_output_both_succeed_in_turn(tmp_path):
    out = tmp_path / "ds"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MIDAS_DATA_LOCK_WAIT": "300"}
    args = [CLI, "build-shards", "--modalities", "fac,mor", "--out", str(out), "--overwrite",
            "--shard-samples", "50", "--quiet"]
    runs = [subprocess.Popen(args + ["--split-seed", str(seed)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env) for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    assert all(code == 0 for code, _ in results), results
    ds = open_dataset(out)
    assert ds.manifest["split_seed"] in (1, 2) and ds.verify() == []
    assert not list(tmp_path.glob(".ds.*"))  # no temp dir left by either


def test_only_temp_dirs_of_gone_owners_are_removed(tmp_path, make_tiny_dataset):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    owners = {".ds.live.tmp": {"pid": alive.pid, "host": socket.gethostname()},
              ".ds.dead.tmp": {"pid": dead.pid, "host": socket.gethostname()},
              ".ds.remote.tmp": {"pid": dead.pid, "host": "another-host.example"}}
    try:
        for name, owner in owners.items():
            (tmp_path / name).mkdir()
            (tmp_path / name / OWNER_FILE).write_text(json.dumps(owner))
        assert [owner_is_gone(tmp_path / n) for n in owners] == [False, True, False]
        make_tiny_dataset(tmp_path / "ds")
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == [".ds.live.tmp", ".ds.remote.tmp", "ds"]
        assert not (tmp_path / "ds" / OWNER_FILE).exists()  # the record never ships
    finally:
        alive.kill()
        alive.wait()


def test_the_lock_file_lives_outside_the_users_folders(tmp_path):
    assert tmp_path not in lock_path(tmp_path / "ds").parents
    assert lock_path(tmp_path / "ds") == lock_path(tmp_path / "x" / ".." / "ds")


# ------------------------------------------------------------------ 2. disk full
@pytest.fixture
def full_disk_under(monkeypatch):
    """Make fsync of any file under the given folders fail with ENOSPC (as a full disk does)."""
    real = os.fsync
    prefixes: list[str] = []

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if any(target.startswith(p) for p in prefixes) and os.path.isfile(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return prefixes


def test_disk_full_in_build_shards_keeps_the_old_dataset(ds, full_disk_under):
    before = snapshot(ds)
    full_disk_under.append(str(ds.parent / f".{ds.name}."))  # the build's temp dir
    r = cli("build-shards", "--modalities", "fac,mor", "--out", ds, "--overwrite", "--quiet")
    line = assert_clean_error(r, "build-shards", str(ds), "no space left", "needs about", "free")
    assert "previous files are unchanged" in line
    assert snapshot(ds) == before
    assert not list(ds.parent.glob(f".{ds.name}.*"))


def test_disk_full_in_extract_keeps_the_old_features(ds, full_disk_under):
    before = snapshot(ds)
    full_disk_under.append(str(ds / "features"))
    r = cli("extract", ds, "--warmup-epochs", "1", "--feature-dim", "8", "--device", "cpu",
            "--quiet")
    assert_clean_error(r, "extract", str(ds / "features"), "needs about")
    assert snapshot(ds) == before


def test_disk_full_in_mining_keeps_the_old_pairs(ds, full_disk_under):
    before = snapshot(ds)
    full_disk_under.append(str(ds / "pairs"))
    r = cli("mine-misaligned", ds, "--k", "3", "--quiet")
    assert_clean_error(r, "mine-misaligned", str(ds / "pairs" / "train"), "needs about")
    assert snapshot(ds) == before


def test_disk_full_at_a_checkpoint_keeps_the_old_one(ds, tmp_path, full_disk_under):
    out = tmp_path / "run"
    assert cli("train", ds, out, *TRAIN).exit_code == 0
    before = (out / "last.pt").read_bytes()
    full_disk_under.append(str(out / ".last.pt."))  # the checkpoint's temp file
    r = cli("train", ds, out, *TRAIN, "--restart")
    line = assert_clean_error(r, "train (checkpoint)", str(out / "last.pt"), "needs about")
    size = int(float(line.split("needs about ")[1].split()[0]) * 1000)  # KB
    assert abs(size - len(before)) < 0.05 * len(before)  # the size it needed, not a guess
    assert (out / "last.pt").read_bytes() == before


# ------------------------------------------------------------------ 3. damaged checkpoints
@pytest.fixture(scope="module")
def trained(mined, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    assert cli("train", mined, out, *TRAIN).exit_code == 0
    return out


@pytest.mark.parametrize("damage", ["random-bytes", "empty", "truncated", "not-a-dict"])
def test_a_damaged_checkpoint_is_named_and_restart_is_offered(mined, trained, tmp_path, damage):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    last = out / "last.pt"
    good = last.read_bytes()
    if damage == "random-bytes":
        last.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "empty":
        last.write_bytes(b"")
    elif damage == "truncated":
        last.write_bytes(good[: len(good) // 2])
    else:
        torch.save([1, 2, 3], last)
    r = cli("train", mined, out, *TRAIN, "--resume")
    assert_clean_error(r, str(last), "--restart")
    assert "weights_only" not in r.output and "Aborted" not in r.output
    r = cli("train", mined, out, *TRAIN, "--restart")
    assert r.exit_code == 0, r.output
    assert torch.load(last, weights_only=True)["epoch"] == 1


def test_resume_and_restart_exclude_each_other(mined, trained):
    r = cli("train", mined, trained, *TRAIN, "--resume", "--restart")
    assert r.exit_code == 2 and "exclude each other" in r.output


# ------------------------------------------------------------------ 4. resume on other data
def test_resume_on_another_dataset_is_refused(mined, trained, tmp_path, mfeat_source):
    other = build_tiny(tmp_path / "other", mfeat_source, split_seed=1)
    assert [len(open_dataset(other).split(s)) for s in ("train", "val", "test")] == \
        [len(open_dataset(mined).split(s)) for s in ("train", "val", "test")]
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = (out / "last.pt").read_bytes()
    r = cli("train", other, out, *TRAIN, "--resume")
    assert_clean_error(r, str(out / "last.pt"), "inputs.dataset", "--restart")
    assert (out / "last.pt").read_bytes() == before


def test_resume_on_other_features_is_refused(ds, trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    extract_features(ds, warmup_epochs=1, feature_dim=8, seed=5, progress=False)
    r = cli("train", ds, out, *TRAIN, "--resume")
    assert_clean_error(r, "inputs.features")


def test_resume_on_other_pairs_is_refused(ds, tmp_path):
    out = tmp_path / "run"
    assert cli("train", ds, out, *TRAIN, "--policy", "mined").exit_code == 0
    assert torch.load(out / "last.pt", weights_only=True)["inputs"]["pairs"]
    mine_misaligned(ds, k=3, progress=False)
    r = cli("train", ds, out, *TRAIN, "--policy", "mined", "--resume")
    assert_clean_error(r, str(out / "last.pt"), "inputs.pairs", "--restart")


def test_checkpoints_record_what_they_trained_on(mined, trained):
    ck = torch.load(trained / "last.pt", weights_only=True)
    assert ck["inputs"]["dataset"] == open_dataset(mined).fingerprint
    assert ck["inputs"]["features"] == read_features(mined / "features" / "train.arrow").fingerprint
    from midas_data.trainers import artifacts

    with pytest.raises(StaleArtifactError, match="inputs.pairs"):
        artifacts.check_inputs({**ck["inputs"], "pairs": "a" * 64}, ck["inputs"], trained / "last.pt")
    old = {**ck, "format_version": 1}
    old.pop("inputs")
    torch.save(old, trained.parent / "old.pt")
    with pytest.raises(MidasDataError, match="format 1.*--restart"):
        artifacts.load_checkpoint(trained.parent / "old.pt")


# ------------------------------------------------------------------ 5. pairs and features content
def _rewrite_part(root: Path, edit, resign_content: bool) -> Path:
    path = part_path(root, "train", 0, 1)
    t = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()  # not mapped: rewritten
    t = edit(t)
    meta = dict(t.schema.metadata)
    if resign_content:
        meta[f"{META_PREFIX}content_sha256".encode()] = table_content_sha256(
            t, PAIRS_SCHEMA.names).encode()
    t = t.replace_schema_metadata(meta)
    with open(path, "wb") as f, pa.ipc.new_file(f, t.schema) as w:
        w.write_table(t)
    return path


def _same_label_other_row(t: pa.Table) -> pa.Table:
    """partner_row of row 0 moved to another sample of the partner's class: labels stay right."""
    p = t.column("partner_row").to_numpy().copy()
    pl = t.column("partner_label").to_numpy()
    al = t.column("anchor_label").to_numpy()
    a = t.column("anchor_row").to_numpy()
    row_label = dict(zip(a.tolist(), al.tolist()))
    other = next(r for r, lab in row_label.items() if lab == pl[0] and r != p[0])
    p[0] = other
    i = t.column_names.index("partner_row")
    return t.set_column(i, t.schema.field(i), pa.array(p))


@pytest.mark.parametrize("resign_content", [False, True], ids=["flipped", "flipped-and-resigned"])
def test_a_changed_partner_row_is_caught_by_reader_stream_and_verify(ds, resign_content):
    from midas_data.stream.dataset import MidasDataset

    path = _rewrite_part(ds, _same_label_other_row, resign_content)
    what = "partner_row" if resign_content else "content_sha256"
    with pytest.raises(SchemaError, match=what) as info:
        read_pairs(ds, "train")
    assert str(path) in str(info.value)
    with pytest.raises(SchemaError, match=what):
        MidasDataset(ds, "train", batch_size=8, policy="mined")
    r = cli("inspect", ds, "--verify")
    assert r.exit_code == 1 and what in r.output and str(path) in r.output


def test_pairs_without_a_checksum_are_stale(ds):
    path = part_path(ds, "train", 0, 1)
    t = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()  # not mapped: rewritten
    meta = {k: v for k, v in t.schema.metadata.items() if not k.endswith(b"content_sha256")}
    t = t.replace_schema_metadata(meta)
    with open(path, "wb") as f, pa.ipc.new_file(f, t.schema) as w:
        w.write_table(t)
    with pytest.raises(StaleArtifactError, match="content_sha256.*mine-misaligned"):
        read_pairs(ds, "train")


def test_a_changed_feature_value_is_caught_by_verify(ds):
    path = ds / "features" / "val.arrow"
    t = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()  # not mapped: rewritten
    i = t.column_names.index("conf.fac")
    conf = t.column(i).to_numpy().copy()
    conf[3] = 0.5 if conf[3] != 0.5 else 0.25
    t = t.set_column(i, t.schema.field(i), pa.array(conf))
    with open(path, "wb") as f, pa.ipc.new_file(f, t.schema) as w:
        w.write_table(t)
    r = cli("inspect", ds, "--verify")
    assert r.exit_code == 1 and "val.arrow" in r.output and "features_fingerprint" in r.output
    assert "verify: 1 problem(s)" in r.output


def test_verify_passes_an_intact_dataset_with_features_and_pairs(mined):
    r = cli("inspect", mined, "--verify")
    assert r.exit_code == 0 and "features and pairs their checksums" in r.output


# ------------------------------------------------------------------ 6. mandatory index digests
def test_a_missing_index_digest_is_an_error(ds):
    m = read_manifest_json(ds)
    del m["splits"]["val"]["index_sha256"]
    write_manifest(ds, m)
    r = cli("inspect", ds)
    assert_clean_error(r, "manifest.json", "splits.val.index_sha256", "mandatory")


def test_a_changed_index_is_refused_even_with_its_digest_re_signed(ds):
    labels = read_index(ds, "train").column("label").to_pylist()
    set_index_value(ds, "train", "label", 0, (labels[0] + 1) % 10)
    with pytest.raises(MidasDataError, match="sha256 does not match"):
        open_dataset(ds).split("train")
    m = read_manifest_json(ds)
    from midas_data.dataset.manifest import file_sha256

    m["splits"]["train"]["index_sha256"] = file_sha256(ds / "index" / "train.arrow")
    write_manifest(ds, m)  # digest re-signed, fingerprint not: another dataset
    with pytest.raises(SchemaError, match="fingerprint"):
        open_dataset(ds)
    resign(ds)  # a forger who re-signs everything makes another dataset: features go stale
    with pytest.raises(StaleArtifactError, match="rerun `midas-data extract`"):
        read_features(ds / "features" / "train.arrow", open_dataset(ds).fingerprint)


def test_a_format_1_dataset_is_told_to_rebuild(ds):
    m = read_manifest_json(ds)
    m["format_version"] = 1
    write_manifest(ds, m)
    r = cli("inspect", ds)
    assert_clean_error(r, "format_version", "rebuild", "--overwrite")


# ------------------------------------------------------------------ 7. labels
def _manifest_rows(folder: Path, labels: list[object]) -> list[dict]:
    rows = []
    for i, lab in enumerate(labels):
        rows.append({"key": f"s{i}", "label": lab, "a": f"[{i}, 1.0]", "b": f"[{i % 3}]"})
    return rows


def test_non_utf8_csv_label_is_refused_with_its_row(tmp_path):
    path = tmp_path / "m.csv"
    lines = ["key,label,a,b"] + [f"s{i},{'cat' if i % 2 else 'dog'},{i},{i % 3}" for i in range(8)]
    data = ("\n".join(lines) + "\n").encode().replace(b"s5,cat", b"s5,c\xe4t")
    path.write_bytes(data)
    r = cli("build-shards", "--manifest", path, "--out", tmp_path / "out", "--quiet")
    assert_clean_error(r, str(path), "row 6", "label", "UTF-8")
    assert not (tmp_path / "out").exists()


def test_utf8_csv_labels_and_parquet_binary_labels_are_text(tmp_path):
    path = tmp_path / "m.csv"
    lines = ["key,label,a,b"] + [f"s{i},{'café' if i % 2 else 'dog'},{i},{i % 3}" for i in range(10)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert cli("build-shards", "--manifest", path, "--out", tmp_path / "csv", "--quiet").exit_code == 0
    assert open_dataset(tmp_path / "csv").classes == ["café", "dog"]
    pq.write_table(pa.table({"key": [f"s{i}" for i in range(10)],
                             "label": pa.array([b"cat" if i % 2 else b"dog" for i in range(10)],
                                               pa.binary()),
                             "a": [float(i) for i in range(10)], "b": [1.0] * 10}),
                   tmp_path / "m.parquet")
    r = cli("build-shards", "--manifest", tmp_path / "m.parquet", "--out", tmp_path / "pq", "--quiet")
    assert r.exit_code == 0, r.output
    assert open_dataset(tmp_path / "pq").classes == ["cat", "dog"]


def test_non_utf8_parquet_binary_label_is_refused_with_its_row(tmp_path):
    labels = [b"cat", b"dog"] * 4
    labels[3] = b"\xff\xfe"
    pq.write_table(pa.table({"key": [f"s{i}" for i in range(8)], "label": pa.array(labels, pa.binary()),
                             "a": [float(i) for i in range(8)], "b": [1.0] * 8}), tmp_path / "m.parquet")
    r = cli("build-shards", "--manifest", tmp_path / "m.parquet", "--out", tmp_path / "o", "--quiet")
    assert_clean_error(r, "m.parquet", "row 4", "label", "UTF-8")


# ------------------------------------------------------------------ 8. one key-length limit
def _samples_with_key(source: dict, key: str) -> list[Sample]:
    samples = tiny_samples(source, 3)
    s = samples[0]
    samples[0] = Sample(key, s.label, s.payloads, s.split, s.source)
    return samples


def test_the_longest_allowed_key_builds_and_verifies(tmp_path, mfeat_source):
    out = tmp_path / "ds"
    build_dataset(_samples_with_key(mfeat_source, "k" * MAX_KEY_CHARS), out,
                  classes=mfeat_source["classes"], modalities=["fac", "mor"], progress=False)
    r = cli("inspect", out, "--verify")
    assert r.exit_code == 0, r.output
    d = open_dataset(out)
    assert "k" * MAX_KEY_CHARS in [k for sp in d.splits for k in d.split(sp).keys]


def test_a_longer_key_is_refused_by_the_builder_and_the_reader(tmp_path, mfeat_source):
    with pytest.raises(SchemaError, match=f"at most {MAX_KEY_CHARS}"):
        build_dataset(_samples_with_key(mfeat_source, "k" * (MAX_KEY_CHARS + 1)), tmp_path / "x",
                      classes=mfeat_source["classes"], modalities=["fac", "mor"], progress=False)
    out = tmp_path / "ds"
    build_dataset(tiny_samples(mfeat_source, 3), out, classes=mfeat_source["classes"],
                  modalities=["fac", "mor"], progress=False)
    set_index_value(out, "train", "key", 0, "k" * (MAX_KEY_CHARS + 1))
    resign(out)
    with pytest.raises(SchemaError, match=f"1..{MAX_KEY_CHARS} letters"):
        open_dataset(out).split("train")
    assert_clean_error(cli("inspect", out, "--verify"), "train.arrow", f"1..{MAX_KEY_CHARS}")


# ------------------------------------------------------------------ 9. option ranges
NO_CUDA = not torch.cuda.is_available()


@pytest.mark.parametrize("args, names", [
    (["build-shards", "--option", "foo=1"], ["'foo'", "no --option at all"]),
    (["build-shards", "--pipeline", "av_digits", "--option", "nois=1"], ["'nois'", "noise_std", "seed"]),
    (["build-shards", "--shard-samples", "-1"], ["--shard-samples", "-1"]),
    (["build-shards", "--shard-mb", "0"], ["--shard-mb"]),
    (["build-shards", "--split-seed", "-1"], ["--split-seed"]),
    (["extract", "{ds}", "--batch-size", "0"], ["--batch-size"]),
    (["extract", "{ds}", "--batch-size", "-1"], ["--batch-size"]),
    (["extract", "{ds}", "--feature-dim", "0"], ["--feature-dim"]),
    (["extract", "{ds}", "--lr", "-1"], ["--lr"]),
    (["extract", "{ds}", "--warmup-epochs", "-2"], ["--warmup-epochs"]),
    (["train", "{ds}", "{out}", "--epochs", "0"], ["--epochs"]),
    (["mine-misaligned", "{ds}", "--approx", "ivf", "--nprobe", "-1"], ["--nprobe"]),
    (["extract", "{ds}", "--seed", "-1"], ["--seed"]),
    (["mine-misaligned", "{ds}", "--seed", "-1"], ["--seed"]),
    (["train", "{ds}", "{out}", "--seed", "-1"], ["--seed"]),
    (["demo", "--out", "{out}", "--epochs", "0"], ["--epochs"]),
])
def test_out_of_range_options_are_refused_before_any_work(ds, tmp_path, args, names):
    before = snapshot(ds)
    args = [a.format(ds=ds, out=tmp_path / "run") for a in args]
    if args[0] == "build-shards":
        args += ["--out", str(ds), "--overwrite", "--quiet"]
    r = cli(*args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    for n in names:
        assert n in r.output, (n, r.output)
    assert snapshot(ds) == before and not (tmp_path / "run").exists()


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["extract", "train"])
def test_cuda_without_cuda_is_refused(ds, tmp_path, command):
    before = snapshot(ds)
    args = ["extract", ds] if command == "extract" else ["train", ds, tmp_path / "run"]
    r = cli(*args, "--device", "cuda")
    assert_clean_error(r, "cuda", "CUDA is not available", "--device cpu")
    assert snapshot(ds) == before


def test_the_python_api_checks_the_same_ranges(tmp_path, mfeat_source):
    from midas_data.trainers.config import TrainConfig

    from midas_data.features.config import ExtractConfig
    from midas_data.mining.config import MineConfig
    from midas_data.options import SettingError

    samples = tiny_samples(mfeat_source, 3)
    for kw in ({"shard_max_count": -1}, {"shard_max_mb": 0}, {"split_seed": -1}):
        with pytest.raises(SettingError):
            build_dataset(samples, tmp_path / "x", progress=False, **kw)
    for cls, kw in ((ExtractConfig, {"batch_size": 0}), (ExtractConfig, {"lr": -1.0}),
                    (ExtractConfig, {"warmup_epochs": -2}), (ExtractConfig, {"device": "gpu0"}),
                    (MineConfig, {"nprobe": -1}), (TrainConfig, {"epochs": 0}),
                    (TrainConfig, {"device": "tpu"}), (TrainConfig, {"momentum": 1.5})):
        with pytest.raises(SettingError):
            cls(**kw)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ 10. one class
def test_one_class_builds_but_midas_refuses_and_joint_trains(tmp_path, mfeat_source):
    samples = [Sample(s.key, "only", s.payloads, s.split, s.source)
               for s in tiny_samples(mfeat_source, 3)]
    out = tmp_path / "one"
    build_dataset(samples, out, modalities=["fac", "mor"], progress=False)
    r = cli("train", out, tmp_path / "midas", *TRAIN)
    assert_clean_error(r, "train.arrow", "'only'", "at least two", "joint")
    r = cli("train", out, tmp_path / "joint", *TRAIN, "--method", "joint")
    assert r.exit_code == 0, r.output
    extract_features(out, warmup_epochs=1, feature_dim=4, progress=False)
    r = cli("mine-misaligned", out, "--quiet")
    assert_clean_error(r, "train.arrow", "at least two classes")


# ------------------------------------------------------------------ 12. files outside the folder
def _user_manifest(folder: Path, a_values: dict[int, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    rows = []
    for i in range(10):
        np.save(folder / "data" / f"v{i}.npy", np.full(3, i, np.float32))
        rows.append({"key": f"u{i}", "label": "ab"[i % 2], "a": a_values.get(i, f"data/v{i}.npy"),
                     "b": f"[{i}]"})
    path = folder / "m.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["key", "label", "a", "b"])
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink"])
def test_paths_leaving_the_manifests_folder_are_refused_unless_allowed(tmp_path, case):
    secret = tmp_path / "outside" / "secret.npy"
    secret.parent.mkdir()
    np.save(secret, np.full(3, 42, np.float32))
    proj = tmp_path / "proj"
    value = {"dotdot": "../outside/secret.npy", "absolute": str(secret),
             "symlink": "data/link.npy"}[case]
    path = _user_manifest(proj, {4: value})
    if case == "symlink":
        (proj / "data" / "link.npy").symlink_to(secret)
    r = cli("build-shards", "--manifest", path, "--out", tmp_path / "o", "--quiet")
    assert_clean_error(r, str(path), "'u4'", "outside the manifest's folder", "--allow-outside-paths")
    assert not (tmp_path / "o").exists()
    r = cli("build-shards", "--manifest", path, "--out", tmp_path / "o", "--allow-outside-paths",
            "--quiet")
    assert r.exit_code == 0, r.output
    sample = next(s for sp in ("train", "val", "test")
                  for s in open_dataset(tmp_path / "o").split(sp) if s["__key__"] == "u4")
    assert sample["a"].tolist() == [42, 42, 42]


def test_inside_paths_absolute_or_relative_are_fine(tmp_path):
    proj = tmp_path / "proj"
    path = _user_manifest(proj, {1: str(proj / "data" / "v1.npy"), 2: "./data/../data/v2.npy"})
    r = cli("build-shards", "--manifest", path, "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("value", ["data/v3.npz", "v3.nyp", "data/img.pnj", "clip.wave"])
def test_a_mistyped_extension_is_refused_not_stored_as_text(tmp_path, value):
    path = _user_manifest(tmp_path / "proj", {3: value})
    r = cli("build-shards", "--manifest", path, "--out", tmp_path / "o", "--quiet")
    assert_clean_error(r, str(path), "'u3'", repr(value), "not a payload type")


def test_text_and_numbers_that_are_not_paths_stay_values(tmp_path):
    from midas_data.pipelines.user_manifest import _looks_like_path

    for text in ("a cat on a mat.", "3.14", "[1.0, 2.5]", "hello", "e.g. this one"):
        assert not _looks_like_path(text), text
    for text in ("x.png", "a/b", "scan.nii", "dir\\file.txt"):
        assert _looks_like_path(text), text


# ------------------------------------------------------------------ --debug and progress in logs
def test_debug_shows_the_traceback_and_the_default_one_line(tmp_path):
    missing = tmp_path / "nothing"
    missing.mkdir()
    r = subprocess.run([CLI, "inspect", str(missing)], capture_output=True, text=True, timeout=60)
    assert_clean_error(r, str(missing / "manifest.json"), "build-shards")
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([CLI, "--debug", "inspect", str(missing)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "Traceback" in r.stderr and "MidasDataError" in r.stderr


def test_progress_in_a_log_file_is_a_few_lines(tmp_path, mined):
    """stderr to a file (not a terminal): a handful of bar redraws per bar, not one per update."""
    log = tmp_path / "log.txt"
    root = tmp_path / "ds"
    shutil.copytree(mined, root)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        r = subprocess.run([CLI, "build-shards", "--modalities", "fac,mor", "--out",
                            str(tmp_path / "b"), "--shard-samples", "100"], stderr=f,
                           stdout=subprocess.DEVNULL, env=env, timeout=300)
        assert r.returncode == 0
        r = subprocess.run([CLI, "extract", str(root), "--warmup-epochs", "30", "--batch-size",
                            "8", "--feature-dim", "8", "--device", "cpu"], stderr=f,
                           stdout=subprocess.DEVNULL, env=env, timeout=300)
        assert r.returncode == 0
    text = log.read_text()
    redraws = text.count("\r") + text.count("\n")
    assert "build-shards" in text and "warm-up fac" in text  # bars are still shown
    # 7 bars (build-shards, read train/val/test, warm-up fac/mor, ...): a few redraws each;
    # on a terminal the 30-epoch warm-ups and 2000-sample build alone redraw hundreds of times
    assert redraws <= 40, (redraws, text[-2000:])


def test_the_lock_wait_setting_is_checked(monkeypatch, tmp_path):
    from midas_data.locking import output_lock

    monkeypatch.setenv("MIDAS_DATA_LOCK_WAIT", "soon")
    with pytest.raises(MidasDataError, match="MIDAS_DATA_LOCK_WAIT"), \
            output_lock(tmp_path / "x", "test"):
        pass
