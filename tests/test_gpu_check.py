"""The GPU check (bench/gpu_check.py, bench/gpu/): its checks catch wrong results, its
supervision kills a part at its budget, it runs from a checkout that is not installed (as
on the GPU machine), and its CPU rehearsal runs every part to the end."""

from __future__ import annotations

import json
import site
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench/ is not installed

from bench.gpu.exactness import (  # noqa: E402
    TOL,
    compare,
    guarantee,
    guarantee_ok,
    oracle_topk,
    unit_rows_float64,
)
from bench.gpu.harness import run_part  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def searched():
    """Random rows, 4 labels, and the exact different-label top-5 of 40 queries (the library's)."""
    import torch

    from midas_data.mining.knn import search_different_label

    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    y = rng.integers(0, 4, 400)
    rows = np.arange(0, 400, 10)
    D, I = search_different_label(x, y, 5, index="torch", queries=rows)
    x64 = unit_rows_float64(torch.from_numpy(x))
    Do, Io = oracle_topk(x64, torch.from_numpy(y), rows, 5, q_block=7, db_block=33)
    return x, y, rows, D, I, x64, Do, Io


def test_oracle_agrees_with_numpy_float64(searched):
    x, y, rows, _, _, _, Do, Io = searched
    xn = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    S = xn[rows] @ xn.T
    S[y[rows][:, None] == y[None, :]] = -np.inf
    np.testing.assert_allclose(Do, -np.sort(-S, axis=1)[:, :5], atol=1e-12)
    np.testing.assert_allclose(np.take_along_axis(S, Io, 1), Do, atol=1e-12)


def test_exact_result_passes_and_wrong_ones_fail(searched):
    _, y, rows, D, I, x64, Do, Io = searched
    assert compare(D, I, Do, Io, x64, rows)["exact"]
    assert guarantee_ok(guarantee(D, I, y, rows))
    # the best partner swapped for a worse row of another label: its similarity is wrong
    # and a row better than the k-th is missing
    I_bad = I.copy()
    I_bad[3, 0] = next(j for j in range(len(y)) if y[j] != y[rows[3]] and j not in I[3])
    res = compare(D, I_bad, Do, Io, x64, rows)
    assert not res["exact"] and res["max_row_error"] > TOL
    assert res["missed_strictly_better_rows"] == 1
    # a similarity off by more than the tolerance
    D_bad = D.copy()
    D_bad[5, 2] += 10 * TOL
    assert not compare(D_bad, I, Do, Io, x64, rows)["exact"]
    # a partner with the query's own label, a repeated one, an unsorted row
    I_bad = I.copy()
    I_bad[0, 4] = rows[0]
    I_bad[1, 4] = I_bad[1, 3]
    D_bad = D.copy()
    D_bad[2, [0, 1]] = D_bad[2, [1, 0]]
    g = guarantee(D_bad, I_bad, y, rows)
    assert (g["same_label"], g["duplicates"], g["not_descending"]) == (1, 1, 1)
    assert not guarantee_ok(g)


def test_a_part_past_its_budget_is_killed_and_reported(tmp_path):
    t = tmp_path / "w"
    t.mkdir()
    res = run_part("mine", ["--cpu-smoke", "--n", "200000", "--work", str(t)], 3.0, t, smoke=True)
    assert res["status"] == "timeout" and res["budget_s"] == 3.0
    assert res["wall_s"] < 30


def test_runs_from_a_checkout_that_is_not_installed():
    """What the GPU machine has: torch and numpy, not this project (no .pth processed)."""
    code = ("import sys; sys.path += " + repr(site.getsitepackages()) + "\n"
            "try:\n    import midas_data\nexcept ImportError:\n    pass\n"
            "else:\n    raise SystemExit('midas_data importable without the checkout')\n"
            f"sys.path.insert(0, {str(REPO)!r})\n"
            "from bench.gpu.harness import use_checkout\n"
            "use_checkout()\n"
            "import midas_data.trainers.run, midas_data.pipelines.cremad\n"
            "print(midas_data.trainers.run.__file__)\n")
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                       cwd="/", timeout=120)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == REPO / "trainers" / "run.py"


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu-smoke",
                        "--work", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    s = json.loads(out.read_text())
    parts = s["parts"]
    assert {p: parts[p]["status"] for p in parts} == dict.fromkeys(
        ("mine", "mine_big", "train", "extract"), "ok")
    mine = parts["mine"]
    assert mine["timing"]["complete"] and mine["timing"]["ratio_search"] > 0
    assert mine["exactness"]["exact"] and mine["exactness"]["queries"] == 300
    assert guarantee_ok(mine["guarantee"]) and mine["guarantee"]["rows"] == 3000
    assert mine["precision_variants"]["bf16"]["exact_on_sample"]
    assert parts["mine_big"]["timing"]["complete"] and parts["mine_big"]["exactness"]["exact"]
    train = parts["train"]
    assert set(train["runs"]) == {"joint_w0", "joint_w2", "midas_w0", "midas_w2"}
    assert all(run["samples_per_s"] > 0 for run in train["runs"].values())
    v = train["verdict"]
    assert v["midas_over_joint_step_w0"] > 0 and v["midas_over_joint_step_compute_only"] > 0
    assert v["joint_w0"]["bottleneck"] in ("stream", "compute")
    assert parts["extract"]["extract"]["wall_s"] > 0
    assert s["summary"][-4:] == ["mine: ok", "mine_big: ok", "train: ok", "extract: ok"]
