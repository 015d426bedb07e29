"""MIDAS loss terms as pure torch functions (the equations of docs/METHOD.md).

Shapes: B aligned samples, N misaligned rows, M modalities, C classes, D feature dim.
A misaligned row draws modality m from a source sample with label ``src_labels[:, m]``
and unimodal confidence ``src_conf[:, m]``; for two modalities and anchor i with partner
j, row A = (x^1_i, x^2_j) has ``src_labels = [y_i, y_j]``, ``src_conf = [c^1_i, c^2_j]``.

Nothing here keeps state: ``alpha`` and its running statistics (:class:`AlphaStats`) are
values that the trainer threads through :func:`accumulate` and :func:`update_alpha`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AlphaStats",
    "LossTerms",
    "accumulate",
    "midas_loss_by_class",
    "hard_sample_weight",
    "hard_weight_from_similarity",
    "in_batch_hard_weight",
    "mean_replaced_similarity",
    "midas_total_loss",
    "misaligned_loss",
    "misaligned_top2_correct",
    "modality_weights",
    "normalised_confidences",
    "source_rows",
    "strong_modality",
    "unimodal_confidence",
    "update_alpha",
    "weak_and_strong",
    "weak_modality",
]


def _check(cond: bool, msg: str | Callable[[], str]) -> None:
    """Raise ValueError(msg) unless cond; a callable msg is formatted only on failure (these
    checks run on every training step, and formatting shapes costs more than the check)."""
    if not cond:
        raise ValueError(msg() if callable(msg) else msg)


def _nograd(t: Tensor) -> Tensor:
    """`t` without autograd history: `t.detach()`, skipped when there is none to cut (these
    helpers run on every training step, and on small tensors each call costs as much as the math)."""
    return t.detach() if t.requires_grad else t


def _as(t: Tensor, like: Tensor) -> Tensor:
    """`t` detached, in `like`'s dtype and on its device (no copy when it already is)."""
    t = _nograd(t)
    return t if t.dtype == like.dtype and t.device == like.device else t.to(device=like.device, dtype=like.dtype)


def unimodal_confidence(logits: Tensor, y: Tensor) -> Tensor:
    """c_i = softmax(logits_i)[y_i] at temperature 1, detached.

    logits: [B, C]; y: int64 [B]. Returns [B] in the logits' dtype. Detached because the
    confidence is a label weight, not something the encoders should be trained to move.
    """
    _check(logits.dim() == 2 and y.shape == logits.shape[:1],
           lambda: f"unimodal_confidence: logits [B,C] and y [B], got {tuple(logits.shape)}, {tuple(y.shape)}")
    probs = torch.softmax(logits.detach(), dim=1)
    return probs.gather(1, y.long().unsqueeze(1)).squeeze(1)


def normalised_confidences(src_conf: Tensor) -> Tensor:
    """c~^m = c^m / sum_m' c^m' per misaligned row (docs/METHOD.md, "Confidences and soft labels").

    src_conf: [N, M], confidence of each modality's source (see :func:`source_rows`).
    Returns [N, M] in src_conf's dtype, detached. For M = 2 this is the paper's
    w1 = c^1_i / (c^1_i + c^2_j). This is the one implementation: the loss, the stream's
    anchor/partner weights, the mined pairs table and the trainer's metrics all call it
    (NumPy callers through ``torch.from_numpy``).

    Every row sums to 1. A row whose confidences are all zero carries no evidence for any
    source, so it gets the uniform weights 1/M (0.5/0.5 for two modalities): the soft label
    stays a distribution and the loss stays finite. Rows with a positive sum are divided
    exactly (no epsilon), so ordinary rows match a float64 reference bit for bit.
    """
    _check(src_conf.dim() == 2, lambda: f"normalised_confidences: src_conf must be [N,M], got {tuple(src_conf.shape)}")
    c = _nograd(src_conf)
    total = c.sum(dim=1, keepdim=True)
    # A zero row's 0/0 is replaced; NaN rows stay NaN: a missing confidence is not a zero one.
    return torch.where(total == 0, 1.0 / max(c.shape[1], 1), c / total)


def source_rows(anchor: Tensor, swapped: Tensor, partner: Tensor, num_modalities: int) -> Tensor:
    """Batch row that each modality of each misaligned row comes from, int64 [N, M].

    Misaligned row n is anchor ``anchor[n]`` with modality ``swapped[n]`` taken from batch
    row ``partner[n]``: its modality ``swapped[n]`` comes from ``partner[n]``, every other
    modality from ``anchor[n]``. anchor, swapped, partner: int64 [N]. With
    ``src = source_rows(...)``, ``labels[src]`` are the source labels and
    ``conf[src, arange(M)]`` the source confidences of the misaligned rows.
    """
    _check(anchor.dim() == 1 and swapped.shape == anchor.shape and partner.shape == anchor.shape,
           lambda: f"source_rows: three [N] tensors, got {tuple(anchor.shape)}, {tuple(swapped.shape)}, "
           f"{tuple(partner.shape)}")
    k = torch.arange(num_modalities, device=anchor.device)
    return torch.where(swapped[:, None] == k[None, :], partner[:, None], anchor[:, None])


def hard_weight_from_similarity(similarity: Tensor) -> Tensor:
    """h = 1 + (s + 1) / 2 in [1, 2], detached; s is clamped to [-1, 1] against rounding."""
    return _hard_weight_of_clamped(_nograd(similarity).clamp(-1.0, 1.0))


def _hard_weight_of_clamped(s: Tensor) -> Tensor:
    """`hard_weight_from_similarity` of an s already clamped, which it overwrites."""
    # addcdiv(1, s + 1, 2) rounds (s + 1) / 2 then the sum, as the two steps written out
    # would: the same numbers in one op fewer (this runs on every training step).
    one, two = _one_and_two(s.dtype, s.device)
    return torch.addcdiv(one, s.add_(1.0), two)


@functools.lru_cache(maxsize=16)
def _one_and_two(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.ones((), dtype=dtype, device=device), torch.full((), 2.0, dtype=dtype, device=device)


def hard_sample_weight(f_anchor: Tensor, f_partner: Tensor) -> Tensor:
    """Hard-sample weight from the swapped modality's features of anchor and partner.

    f_anchor, f_partner: [N, D]. Returns h: [N] in [1, 2]. The cosine is taken on detached
    features: h only scales the loss, no gradient flows into the encoders through it.
    For M > 2 use :func:`mean_replaced_similarity` then :func:`hard_weight_from_similarity`.
    """
    _check(f_anchor.dim() == 2 and f_anchor.shape == f_partner.shape,
           lambda: f"hard_sample_weight: two [N,D] tensors, got {tuple(f_anchor.shape)}, {tuple(f_partner.shape)}")
    s = F.cosine_similarity(f_anchor.detach(), f_partner.detach(), dim=1)
    return hard_weight_from_similarity(s)


def in_batch_hard_weight(features: Tensor, anchor: Tensor | None, source: Tensor) -> Tensor:
    """:func:`hard_sample_weight` of rows whose swapped modality's features are rows of one matrix.

    features: [R, D], e.g. a batch's per-modality features stacked as [B * M, D]; anchor,
    source: int64 [N], the rows of the anchor's and of the source's features (``None`` for
    anchor means rows 0..N-1, N = R). Returns h: [N], equal bit for bit to
    ``hard_sample_weight(features[anchor], features[source])``: each row is normalised once
    and the cosine is the same sum of the same products, without gathering the raw rows twice.
    """
    _check(features.dim() == 2 and source.dim() == 1 and (anchor is None and source.shape[0] == features.shape[0]
                                                           or anchor is not None and anchor.shape == source.shape),
           lambda: f"in_batch_hard_weight: features [R,D], anchor and source [N] (anchor None: N = R), got "
           f"{tuple(features.shape)}, {None if anchor is None else tuple(anchor.shape)}, {tuple(source.shape)}")
    f = _nograd(features)
    # F.cosine_similarity's own steps (norms clamped at its eps, each side divided, then
    # the row sum of the product, which is what vecdot computes), once per row of `features`.
    unit = f / torch.linalg.vector_norm(f, dim=1, keepdim=True).clamp_min_(_COSINE_EPS)
    first = unit if anchor is None else unit.index_select(0, anchor)
    similarity = torch.linalg.vecdot(first, unit.index_select(0, source))
    return _hard_weight_of_clamped(similarity.clamp_(-1.0, 1.0))  # its own tensor: no copy made


_COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default eps


def mean_replaced_similarity(
    anchor_feats: Sequence[Tensor], source_feats: Sequence[Tensor], replaced: Tensor
) -> Tensor:
    """Mean cosine over the replaced modalities of each row (appendix A.2), detached.

    anchor_feats[m], source_feats[m]: [N, D_m] features of modality m of the anchor and of
    the source that row n takes modality m from; replaced: bool [N, M], True where the
    source is not the anchor. Returns s: [N]. Every row must replace at least one modality
    (else it is not misaligned). With one replaced modality this is that modality's cosine.
    """
    m = len(anchor_feats)
    _check(m == len(source_feats) and replaced.dim() == 2 and replaced.shape[1] == m,
           lambda: f"mean_replaced_similarity: {m} anchor, {len(source_feats)} source feature sets, "
           f"replaced {tuple(replaced.shape)}")
    cos = torch.stack([F.cosine_similarity(a.detach(), b.detach(), dim=1)
                       for a, b in zip(anchor_feats, source_feats)], dim=1)  # [N, M]
    mask = replaced.to(cos.dtype)
    count = mask.sum(dim=1)
    _check(bool((count > 0).all()), "mean_replaced_similarity: a row replaces no modality")
    return (cos * mask).sum(dim=1) / count


def modality_weights(num_modalities: int, weak: int, alpha: float,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """a: [M] with a[weak] = alpha and 1 elsewhere (the weak modality's soft-label term)."""
    _check(num_modalities >= 1 and 0 <= weak < num_modalities,
           lambda: f"modality_weights: weak={weak} not in [0, {num_modalities})")
    a = torch.ones(num_modalities, dtype=dtype)
    a[weak] = alpha
    return a


def misaligned_loss(
    logits: Tensor,
    src_labels: Tensor,
    src_weights: Tensor,
    modality_weight: Tensor,
    hard_weight: Tensor | None = None,
) -> Tensor:
    """L_mis = mean_n h_n * sum_m a_m * w_nm * CE(z_n, y_nm).

    logits: [N, C] fused logits of the misaligned rows; src_labels: int64 [N, M];
    src_weights: [N, M] normalised confidences w (see :func:`normalised_confidences`);
    modality_weight: [M] (see :func:`modality_weights`); hard_weight: [N] or None (= 1).
    Returns a scalar. With the paper's rows A and B for each of B anchors (N = 2B), the
    mean over the 2B rows equals mean_b (h_A loss_A + h_B loss_B) / 2. Weights are detached:
    only the fused logits receive gradient. N = 0 gives a zero still attached to ``logits``
    so that ``backward()`` works on a batch without misaligned rows.
    """
    n = logits.shape[0]
    _check(logits.dim() == 2 and src_labels.dim() == 2 and src_labels.shape[0] == n
           and src_weights.shape == src_labels.shape
           and modality_weight.shape == src_labels.shape[1:],
           lambda: f"misaligned_loss: logits {tuple(logits.shape)}, src_labels {tuple(src_labels.shape)}, "
           f"src_weights {tuple(src_weights.shape)}, modality_weight {tuple(modality_weight.shape)}")
    _check(hard_weight is None or hard_weight.shape == (n,),
           lambda: f"misaligned_loss: hard_weight must be [{n}], got {None if hard_weight is None else tuple(hard_weight.shape)}")
    if n == 0:
        return logits.sum() * 0.0  # mean of nothing would be NaN
    labels = src_labels if src_labels.dtype == torch.int64 else src_labels.long()
    # The sum as one soft target per row: L_mis = sum_{n,c} t[c, n] * log softmax(z_n)[c]
    # with t[c, n] = -(h_n / N) * sum of coef_nm over the sources m labelled c. Autograd then
    # differentiates a product and a sum instead of a chain of gathers and per-row scalings.
    target = _misaligned_targets(logits.new_zeros(logits.shape[1], n), labels, src_weights, modality_weight,
                                 hard_weight, -1.0 / n)
    # Classes along dim 0: the CPU log_softmax over a short last dim (10 classes) costs
    # several times the same one over the first dim of the transposed copy.
    logp = torch.log_softmax(logits.t().contiguous(), dim=0)
    return (target * logp).sum()


def _misaligned_targets(target: Tensor, labels: Tensor, src_weights: Tensor, modality_weight: Tensor,
                        hard_weight: Tensor | None, scale: float) -> Tensor:
    """Adds to `target` [C, N] each misaligned row's soft target times `scale` (times h_n):
    t[c, n] += scale * h_n * sum of src_weights[n, m] * modality_weight[m] over the sources
    m labelled c (labels: int64 [N, M]). Returns `target`."""
    n = labels.shape[0]
    row_scale = torch.full((n,), scale, dtype=target.dtype, device=target.device) if hard_weight is None \
        else _as(hard_weight, target) * scale
    coef = (_as(src_weights, target) * _as(modality_weight, target)).mul_(row_scale.unsqueeze(1))
    return target.scatter_add_(0, labels.t(), coef.t())


def midas_loss_by_class(
    log_probs: Tensor,
    labels: Tensor,
    unimodal: int,
    src_labels: Tensor,
    src_weights: Tensor,
    modality_weight: Tensor,
    hard_weight: Tensor | None = None,
    lam: float = 1.0,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """L_uni + CE(z, y) + lam * L_mis of a MIDAS step from one log-softmax, classes first.

    log_probs: [C, U * B + B + N], ``log_softmax(dim=0)`` of the logits of every head side
    by side, transposed: the `unimodal` (U) heads' B columns each, then the fused head's B
    aligned and N misaligned rows (one log-softmax for all of them, whose unimodal columns
    also give the confidences c^m = exp(log p)[y]). labels: int64 [B]; weight: [B] (None: all
    1); src_labels, src_weights, modality_weight, hard_weight: the misaligned rows' terms as
    in :func:`misaligned_loss`. L_uni is the mean over the U
    heads of their CE, each CE the weighted mean over rows as in `aligned_loss`. Returns
    (loss, l_uni, ce, l_mis): ``loss`` carries the gradient, the others are the terms'
    values, detached (for logging).

    Equal in exact arithmetic to ``mean(aligned_loss of each head) + aligned_loss + lam *
    misaligned_loss``; only the rounding differs: every term is a sum of target *
    log-probability with targets built without gradient (a one-hot per aligned row, a soft
    label per misaligned row), so autograd differentiates one product and one sum for all
    of them, and classes-first is the layout where the CPU log_softmax is fast for few
    classes (over a last dim of 10 it costs several times as much). With U = 0 it is the
    fused head alone: CE + lam * L_mis.
    """
    _check(unimodal >= 0, lambda: f"midas_loss_by_class: unimodal must be >= 0, got {unimodal}")
    _check_shapes(f"midas_loss_by_class: log_probs [C, U*B+B+N] with U={unimodal}", log_probs, labels, unimodal + 1,
                  src_labels, src_weights, modality_weight, hard_weight, weight)
    return _objective_by_class(log_probs, labels, unimodal, src_labels, src_weights, modality_weight, hard_weight,
                               lam, weight)


def _check_shapes(what: str, by_class: Tensor, labels: Tensor, blocks: int, src_labels: Tensor, src_weights: Tensor,
                  modality_weight: Tensor, hard_weight: Tensor | None, weight: Tensor | None) -> None:
    """The shapes the classes-first objectives need: `blocks` column blocks of B rows, then N."""
    b = labels.shape[0]
    n = (by_class.shape[1] if by_class.dim() == 2 else -1) - blocks * b
    _check(by_class.dim() == 2 and labels.dim() == 1 and n >= 0 and src_labels.dim() == 2
           and src_labels.shape[0] == n and src_weights.shape == src_labels.shape
           and modality_weight.shape == src_labels.shape[1:]
           and (hard_weight is None or hard_weight.shape == (n,)) and (weight is None or weight.shape == (b,)),
           lambda: f"{what} {tuple(by_class.shape)}, labels [B] {tuple(labels.shape)}, src_labels and src_weights "
           f"[N, M] {tuple(src_labels.shape)}, {tuple(src_weights.shape)}, modality_weight [M] "
           f"{tuple(modality_weight.shape)}, hard_weight [N], weight [B]")


def _objective_by_class(logp: Tensor, labels: Tensor, unimodal: int, src_labels: Tensor, src_weights: Tensor,
                        modality_weight: Tensor, hard_weight: Tensor | None, lam: float,
                        weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    c, total = logp.shape
    b = labels.shape[0]
    uni_cols = unimodal * b
    lead = uni_cols + b  # the columns whose target is a one-hot at the row's own label
    n = total - lead
    target = logp.new_zeros(c, total)
    if b:  # minus each row's normalised weight at its label: 1 / (U * sum w) per head, 1 / sum w fused
        labels = labels if labels.dtype == torch.int64 else labels.long()
        at_labels = (labels.repeat(unimodal + 1) if unimodal else labels).view(1, lead)
        if weight is None or bool((weight == 1).all()):
            target.scatter_(0, at_labels, _one_hot_values(unimodal, b, logp.dtype, logp.device))
        else:
            w = _as(weight, logp)
            w_total = w.sum()
            if w_total > 0:  # else no real row: the CEs are zeros still attached to the logits
                fused = (w / w_total).neg_()
                values = torch.cat((fused.div(unimodal).repeat(unimodal), fused)) if unimodal else fused
                target.scatter_(0, at_labels, values.view(1, lead))
    # lam scales the misaligned targets; with lam = 0 they are built unscaled (for l_mis)
    # and their columns stay out of the loss.
    lam_used = lam if lam > 0 else 1.0
    if n:  # minus lam * h_n / N times each source's coefficient, at the source's label
        labels_mis = src_labels if src_labels.dtype == torch.int64 else src_labels.long()
        _misaligned_targets(target[:, lead:], labels_mis, src_weights, modality_weight, hard_weight, -lam_used / n)
    prod = target * logp
    values = prod.detach()
    l_uni = values[:, :uni_cols].sum()
    ce = values[:, uni_cols:lead].sum()
    l_mis = values[:, lead:].sum()  # its own sum: no cancellation in a difference of totals
    if lam > 0:
        return prod.sum(), l_uni, ce, (l_mis if lam == 1.0 else l_mis / lam)
    return prod[:, :lead].sum(), l_uni, ce, l_mis


@functools.lru_cache(maxsize=32)
def _one_hot_values(unimodal: int, b: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[1, (U + 1) * B]: -1 / (U * B) for the U unimodal heads' columns, -1 / B for the fused."""
    return torch.cat((torch.full((unimodal * b,), -1.0 / (unimodal * b) if unimodal else 0.0, dtype=dtype,
                                 device=device), torch.full((b,), -1.0 / b, dtype=dtype, device=device))).view(1, -1)


class LossTerms(NamedTuple):
    """Terms of the MIDAS objective; terms not computed are zero tensors (for logging)."""

    total: Tensor
    fused: Tensor
    unimodal: Tensor
    misaligned: Tensor


def midas_total_loss(
    fused_ce: Tensor | None,
    unimodal_ces: Sequence[Tensor] | Tensor,
    mis_loss: Tensor | None,
    lam: float,
    warmup: bool,
) -> LossTerms:
    """L = CE(z, y) + L_uni + lam * L_mis, or L = L_uni during warm-up.

    fused_ce: scalar CE of the fused head on aligned samples (may be None in warm-up);
    unimodal_ces: M scalars (or a [M] tensor), L_uni is their mean; mis_loss: scalar
    L_mis, None when the batch has no misaligned rows.
    """
    uni_t = unimodal_ces if isinstance(unimodal_ces, Tensor) else torch.stack(list(unimodal_ces))
    _check(uni_t.numel() >= 1, "midas_total_loss: no unimodal losses")
    uni = uni_t.mean()
    zero = uni.detach() * 0.0
    fused = zero if fused_ce is None else fused_ce
    mis = zero if mis_loss is None else mis_loss
    if warmup:
        # Encoders and unimodal heads learn first so that confidences mean something.
        return LossTerms(uni, fused.detach(), uni, mis.detach())
    _check(fused_ce is not None, "midas_total_loss: fused_ce is required after warm-up")
    return LossTerms(fused + uni + lam * mis, fused, uni, mis)


def weak_modality(mean_conf: Tensor | Sequence[float]) -> int:
    """Index of the modality with the lowest mean confidence (first one on ties)."""
    t = torch.as_tensor(mean_conf, dtype=torch.float64).flatten()
    _check(t.numel() >= 1, "weak_modality: no modalities")
    return int(torch.argmin(t))


def strong_modality(mean_conf: Tensor | Sequence[float]) -> int:
    """Index of the modality with the highest mean confidence (first one on ties).

    Use :func:`weak_and_strong` when the strong modality must differ from the weak one.
    """
    t = torch.as_tensor(mean_conf, dtype=torch.float64).flatten()
    _check(t.numel() >= 1, "strong_modality: no modalities")
    return int(torch.argmax(t))


def weak_and_strong(mean_conf: Tensor | Sequence[float]) -> tuple[int, int]:
    """(weak, strong) modality indices from each modality's mean confidence: the one tie rule.

    weak = the lowest mean (first one on ties); strong = the highest mean among the *other*
    modalities (first one on ties), so the two always differ, even when every mean is
    equal (then weak = 0, strong = 1). Needs at least two modalities. The trainer's alpha
    rule and the stream's "weak"/"strong" modality names both resolve through this.
    """
    t = torch.as_tensor(mean_conf, dtype=torch.float64).flatten()
    _check(t.numel() >= 2, lambda: f"weak_and_strong: needs two or more modalities, got {t.numel()}")
    weak = int(torch.argmin(t))
    others = t.clone()
    others[weak] = -torch.inf
    return weak, int(torch.argmax(others))


@dataclass(frozen=True)
class AlphaStats:
    """Running sums over misaligned rows for the alpha update (an immutable value).

    fused_strong / fused_weak: sums of the fused softmax at the strong / weak modality's
    source label; uni_strong / uni_weak: sums of those sources' unimodal confidences;
    count: rows summed. Add two with ``+`` (e.g. to merge ranks or workers).
    """

    fused_strong: float = 0.0
    fused_weak: float = 0.0
    uni_strong: float = 0.0
    uni_weak: float = 0.0
    count: int = 0

    def __add__(self, other: AlphaStats) -> AlphaStats:
        return AlphaStats(self.fused_strong + other.fused_strong, self.fused_weak + other.fused_weak,
                          self.uni_strong + other.uni_strong, self.uni_weak + other.uni_weak,
                          self.count + other.count)


def accumulate(
    stats: AlphaStats,
    logits: Tensor,
    strong_labels: Tensor,
    weak_labels: Tensor,
    strong_conf: Tensor,
    weak_conf: Tensor,
) -> AlphaStats:
    """Return ``stats`` plus one batch of misaligned rows.

    logits: [N, C] fused logits; strong_labels, weak_labels: int64 [N], labels of the
    sources of the strong and weak modality (``src_labels[:, strong]``, ``[:, weak]``);
    strong_conf, weak_conf: [N] those sources' unimodal confidences c (not normalised).
    Rows whose two sources share a label are skipped: there the fused probabilities at
    both labels coincide and say nothing about which modality the fused head follows.
    """
    n = logits.shape[0]
    _check(logits.dim() == 2 and all(t.shape == (n,) for t in
                                     (strong_labels, weak_labels, strong_conf, weak_conf)),
           lambda: f"accumulate: logits [N,C] and four [N] tensors, got logits {tuple(logits.shape)}")
    keep = (strong_labels != weak_labels).nonzero().view(-1)
    # Classes first: the CPU softmax over a short last dim (10 classes) costs several times
    # the one over dim 0 of the transposed tensor.
    p = torch.softmax(logits.detach().double().t(), dim=0)  # [C, N]
    at = torch.stack((strong_labels, weak_labels)).long()  # [2, N]
    p_at = p.gather(0, at)  # fused probability at the strong and at the weak source's label
    conf = torch.stack((strong_conf.detach(), weak_conf.detach())).double()
    ps, pw, cs, cw = torch.cat((p_at, conf)).index_select(1, keep).sum(dim=1).tolist()
    return stats + AlphaStats(ps, pw, cs, cw, keep.shape[0])


def update_alpha(alpha: float, stats: AlphaStats, eta: float = 0.05) -> float:
    """One alpha step: alpha +/- eta, then max(1, alpha). Returns the new alpha.

    Compares the fused ratio mean p[strong] / mean p[weak] with the unimodal ratio
    mean c_strong / mean c_weak. If the fused head over-weights the strong modality
    (fused ratio > unimodal ratio) alpha += eta, otherwise (ties included, as in the
    authors' if/else) alpha -= eta. The means share one count, so the comparison is done
    by cross-multiplying the sums: no division, safe at zero. Empty stats: no step.

    For two modalities, with normalised means p~_weak = P_w / (P_s + P_w) and
    c~_weak = C_w / (C_s + C_w), this equals the paper's
    alpha <- max(1, alpha + eta * sign(E[c~_weak] - E[p~_weak])) whenever the ratios
    differ; at an exact tie the paper's sign(0) = 0 keeps alpha, this rule lowers it.
    A single batch's means can be passed as ``AlphaStats(p_s, p_w, c_s, c_w, 1)``.
    """
    if stats.count == 0:
        return max(1.0, alpha)
    over = stats.fused_strong * stats.uni_weak > stats.uni_strong * stats.fused_weak
    return max(1.0, alpha + eta if over else alpha - eta)


def misaligned_top2_correct(logits: Tensor, y_a: Tensor, y_b: Tensor) -> Tensor:
    """Misaligned accuracy: the fused top-2 classes are exactly {y_a, y_b}, in any order.

    logits: [N, C] (C >= 2); y_a, y_b: int64 [N] labels of the two sources. Returns bool
    [N]; a row with y_a == y_b is never correct (it is not a misaligned sample).
    """
    _check(logits.dim() == 2 and logits.shape[1] >= 2 and y_a.shape == logits.shape[:1]
           and y_b.shape == y_a.shape,
           lambda: f"misaligned_top2_correct: logits [N,C>=2], y_a, y_b [N], got {tuple(logits.shape)}, "
           f"{tuple(y_a.shape)}, {tuple(y_b.shape)}")
    top = logits.detach().topk(2, dim=1).indices
    a, b = y_a.long().to(top.device), y_b.long().to(top.device)
    # The two top-k indices are distinct, so y_a == y_b can never match both.
    return ((top[:, 0] == a) & (top[:, 1] == b)) | ((top[:, 0] == b) & (top[:, 1] == a))
