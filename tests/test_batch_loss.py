"""The batch-level loss helper against a float64 reference written from docs/METHOD.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from midas_data import Sample, build_dataset
from midas_data.features.extract import extract_features
from midas_data.loss import AlphaStats, update_alpha
from midas_data.loss.batch import batch_alpha_stats, batch_misaligned_loss, misaligned_targets
from midas_data.stream.dataset import MidasDataset, materialize_misaligned


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("bl") / "ds"
    samples = [Sample(f"s{i:03d}", i % 3, {"a": rng.normal(size=5).astype(np.float32) + i % 3,
                                           "b": rng.normal(size=2).astype(np.float32)}, split="train")
               for i in range(40)]
    build_dataset(samples, root, progress=False)
    extract_features(root, warmup_epochs=1, splits=("train",), progress=False, num_threads=1)
    return next(iter(MidasDataset(root, batch_size=16)))


def _reference(logits: np.ndarray, batch: dict, alpha: float, weak: int) -> float:
    """Loop over misaligned rows (b, m): sum_k a_k c~_k CE(z, y_src[k]), times h, averaged."""
    partner, label = batch["partner"].numpy(), batch["label"].numpy()
    conf, sim = batch["conf"].numpy().astype(np.float64), batch["similarity"].numpy().astype(np.float64)
    total, rows = 0.0, 0
    for b in range(partner.shape[0]):
        for m in range(partner.shape[1]):
            j = partner[b, m]
            if j < 0:
                continue
            src = [j if k == m else b for k in range(partner.shape[1])]
            c = [conf[src[k], k] for k in range(len(src))]
            z = logits[rows].astype(np.float64)
            logp = z - (np.log(np.sum(np.exp(z - z.max()))) + z.max())
            loss = sum((alpha if k == weak else 1.0) * c[k] / sum(c) * -logp[label[src[k]]]
                       for k in range(len(src)))
            h = 1.0 + (sim[b, m] + 1.0) / 2.0
            total += h * loss
            rows += 1
    return total / rows


@pytest.mark.parametrize("alpha,weak", [(1.0, 1), (1.7, 1), (2.5, 0)])
def test_batch_loss_matches_float64_reference(batch, alpha, weak):
    mis = materialize_misaligned(batch)
    logits = torch.randn(len(mis["anchor"]), 3, generator=torch.Generator().manual_seed(0))
    got = batch_misaligned_loss(logits, batch, mis, alpha=alpha, weak=weak)
    assert math.isclose(float(got), _reference(logits.numpy(), batch, alpha, weak), rel_tol=1e-5)


def test_targets_take_the_swapped_modality_from_the_partner(batch):
    mis = materialize_misaligned(batch)
    labels, weights = misaligned_targets(batch, mis)
    for n in range(len(mis["anchor"])):
        b, m = int(mis["anchor"][n]), int(mis["swapped"][n])
        assert labels[n, m] == batch["partner_label"][b, m]
        assert labels[n, 1 - m] == batch["label"][b]
    assert torch.allclose(weights.sum(1), torch.ones(len(weights)))
    # for two modalities the weights equal the stream's anchor/partner weights
    w = torch.stack([weights[n, int(mis["swapped"][n])] for n in range(len(weights))])
    assert torch.allclose(w, mis["weights"][:, 1], atol=1e-6)


def test_user_model_learns_with_the_helper(batch):
    torch.manual_seed(0)
    model = torch.nn.Linear(7, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    mis = materialize_misaligned(batch)
    x = torch.cat([batch["inputs"]["a"], batch["inputs"]["b"]], 1)
    xm = torch.cat([mis["inputs"]["a"], mis["inputs"]["b"]], 1)
    first = None
    stats = AlphaStats()
    for _ in range(50):
        loss = torch.nn.functional.cross_entropy(model(x), batch["label"])
        loss = loss + batch_misaligned_loss(model(xm), batch, mis, alpha=1.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    stats = batch_alpha_stats(stats, model(xm), batch, mis, weak=1, strong=0)
    assert loss.item() < first and stats.count > 0
    assert update_alpha(1.0, stats) >= 1.0


def _with_fill_rows(batch: dict, fill: int) -> dict:
    """The batch with its last `fill` rows turned into fill rows, as the stream pads the epoch's
    last batch: valid False, weight 0, no misaligned partner, lent to no real row."""
    b = len(batch["label"])
    valid = torch.arange(b) < b - fill
    partner = batch["partner"].clone()
    partner[~valid] = -1
    partner[valid.unsqueeze(1) & ~valid[partner.clamp(min=0)] & (partner >= 0)] = -1
    return {**batch, "valid": valid, "weight": valid.float(), "partner": partner}


def _real_rows(batch: dict) -> dict:
    """The batch restricted to its real rows (what the helpers must compute on)."""
    keep = batch["valid"]
    out = {k: (v[keep] if isinstance(v, torch.Tensor) and v.shape[:1] == keep.shape else v)
           for k, v in batch.items()}
    out["inputs"] = {m: x[keep] for m, x in batch["inputs"].items()}
    return out


def test_aligned_loss_is_the_weighted_mean_over_real_rows(batch):
    from midas_data import aligned_loss

    logits = torch.randn(len(batch["label"]), 3, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64, requires_grad=True)
    full = aligned_loss(logits, batch)  # no fill rows: exactly F.cross_entropy
    assert torch.equal(full, torch.nn.functional.cross_entropy(logits, batch["label"]))
    padded = _with_fill_rows(batch, 5)
    y, v = batch["label"].numpy(), padded["valid"].numpy()
    z = logits.detach().numpy()
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    want = -np.mean(logp[np.arange(len(y)), y][v])  # float64, straight from the definition
    got = aligned_loss(logits, padded)
    assert math.isclose(float(got.detach()), want, rel_tol=1e-12)
    got.backward()
    assert torch.all(logits.grad[~padded["valid"]] == 0), "a fill row received gradient"


def test_aligned_loss_of_a_batch_of_fill_rows_is_a_zero_that_backpropagates(batch):
    from midas_data import aligned_loss

    model = torch.nn.Linear(7, 3)
    x = torch.cat([batch["inputs"]["a"], batch["inputs"]["b"]], 1)
    only_fill = _with_fill_rows(batch, len(batch["label"]))
    loss = aligned_loss(model(x), only_fill)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(torch.all(p.grad == 0) for p in model.parameters()), "zero loss must give zero grads"
    empty = {"label": torch.zeros(0, dtype=torch.int64), "valid": torch.zeros(0, dtype=torch.bool),
             "weight": torch.zeros(0)}
    assert aligned_loss(model(x[:0]), empty).item() == 0.0
    with pytest.raises(ValueError, match="aligned_loss"):
        aligned_loss(model(x[:3]), batch)


def test_misaligned_helpers_ignore_fill_rows(batch):
    """On a batch with fill rows, materialize_misaligned, batch_misaligned_loss and
    batch_alpha_stats equal the same helpers on the batch cut down to its real rows."""
    padded = _with_fill_rows(batch, 4)
    real = _real_rows(padded)
    mis_p, mis_r = materialize_misaligned(padded), materialize_misaligned(real)
    assert len(mis_p["anchor"]) == len(mis_r["anchor"]) > 0
    assert bool(padded["valid"][mis_p["anchor"]].all())
    for m in ("a", "b"):
        assert torch.equal(mis_p["inputs"][m], mis_r["inputs"][m])
    logits = torch.randn(len(mis_p["anchor"]), 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(batch_misaligned_loss(logits, padded, mis_p, alpha=1.5),
                       batch_misaligned_loss(logits, real, mis_r, alpha=1.5))
    assert (batch_alpha_stats(AlphaStats(), logits, padded, mis_p, weak=1, strong=0)
            == batch_alpha_stats(AlphaStats(), logits, real, mis_r, weak=1, strong=0))
    # the default weak modality reads the real rows' confidences only
    from midas_data.loss import weak_modality

    weak = weak_modality(real["conf"].mean(0))
    skewed = {**padded, "conf": padded["conf"].clone()}
    skewed["conf"][~padded["valid"], weak] = 100.0  # if counted, the other modality turns weak
    skewed["conf"][~padded["valid"], 1 - weak] = -100.0
    assert weak_modality(skewed["conf"].mean(0)) != weak
    assert torch.equal(batch_misaligned_loss(logits, skewed, mis_p),
                       batch_misaligned_loss(logits, real, mis_r, weak=weak))
    none = materialize_misaligned(_with_fill_rows(batch, len(batch["label"])))
    assert len(none["anchor"]) == 0
    assert batch_misaligned_loss(logits[:0].requires_grad_(), _with_fill_rows(batch, 16), none).item() == 0.0
