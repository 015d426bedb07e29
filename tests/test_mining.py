"""Different-label cosine k-NN against a float64 brute-force oracle (tolerant of ties)."""
# ruff: noqa: E741  (D, I: the FAISS names for distances and indices)

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

from midas_data.errors import MidasDataError
from midas_data.mining.knn import (
    DifferentLabelIndex,
    MiningInputError,
    gpu_available,
    recall_at_k,
    search_different_label,
)

MFEAT = Path(__file__).resolve().parents[1] / "pipelines" / "data" / "mfeat.npz"
TOL = 1e-5  # float32 inner products vs the float64 oracle


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def mfeat() -> dict[str, np.ndarray]:
    with np.load(MFEAT, allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def oracle(x, labels, queries=None):
    """float64 cosine similarities of the queries to every row, same-label rows at -inf."""
    q = np.arange(len(x)) if queries is None else np.asarray(queries)
    xn = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    S = xn[q] @ xn.T
    S[labels[q][:, None] == labels[None, :]] = -np.inf
    return S


def assert_exact(D, I, x, labels, k, queries=None):
    """D, I are an exact different-label top-k: every check allows for tied similarities."""
    q = np.arange(len(x)) if queries is None else np.asarray(queries)
    S = oracle(x, labels, q)
    assert D.shape == I.shape == (len(q), k) and D.dtype == np.float32 and I.dtype == np.int64
    assert (labels[I] != labels[q][:, None]).all(), "a partner shares the anchor's label"
    assert (np.diff(D, axis=1) <= 0).all(), "not sorted by descending similarity"
    assert all(len(set(row)) == k for row in I), "a partner repeats"
    # the reported similarity is the true cosine of the reported row ...
    np.testing.assert_allclose(D, np.take_along_axis(S, I, 1), atol=TOL)
    # ... the k values are the k best values ...
    best = -np.sort(-S, axis=1)[:, :k]
    np.testing.assert_allclose(D, best, atol=TOL)
    # ... and every row strictly better than the k-th (beyond ties) is among them
    for r in range(len(q)):
        must = np.flatnonzero(S[r] > best[r, -1] + TOL)
        assert set(must) <= set(I[r]), f"query {q[r]} misses {set(must) - set(I[r])}"


def untied(D, tol=TOL):
    """Mask of positions whose similarity is clear of both neighbours (index is unambiguous)."""
    gap = np.full(D.shape, np.inf)
    gap[:, 1:] = np.minimum(gap[:, 1:], D[:, :-1] - D[:, 1:])
    gap[:, :-1] = np.minimum(gap[:, :-1], D[:, :-1] - D[:, 1:])
    return gap > tol


def random_data(n=1200, d=24, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, classes, n)


def test_exact_random_matches_oracle():
    x, y = random_data()
    D, I = search_different_label(x, y, 7)
    assert_exact(D, I, x, y, 7)


@pytest.mark.parametrize("view", ["fac", "pix", "kar", "fou", "zer", "mor"])
def test_exact_real_mfeat_matches_oracle(mfeat, view):
    x, y = mfeat[view], mfeat["label"]
    D, I = search_different_label(x, y, 10, name=view)
    assert_exact(D, I, x, y, 10)


def test_blocks_smaller_than_n_give_the_same_result():
    x, y = random_data(n=900)
    D0, I0 = search_different_label(x, y, 6, block_size=len(x))
    for bs in (97, 8, 1):
        D, I = search_different_label(x, y, 6, block_size=bs)
        np.testing.assert_allclose(D, D0, atol=1e-6)
        mask = untied(D0)
        assert (I[mask] == I0[mask]).all()
        assert_exact(D, I, x, y, 6)


def test_queries_subset_order_and_duplicates():
    x, y = random_data(n=700)
    D0, I0 = search_different_label(x, y, 5)
    q = np.array([699, 3, 3, 250, 0])
    D, I = search_different_label(x, y, 5, queries=q)
    np.testing.assert_allclose(D, D0[q], atol=1e-6)
    assert (I[untied(D)] == I0[q][untied(D)]).all()


def test_arbitrary_label_values_float64_input_unchanged():
    x, y = random_data(n=500, classes=3)
    y = np.array([-7, 40, 1_000_000])[y]
    x64 = x.astype(np.float64) * 1e30  # huge but finite: norms must not overflow
    x64[::3] *= 1e-70  # ... and tiny ones must not underflow
    before = x64.copy()
    D, I = search_different_label(x64, y, 4)
    assert_exact(D, I, x, y, 4)
    assert np.array_equal(x64, before)


def test_index_built_once_serves_many_searches():
    x, y = random_data(n=600)
    index = DifferentLabelIndex(x, y)
    for k, q in ((3, None), (9, np.arange(0, 600, 7))):
        D, I = index.search(k, q, block_size=64)
        assert_exact(D, I, x, y, k, q)


def test_ivf_recall_and_guarantee(mfeat):
    x, y = mfeat["fac"], mfeat["label"]
    _, I_exact = search_different_label(x, y, 10)
    D, I = search_different_label(x, y, 10, approx="ivf", nlist=4, nprobe=2)
    assert (y[I] != y[:, None]).all() and (I >= 0).all()
    assert recall_at_k(I, I_exact) > 0.8
    # probing every list is an exhaustive search
    D_all, I_all = search_different_label(x, y, 10, approx="ivf", nlist=4, nprobe=4)
    assert_exact(D_all, I_all, x, y, 10)


def test_ivf_short_lists_fall_back_to_exact(caplog):
    x, y = random_data(n=800, d=8, classes=2)
    with caplog.at_level(logging.INFO, logger="midas_data.mining.knn"):
        D, I = search_different_label(x, y, 40, approx="ivf", nlist=50, nprobe=1)
    assert "searched exactly" in caplog.text  # ~8 vectors per list < k=40
    assert (I >= 0).all() and (y[I] != y[:, None]).all()
    assert np.isfinite(D).all() and (np.diff(D, axis=1) <= 0).all()


def test_recall_at_k():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_at_k(exact, exact) == 1.0
    assert recall_at_k(np.array([[3, 2, 9], [-1, -1, 6]]), exact) == pytest.approx(3 / 6)
    with pytest.raises(ValueError):
        recall_at_k(exact[:1], exact)


def _bad(x, y, k=3, match="", **kw):
    with pytest.raises(MiningInputError, match=match) as e:
        search_different_label(x, y, k, name="fac", **kw)
    return e.value


@pytest.mark.parametrize("value, what", [(np.nan, "NaN or inf"), (np.inf, "NaN or inf"),
                                         (-np.inf, "NaN or inf")])
def test_non_finite_value_names_row_and_modality(value, what):
    x, y = random_data(n=60)
    x[17, 3] = value
    err = _bad(x, y, match="modality 'fac', row 17")
    assert what in str(err) and err.row == 17


def test_all_zero_row_names_row():
    x, y = random_data(n=60)
    x[42] = 0
    err = _bad(x, y, match="row 42.*all zeros")
    assert err.row == 42


def test_k_larger_than_candidates():
    x, _ = random_data(n=13)
    y = np.array([0] * 10 + [1] * 3)
    _bad(x, y, k=4, match=r"row 0: k=4 but label 0 has only 3 rows with a different label")
    # queries of the big class only need 3; the small class has 10 candidates
    D, I = search_different_label(x, y, 4, queries=np.array([10, 11, 12]))
    assert (y[I] == 0).all()


def test_single_class():
    x, _ = random_data(n=20)
    _bad(x, np.zeros(20, np.int64), match="at least two classes")


@pytest.mark.parametrize("x, y, k, match", [
    (np.zeros((5, 3), np.int32), np.arange(5), 1, "floating point"),
    (np.ones(5, np.float32), np.arange(5), 1, "2-D"),
    (np.ones((0, 3), np.float32), np.arange(0), 1, "non-empty"),
    (np.ones((5, 3), np.float32), np.arange(4), 1, r"labels must be integers of shape \[5\]"),
    (np.ones((5, 3), np.float32), np.arange(5.0), 1, "labels must be integers"),
    (np.ones((5, 3), np.float32), np.arange(5), 0, "k must be a positive integer"),
    (np.ones((5, 3), np.float32), np.arange(5), 2.0, "k must be a positive integer"),
])
def test_wrong_dtype_or_shape(x, y, k, match):
    _bad(x, y, k=k, match=match)


def test_bad_queries_and_options():
    x, y = random_data(n=30)
    _bad(x, y, match="query 30 is out of range", queries=np.array([0, 30]))
    _bad(x, y, match="1-D integer", queries=np.array([0.5]))
    with pytest.raises(MidasDataError, match="approx"):
        search_different_label(x, y, 3, approx="hnsw")
    with pytest.raises(MidasDataError, match="index must be one of"):
        search_different_label(x, y, 3, index="tpu")


@pytest.mark.skipif(gpu_available(), reason="checks the no-GPU error")
def test_gpu_requested_without_gpu_is_a_clear_error():
    x, y = random_data(n=30)
    with pytest.raises(MidasDataError, match=r"gpu.*extra.*--index cpu"):
        search_different_label(x, y, 3, index="gpu")


@pytest.mark.skipif(gpu_available(), reason="checks the CPU fallback")
def test_auto_without_gpu_warns_and_uses_cpu():
    x, y = random_data(n=300)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        D, I = search_different_label(x, y, 5, index="auto")
    assert any("no GPU visible" in str(m.message) for m in w)
    assert_exact(D, I, x, y, 5)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU and faiss-gpu")
def test_gpu_matches_oracle(mfeat):
    x, y = mfeat["fac"], mfeat["label"]
    D, I = search_different_label(x, y, 10, index="gpu", block_size=333)
    assert_exact(D, I, x, y, 10)
    D_ivf, I_ivf = search_different_label(x, y, 10, index="gpu", approx="ivf", nlist=4, nprobe=4)
    assert_exact(D_ivf, I_ivf, x, y, 10)
