"""The authors' per-batch alpha step against a float64 reference written from the rule:
u = mean c^1 / mean c^2 over aligned samples; r = mean p[y of modality 1's source] /
mean p[y of modality 2's source] per swap direction (A: modality 2 swapped, B: modality 1
swapped); mm = (r_A + r_B) / 2; alpha +/- eta by the side of u that mm is on; max(1, .)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from midas_data.trainers.config import TrainConfig
from midas_data.trainers.distributed import DistInfo
from midas_data.trainers.loop import EpochTracker, RunState, train_step
from midas_data.trainers.models import misaligned_index
from torch import nn

from midas_data.loss import (
    AlphaStats,
    DirectionSums,
    accumulate,
    authors_alpha_step,
    authors_alpha_update,
    authors_batch_ratios,
    direction_sums,
    update_alpha,
)

ETA = 0.05


def _reference_ratios(probs: np.ndarray, src_labels: np.ndarray, swapped: np.ndarray,
                      conf: np.ndarray) -> tuple[float, float, float]:
    """Plain loops in float64, modalities 1 and 2 = columns 0 and 1."""
    u = float(np.mean(conf[:, 0]) / np.mean(conf[:, 1]))
    r = {}
    for name, m in (("A", 1), ("B", 0)):
        p1 = [probs[n, src_labels[n, 0]] for n in range(len(probs)) if swapped[n] == m]
        p2 = [probs[n, src_labels[n, 1]] for n in range(len(probs)) if swapped[n] == m]
        r[name] = float(np.mean(p1) / np.mean(p2))
    return u, r["A"], r["B"]


def _reference_step(alpha: float, u: float, r_a: float, r_b: float) -> float:
    mm = (r_a + r_b) / 2
    if u > 1:
        alpha = alpha + ETA if mm > u else alpha - ETA
    else:
        alpha = alpha + ETA if mm < u else alpha - ETA
    return max(1.0, alpha)


def _pooled_step(alpha: float, logits: torch.Tensor, src_labels: torch.Tensor, src_conf: torch.Tensor,
                 strong: int, weak: int) -> float:
    stats = accumulate(AlphaStats(), logits, src_labels[:, strong], src_labels[:, weak],
                       src_conf[:, strong], src_conf[:, weak])
    return update_alpha(alpha, stats, ETA)


# A two-row batch where the two rules disagree. Every sample has c^1 = 0.8, c^2 = 0.4, so
# u = 2 and the pooled rule's unimodal ratio over the rows' sources is 2 as well: the only
# difference is pooling the fused probabilities versus averaging the two directions' ratios.
# Row A (modality 2 swapped): p[y1] = 0.9, p[y2] = 0.01 -> r_A = 90.
# Row B (modality 1 swapped): p[y1] = 0.1, p[y2] = 0.8  -> r_B = 0.125; mm = 45.06 > u: up.
# Pooled: (0.9 + 0.1) / (0.01 + 0.8) = 1.23 < 2: the fused head under-uses modality 1: down.
DISAGREE_PROBS = np.array([[0.9, 0.09, 0.01], [0.1, 0.1, 0.8]])
DISAGREE_LABELS = np.array([[0, 2], [0, 2]])  # [N, M]: source labels of modality 1 and 2
DISAGREE_SWAPPED = np.array([1, 0])


def test_pinned_batch_where_pooled_and_per_direction_rules_disagree():
    logits = torch.tensor(np.log(DISAGREE_PROBS), dtype=torch.float64)
    labels, swapped = torch.tensor(DISAGREE_LABELS), torch.tensor(DISAGREE_SWAPPED)
    conf = torch.tensor([[0.8, 0.4], [0.8, 0.4]], dtype=torch.float64)
    u, r_a, r_b = authors_batch_ratios(logits, labels, swapped, conf)
    ref = _reference_ratios(DISAGREE_PROBS, DISAGREE_LABELS, DISAGREE_SWAPPED, conf.numpy())
    assert (u, r_a, r_b) == pytest.approx(ref, rel=1e-12)
    assert (u, r_a, r_b) == pytest.approx((2.0, 90.0, 0.125), rel=1e-12)
    authors = authors_alpha_update(1.5, direction_sums(logits, labels, swapped, conf), ETA)
    pooled = _pooled_step(1.5, logits, labels, conf, strong=0, weak=1)
    assert authors == pytest.approx(1.55) and authors == pytest.approx(_reference_step(1.5, *ref))
    assert pooled == pytest.approx(1.45)


def test_ratios_match_float64_reference_on_random_batches():
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        n, b, c = 24, 16, 5
        logits = torch.randn(n, c, generator=gen, dtype=torch.float64) * 3
        labels = torch.randint(0, c, (n, 2), generator=gen)
        swapped = torch.randint(0, 2, (n,), generator=gen)
        swapped[:2] = torch.tensor([0, 1])  # both directions present
        conf = torch.rand(b, 2, generator=gen, dtype=torch.float64)
        got = authors_batch_ratios(logits, labels, swapped, conf)
        ref = _reference_ratios(torch.softmax(logits, 1).numpy(), labels.numpy(), swapped.numpy(), conf.numpy())
        assert got == pytest.approx(ref, rel=1e-12)
        alpha = 1.0 + float(torch.rand(1, generator=gen))
        assert authors_alpha_step(alpha, *got, ETA) == _reference_step(alpha, *ref)


@pytest.mark.parametrize("u,mm,expected", [
    (2.0, 3.0, 1.55),   # modality 1 strong, fused ratio above u: the fused head over-uses it: up
    (2.0, 1.0, 1.45),   # modality 1 strong, fused ratio below u: down
    (2.0, 2.0, 1.45),   # tie: down (the authors' else branch)
    (0.5, 0.25, 1.55),  # modality 2 strong, fused ratio (1 over 2) below u: up
    (0.5, 0.75, 1.45),  # modality 2 strong, above u: down
    (0.5, 0.5, 1.45),   # tie: down
    (1.0, 0.9, 1.55),   # u == 1 takes the "modality 2 strong" branch: mm < u is up
    (1.0, 1.1, 1.45),
])
def test_each_branch_of_the_authors_step(u, mm, expected):
    # r_a and r_b differ, only their mean counts
    assert authors_alpha_step(1.5, u, mm - 0.2, mm + 0.2, ETA) == pytest.approx(expected)


def test_step_clamps_at_one_and_uses_eta():
    assert authors_alpha_step(1.0, 2.0, 1.0, 1.0, ETA) == 1.0
    assert authors_alpha_step(1.02, 2.0, 1.0, 1.0, ETA) == 1.0
    assert authors_alpha_step(1.0, 2.0, 5.0, 5.0, eta=0.3) == pytest.approx(1.3)
    with pytest.raises(ValueError, match="r_b is NaN"):
        authors_alpha_step(1.0, 2.0, 1.0, math.nan, ETA)


def test_sums_merge_over_ranks_like_one_batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (20, 2), generator=gen)
    swapped = torch.arange(20) % 2
    conf = torch.rand(10, 2, generator=gen, dtype=torch.float64)
    whole = direction_sums(logits, labels, swapped, conf)
    halves = (direction_sums(logits[:7], labels[:7], swapped[:7], conf[:3])
              + direction_sums(logits[7:], labels[7:], swapped[7:], conf[3:]))
    assert halves.to_list() == pytest.approx(whole.to_list(), rel=1e-12)
    assert DirectionSums.from_list(whole.to_list()) == whole


def test_one_direction_or_no_rows():
    conf = torch.tensor([[0.8, 0.4]], dtype=torch.float64)
    logits = torch.tensor(np.log([[0.9, 0.05, 0.05]]), dtype=torch.float64)
    only_a = direction_sums(logits, torch.tensor([[0, 1]]), torch.tensor([1]), conf)
    # mm = r_A = 18 > u = 2: up
    assert authors_alpha_update(1.0, only_a, ETA) == pytest.approx(1.05)
    empty = direction_sums(logits[:0], torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long), conf)
    assert authors_alpha_update(1.3, empty, ETA) == 1.3  # no misaligned rows: no step


def test_more_modalities_use_the_weak_strong_pair_in_index_order():
    # M = 3, pair (0, 2); rows swapping modality 1 carry the same label at 0 and 2 and are ignored.
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.2, 0.6], [0.3, 0.4, 0.3]])
    labels = torch.tensor([[0, 0, 2], [0, 1, 2], [1, 2, 1]])
    swapped = torch.tensor([2, 0, 1])
    conf = torch.tensor([[0.9, 0.5, 0.3]], dtype=torch.float64)
    u, r_a, r_b = authors_batch_ratios(torch.tensor(np.log(probs)), labels, swapped, conf, pair=(0, 2))
    assert (u, r_a, r_b) == pytest.approx((3.0, 0.7 / 0.1, 0.2 / 0.6), rel=1e-12)
    with pytest.raises(ValueError, match="first < second"):
        direction_sums(torch.tensor(np.log(probs)), labels, swapped, conf, pair=(2, 0))


class _FixedOutputs(nn.Module):
    """Stands in for the reference model: fixed unimodal and fused logits (plus a trainable
    bias so that the step has a gradient), misaligned rows from the batch's partners."""

    def __init__(self, uni_probs: np.ndarray, mis_probs: np.ndarray):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(3))
        self.uni = [torch.tensor(np.log(p), dtype=torch.float32) for p in uni_probs]
        self.mis = torch.tensor(np.log(mis_probs), dtype=torch.float32)

    def forward(self, inputs, partner=None, fused=True, detach_unimodal=False):
        index = misaligned_index(partner)
        return {"feats": [torch.zeros(2, 4), torch.zeros(2, 4)], "uni": [u + self.bias for u in self.uni],
                "fused": self.uni[0] + self.bias, "mis": self.mis + self.bias, "mis_index": index}


def _uni_probs(c1: float, c2: float) -> np.ndarray:
    """Unimodal probabilities [M, B, C] giving confidence c^m at labels y = [0, 2]."""
    def rows(c: float) -> np.ndarray:
        r = (1 - c) / 2
        return np.array([[c, r, r], [r, r, c]])
    return np.stack([rows(c1), rows(c2)])


@pytest.mark.parametrize("c1,c2,mis_probs,authors,pooled", [
    # u = 2 (modality 1 strong): the pinned batch above, authors up, pooled down
    (0.8, 0.4, DISAGREE_PROBS, 1.55, 1.45),
    # u = 0.5 (modality 2 strong): A p[y1]/p[y2] = 0.01/0.9, B 0.3/0.2 -> mm = 0.756 > u: down;
    # pooled strong over weak 1.1 / 0.31 = 3.5 > 2: up
    (0.4, 0.8, np.array([[0.01, 0.09, 0.9], [0.3, 0.5, 0.2]]), 1.45, 1.55),
])
def test_trainer_batch_mode_takes_the_authors_step(c1, c2, mis_probs, authors, pooled):
    # anchor 0 takes modality 2 from row 1 (direction A); anchor 1 takes modality 1 from row 0 (B);
    # both rows have modality 1 from a label-0 sample and modality 2 from a label-2 sample
    batch = {"label": torch.tensor([0, 2]), "inputs": {}, "partner": torch.tensor([[-1, 1], [0, -1]])}
    model = _FixedOutputs(_uni_probs(c1, c2), mis_probs)
    config = TrainConfig(method="midas", alpha_update="batch", warmup_epochs=0, hard_weighting=False)
    run = RunState(alpha=1.5)
    info = DistInfo(0, 1, torch.device("cpu"), False)
    train_step(model, batch, torch.optim.SGD(model.parameters(), lr=0.0), config, run,
               EpochTracker(epoch=0, num_modalities=2), info)
    assert run.alpha == pytest.approx(authors)
    # the pooled rule on the same rows would have stepped the other way
    conf = torch.tensor([[c1, c2], [c1, c2]], dtype=torch.float64)
    labels = torch.tensor([[0, 2], [0, 2]])
    strong, weak = (0, 1) if c1 > c2 else (1, 0)
    assert _pooled_step(1.5, torch.tensor(np.log(mis_probs)), labels, conf, strong, weak) == pytest.approx(pooled)
