"""Different-label cosine k-NN against a float64 brute-force oracle (tolerant of ties)."""
# ruff: noqa: E741  (D, I: the FAISS names for distances and indices)

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

from midas_data.errors import MidasDataError
from midas_data.mining import knn
from midas_data.mining.knn import (
    DifferentLabelIndex,
    MiningInputError,
    cuda_available,
    gpu_available,
    recall_at_k,
    search_different_label,
)
from midas_data.mining.torch_knn import candidate_error_bound

MFEAT = Path(__file__).resolve().parents[1] / "pipelines" / "data" / "mfeat.npz"
TOL = 1e-5  # float32 inner products vs the float64 oracle


pytestmark = pytest.mark.usefixtures("one_faiss_thread", "one_torch_thread")
NO_GPU = not (gpu_available() or cuda_available())


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
    D, I = search_different_label(x, y, 10, approx="ivf", nlist=4, nprobe=4)
    assert (y[I] != y[:, None]).all() and (I >= 0).all()
    assert recall_at_k(I, I_exact) > 0.8
    # probing every list of the 9 other classes is an exhaustive search
    D_all, I_all = search_different_label(x, y, 10, approx="ivf", nlist=4, nprobe=36)
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


@pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU error")
def test_gpu_requested_without_gpu_is_a_clear_error():
    x, y = random_data(n=30)
    with pytest.raises(MidasDataError, match=r"gpu.*extra.*--index cpu"):
        search_different_label(x, y, 3, index="gpu")


@pytest.mark.skipif(not NO_GPU, reason="checks the CPU fallback")
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


# -- the torch backend ------------------------------------------------------------------
PRECISIONS = ["fp32", "tf32", "bf16"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_torch_matches_oracle(precision):
    x, y = random_data()
    index = DifferentLabelIndex(x, y, index="torch", precision=precision)
    D, I = index.search(7, block_size=301)
    assert_exact(D, I, x, y, 7)
    assert index.torch.device.type == ("cuda" if cuda_available() else "cpu")
    assert index.torch.stats["queries"] == len(x)


@pytest.mark.parametrize("view", ["fac", "kar", "mor"])
def test_torch_real_mfeat_matches_oracle(mfeat, view):
    x, y = mfeat[view], mfeat["label"]
    D, I = search_different_label(x, y, 10, index="torch", name=view)
    assert_exact(D, I, x, y, 10)


def test_torch_partners_never_share_the_label():
    # tight clusters, one per class pair: every row's nearest rows share its label, so a
    # search that leaked same-label rows would return them first
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((4, 16))
    y = np.repeat(np.arange(8), 40)
    x = (centres[y // 2] + 0.01 * rng.standard_normal((len(y), 16))).astype(np.float32)
    D, I = search_different_label(x, y, 12, index="torch", precision="bf16")
    assert (y[I] != y[:, None]).all()
    assert_exact(D, I, x, y, 12)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_torch_chunk_smaller_than_a_class_gives_the_same_result(precision):
    x, y = random_data(n=450, classes=3)  # ~150 rows per class, products of 7 rows
    D0, I0 = search_different_label(x, y, 6, index="torch", precision=precision)
    q = np.arange(0, 450, 9)
    for chunk, block, queries in ((7, 64, None), (1, 5, q), (149, 1000, None)):
        D, I = search_different_label(x, y, 6, index="torch", precision=precision,
                                      chunk_size=chunk, block_size=block, queries=queries)
        sel = slice(None) if queries is None else queries
        np.testing.assert_allclose(D, D0[sel], atol=1e-6)
        mask = untied(D0[sel])
        assert (I[mask] == I0[sel][mask]).all()
        assert_exact(D, I, x, y, 6, queries)


def test_torch_queries_subset_order_and_duplicates():
    x, y = random_data(n=700)
    D0, I0 = search_different_label(x, y, 5)  # FAISS
    q = np.array([699, 3, 3, 250, 0])
    D, I = search_different_label(x, y, 5, index="torch", queries=q, precision="bf16")
    np.testing.assert_allclose(D, D0[q], atol=1e-6)
    assert (I[untied(D)] == I0[q][untied(D)]).all()


def near_ties(n_queries=6, per_query=48, d=64, seed=5):
    """Class-0 queries, each with `per_query` class-1 rows at cosines spread over
    [0.995, 0.999]: gaps of ~1e-4, far below bf16's resolution near 1 (2^-8), plus
    random rows of classes 1 and 2."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n_queries, d))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    rows, labels = [q], [np.zeros(n_queries, np.int64)]
    for qi in q:
        u = rng.standard_normal((per_query, d))
        u -= (u @ qi)[:, None] * qi  # orthogonal to the query
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        cos = rng.permutation(np.linspace(0.995, 0.999, per_query))
        rows.append(cos[:, None] * qi + np.sqrt(1 - cos**2)[:, None] * u)
        labels.append(np.ones(per_query, np.int64))
    rows.append(rng.standard_normal((300, d)))
    labels.append(rng.integers(1, 3, 300))
    return np.concatenate(rows).astype(np.float32), np.concatenate(labels)


def test_torch_low_precision_candidates_are_reranked_to_the_exact_answer():
    import torch

    x, y = near_ties()
    k, queries = 8, np.arange(6)
    S = oracle(x, y, queries)
    # the case exposes low precision: a plain bf16 search picks other neighbours
    xb = torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True)).to(torch.bfloat16)
    S_low = (xb[:6] @ xb.T).float().numpy()
    S_low[np.isinf(S)] = -np.inf
    I_low = np.argsort(-S_low, axis=1, kind="stable")[:, :k]
    I_true = np.argsort(-S, axis=1, kind="stable")[:, :k]
    assert any(set(a) != set(b) for a, b in zip(I_low, I_true))
    assert np.ptp(np.take_along_axis(S, I_true, 1), axis=1).max() < candidate_error_bound("bf16", 64)
    # ... while the backend's re-rank (and its certificate) gives the exact one
    for precision in ("bf16", "tf32"):
        index = DifferentLabelIndex(x, y, index="torch", precision=precision)
        D, I = index.search(k, queries)
        assert_exact(D, I, x, y, k, queries)
        assert index.torch.stats["reranked"] == len(queries)


def test_torch_uncertified_queries_are_searched_again_in_fp32(caplog):
    x, y = near_ties()
    k, queries = 8, np.arange(6)
    index = DifferentLabelIndex(x, y, index="torch", precision="bf16")
    index.torch.candidates = k  # no margin: the bf16 candidates cannot be certified
    with caplog.at_level(logging.INFO, logger="midas_data.mining.knn"):
        D, I = index.search(k, queries)
    assert index.torch.stats["fallback_fp32"] == len(queries)
    assert "6 of 6 queries so far could not be certified" in caplog.text
    assert_exact(D, I, x, y, k, queries)


def test_torch_options_are_checked():
    x, y = random_data(n=60)
    with pytest.raises(MidasDataError, match="approx='ivf' needs FAISS"):
        search_different_label(x, y, 3, index="torch", approx="ivf")
    with pytest.raises(ValueError, match="precision must be one of"):
        search_different_label(x, y, 3, index="torch", precision="fp8")
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        search_different_label(x, y, 3, index="torch", chunk_size=0)


def test_gpu_without_faiss_gpu_uses_torch_on_cuda_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(knn, "gpu_available", lambda: False)
    monkeypatch.setattr(knn, "cuda_available", lambda: True)
    with caplog.at_level(logging.WARNING, logger="midas_data.mining.knn"):
        assert knn.resolve_index("gpu") == "torch"
    assert "torch backend" in caplog.text
    assert knn.resolve_index("auto") == "torch"  # torch on CUDA beats FAISS on the CPU


def test_auto_without_gpu_uses_torch_on_cpu(monkeypatch):
    monkeypatch.setattr(knn, "gpu_available", lambda: False)
    monkeypatch.setattr(knn, "cuda_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="no GPU visible.*torch backend"):
        assert knn.resolve_index("auto") == "torch"
    assert knn.resolve_index("torch") == "torch" and knn.resolve_index("cpu") == "cpu"


# -- the stage and the command line with the torch backend ------------------------------
@pytest.fixture
def mined_dataset(tiny_dataset) -> Path:
    """The tiny mfeat dataset (fac + mor) with features written for its train split."""
    from midas_data.dataset.reader import open_dataset
    from midas_data.features.tables import Features, write_features

    ds = open_dataset(tiny_dataset)
    sr = ds.split("train")
    rows = [sr.get(i) for i in range(len(sr))]
    rng = np.random.default_rng(1)
    f = Features(list(sr.keys), sr.labels.copy(),
                 {m: np.stack([r[m] for r in rows]).astype(np.float32).reshape(len(sr), -1)
                  for m in ds.modalities},
                 {m: rng.uniform(0.05, 1, len(sr)).astype(np.float32) for m in ds.modalities})
    write_features(tiny_dataset / "features" / "train.arrow", f, ds.fingerprint, "user")
    return tiny_dataset


def _pairs_by_anchor(dataset: Path) -> dict:
    """{(modality, anchor_row): set of partner rows} and the similarities, from the pairs parts."""
    from midas_data.mining.pairs import read_pairs

    t = read_pairs(dataset, "train").to_pydict()
    out: dict = {}
    for m, a, p, s in zip(t["modality"], t["anchor_row"], t["partner_row"], t["similarity"]):
        out.setdefault((m, a), []).append((round(s, 5), p))
    return {key: sorted(v, reverse=True) for key, v in out.items()}


def test_cli_index_torch_mines_what_faiss_mines(mined_dataset):
    from click.testing import CliRunner

    from midas_data.cli import main

    runner = CliRunner()
    r = runner.invoke(main, ["mine-misaligned", str(mined_dataset), "--k", "3", "--quiet"])
    assert r.exit_code == 0, r.output
    faiss_pairs = _pairs_by_anchor(mined_dataset)
    r = runner.invoke(main, ["mine-misaligned", str(mined_dataset), "--k", "3", "--quiet",
                             "--index", "torch"])
    assert r.exit_code == 0, r.output
    assert '"index": "torch"' in r.output
    torch_pairs = _pairs_by_anchor(mined_dataset)
    assert torch_pairs.keys() == faiss_pairs.keys()
    for key, pairs in torch_pairs.items():  # the same similarities; rows where not tied
        sims = [s for s, _ in pairs]
        assert sims == pytest.approx([s for s, _ in faiss_pairs[key]], abs=2e-5)
        if len(set(sims)) == len(sims):
            assert [p for _, p in pairs] == [p for _, p in faiss_pairs[key]]


@pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU error")
def test_cli_index_gpu_without_cuda_is_a_clear_error(mined_dataset):
    from click.testing import CliRunner

    from midas_data.cli import main

    r = CliRunner().invoke(main, ["mine-misaligned", str(mined_dataset), "--index", "gpu",
                                  "--quiet"])
    assert r.exit_code == 2
    assert "--index gpu" in r.output and "torch sees no CUDA device" in r.output
    assert "--index torch" in r.output


def test_torch_ranks_mine_their_slices_of_the_anchors(mined_dataset, monkeypatch):
    from midas_data.mining.pairs import read_pairs
    from midas_data.mining.stage import mine_misaligned

    sort = [("modality", "ascending"), ("anchor_row", "ascending"), ("rank", "ascending")]
    mine_misaligned(mined_dataset, k=3, index="torch", progress=False)
    whole = read_pairs(mined_dataset, "train")
    n = len(whole) // (3 * 2)  # k partners in each of two modalities per anchor
    for r in range(2):  # what torchrun sets for each rank
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("LOCAL_RANK", str(r))
        monkeypatch.setenv("WORLD_SIZE", "2")
        s = mine_misaligned(mined_dataset, k=3, index="torch", progress=False)
        lo, hi = s["splits"]["train"]["anchors"]
        assert (lo, hi) == (r * n // 2, (r + 1) * n // 2)
    parts = read_pairs(mined_dataset, "train").sort_by(sort)
    assert parts.select(["modality", "anchor_row", "partner_row"]).equals(
        whole.sort_by(sort).select(["modality", "anchor_row", "partner_row"]))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_torch_unconstrained_baseline_matches_oracle(precision):
    from midas_data.mining.torch_knn import TorchKNN

    x, _ = random_data(n=500)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    knn_all = TorchKNN(xn, np.array([0, len(x)]), "cpu", precision, chunk_size=97)
    q = np.arange(0, 500, 3)
    D, I = knn_all.search_unconstrained(q, 5)
    S = oracle(x, np.zeros(len(x), np.int64) + np.arange(len(x)), q)  # no row shares a label
    S[np.arange(len(q)), q] = 1.0  # ... but each query is its own nearest row
    best = -np.sort(-S, axis=1)[:, :5]
    np.testing.assert_allclose(D, best, atol=TOL)
    assert (I[:, 0] == q).all()
    np.testing.assert_allclose(D, np.take_along_axis(S, I, 1), atol=TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU (torch)")
@pytest.mark.parametrize("precision", PRECISIONS)
def test_torch_on_cuda_matches_oracle(mfeat, precision):
    x, y = mfeat["fac"], mfeat["label"]
    index = DifferentLabelIndex(x, y, index="torch", torch_device="cuda", precision=precision,
                                chunk_size=333)
    D, I = index.search(10, block_size=257)
    assert index.torch.device.type == "cuda"
    assert_exact(D, I, x, y, 10)
    xt, yt = near_ties()
    D, I = search_different_label(xt, yt, 8, index="torch", torch_device="cuda",
                                  precision=precision, queries=np.arange(6))
    assert_exact(D, I, xt, yt, 8, np.arange(6))
