"""Cross-fitted linear probes: unimodal confidences p^m[y] for features a user brings.

A multinomial logistic regression on standardised features, fitted full-batch with L-BFGS
from zero weights (so a fit is a deterministic function of its data). With stratified
K-fold cross-fitting every sample's confidence comes from a probe that never saw it: an
in-sample probe on wide features memorises labels and reports confidences near 1 that
say nothing about how informative the modality is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LinearProbe:
    """A fitted probe: `softmax(((x - mean) / std) @ weight.T + bias)`."""

    mean: np.ndarray  # float32 [d]
    std: np.ndarray  # float32 [d]
    weight: np.ndarray  # float32 [C, d]
    bias: np.ndarray  # float32 [C]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, float32 [n, C]."""
        z = ((np.asarray(x, np.float32) - self.mean) / self.std) @ self.weight.T + self.bias
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def _check(x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"expected x [n, d] and y [n], got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    return x, y


def fit_linear_probe(x: np.ndarray, y: np.ndarray, num_classes: int, epochs: int = 100,
                     l2: float = 1e-3) -> LinearProbe:
    """Fit a multinomial logistic regression on x [n, d], y [n] (standardised on x).

    Minimises mean cross-entropy + l2/2 * ||W||^2 with at most `epochs` L-BFGS iterations.
    """
    x, y = _check(x, y, num_classes)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    xs = torch.from_numpy((x - mean) / std).double()
    yt = torch.from_numpy(y)
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=epochs, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ w.T + b, yt) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    if len(y):
        opt.step(closure)
    return LinearProbe(mean.astype(np.float32), std, w.detach().float().numpy(),
                       b.detach().float().numpy())


def stratified_folds(y: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Fold id int64 [n] per sample: each class shuffled (seeded) and dealt round-robin.

    Dealing continues across classes, so fold sizes differ by at most one.
    """
    y = np.asarray(y, dtype=np.int64)
    if folds < 2:
        raise ValueError(f"cross-fitting needs folds >= 2, got {folds}")
    if len(y) < folds:
        raise ValueError(f"cross-fitting with {folds} folds needs at least {folds} samples, got {len(y)}")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    start = 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = (start + np.arange(len(idx))) % folds
        start += len(idx)
    return fold


def crossfit_probes(x: np.ndarray, y: np.ndarray, num_classes: int, folds: int = 5, seed: int = 0,
                    epochs: int = 100, l2: float = 1e-3) -> tuple[np.ndarray, list[LinearProbe]]:
    """Out-of-fold confidences float32 [n] and the `folds` fitted probes.

    Probe k is fitted on every sample outside fold k and scores fold k. Averaging the
    probes' probabilities scores samples outside x (e.g. held-out splits) out-of-sample too.
    """
    x, y = _check(x, y, num_classes)
    fold = stratified_folds(y, folds, seed)
    conf = np.empty(len(y), dtype=np.float32)
    probes = []
    for k in range(folds):
        held = fold == k
        probe = fit_linear_probe(x[~held], y[~held], num_classes, epochs, l2)
        conf[held] = probe.predict_proba(x[held])[np.arange(int(held.sum())), y[held]]
        probes.append(probe)
    return conf, probes


def crossfit_confidences(x: np.ndarray, y: np.ndarray, num_classes: int, folds: int = 5,
                         seed: int = 0, epochs: int = 100, l2: float = 1e-3) -> np.ndarray:
    """Out-of-fold confidence p[y] float32 [n] of a linear probe, stratified K-fold cross-fitted."""
    return crossfit_probes(x, y, num_classes, folds, seed, epochs, l2)[0]


def ensemble_confidences(probes: list[LinearProbe], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """p[y] float32 [n] of the probes' mean probabilities (for samples none of them saw)."""
    p = np.mean([pr.predict_proba(x) for pr in probes], axis=0)
    return p[np.arange(len(y)), np.asarray(y, np.int64)].astype(np.float32)
