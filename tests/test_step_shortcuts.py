"""The training step's shortcuts give the numbers of the straightforward code.

The MIDAS step builds its misaligned rows from one flat (row, modality) index, gathers the
fused head's input in one pass, normalises each feature row once for the hard-sample
weights and reuses constant tensors: each of these is compared here with the plain
formulation it replaces (torch.nonzero + source_rows, per-modality gathers + cat,
cosine_similarity on gathered rows) with torch.equal, bit for bit, gradients included.
The step then puts every head's logits side by side, classes first (the unimodal heads,
the fused head on the aligned and on the misaligned rows, in one matmul for the fused
head), and takes L_uni + CE + lam * L_mis and the live confidences from one log-softmax
(`midas_loss_by_class`): equal in exact arithmetic, so the whole step is compared with
the plain formulation to float32 rounding.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from midas_data.trainers.config import TrainConfig
from midas_data.trainers.distributed import DistInfo
from midas_data.trainers.loop import EpochTracker, RunState, train_step
from midas_data.trainers.models import (
    MultimodalModel,
    misaligned_index,
    swap_features,
    swapped_joined,
)

from midas_data.loss import (
    hard_sample_weight,
    hard_weight_from_similarity,
    in_batch_hard_weight,
    modality_weights,
    normalised_confidences,
    source_rows,
)
from midas_data.stream.dataset import misaligned_flat


def _plain_index(partner: torch.Tensor) -> tuple[torch.Tensor, ...]:
    b, m = torch.nonzero(partner >= 0, as_tuple=True)
    src = partner[b, m]
    return b, m, src, source_rows(b, m, src, partner.shape[1])


def _partners(size: int, modalities: int, seed: int, missing: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    partner = torch.randint(0, size, (size, modalities), generator=g)
    partner[torch.rand(size, modalities, generator=g) < missing] = -1
    return partner


@pytest.mark.parametrize("modalities", [2, 3])
@pytest.mark.parametrize("missing", [0.0, 0.3])
def test_misaligned_index_equals_the_nonzero_index(modalities, missing):
    """Full batches take the cached layout, others torch.nonzero: both give the rows of
    torch.nonzero + source_rows, and flat indices that address the same (row, modality)."""
    for seed in range(5):
        partner = _partners(9, modalities, seed, missing)
        idx = misaligned_index(partner)
        b, m, src, rows = _plain_index(partner)
        for got, want in ((idx.b, b), (idx.m, m), (idx.src, src), (idx.rows, rows)):
            assert torch.equal(got, want)
        k = torch.arange(modalities)
        assert torch.equal(idx.flat, rows * modalities + k)
        assert torch.equal(idx.anchor_flat, b * modalities + m)
        assert torch.equal(idx.source_flat, src * modalities + m)
        aligned = torch.arange(9)[:, None] * modalities + k
        assert torch.equal(idx.fused_flat, torch.cat((aligned, rows * modalities + k)))


def test_misaligned_index_of_a_full_batch_does_not_depend_on_earlier_batches():
    """The cached layout is shared between batches of one size: a second batch must not see
    anything of the first (nor change the tensors the first index returned)."""
    first = misaligned_index(_partners(6, 2, 0, 0.0))
    kept = [t.clone() for t in first]
    second = misaligned_index(_partners(6, 2, 1, 0.0))
    assert all(torch.equal(a, b) for a, b in zip(first, kept))
    assert torch.equal(second.rows, _plain_index(_partners(6, 2, 1, 0.0))[3])


def test_misaligned_index_of_an_empty_batch_is_empty():
    idx = misaligned_index(torch.zeros(0, 2, dtype=torch.int64))
    assert all(len(t) == 0 for t in idx)


@pytest.mark.parametrize("modalities", [2, 3])
@pytest.mark.parametrize("missing", [0.0, 0.3, 1.0])
def test_the_streams_misaligned_flat_is_the_index_the_model_builds(modalities, missing):
    """The stream builds `misaligned_flat` with the partners (numpy); it equals the model's
    own fused_flat, and an index made from it equals the one made without it, field by field."""
    for seed in range(5):
        partner = _partners(9, modalities, seed, missing)
        built = misaligned_index(partner)
        given = torch.from_numpy(misaligned_flat(partner.numpy()))
        assert torch.equal(given, built.fused_flat)
        taken = misaligned_index(partner, given)
        for name, want, got in zip(built._fields, built, taken):
            assert torch.equal(got, want), name
        assert torch.equal(taken.rows, _plain_index(partner)[3])
    empty = torch.zeros(0, modalities, dtype=torch.int64)
    assert all(len(t) == 0 for t in misaligned_index(empty, torch.from_numpy(misaligned_flat(empty.numpy()))))


def test_a_misaligned_flat_that_does_not_fit_the_partners_is_not_used():
    """`partner` decides: a flat of another shape or dtype, or one made before the partners
    were changed (a partner dropped, or moved to another row), gives the index built from
    `partner` alone, field by field."""
    partner = torch.tensor([[1, 2], [0, 2], [1, 0]])
    flat = torch.from_numpy(misaligned_flat(partner.numpy()))
    dropped = partner.clone()
    dropped[0, 1] = -1
    moved = partner.clone()
    moved[2, 0] = 2
    for p, bad in ((partner, flat[:, :1]), (partner, flat[:-1]), (partner, flat.int()), (dropped, flat),
                   (moved, flat), (dropped, flat[:-1])):
        want, got = misaligned_index(p), misaligned_index(p, bad)
        for name, a, b in zip(want._fields, want, got):
            assert torch.equal(a, b), name
    assert misaligned_index(partner, flat).fused_flat is flat  # the matching one is taken as it is


def test_train_step_keeps_models_that_do_not_take_misaligned_flat():
    """The step passes `misaligned_flat` only to a model that says it takes it: a model
    with the earlier forward signature trains on stream batches as before."""

    class Earlier(MultimodalModel):
        takes_misaligned_flat = False

        def forward(self, inputs, partner=None, fused=True, detach_unimodal=False):
            return super().forward(inputs, partner, fused, detach_unimodal)

    torch.manual_seed(0)
    model = Earlier(["a", "b"], {"a": "tensor", "b": "tensor"}, {"a": (7,), "b": (4,)}, 5, 8)
    g = torch.Generator().manual_seed(3)
    partner = _partners(12, 2, 4, 0.0)
    batch = {"label": torch.randint(0, 5, (12,), generator=g),
             "inputs": {"a": torch.randn(12, 7, generator=g), "b": torch.randn(12, 4, generator=g)},
             "partner": partner, "misaligned_flat": torch.from_numpy(misaligned_flat(partner.numpy()))}
    cfg = dataclasses.replace(TrainConfig.from_preset("mfeat", method="midas"), warmup_epochs=0)
    terms = train_step(model, batch, torch.optim.Adam(model.parameters(), lr=0.01), cfg, RunState(),
                       EpochTracker(0, 2, weak=1, strong=0), DistInfo(0, 1, torch.device("cpu"), False))
    assert torch.isfinite(terms.total) and terms.misaligned.item() > 0


@pytest.mark.parametrize("missing", [0.0, 0.25, 1.0])
def test_swapped_joined_equals_gathered_features_forward_and_backward(missing):
    """One gather from the concatenated features = per-modality gathers then cat, for the
    values and for the gradient that reaches each modality's features."""
    for seed in range(4):
        torch.manual_seed(seed)
        feats = [torch.randn(11, 5, requires_grad=True) for _ in range(3)]
        partner = _partners(11, 3, seed, missing)
        idx = misaligned_index(partner)
        upstream = torch.randn(len(idx.b), 15)

        plain = torch.cat(swap_features(feats, idx.rows), dim=1)
        grads_plain = torch.autograd.grad((plain * upstream).sum() + torch.cat(feats, 1).square().sum(), feats)
        joined = torch.cat(feats, dim=1)
        got = swapped_joined(joined, idx)
        grads_got = torch.autograd.grad((got * upstream).sum() + joined.square().sum(), feats)
        assert torch.equal(got, plain)
        assert all(torch.equal(a, b) for a, b in zip(grads_got, grads_plain))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_batch_hard_weight_is_hard_sample_weight_bit_for_bit(dtype):
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        features = torch.randn(24, 7, generator=g, dtype=dtype) * 10.0 ** (seed % 5 - 2)
        features[3] = 0.0  # a zero row: cosine_similarity's eps clamp decides
        source = torch.randint(0, 24, (24,), generator=g)
        anchor = torch.randint(0, 24, (24,), generator=g)
        assert torch.equal(in_batch_hard_weight(features, None, source),
                           hard_sample_weight(features, features[source]))
        assert torch.equal(in_batch_hard_weight(features, anchor, source),
                           hard_sample_weight(features[anchor], features[source]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_weight_from_similarity_is_the_written_out_formula_bit_for_bit(dtype):
    """One addcdiv gives 1 + (s + 1) / 2 with the roundings of the two steps written out."""
    g = torch.Generator().manual_seed(0)
    s = torch.rand(20000, generator=g, dtype=dtype) * 2.4 - 1.2  # beyond [-1, 1] too: the clamp
    s[:4] = torch.tensor([1e-30, -1e-30, 0.0, -0.0], dtype=dtype)
    assert torch.equal(hard_weight_from_similarity(s), ((s.clamp(-1.0, 1.0) + 1.0) / 2.0) + 1.0)


def test_in_batch_hard_weight_names_the_shapes_it_needs():
    with pytest.raises(ValueError, match="in_batch_hard_weight"):
        in_batch_hard_weight(torch.zeros(4, 3), None, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="in_batch_hard_weight"):
        in_batch_hard_weight(torch.zeros(4, 3), torch.zeros(2, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))


def _plain_misaligned_loss(logits, src_labels, src_weights, modality_weight, hard_weight):
    """L_mis as a chain of gathers: mean_n h_n * sum_m a_m * w_nm * -log softmax(z_n)[y_nm]."""
    if len(logits) == 0:
        return logits.sum() * 0.0
    ce = -torch.log_softmax(logits, dim=1).gather(1, src_labels)
    return ((src_weights * modality_weight * ce).sum(dim=1) * hard_weight).mean()


def _plain_midas_loss(model: MultimodalModel, batch: dict, alpha: float, weak: int, lam: float) -> torch.Tensor:
    """The step's loss as it was first written: nonzero index, gathered features per
    modality, cosine_similarity on stacked features, weights built on the spot."""
    y, M = batch["label"], len(model.modalities)
    feats = model.encode(batch["inputs"])
    uni = model.unimodal_logits(feats)
    fused = model.fuse(feats)
    b, m, src, rows = _plain_index(batch["partner"])
    mis = model.fuse(swap_features(feats, rows))
    conf = torch.stack([torch.softmax(z.detach(), 1).gather(1, y[:, None]).squeeze(1) for z in uni], 1)
    stacked = torch.stack(feats)
    h = hard_sample_weight(stacked[m, b], stacked[m, src])
    w = normalised_confidences(conf[rows, torch.arange(M)])
    l_mis = _plain_misaligned_loss(mis, y[rows], w, modality_weights(M, weak, alpha), h)
    uni_ce = torch.stack([F.cross_entropy(z, y) for z in uni]).mean()
    return F.cross_entropy(fused, y) + uni_ce + lam * l_mis


@pytest.mark.parametrize("missing", [0.0, 0.3, 1.0])
def test_train_step_loss_and_update_equal_the_plain_formulation(missing):
    """train_step's loss and the parameters after its update equal, to float32 rounding,
    those of the plain formulation above (same model, same batch, same optimizer step)."""
    torch.manual_seed(0)
    model = MultimodalModel(["a", "b"], {"a": "tensor", "b": "tensor"}, {"a": (7,), "b": (4,)}, 5, 8)
    plain, start = copy.deepcopy(model), copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    batch = {"label": torch.randint(0, 5, (12,), generator=g),
             "inputs": {"a": torch.randn(12, 7, generator=g), "b": torch.randn(12, 4, generator=g)},
             "partner": _partners(12, 2, 4, missing)}
    cfg = dataclasses.replace(TrainConfig.from_preset("mfeat", method="midas"), warmup_epochs=0, lam=0.7)
    tracker = EpochTracker(0, 2, weak=1, strong=0)
    info = DistInfo(0, 1, torch.device("cpu"), False)
    terms = train_step(model, batch, torch.optim.SGD(model.parameters(), lr=0.1), cfg, RunState(alpha=1.3),
                       tracker, info)

    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    loss = _plain_midas_loss(plain, batch, alpha=1.3, weak=1, lam=0.7)
    loss.backward()
    opt.step()
    torch.testing.assert_close(terms.total.detach(), loss.detach(), rtol=1e-6, atol=1e-6)
    moved = 0
    for (name, p), q, p0 in zip(model.named_parameters(), plain.parameters(), start.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
        moved += int(not torch.equal(p, p0))
    assert moved == len(list(start.parameters()))  # every parameter took a step, so the check compares updates


@pytest.mark.parametrize("missing", [0.0, 0.3])
def test_forward_with_partners_gives_every_head_in_one_classes_first_block(missing):
    """'logits_by_class' is [C, M*B + B + N]: each unimodal head, the fused head on the
    aligned rows, then on the misaligned ones; 'uni', 'fused' and 'mis' are those blocks,
    equal to the heads run one by one (to float32 rounding: another matmul layout)."""
    torch.manual_seed(1)
    model = MultimodalModel(["a", "b", "c"], {k: "tensor" for k in "abc"}, {"a": (7,), "b": (4,), "c": (3,)}, 5, 8)
    g = torch.Generator().manual_seed(2)
    inputs = {"a": torch.randn(10, 7, generator=g), "b": torch.randn(10, 4, generator=g),
              "c": torch.randn(10, 3, generator=g)}
    partner = _partners(10, 3, 5, missing)
    out = model(inputs, partner)
    feats = model.encode(inputs)
    rows = _plain_index(partner)[3]
    want = [*model.unimodal_logits(feats), model.fuse(feats), model.fuse(swap_features(feats, rows))]
    torch.testing.assert_close(out["logits_by_class"], torch.cat(want).t())
    for got, ref in zip([*out["uni"], out["fused"], out["mis"]], want):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("missing", [0.0, 0.3])
def test_train_step_with_the_streams_misaligned_flat_is_the_same_step(missing):
    """A batch that brings `misaligned_flat` (as stream batches do) trains exactly as one
    without it: the same loss terms and the same parameters afterwards, bit for bit."""
    torch.manual_seed(0)
    model = MultimodalModel(["a", "b"], {"a": "tensor", "b": "tensor"}, {"a": (7,), "b": (4,)}, 5, 8)
    g = torch.Generator().manual_seed(3)
    batch = {"label": torch.randint(0, 5, (12,), generator=g),
             "inputs": {"a": torch.randn(12, 7, generator=g), "b": torch.randn(12, 4, generator=g)},
             "partner": _partners(12, 2, 4, missing)}
    cfg = dataclasses.replace(TrainConfig.from_preset("mfeat", method="midas"), warmup_epochs=0)
    info = DistInfo(0, 1, torch.device("cpu"), False)
    runs = []
    for given in (False, True):
        m = copy.deepcopy(model)
        b = dict(batch, misaligned_flat=torch.from_numpy(misaligned_flat(batch["partner"].numpy()))) if given else batch
        terms = train_step(m, b, torch.optim.Adam(m.parameters(), lr=0.01), cfg, RunState(alpha=1.3),
                           EpochTracker(0, 2, weak=1, strong=0), info)
        runs.append((terms, list(m.parameters())))
    (t0, p0), (t1, p1) = runs
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(t0, t1))
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert not all(torch.equal(a, b) for a, b in zip(p0, model.parameters()))  # the step did move them


@pytest.mark.parametrize("old_form", [False, True])
def test_pending_alpha_rows_are_summed_at_the_strong_and_weak_columns(old_form):
    """Batches kept whole ([logits, source labels, source confidences]), alone or beside a
    batch in the five-column form of earlier mid-epoch checkpoints, sum to what `accumulate`
    gives on the strong and weak columns of all rows."""
    from midas_data.loss import AlphaStats, accumulate

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 4, generator=g), torch.randint(0, 4, (6, 3), generator=g), torch.rand(6, 3, generator=g))
               for _ in range(3)]
    tracker = EpochTracker(0, 3, weak=2, strong=0)
    tracker.add_alpha_rows(*batches[0])
    z, y, c = batches[1]
    if old_form:
        tracker.pending.append([z, y[:, 0], y[:, 2], c[:, 0], c[:, 2]])
    else:
        tracker.add_alpha_rows(z, y, c)
    tracker.add_alpha_rows(*batches[2])
    tracker.flush_alpha_rows()
    z, y, c = (torch.cat(t) for t in zip(*batches))
    want = accumulate(AlphaStats(), z, y[:, 0], y[:, 2], c[:, 0], c[:, 2])
    assert tracker.alpha_stats == want and tracker.pending == []
