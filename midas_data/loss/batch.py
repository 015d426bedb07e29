"""MIDAS loss terms straight from a stream batch, for a user's own model.

The stream gives each misaligned sample (b, m) its sources (row b for every modality but
m, row partner[b, m] for m) and the sources' stored unimodal confidences. These helpers
turn that into the soft-label targets of docs/METHOD.md ("Confidences and soft labels")
and call the pure functions of `midas_data.loss.terms`; nothing about the model is
assumed beyond "logits for inputs".

Fill rows (`batch["valid"] == False`, `batch["weight"] == 0`: repeats that pad the epoch's
last batches, see docs/CONTRACTS.md) count nowhere: `aligned_loss` weights rows by
`batch["weight"]`, and the misaligned rows of `materialize_misaligned` never involve them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from midas_data.loss.terms import (
    AlphaStats,
    accumulate,
    misaligned_loss,
    modality_weights,
    normalised_confidences,
    source_rows,
    weak_modality,
)


def aligned_loss(logits: Tensor, batch: dict) -> Tensor:
    """Cross-entropy of the aligned rows, averaged over the real ones.

    logits: [B, C] the user's logits on `batch["inputs"]`. Returns
    sum_b weight_b * CE(z_b, y_b) / sum_b weight_b with `batch["weight"]` [B] (1 for real
    rows, 0 for fill rows; all ones when the batch has none), i.e. the mean CE over the rows
    with `batch["valid"]`. A batch with no real row (or no row) gives a zero that is still
    attached to `logits`, so `backward()` and DDP's gradient all-reduce run as usual.
    """
    y = batch["label"].to(logits.device)
    weight = batch.get("weight")
    if logits.dim() != 2 or logits.shape[0] != y.shape[0]:
        raise ValueError(f"aligned_loss: logits must be [B, C] with B = {y.shape[0]} rows of the "
                         f"batch, got {tuple(logits.shape)}")
    if weight is None or bool((weight == 1).all()):
        return F.cross_entropy(logits, y) if len(y) else logits.sum() * 0.0
    weight = weight.to(device=logits.device, dtype=logits.dtype)
    total = weight.sum()
    if not total > 0:
        return logits.sum() * 0.0  # a mean over no real row would be NaN
    return (weight * F.cross_entropy(logits, y, reduction="none")).sum() / total


def _source_rows(batch: dict, mis: dict) -> tuple[Tensor, Tensor, Tensor]:
    """`source_rows` of the misaligned rows [N, M]; the modality index [N, M]; and whether
    that modality is the swapped one [N, M]."""
    anchor, swapped = mis["anchor"], mis["swapped"]
    m_count = batch["partner"].shape[1]
    src_rows = source_rows(anchor, swapped, batch["partner"][anchor, swapped], m_count)
    cols = torch.arange(m_count).expand(len(anchor), m_count)
    return src_rows, cols, cols == swapped.unsqueeze(1)


def misaligned_targets(batch: dict, mis: dict) -> tuple[Tensor, Tensor]:
    """Source labels [N, M] and normalised confidences [N, M] of the misaligned rows.

    `mis` is `materialize_misaligned(batch)`. With stored per-modality confidences
    (`batch["conf"]`, from `midas-data extract`) each modality's weight is its source's
    confidence normalised over the modalities (`normalised_confidences`); without them the stream's
    anchor/partner weights (0.5 each) are split over the anchor's kept modalities.
    """
    src_rows, cols, is_swapped = _source_rows(batch, mis)
    n = len(src_rows)
    src_labels = batch["label"][src_rows]
    conf = batch.get("conf")
    if conf is not None and n and torch.isfinite(conf).all():
        weights = normalised_confidences(conf[src_rows, cols].double())
    else:
        kept = (~is_swapped).sum(1, keepdim=True).double()
        weights = torch.where(is_swapped, mis["weights"][:, 1:2].double(),
                              mis["weights"][:, 0:1].double() / kept)
    return src_labels, weights.float()


def batch_misaligned_loss(logits: Tensor, batch: dict, mis: dict, alpha: float = 1.0,
                          weak: int | None = None, hard_weighting: bool = True) -> Tensor:
    """L_mis for the misaligned rows of a batch.

    logits: [N, C] the user's fused logits on `mis["inputs"]`; alpha: the weak-modality
    weight (see `update_alpha`); weak: index of the weak modality (default: the lowest
    mean stored confidence of the batch's real rows, else the last modality). No
    misaligned row (e.g. a batch of fill rows) gives a zero attached to `logits`.
    """
    src_labels, weights = misaligned_targets(batch, mis)
    m_count = src_labels.shape[1]
    if weak is None:
        conf = batch.get("conf")
        if conf is not None and "valid" in batch:
            conf = conf[batch["valid"]]
        weak = weak_modality(conf.nanmean(0)) if conf is not None and torch.isfinite(conf).any() else m_count - 1
    hard = mis["hard_weight"] if hard_weighting else None
    return misaligned_loss(logits, src_labels, weights.to(logits.dtype),
                           modality_weights(m_count, weak, alpha).to(logits.device), hard)


def batch_alpha_stats(stats: AlphaStats, logits: Tensor, batch: dict, mis: dict, weak: int,
                      strong: int) -> AlphaStats:
    """Add a batch's misaligned rows (real rows only, as `materialize_misaligned` gives
    them) to the statistics that `update_alpha` consumes."""
    src_rows, cols, _ = _source_rows(batch, mis)
    src_labels = batch["label"][src_rows]
    conf = batch["conf"][src_rows, cols]
    return accumulate(stats, logits, src_labels[:, strong], src_labels[:, weak], conf[:, strong], conf[:, weak])
