"""The mine stage's search plan: the exact-time estimate, --approx auto, IVF recall in the metadata."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from midas_data.errors import MidasDataError
from midas_data.features.tables import table_metadata
from midas_data.mining import knn, plan
from midas_data.mining.config import MineConfig
from midas_data.mining.ivf import CrossClassIVF
from midas_data.mining.knn import DifferentLabelIndex, search_different_label
from midas_data.mining.pairs import read_pairs
from midas_data.mining.plan import choose_approx, lower_bound, mine_modality, recall_per_query
from midas_data.mining.stage import mine_misaligned
from tests.test_pairs import SORT, dataset  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_faiss_thread", "one_torch_thread")


def clustered(n=1200, d=16, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.standard_normal((classes * 6, d)).astype(np.float32) * 3
    x = centres[y * 6 + rng.integers(0, 6, n)] + rng.standard_normal((n, d)).astype(np.float32)
    return x.astype(np.float32), y


def config_of(dataset):  # noqa: F811
    return json.loads(table_metadata(read_pairs(dataset, "train"))["config"])


def test_auto_is_exact_at_or_below_the_threshold(dataset):  # noqa: F811
    s = mine_misaligned(dataset, k=3, approx="auto", approx_above=10**6, progress=False)
    info = s["splits"]["train"]
    assert info["approx"] is None and info["recall_at_k"] is None
    cfg = config_of(dataset)
    assert cfg["settings"]["approx"] == "auto" and cfg["search"]["fac"]["approx"] is None
    auto = read_pairs(dataset, "train").sort_by(SORT)
    exact = mine_misaligned(dataset, k=3, progress=False)
    assert exact["splits"]["train"]["approx"] is None
    assert read_pairs(dataset, "train").sort_by(SORT).equals(auto)


def test_auto_picks_ivf_above_the_threshold_and_stores_recall(dataset, monkeypatch):  # noqa: F811
    # this tiny set may need every list for the recall; the IVF path is what is tested
    monkeypatch.setattr(plan, "exact_instead", lambda *a: False)
    s = mine_misaligned(dataset, k=3, approx="auto", approx_above=10, progress=False)
    info = s["splits"]["train"]
    assert info["approx"] == "ivf"
    meta = table_metadata(read_pairs(dataset, "train"))
    cfg = json.loads(meta["config"])
    assert meta["index"] == "cpu-ivf" and cfg["settings"]["approx"] == "auto"
    assert set(cfg["recall_at_k"]) == {"fac", "mor"} and cfg["recall_at_k"] == info["recall_at_k"]
    for m in ("fac", "mor"):
        srch = cfg["search"][m]
        assert srch["approx"] == "ivf" and 0 <= srch["recall_at_k"] <= 1
        assert srch["recall_anchors"] > 0 and srch["nprobe"] and srch["nlist"]
        assert srch["recall_target_met"] == (srch["recall_at_k"] >= 0.95)


def test_exact_instead_only_for_auto_with_a_calibrated_nprobe_that_reads_every_list():
    assert plan.exact_instead("auto", None, True)
    assert not plan.exact_instead("auto", None, False)
    assert not plan.exact_instead("ivf", None, True)  # IVF asked for by name: kept
    assert not plan.exact_instead("auto", 8, True)  # an explicit nprobe: kept


def test_choose_approx():
    assert choose_approx("auto", 100, 100, "cpu", True) is None
    assert choose_approx("auto", 101, 100, "cpu", True) == "ivf"
    assert choose_approx("auto", 101, 100, "gpu", False) is None  # exact is fast on a GPU
    assert choose_approx("auto", 101, 100, "torch", True) is None  # IVF needs FAISS
    assert choose_approx(None, 10**9, 100, "cpu", True) is None
    assert choose_approx("ivf", 5, 100, "cpu", True) == "ivf"
    with pytest.raises(ValueError, match="approx"):
        MineConfig(approx="hnsw")


def test_estimate_printed_before_the_search_and_suggestion(dataset, capsys):  # noqa: F811
    s = mine_misaligned(dataset, k=3, approx_above=10, progress=True)
    err = capsys.readouterr().err
    est = err.index("modality 'fac': exact search of")
    assert "estimated at" in err[est:est + 200]
    assert "--approx ivf (or --approx auto)" in err  # above the threshold without --approx
    assert s["splits"]["train"]["estimate_exact_s"]["fac"] > 0
    assert config_of(dataset)["search"]["mor"]["probe_anchors"] > 0


def test_estimate_scales_the_probe_by_inner_products():
    x, y = clustered(n=900)
    q = np.arange(900)
    _, _, info = mine_modality(x, y, 5, "cpu", q, approx=None, approx_above=10**6, nlist=None,
                               nprobe=None, recall_target=0.95, recall_queries=90,
                               rng=np.random.default_rng(0))
    counts = np.bincount(y)
    sample_share = 90 * (900 - counts.mean())  # ~ uniform classes
    ratio = info["estimate_exact_s"] / info["probe_s"]
    assert ratio == pytest.approx((900 * 900 - (counts ** 2).sum()) / sample_share, rel=0.15)


def test_exact_plan_equals_direct_search():
    x, y = clustered()
    q = np.arange(100, 1100, dtype=np.int64)
    D, I, info = mine_modality(x, y, 7, "cpu", q, approx="auto", approx_above=10**6, nlist=None,
                               nprobe=None, recall_target=0.95, recall_queries=123,
                               rng=np.random.default_rng(3))
    D0, I0 = search_different_label(x, y, 7, queries=q)
    assert info["approx"] is None
    np.testing.assert_array_equal(I, I0)
    np.testing.assert_array_equal(D, D0)


def test_low_recall_raises_nprobe_until_the_target():
    x, y = clustered()
    q = np.arange(1200, dtype=np.int64)
    D, I, info = mine_modality(x, y, 10, "cpu", q, approx="ivf", approx_above=0, nlist=16,
                               nprobe=None, recall_target=1.0, recall_queries=200,
                               rng=np.random.default_rng(0))
    tried = [t["nprobe"] for t in info["calibration"]]
    assert tried == sorted(tried) and len(tried) > 1  # started below the target, then raised
    assert info["calibration"][0]["recall_at_k"] < 1.0
    assert (info["calibration"][-1]["recall_at_k"] == 1.0
            or info["nprobe"] == info["nprobe_exhaustive"])
    assert info["recall_at_k"] == 1.0 and info["recall_target_met"]


def test_auto_searches_exactly_when_the_recall_needs_every_list():
    rng = np.random.default_rng(0)  # isotropic: no cluster structure for IVF to use
    x, y = rng.standard_normal((1500, 32)).astype(np.float32), rng.integers(0, 3, 1500)
    q = np.arange(1500, dtype=np.int64)
    D, I, info = mine_modality(x, y, 10, "cpu", q, approx="auto", approx_above=0, nlist=8,
                               nprobe=None, recall_target=1.0, recall_queries=200,
                               rng=np.random.default_rng(0))
    assert info["approx"] is None and "nprobe" not in info
    assert info["ivf_not_used"]["calibration"][-1]["nprobe"] == 16  # every other-class list
    D0, I0 = search_different_label(x, y, 10, queries=q)
    np.testing.assert_array_equal(I, I0)
    np.testing.assert_array_equal(D, D0)


def test_recall_below_target_with_a_fixed_nprobe_warns_and_is_recorded():
    x, y = clustered()
    q = np.arange(1200, dtype=np.int64)
    with pytest.warns(RuntimeWarning, match="below the target 1.0"):
        _, I, info = mine_modality(x, y, 10, "cpu", q, approx="ivf", approx_above=0, nlist=32,
                                   nprobe=1, recall_target=1.0, recall_queries=200,
                                   rng=np.random.default_rng(0))
    assert [t["nprobe"] for t in info["calibration"]] == [1]  # an explicit nprobe is kept
    assert info["recall_at_k"] < 1.0 and not info["recall_target_met"]
    assert (y[I] != y[q][:, None]).all()  # the different-label guarantee holds anyway
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a reachable target: no warning
        mine_modality(x, y, 10, "cpu", q, approx="ivf", approx_above=0, nlist=32, nprobe=32,
                      recall_target=0.9, recall_queries=200, rng=np.random.default_rng(0))


def test_calibration_keeps_a_margin_below_the_sample_recall():
    per_query = np.array([1.0] * 90 + [0.5] * 10)
    assert lower_bound(per_query) < per_query.mean() == 0.95
    assert lower_bound(np.ones(50)) == 1.0
    assert recall_per_query(np.array([[1, 2, -1], [4, 5, 6]]), np.array([[1, 2, 3], [6, 5, 4]])
                            ).tolist() == [2 / 3, 1.0]


def oracle(xn, y, rows, k):
    """float64 brute force: similarities and rows of the k most similar other-label rows."""
    S = xn[rows].astype(np.float64) @ xn.T.astype(np.float64)
    S[y[rows][:, None] == y[None, :]] = -np.inf
    top = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S, top, 1), top


def cross_ivf(x, y, nlist, nprobe):
    index = DifferentLabelIndex(x, y)  # its normalised, class-sorted rows
    return index, CrossClassIVF(index.xs, index.bounds, nlist, nprobe)


def test_cross_class_ivf_probing_every_other_list_is_exact():
    x, y = clustered()
    index, ivf = cross_ivf(x, y, nlist=9, nprobe=27)
    assert ivf.exhaustive_nprobe == 27  # 3 other classes x 9 lists
    rows = np.arange(len(y))
    D, I = ivf.search(index.xs, index.cls[index.order], 5)
    want, _ = oracle(index.xs, index.cls[index.order], rows, 5)
    np.testing.assert_allclose(-np.sort(-D, axis=1), want, atol=1e-5)
    S = np.einsum("ij,ikj->ik", index.xs.astype(np.float64), index.xs[I].astype(np.float64))
    np.testing.assert_allclose(S, D, atol=1e-5)  # D is the similarity of the row it names


def test_ivf_blocks_shrink_with_nprobe_and_give_the_same_result(monkeypatch):
    x, y = clustered()
    index = DifferentLabelIndex(x, y, approx="ivf", nlist=9, nprobe=20)
    want = index.search(5)
    monkeypatch.setattr(knn, "_CANDIDATE_BUDGET", 20 * 5 * 64)  # 64 queries per block
    calls = []
    search = index._cross.search
    monkeypatch.setattr(index._cross, "search", lambda *a: calls.append(len(a[0])) or search(*a))
    got = index.search(5)
    assert max(calls) == 64 and sum(calls) == len(y)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_ivf_settings_of_an_exact_index_are_a_clear_error():
    index = DifferentLabelIndex(*clustered())
    for get in (index.ivf_lists, lambda: index.nprobe, lambda: index.set_nprobe(3)):
        with pytest.raises(MidasDataError, match="exact index has no IVF lists"):
            get()


def test_cross_class_ivf_never_probes_the_query_class():
    x, y = clustered()
    index, ivf = cross_ivf(x, y, nlist=9, nprobe=40)  # more than the other classes hold
    assert ivf.nprobe == ivf.exhaustive_nprobe == 27  # capped: blocks are sized from it
    cq = index.cls[index.order]
    _, I = ivf.search(index.xs, cq, 8)
    assert (I >= 0).all() and (cq[I] != cq[:, None]).all()


def test_cross_class_ivf_spends_its_probes_on_the_class_that_holds_the_neighbours():
    # class 0 sits next to class 1 and far from class 2: every different-label neighbour of a
    # class-0 row is in class 1, so probing as many lists as class 1 has finds them all, where
    # a fixed share per class would spend half the probes on class 2
    rng = np.random.default_rng(0)
    d, m = 16, 300
    base = rng.standard_normal(d).astype(np.float32) * 4
    x = np.concatenate([base + rng.standard_normal((m, d)), base + 0.5 + rng.standard_normal((m, d)),
                        -base + rng.standard_normal((m, d))]).astype(np.float32)
    y = np.repeat([0, 1, 2], m)
    index, ivf = cross_ivf(x, y, nlist=4, nprobe=4)
    xs_rows = np.flatnonzero(index.cls[index.order] == 0)
    D, I = ivf.search(index.xs[xs_rows], np.zeros(m, np.int64), 10)
    want, want_rows = oracle(index.xs, index.cls[index.order], xs_rows, 10)
    assert (index.cls[index.order][I] == 1).all()
    np.testing.assert_allclose(-np.sort(-D, axis=1), want, atol=1e-5)
