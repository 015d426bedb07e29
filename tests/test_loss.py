"""Tests for midas_data.loss.terms against float64 references written from docs/METHOD.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from midas_data.loss import (
    AlphaStats,
    accumulate,
    aligned_loss,
    hard_sample_weight,
    hard_weight_from_similarity,
    mean_replaced_similarity,
    midas_loss_by_class,
    midas_total_loss,
    misaligned_loss,
    misaligned_top2_correct,
    modality_weights,
    normalised_confidences,
    source_rows,
    strong_modality,
    unimodal_confidence,
    update_alpha,
    weak_and_strong,
    weak_modality,
)

SEEDS = [0, 1, 2]
MODALITIES = [2, 3]


# ----- plain-Python references (no torch, no code shared with the implementation) -----


def ref_softmax(row):
    mx = max(row)
    e = [math.exp(v - mx) for v in row]
    s = sum(e)
    return [v / s for v in e]


def ref_cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def ref_misaligned_loss(logits, labels, conf, a, h):
    """mean_n h_n * sum_m a_m * (c_nm / sum c_n) * -log softmax(z_n)[y_nm]."""
    total = 0.0
    for n in range(len(logits)):
        p = ref_softmax(logits[n])
        csum = sum(conf[n])
        row = sum(a[m] * conf[n][m] / csum * -math.log(p[labels[n][m]]) for m in range(len(a)))
        total += (1.0 if h is None else h[n]) * row
    return total / len(logits)


def random_rows(rng, n, m, c):
    """Misaligned rows: m source labels with at least two distinct, confidences in (0,1)."""
    labels = rng.integers(0, c, size=(n, m))
    for row in labels:
        while len(set(row.tolist())) < 2:
            row[rng.integers(0, m)] = rng.integers(0, c)
    conf = rng.uniform(0.01, 1.0, size=(n, m))
    logits = rng.normal(0, 2, size=(n, c))
    return logits, labels, conf


# ----- confidences and weights -----


@pytest.mark.parametrize("seed", SEEDS)
def test_unimodal_confidence_matches_softmax_at_true_label(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(7, 5))
    y = rng.integers(0, 5, size=7)
    lt = torch.tensor(logits, requires_grad=True)
    got = unimodal_confidence(lt, torch.tensor(y))
    assert not got.requires_grad
    want = [ref_softmax(list(logits[i]))[y[i]] for i in range(7)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("m", MODALITIES)
@pytest.mark.parametrize("seed", SEEDS)
def test_normalised_confidences_divide_by_row_sum(seed, m):
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.0, 1.0, size=(6, m))
    got = normalised_confidences(torch.tensor(conf)).numpy()
    for n in range(6):
        s = sum(conf[n])
        for j in range(m):
            assert got[n, j] == pytest.approx(conf[n, j] / s, rel=1e-12)


def test_normalised_confidences_two_modalities_is_paper_w1():
    c1_i, c2_j = 0.8, 0.3
    got = normalised_confidences(torch.tensor([[c1_i, c2_j]], dtype=torch.float64))
    assert got[0, 0].item() == pytest.approx(c1_i / (c1_i + c2_j), rel=1e-12)
    assert got[0, 1].item() == pytest.approx(1 - c1_i / (c1_i + c2_j), rel=1e-12)


def test_normalised_confidences_zero_row_is_uniform():
    """The one rule for a row without evidence: 1/M each, so every row sums to 1."""
    got = normalised_confidences(torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.0, 0.6]], dtype=torch.float64))
    assert torch.isfinite(got).all()
    assert torch.equal(got[0], torch.full((3,), 1 / 3, dtype=torch.float64))
    assert torch.allclose(got[1], torch.tensor([0.25, 0.0, 0.75], dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.equal(normalised_confidences(torch.zeros(1, 2)), torch.tensor([[0.5, 0.5]]))
    assert torch.isnan(normalised_confidences(torch.tensor([[float("nan"), 0.5]]))).all(), \
        "a missing confidence must not pass for a zero one"


def test_normalised_confidences_tiny_rows_still_sum_to_one():
    got = normalised_confidences(torch.tensor([[1e-300, 3e-300]], dtype=torch.float64))
    assert got[0].tolist() == pytest.approx([0.25, 0.75], rel=1e-12)


@pytest.mark.parametrize("m", MODALITIES)
def test_source_rows_take_the_swapped_modality_from_the_partner(m):
    rng = np.random.default_rng(m)
    anchor, swapped, partner = rng.integers(0, 9, 12), rng.integers(0, m, 12), rng.integers(0, 9, 12)
    got = source_rows(*(torch.from_numpy(a) for a in (anchor, swapped, partner)), m)
    want = [[partner[n] if k == swapped[n] else anchor[n] for k in range(m)] for n in range(12)]
    assert got.tolist() == want


@pytest.mark.parametrize("seed", SEEDS)
def test_hard_sample_weight_is_one_plus_half_shifted_cosine(seed):
    rng = np.random.default_rng(seed)
    fa, fb = rng.normal(size=(9, 4)), rng.normal(size=(9, 4))
    got = hard_sample_weight(torch.tensor(fa), torch.tensor(fb)).numpy()
    want = [1 + (ref_cosine(fa[i], fb[i]) + 1) / 2 for i in range(9)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert (got >= 1).all() and (got <= 2).all()


def test_hard_sample_weight_extremes_are_one_and_two():
    f = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    assert hard_sample_weight(f, f).tolist() == pytest.approx([2.0, 2.0])
    assert hard_sample_weight(f, -f).tolist() == pytest.approx([1.0, 1.0])
    # Stored similarities a hair past 1 still give h in [1, 2].
    assert hard_weight_from_similarity(torch.tensor([1.0000001, -1.0000001])).tolist() == [2.0, 1.0]


@pytest.mark.parametrize("seed", SEEDS)
def test_mean_replaced_similarity_averages_cosine_over_replaced_modalities(seed):
    rng = np.random.default_rng(seed)
    dims = [3, 5, 4]
    anchor = [rng.normal(size=(6, d)) for d in dims]
    source = [rng.normal(size=(6, d)) for d in dims]
    replaced = rng.random((6, 3)) < 0.5
    replaced[:, 1] |= ~replaced.any(axis=1)  # every row replaces at least one modality
    got = mean_replaced_similarity([torch.tensor(a) for a in anchor],
                                   [torch.tensor(s) for s in source], torch.tensor(replaced))
    for n in range(6):
        cos = [ref_cosine(anchor[m][n], source[m][n]) for m in range(3) if replaced[n, m]]
        assert got[n].item() == pytest.approx(sum(cos) / len(cos), rel=1e-12)


def test_mean_replaced_similarity_with_one_swap_equals_pair_cosine():
    g = torch.Generator().manual_seed(0)
    a1, a2, b2 = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    replaced = torch.tensor([[False, True]] * 5)
    s = mean_replaced_similarity([a1, a2], [a1, b2], replaced)
    torch.testing.assert_close(hard_weight_from_similarity(s), hard_sample_weight(a2, b2))


def test_mean_replaced_similarity_rejects_row_without_swap():
    f = [torch.randn(2, 3), torch.randn(2, 3)]
    with pytest.raises(ValueError):
        mean_replaced_similarity(f, f, torch.tensor([[True, False], [False, False]]))


@pytest.mark.parametrize("m", MODALITIES)
def test_modality_weights_put_alpha_on_weak_term_only(m):
    for weak in range(m):
        got = modality_weights(m, weak, 1.35).tolist()
        assert got == pytest.approx([1.35 if j == weak else 1.0 for j in range(m)])
    with pytest.raises(ValueError):
        modality_weights(m, m, 1.0)


# ----- misaligned loss -----


@pytest.mark.parametrize("use_h", [False, True])
@pytest.mark.parametrize("m", MODALITIES)
@pytest.mark.parametrize("seed", SEEDS)
def test_misaligned_loss_matches_loop_reference(seed, m, use_h):
    rng = np.random.default_rng(seed)
    logits, labels, conf = random_rows(rng, 8, m, 6)
    a = [1.0] * m
    a[int(rng.integers(0, m))] = 1.4
    h = rng.uniform(1, 2, size=8) if use_h else None
    got = misaligned_loss(
        torch.tensor(logits), torch.tensor(labels), normalised_confidences(torch.tensor(conf)),
        torch.tensor(a, dtype=torch.float64), None if h is None else torch.tensor(h))
    want = ref_misaligned_loss(logits.tolist(), labels.tolist(), conf.tolist(), a, h)
    assert got.item() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
def test_misaligned_loss_over_a_and_b_rows_equals_paper_batch_mean(seed):
    """Rows A=(x1_i, x2_j) and B=(x1_j, x2_i) for each anchor: mean over 2B rows equals
    mean_i (h_A loss_A + h_B loss_B) / 2 with the paper's per-sample losses."""
    rng = np.random.default_rng(seed)
    bsz, c = 6, 5
    y = rng.integers(0, c, size=bsz)
    perm = rng.permutation(bsz)
    c1, c2 = rng.uniform(0.05, 1, size=bsz), rng.uniform(0.05, 1, size=bsz)
    z_a, z_b = rng.normal(size=(bsz, c)), rng.normal(size=(bsz, c))
    h_a, h_b = rng.uniform(1, 2, size=bsz), rng.uniform(1, 2, size=bsz)
    alpha, weak = 1.3, 1
    a = [1.0, alpha]  # modality 2 weak
    paper = 0.0
    for i in range(bsz):
        j = perm[i]
        pa, pb = ref_softmax(list(z_a[i])), ref_softmax(list(z_b[i]))
        w1 = c1[i] / (c1[i] + c2[j])  # A keeps x1_i, takes x2_j
        loss_a = a[0] * w1 * -math.log(pa[y[i]]) + a[1] * (1 - w1) * -math.log(pa[y[j]])
        v1 = c1[j] / (c1[j] + c2[i])  # B takes x1_j, keeps x2_i
        loss_b = a[0] * v1 * -math.log(pb[y[j]]) + a[1] * (1 - v1) * -math.log(pb[y[i]])
        paper += (h_a[i] * loss_a + h_b[i] * loss_b) / 2
    paper /= bsz
    labels = np.concatenate([np.stack([y, y[perm]], 1), np.stack([y[perm], y], 1)])
    conf = np.concatenate([np.stack([c1, c2[perm]], 1), np.stack([c1[perm], c2], 1)])
    got = misaligned_loss(
        torch.tensor(np.concatenate([z_a, z_b])), torch.tensor(labels),
        normalised_confidences(torch.tensor(conf)),
        modality_weights(2, weak, alpha, dtype=torch.float64),
        torch.tensor(np.concatenate([h_a, h_b])))
    assert got.item() == pytest.approx(paper, rel=1e-10)


def ref_ce(logits, labels, weight):
    """sum_b w_b * -log softmax(z_b)[y_b] / sum_b w_b (0 when no row weighs anything)."""
    total = sum(weight)
    if total == 0:
        return 0.0
    return sum(w * -math.log(ref_softmax(z)[y]) for z, y, w in zip(logits, labels, weight)) / total


def fused_head_loss(logits_by_class, labels, *rest):
    """`midas_loss_by_class` of the fused head alone (no unimodal columns): (loss, ce, l_mis)."""
    loss, l_uni, ce, l_mis = midas_loss_by_class(torch.log_softmax(logits_by_class, dim=0), labels, 0, *rest)
    assert l_uni.item() == 0.0
    return loss, ce, l_mis


@pytest.mark.parametrize("lam", [1.0, 0.7, 0.0])
@pytest.mark.parametrize("fill", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_fused_head_loss_matches_the_two_references(seed, fill, lam):
    """One classes-first output of the fused head gives CE + lam * L_mis, and the two terms,
    as the float64 loop references compute them; fill rows (weight 0) count nowhere."""
    rng = np.random.default_rng(seed)
    b, n, m, c = 7, 9, 2 + seed % 2, 5
    aligned = rng.normal(0, 2, size=(b, c))
    y = rng.integers(0, c, size=b)
    mis, labels, conf = random_rows(rng, n, m, c)
    a = [1.0] * m
    a[int(rng.integers(0, m))] = 1.3
    h = rng.uniform(1, 2, size=n)
    weight = np.ones(b)
    if fill:
        weight[-2:] = 0.0
    by_class = torch.tensor(np.concatenate([aligned, mis]).T.copy())
    loss, ce, l_mis = fused_head_loss(
        by_class, torch.tensor(y), torch.tensor(labels), normalised_confidences(torch.tensor(conf)),
        torch.tensor(a, dtype=torch.float64), torch.tensor(h), lam, torch.tensor(weight) if fill else None)
    want_ce = ref_ce(aligned.tolist(), y.tolist(), weight.tolist())
    want_mis = ref_misaligned_loss(mis.tolist(), labels.tolist(), conf.tolist(), a, h)
    assert ce.item() == pytest.approx(want_ce, rel=1e-10)
    assert l_mis.item() == pytest.approx(want_mis, rel=1e-10)
    assert loss.item() == pytest.approx(want_ce + lam * want_mis, rel=1e-10)
    assert not ce.requires_grad and not l_mis.requires_grad


@pytest.mark.parametrize("lam", [1.0, 0.7, 0.0])
def test_fused_head_loss_gradient_equals_the_two_losses(lam):
    """Its gradient is that of aligned_loss + lam * misaligned_loss on the two row blocks,
    fill rows and a batch without misaligned rows included."""
    rng = np.random.default_rng(5)
    b, n, m, c = 6, 8, 3, 4
    logits = torch.tensor(rng.normal(0, 2, size=(b + n, c)), requires_grad=True)
    y = torch.tensor(rng.integers(0, c, size=b))
    _, labels, conf = random_rows(rng, n, m, c)
    w = normalised_confidences(torch.tensor(conf))
    a, h = modality_weights(m, 1, 1.2, dtype=torch.float64), torch.tensor(rng.uniform(1, 2, size=n))
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    for rows in (n, 0):
        z = logits[: b + rows]
        got = torch.autograd.grad(fused_head_loss(
            z.t(), y, torch.tensor(labels[:rows]), w[:rows], a, h[:rows], lam, weight)[0], logits)[0]
        plain = aligned_loss(z[:b], {"label": y, "weight": weight})
        if rows:
            plain = plain + lam * misaligned_loss(z[b:], torch.tensor(labels), w, a, h)
        want = torch.autograd.grad(plain, logits)[0]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_fused_head_loss_of_no_real_row_is_an_attached_zero():
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss, ce, l_mis = fused_head_loss(
        z, torch.tensor([0, 1, 2, 0]), torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2, dtype=torch.float64),
        torch.ones(2, dtype=torch.float64), None, 1.0, torch.zeros(4, dtype=torch.float64))
    assert loss.item() == 0.0 and ce.item() == 0.0 and l_mis.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("lam", [1.0, 0.7, 0.0])
@pytest.mark.parametrize("weights", ["none", "fill", "no-real-row"])
@pytest.mark.parametrize("heads", [0, 1, 2, 3])
def test_midas_loss_by_class_matches_the_references(heads, weights, lam):
    """From one log-softmax over every head's columns: L_uni (the mean over the heads of
    each head's weighted-mean CE), CE and lam * L_mis as the float64 loop references give
    them, each returned term too; fill rows count nowhere; no real row: attached zeros."""
    rng = np.random.default_rng(heads * 10 + len(weights))
    b, n, m, c = 6, 8, 2 + heads % 2, 5
    uni = [rng.normal(0, 2, size=(b, c)) for _ in range(heads)]
    aligned = rng.normal(0, 2, size=(b, c))
    y = rng.integers(0, c, size=b)
    mis, labels, conf = random_rows(rng, n, m, c)
    a, h = [1.0] * m, rng.uniform(1, 2, size=n)
    a[1] = 1.25
    weight = {"none": np.ones(b), "fill": np.array([1, 1, 0, 1, 1, 0.0]), "no-real-row": np.zeros(b)}[weights]
    logits = torch.tensor(np.concatenate([*uni, aligned, mis]).T.copy(), requires_grad=True)
    loss, l_uni, ce, l_mis = midas_loss_by_class(
        torch.log_softmax(logits, dim=0), torch.tensor(y), heads, torch.tensor(labels),
        normalised_confidences(torch.tensor(conf)), torch.tensor(a, dtype=torch.float64), torch.tensor(h), lam,
        None if weights == "none" else torch.tensor(weight))
    want_uni = sum(ref_ce(z.tolist(), y.tolist(), weight.tolist()) for z in uni) / heads if heads else 0.0
    want_ce = ref_ce(aligned.tolist(), y.tolist(), weight.tolist())
    want_mis = ref_misaligned_loss(mis.tolist(), labels.tolist(), conf.tolist(), a, h)
    assert l_uni.item() == pytest.approx(want_uni, rel=1e-10, abs=1e-12)
    assert ce.item() == pytest.approx(want_ce, rel=1e-10, abs=1e-12)
    assert l_mis.item() == pytest.approx(want_mis, rel=1e-10)
    assert loss.item() == pytest.approx(want_uni + want_ce + lam * want_mis, rel=1e-10)
    assert not (l_uni.requires_grad or ce.requires_grad or l_mis.requires_grad)
    # the gradient is that of the terms written out with the library's per-head losses
    got = torch.autograd.grad(loss, logits)[0]
    z = logits.t()
    batch = {"label": torch.tensor(y), "weight": torch.tensor(weight)}
    plain = aligned_loss(z[heads * b:(heads + 1) * b], batch)
    if heads:
        plain = plain + torch.stack([aligned_loss(z[k * b:(k + 1) * b], batch) for k in range(heads)]).mean()
    if lam:
        plain = plain + lam * misaligned_loss(z[(heads + 1) * b:], torch.tensor(labels),
                                              normalised_confidences(torch.tensor(conf)),
                                              torch.tensor(a, dtype=torch.float64), torch.tensor(h))
    torch.testing.assert_close(got, torch.autograd.grad(plain, logits)[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("lam", [1.0, 0.5, 0.001])
def test_midas_loss_by_class_without_misaligned_rows_logs_an_exact_zero(lam):
    """L_mis is summed over its own columns: no rows, exactly 0 (not the rounding left over
    from a difference of totals)."""
    rng = np.random.default_rng(1)
    logits = torch.tensor(rng.normal(0, 3, size=(5, 3 * 16)))
    _, _, _, l_mis = midas_loss_by_class(
        torch.log_softmax(logits, dim=0), torch.tensor(rng.integers(0, 5, size=16)), 2,
        torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2, dtype=torch.float64),
        torch.ones(2, dtype=torch.float64), None, lam)
    assert l_mis.item() == 0.0


def test_midas_loss_by_class_names_the_shapes_it_needs():
    with pytest.raises(ValueError, match="midas_loss_by_class"):  # 2 heads need 3 * B columns at least
        midas_loss_by_class(torch.zeros(3, 5), torch.zeros(2, dtype=torch.int64), 2,
                            torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2), torch.ones(2))


def test_misaligned_loss_gradcheck_wrt_logits():
    rng = np.random.default_rng(3)
    logits, labels, conf = random_rows(rng, 5, 3, 4)
    lt = torch.tensor(logits, requires_grad=True)
    w = normalised_confidences(torch.tensor(conf))
    a = modality_weights(3, 2, 1.2, dtype=torch.float64)
    h = torch.tensor(rng.uniform(1, 2, size=5))
    assert torch.autograd.gradcheck(
        lambda z: misaligned_loss(z, torch.tensor(labels), w, a, h), (lt,))


def test_no_gradient_reaches_features_through_hard_weight_or_confidence():
    g = torch.Generator().manual_seed(0)
    fa = torch.randn(4, 3, generator=g, requires_grad=True)
    fb = torch.randn(4, 3, generator=g, requires_grad=True)
    uni_logits = torch.randn(4, 5, generator=g, requires_grad=True)
    h = hard_sample_weight(fa, fb)
    conf = unimodal_confidence(uni_logits, torch.tensor([0, 1, 2, 3]))
    assert not h.requires_grad and not conf.requires_grad
    z = torch.randn(4, 5, generator=g, requires_grad=True)
    src_conf = torch.stack([conf, torch.rand(4, generator=g)], 1)
    loss = misaligned_loss(z, torch.tensor([[0, 1], [1, 2], [2, 3], [3, 4]]),
                           normalised_confidences(src_conf), modality_weights(2, 0, 1.5), h)
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert fa.grad is None and fb.grad is None and uni_logits.grad is None


def test_misaligned_loss_empty_batch_is_zero_with_grad():
    z = torch.randn(0, 4, requires_grad=True)
    loss = misaligned_loss(z, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2),
                           modality_weights(2, 0, 1.0), torch.zeros(0))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert z.grad is not None and z.grad.shape == (0, 4)


def test_misaligned_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        misaligned_loss(torch.randn(3, 4), torch.zeros(3, 2, dtype=torch.long),
                        torch.ones(3, 3), torch.ones(2))


# ----- total loss -----


def test_total_loss_is_fused_plus_mean_unimodal_plus_lambda_mis():
    fused, u1, u2, u3, mis = (torch.tensor(v, requires_grad=True) for v in (0.7, 1.1, 2.3, 0.5, 0.9))
    t = midas_total_loss(fused, [u1, u2, u3], mis, lam=5.0, warmup=False)
    assert t.unimodal.item() == pytest.approx((1.1 + 2.3 + 0.5) / 3)
    assert t.total.item() == pytest.approx(0.7 + (1.1 + 2.3 + 0.5) / 3 + 5.0 * 0.9)
    t.total.backward()
    assert mis.grad.item() == pytest.approx(5.0) and fused.grad.item() == pytest.approx(1.0)


def test_total_loss_in_warmup_is_unimodal_only():
    fused, u1, u2, mis = (torch.tensor(v, requires_grad=True) for v in (0.7, 1.0, 2.0, 0.9))
    t = midas_total_loss(fused, [u1, u2], mis, lam=1.0, warmup=True)
    assert t.total.item() == pytest.approx(1.5)
    t.total.backward()
    assert fused.grad is None and mis.grad is None and u1.grad.item() == pytest.approx(0.5)
    t2 = midas_total_loss(None, torch.tensor([1.0, 2.0]), None, lam=1.0, warmup=True)
    assert t2.total.item() == pytest.approx(1.5) and t2.fused.item() == 0.0


def test_total_loss_without_misaligned_rows_and_missing_fused_after_warmup():
    t = midas_total_loss(torch.tensor(0.5), [torch.tensor(1.0)], None, lam=2.0, warmup=False)
    assert t.total.item() == pytest.approx(1.5) and t.misaligned.item() == 0.0
    with pytest.raises(ValueError):
        midas_total_loss(None, [torch.tensor(1.0)], None, lam=1.0, warmup=False)


# ----- weak modality and alpha -----


def test_weak_and_strong_differ_with_the_first_index_on_ties():
    assert weak_and_strong([0.9, 0.4]) == (1, 0)
    assert weak_and_strong([0.6, 0.7, 0.2]) == (2, 1)
    assert weak_and_strong([0.5, 0.5]) == (0, 1), "all equal: weak is the first, strong the next"
    assert weak_and_strong([0.3, 0.8, 0.8]) == (0, 1)
    assert weak_and_strong([0.2, 0.2, 0.9]) == (0, 2)
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = rng.random(4)
        assert weak_and_strong(v) == (int(np.argmin(v)), int(np.argmax(v)))
    with pytest.raises(ValueError, match="two or more"):
        weak_and_strong([0.4])


def test_weak_modality_is_argmin_and_strong_is_argmax():
    assert weak_modality([0.9, 0.4]) == 1
    assert weak_modality(torch.tensor([0.3, 0.8, 0.5])) == 0
    assert weak_modality([0.6, 0.7, 0.2]) == 2
    assert strong_modality([0.6, 0.7, 0.2]) == 1
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = rng.random(4)
        assert weak_modality(v.tolist()) == int(np.argmin(v))


def test_alpha_increases_by_eta_when_fused_overweights_strong():
    # fused ratio 0.8/0.1 = 8 > unimodal ratio 0.6/0.3 = 2
    s = AlphaStats(fused_strong=0.8, fused_weak=0.1, uni_strong=0.6, uni_weak=0.3, count=1)
    assert update_alpha(1.0, s) == pytest.approx(1.05)
    assert update_alpha(1.5, s, eta=0.2) == pytest.approx(1.7)


def test_alpha_decreases_by_eta_otherwise_and_never_below_one():
    # fused ratio 0.4/0.4 = 1 < unimodal ratio 2
    s = AlphaStats(fused_strong=0.4, fused_weak=0.4, uni_strong=0.6, uni_weak=0.3, count=1)
    assert update_alpha(1.5, s) == pytest.approx(1.45)
    assert update_alpha(1.5, s, eta=0.3) == pytest.approx(1.2)
    assert update_alpha(1.02, s) == 1.0
    assert update_alpha(1.0, s) == 1.0


def test_alpha_tie_takes_the_else_branch_and_empty_stats_do_not_move_it():
    tie = AlphaStats(fused_strong=0.6, fused_weak=0.3, uni_strong=0.4, uni_weak=0.2, count=1)
    assert update_alpha(1.5, tie) == pytest.approx(1.45)
    assert update_alpha(1.5, AlphaStats()) == 1.5


@pytest.mark.parametrize("seed", SEEDS)
def test_alpha_rule_equals_paper_sign_form_with_normalised_means(seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        ps, pw, cs, cw = rng.uniform(0.01, 1, size=4)
        alpha, eta = float(rng.uniform(1, 3)), float(rng.uniform(0.01, 0.5))
        p_weak_n, c_weak_n = pw / (ps + pw), cw / (cs + cw)
        paper = max(1.0, alpha + eta * float(np.sign(c_weak_n - p_weak_n)))
        got = update_alpha(alpha, AlphaStats(ps, pw, cs, cw, 1), eta=eta)
        assert got == pytest.approx(paper, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_accumulate_sums_fused_probs_and_confidences_of_distinct_label_rows(seed):
    rng = np.random.default_rng(seed)
    n, c = 10, 4
    logits = rng.normal(size=(n, c))
    ys, yw = rng.integers(0, c, size=n), rng.integers(0, c, size=n)
    cs, cw = rng.random(n), rng.random(n)
    want = [0.0, 0.0, 0.0, 0.0, 0]
    for i in range(n):
        if ys[i] == yw[i]:
            continue
        p = ref_softmax(list(logits[i]))
        want = [want[0] + p[ys[i]], want[1] + p[yw[i]], want[2] + cs[i], want[3] + cw[i], want[4] + 1]
    t = [torch.tensor(v) for v in (logits, ys, yw, cs, cw)]
    got = accumulate(AlphaStats(), *t)
    assert got.count == want[4]
    assert [got.fused_strong, got.fused_weak, got.uni_strong, got.uni_weak] == pytest.approx(want[:4])
    # Accumulating two halves equals one pass; stats are immutable values.
    half = accumulate(AlphaStats(), *(x[:5] for x in t))
    both = accumulate(half, *(x[5:] for x in t))
    assert half.count <= 5 and both.count == got.count
    assert both.fused_strong == pytest.approx(got.fused_strong)
    assert both.uni_weak == pytest.approx(got.uni_weak)


# ----- misaligned top-2 accuracy -----


def test_top2_correct_when_top_two_are_both_source_labels_in_any_order():
    logits = torch.tensor([[5.0, 4.0, 0.0, 1.0], [0.0, 4.0, 5.0, 1.0]])
    ya, yb = torch.tensor([0, 1]), torch.tensor([1, 2])
    assert misaligned_top2_correct(logits, ya, yb).tolist() == [True, True]
    assert misaligned_top2_correct(logits, yb, ya).tolist() == [True, True]


def test_top2_fails_when_one_source_label_is_missing():
    logits = torch.tensor([[5.0, 4.0, 0.0, 1.0]])
    assert misaligned_top2_correct(logits, torch.tensor([0]), torch.tensor([3])).tolist() == [False]
    assert misaligned_top2_correct(logits, torch.tensor([2]), torch.tensor([3])).tolist() == [False]
    # Same label twice is not a misaligned pair.
    assert misaligned_top2_correct(logits, torch.tensor([0]), torch.tensor([0])).tolist() == [False]


@pytest.mark.parametrize("seed", SEEDS)
def test_top2_matches_sorted_reference(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(50, 5))
    ya, yb = rng.integers(0, 5, size=50), rng.integers(0, 5, size=50)
    got = misaligned_top2_correct(torch.tensor(logits), torch.tensor(ya), torch.tensor(yb))
    for i in range(50):
        order = sorted(range(5), key=lambda k: -logits[i][k])
        want = ya[i] != yb[i] and {order[0], order[1]} == {ya[i], yb[i]}
        assert bool(got[i]) == want
