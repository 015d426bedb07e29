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
