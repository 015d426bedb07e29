"""Held-out evaluation: accuracy, macro-F1, per-modality and misaligned accuracy.

Every held-out sample is encoded once; all metrics then reuse those features:
- `unimodal_acc[m]`: the unimodal head g_m.
- `only_acc[m]`: the fused head with every other modality's features zeroed (how much the
  fused model can use modality m alone).
- `misaligned_acc[m]`: modality m swapped across a seeded random permutation of the
  held-out samples, restricted to pairs with different labels; correct when the fused
  top-2 classes are exactly {y_i, y_j} (the paper's diagnostic).
- `mis_conf[k]`: on those misaligned samples, the fused probability of modality k's source
  label, normalised over the modalities (does the fused head follow modality k?), and
  `uni_conf[k]`, the unimodal heads' normalised mean confidence on aligned samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from midas_data.loss import (
    misaligned_top2_correct,
    normalised_confidences,
    source_rows,
    unimodal_confidence,
)
from midas_data.stream.dataset import MidasDataset

from .models import MultimodalModel, swap_features

_PERM_TAG = 0x3A11


def macro_f1(pred: np.ndarray | Tensor, y: np.ndarray | Tensor) -> float:
    """Unweighted mean over classes of F1 = 2TP / (2TP + FP + FN).

    Averaged over the classes that occur in `y` or `pred` (as scikit-learn's
    `f1_score(average="macro")`); a class never predicted correctly scores 0.
    """
    pred, y = np.asarray(pred, dtype=np.int64).ravel(), np.asarray(y, dtype=np.int64).ravel()
    if pred.shape != y.shape:
        raise ValueError(f"macro_f1: pred {pred.shape} and y {y.shape} differ")
    classes = np.union1d(pred, y)
    if classes.size == 0:
        return 0.0
    f1 = []
    for c in classes:
        tp = np.sum((pred == c) & (y == c))
        fp = np.sum((pred == c) & (y != c))
        fn = np.sum((pred != c) & (y == c))
        f1.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


def misaligned_pairs(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, j): a seeded random permutation j of the samples, kept where y_j != y_i."""
    y = np.asarray(y, dtype=np.int64)
    j = np.random.default_rng([int(seed), _PERM_TAG]).permutation(len(y))
    keep = y[j] != y
    return np.flatnonzero(keep), j[keep]


def misaligned_metrics(fuse: Callable[[list[Tensor]], Tensor], feats: Sequence[Tensor], y: Tensor,
                       seed: int, modalities: Sequence[str]) -> dict:
    """Top-2 misaligned accuracy per swapped modality (and their mean), and the normalised
    fused probability of each modality's source label on the misaligned samples."""
    M = len(feats)
    i, j = (torch.from_numpy(a).to(y.device) for a in misaligned_pairs(y.cpu().numpy(), seed))
    acc, prob = {}, torch.zeros(M, dtype=torch.float64)
    for m, name in enumerate(modalities):
        logits = fuse(swap_features(feats, source_rows(i, torch.full_like(i, m), j, M)))
        acc[name] = float(misaligned_top2_correct(logits, y[i], y[j]).double().mean()) if len(i) else 0.0
        p = torch.softmax(logits.double(), dim=1)
        # modality k's source is j for the swapped modality, i for the others
        src_labels = torch.stack([y[j] if k == m else y[i] for k in range(M)], dim=1)
        prob += normalised_confidences(p.gather(1, src_labels)).sum(0).cpu() if len(i) else 0.0
    rows = max(len(i) * M, 1)
    acc["mean"] = float(np.mean([acc[m] for m in modalities]))
    return {"misaligned_acc": acc, "misaligned_pairs": int(len(i)),
            "mis_conf": {name: float(prob[k]) / rows for k, name in enumerate(modalities)}}


@torch.no_grad()
def encode_split(model: MultimodalModel, data: MidasDataset, device: torch.device
                 ) -> tuple[list[Tensor], Tensor]:
    """Features of every real sample of the split, in index order, and the labels."""
    feats: list[list[Tensor]] = [[] for _ in model.modalities]
    labels = []
    for batch in data:
        if len(batch["label"]) == 0:  # an unpadded stream's empty last batch
            continue
        valid = batch["valid"].to(device) if "valid" in batch else slice(None)
        for k, f in enumerate(model.encode(batch["inputs"])):
            feats[k].append(f[valid])  # fill rows (repeats padding the last batch) count nowhere
        labels.append(batch["label"].to(device)[valid])
    if not labels:
        raise ValueError(f"split {data.split!r} of {data.root} is empty; nothing to evaluate")
    return [torch.cat(f) for f in feats], torch.cat(labels)


@torch.no_grad()
def evaluate(model: MultimodalModel, data: MidasDataset, seed: int, device: torch.device) -> dict:
    """All held-out metrics of `model` on `data` (a MidasDataset with policy 'none')."""
    was_training = model.training
    model.eval()
    try:
        feats, y = encode_split(model, data, device)
        mods = model.modalities
        logits = model.fuse(feats)
        pred = logits.argmax(1)
        uni = model.unimodal_logits(feats)
        conf = normalised_confidences(torch.stack([unimodal_confidence(z, y).double() for z in uni], 1))
        only = {}
        for k, m in enumerate(mods):  # fused head with every other modality zeroed
            kept = [f if i == k else torch.zeros_like(f) for i, f in enumerate(feats)]
            only[m] = float((model.fuse(kept).argmax(1) == y).double().mean())
        out = {"samples": int(len(y)), "loss": float(F.cross_entropy(logits, y)),
               "accuracy": float((pred == y).double().mean()),
               "macro_f1": macro_f1(pred.cpu().numpy(), y.cpu().numpy()),
               "unimodal_acc": {m: float((z.argmax(1) == y).double().mean()) for m, z in zip(mods, uni)},
               "only_acc": only,
               "uni_conf": {m: float(conf[:, k].mean()) for k, m in enumerate(mods)}}
        out.update(misaligned_metrics(model.fuse, feats, y, seed, mods))
        return out
    finally:
        model.train(was_training)
