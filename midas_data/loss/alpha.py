"""The authors' per-batch alpha step, as a pure function (docs/METHOD.md, "Weak-modality weight alpha").

Two rules move the weak-modality weight alpha by +/- eta, then clamp it at 1:

- pooled (:func:`midas_data.loss.update_alpha`, the once-per-epoch default): every misaligned
  row of the epoch in one strong-over-weak ratio of fused probabilities, compared with the
  strong-over-weak ratio of unimodal confidences of the same rows.
- per batch (this module, the authors' code): the two swap directions are kept apart.
  u = mean c^1 / mean c^2 over the batch's aligned samples; for direction A (modality 2
  swapped) and B (modality 1 swapped) the fused ratio r = mean p[label of modality 1's
  source] / mean p[label of modality 2's source] over that direction's rows; mm = (r_A + r_B) / 2.
  Both ratios stay "modality 1 over modality 2" whichever modality is strong, and the
  directions are averaged, not pooled, so on some batches the two rules step opposite ways.

For M > 2 modalities the rule is applied to the pair (weak, strong), ordered by modality
index: "modality 1" is the lower index of the two, "modality 2" the higher, direction A
holds the rows that swap the higher one and B the rows that swap the lower one; rows that
swap a third modality carry the same label at both and are not counted.

Shapes: B aligned samples, N misaligned rows, M modalities, C classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import astuple, dataclass

import torch
from torch import Tensor

__all__ = ["DirectionSums", "authors_alpha_step", "authors_alpha_update", "authors_batch_ratios",
           "direction_sums"]


def authors_alpha_step(alpha: float, u: float, r_a: float, r_b: float, eta: float = 0.05) -> float:
    """One alpha step of the authors' rule. Returns the new alpha.

    u: mean c^1 / mean c^2 over the batch's aligned samples; r_a, r_b: the fused ratios
    mean p[y of modality 1's source] / mean p[y of modality 2's source] over the rows of
    direction A (modality 2 swapped) and B (modality 1 swapped). With mm = (r_a + r_b) / 2:
    if u > 1 (modality 1 strong) alpha += eta when mm > u, else alpha -= eta; if u <= 1
    (modality 2 strong) alpha += eta when mm < u, else alpha -= eta. Then max(1, alpha).
    Ties (mm == u) lower alpha, as the authors' if/else does.
    """
    for name, v in (("u", u), ("r_a", r_a), ("r_b", r_b)):
        if math.isnan(v):
            raise ValueError(f"authors_alpha_step: {name} is NaN; pass ratios of non-empty means")
    mm = (r_a + r_b) / 2.0
    up = mm > u if u > 1.0 else mm < u
    return max(1.0, alpha + eta if up else alpha - eta)


@dataclass(frozen=True)
class DirectionSums:
    """Sums behind the authors' ratios for one batch (an immutable value; add two with ``+``
    to merge ranks). "1" and "2" are the first and second modality of the compared pair.

    conf_1, conf_2, aligned: sums of c^1 and c^2 over the aligned samples and their count;
    p1_a, p2_a, rows_a: sums of the fused softmax at the labels of modality 1's and
    modality 2's sources over direction A's rows (modality 2 swapped) and their count;
    p1_b, p2_b, rows_b: the same over direction B (modality 1 swapped).
    """

    conf_1: float = 0.0
    conf_2: float = 0.0
    aligned: float = 0.0
    p1_a: float = 0.0
    p2_a: float = 0.0
    rows_a: float = 0.0
    p1_b: float = 0.0
    p2_b: float = 0.0
    rows_b: float = 0.0

    def __add__(self, other: DirectionSums) -> DirectionSums:
        return DirectionSums(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def to_list(self) -> list[float]:
        return [float(v) for v in astuple(self)]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> DirectionSums:
        return cls(*(float(v) for v in values))

    def ratios(self) -> tuple[float, float, float]:
        """(u, r_a, r_b); a ratio is NaN when its direction (or the batch) has no rows.

        Each ratio is a quotient of means over the same rows, so it is the quotient of the
        sums. A zero denominator with a positive numerator gives +inf (the comparison with
        u stays well defined)."""
        return (_ratio(self.conf_1, self.conf_2, self.aligned), _ratio(self.p1_a, self.p2_a, self.rows_a),
                _ratio(self.p1_b, self.p2_b, self.rows_b))


def _ratio(num: float, den: float, count: float) -> float:
    if count <= 0 or (num == 0.0 and den == 0.0):
        return math.nan
    return num / den if den > 0.0 else math.inf


def direction_sums(logits: Tensor, src_labels: Tensor, swapped: Tensor, aligned_conf: Tensor,
                   pair: tuple[int, int] = (0, 1)) -> DirectionSums:
    """The sums of :class:`DirectionSums` for one batch (float64, detached).

    logits: [N, C] fused logits of the misaligned rows; src_labels: int64 [N, M] label of
    each modality's source; swapped: int64 [N] the modality row n takes from its partner;
    aligned_conf: [B, M] unimodal confidences c^m of the batch's aligned samples (live from
    the unimodal heads, or the stream's stored ``conf``); pair: (first, second) modality,
    first < second; for two modalities (0, 1). Rows that swap neither of the pair are left out.
    """
    first, second = pair
    n = logits.shape[0]
    if not (0 <= first < second < src_labels.shape[1]) or src_labels.dim() != 2:
        raise ValueError(f"direction_sums: pair {pair} must be two modality indices, first < second, "
                         f"of src_labels [N, M] = {tuple(src_labels.shape)}")
    if logits.dim() != 2 or src_labels.shape[0] != n or swapped.shape != (n,) or aligned_conf.dim() != 2 \
            or aligned_conf.shape[1] != src_labels.shape[1]:
        raise ValueError(f"direction_sums: logits [N,C], src_labels [N,M], swapped [N], aligned_conf [B,M]; "
                         f"got {tuple(logits.shape)}, {tuple(src_labels.shape)}, {tuple(swapped.shape)}, "
                         f"{tuple(aligned_conf.shape)}")
    c = aligned_conf.detach().double()
    p = torch.softmax(logits.detach().double(), dim=1)
    p1 = p.gather(1, src_labels[:, first:first + 1].long().to(p.device)).squeeze(1)
    p2 = p.gather(1, src_labels[:, second:second + 1].long().to(p.device)).squeeze(1)
    sw = swapped.to(p.device)
    a, b = sw == second, sw == first
    return DirectionSums(float(c[:, first].sum()), float(c[:, second].sum()), float(c.shape[0]),
                         float(p1[a].sum()), float(p2[a].sum()), float(a.sum()),
                         float(p1[b].sum()), float(p2[b].sum()), float(b.sum()))


def authors_batch_ratios(logits: Tensor, src_labels: Tensor, swapped: Tensor, aligned_conf: Tensor,
                         pair: tuple[int, int] = (0, 1)) -> tuple[float, float, float]:
    """(u, r_a, r_b) of one batch: :func:`direction_sums` then :meth:`DirectionSums.ratios`."""
    return direction_sums(logits, src_labels, swapped, aligned_conf, pair).ratios()


def authors_alpha_update(alpha: float, sums: DirectionSums, eta: float = 0.05) -> float:
    """:func:`authors_alpha_step` from a batch's sums (merged over ranks if any).

    A batch with rows in only one direction uses that direction's ratio for mm; a batch with
    no misaligned rows or no usable u takes no step (alpha is only clamped at 1).
    """
    u, r_a, r_b = sums.ratios()
    if math.isnan(u):
        return max(1.0, alpha)
    if math.isnan(r_a) and math.isnan(r_b):
        return max(1.0, alpha)
    if math.isnan(r_a) or math.isnan(r_b):
        r_a = r_b = r_b if math.isnan(r_a) else r_a
    return authors_alpha_step(alpha, u, r_a, r_b, eta)
