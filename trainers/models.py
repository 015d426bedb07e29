"""`MultimodalModel`: one encoder per modality, unimodal linear heads, a fused linear head.

The model is split into the three pieces the MIDAS loss needs, so that each modality is
encoded once per batch and misaligned samples are built by swapping *features* inside the
batch (the paper's in-batch construction): `encode` -> `unimodal_logits` and `fuse` on any
list of per-modality features (aligned, swapped, or zeroed for per-modality accuracy).
`forward` composes them in one call, because DDP synchronises gradients only for what
runs through the wrapped module's forward.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from midas_data.dataset.reader import Dataset
from midas_data.errors import MidasDataError, where
from midas_data.features.encoders import Standardize, build_encoder, default_encoder_for
from midas_data.loss import source_rows
from midas_data.stream.dataset import collate

from .config import TrainConfig


def prepare(kind: str, x: Tensor) -> Tensor:
    """A collated batch of one modality as float32 in the encoders' layout."""
    if kind == "image":  # decoded images are [B, H, W, C] uint8; conv encoders take [B, C, H, W]
        return x.permute(0, 3, 1, 2).float()
    if kind in ("text", "audio") and not isinstance(x, Tensor):
        raise MidasDataError(f"the reference trainer takes tensors; give MidasDataset a transform "
                             f"that turns {kind} into fixed-shape arrays")
    return x.float()


def _stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature statistics for vectors; one scalar for images, spectrograms and clips
    (per-pixel statistics would whiten away spatial structure)."""
    dims = (0,) if x.dim() == 2 else tuple(range(x.dim()))
    mean, std = x.mean(dim=dims), x.std(dim=dims, unbiased=False)
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def train_statistics(ds: Dataset, modalities: Sequence[str], max_samples: int
                     ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[Tensor, Tensor]]]:
    """Input shape and (mean, std) of each modality on the train split.

    At most `max_samples` rows, evenly spaced, are read: enough for stable moments without
    a full pass over a large split. Every DDP rank computes the same numbers from the files.
    """
    reader = ds.split("train")
    n = len(reader)
    if n == 0:
        raise MidasDataError(f"{where(ds.root / 'manifest.json', field='splits')}: the train split is empty")
    rows = np.unique(np.linspace(0, n - 1, min(n, max(max_samples, 1))).round().astype(np.int64))
    batch = collate(reader.get_many(rows, list(modalities)), list(modalities))
    shapes, stats = {}, {}
    for m in modalities:
        x = prepare(ds.schema[m]["kind"], batch["inputs"][m])
        shapes[m] = tuple(x.shape[1:])
        stats[m] = _stats(x)
    return shapes, stats


class MultimodalModel(nn.Module):
    """Encoders phi_m (standardised inputs), unimodal heads g_m, fused head g_f on concat(f^m)."""

    takes_misaligned_flat = True  # train_step passes a stream batch's `misaligned_flat` to forward

    def __init__(self, modalities: Sequence[str], kinds: dict[str, str],
                 shapes: dict[str, tuple[int, ...]], num_classes: int, feature_dim: int = 64,
                 encoders: dict[str, str] | None = None, hidden: Sequence[int] = (128,),
                 stats: dict[str, tuple[Tensor, Tensor]] | None = None):
        super().__init__()
        self.modalities, self.kinds = list(modalities), dict(kinds)
        self.num_classes, self.feature_dim = int(num_classes), int(feature_dim)
        self.encoder_names: dict[str, str] = {}
        self.encoders = nn.ModuleDict()
        for m in self.modalities:
            name = (encoders or {}).get(m) or default_encoder_for(kinds[m], shapes[m])
            kwargs = {"hidden": tuple(hidden)} if name == "mlp" else {}
            mean, std = stats[m] if stats else (torch.zeros(()), torch.ones(()))
            # Standardisation lives inside the model (as buffers), so a checkpoint is usable alone.
            self.encoders[m] = nn.Sequential(Standardize(mean, std),
                                             build_encoder(name, shapes[m], feature_dim, **kwargs))
            self.encoder_names[m] = name
        self.unimodal_heads = nn.ModuleDict({m: nn.Linear(feature_dim, num_classes)
                                             for m in self.modalities})
        self.fused_head = nn.Linear(feature_dim * len(self.modalities), num_classes)

    @classmethod
    def from_dataset(cls, ds: Dataset, config: TrainConfig) -> MultimodalModel:
        mods = config.modalities or ds.modalities
        unknown = [m for m in list(mods) + list(config.encoders) if m not in ds.modalities]
        if unknown:
            raise MidasDataError(f"{where(ds.root / 'manifest.json', field=unknown[0])}: no such "
                                 f"modality; the dataset has {ds.modalities}")
        shapes, stats = train_statistics(ds, mods, config.stats_samples)
        kinds = {m: ds.schema[m]["kind"] for m in mods}
        return cls(mods, kinds, shapes, len(ds.classes), config.feature_dim, config.encoders,
                   config.hidden, stats)

    # -- the pieces ---------------------------------------------------------------------
    def encode(self, inputs: dict[str, Tensor]) -> list[Tensor]:
        """Features f^m [B, D] of each modality, in `self.modalities` order."""
        dev = self.fused_head.weight.device
        return [self.encoders[m](prepare(self.kinds[m], inputs[m]).to(dev)) for m in self.modalities]

    def unimodal_logits(self, feats: Sequence[Tensor]) -> list[Tensor]:
        return [self.unimodal_heads[m](f) for m, f in zip(self.modalities, feats)]

    def fuse(self, feats: Sequence[Tensor]) -> Tensor:
        """Fused logits [N, C] of any per-modality features (aligned, swapped or zeroed)."""
        return self.fused_head(torch.cat(list(feats), dim=1))

    def forward(self, inputs: dict[str, Tensor] | None, partner: Tensor | None = None,
                fused: bool = True, detach_unimodal: bool = False,
                misaligned_flat: Tensor | None = None) -> dict:
        """One pass for a training step.

        Returns {'feats': [M x [B, D]], 'joined': [B, M * D] (the feats concatenated, the
        fused head's input) or None, 'uni': [M x [B, C]], 'fused': [B, C] or None, 'mis': [N, C]
        fused logits of the misaligned rows or None, 'mis_index': `MisalignedIndex` or None}.
        `partner` [B, M] (the stream's in-batch partners) adds the N misaligned rows; row
        (b, m) takes modality m's features from row partner[b, m]. With them,
        'logits_by_class' [C, M * B + B + N] holds every head's logits side by side, classes
        first: the M unimodal heads' B rows each, then the fused head's aligned and
        misaligned rows (what `midas_loss_by_class` takes after one log_softmax), and 'uni',
        'fused' and 'mis' are its transposed column blocks. `fused=False` skips the fused
        head (warm-up: DDP must not see a head that gets no gradient). `detach_unimodal`
        trains the unimodal heads as probes that do not move the encoders (Joint). With
        partners the heads run as their linear maps (addmm with their weight and bias), so
        hooks registered on the head modules do not run there.
        `misaligned_flat`: the stream batch's field of that name (`misaligned_index`), which
        saves building the index here. `inputs=None` (an empty batch on this rank) returns a
        zero loss touching every parameter the other ranks use, so that DDP's gradient
        all-reduce still completes.
        """
        if inputs is None:
            used = [self.encoders, self.unimodal_heads] + ([self.fused_head] if fused else [])
            return {"zero": sum((p * 0).sum() for mod in used for p in mod.parameters())}
        feats = self.encode(inputs)
        joined = torch.cat(feats, dim=1) if fused else None  # [B, M*D], what `fuse` takes
        if partner is not None and fused:
            # Every head in one classes-first block: the misaligned rows gathered with the
            # aligned ones (one gather, one matmul for the fused head), each head as
            # addmm(bias[:, None], W, x.t()), then one concatenation, so that the step takes
            # one log_softmax and one target product for all its losses.
            dev = feats[0].device
            index = misaligned_index(partner.to(dev), None if misaligned_flat is None else misaligned_flat.to(dev))
            heads = [*(self.unimodal_heads[m] for m in self.modalities), self.fused_head]
            head_inputs = [*((f.detach() if detach_unimodal else f).t() for f in feats),
                           aligned_and_swapped_joined(joined, index).t()]
            by_class = torch.cat([torch.addmm(h.bias.unsqueeze(1), h.weight, x) for h, x in zip(heads, head_inputs)],
                                 dim=1)  # [C, M * B + B + N]
            size = joined.shape[0]
            *uni, fused_rows, mis_rows = by_class.t().split_with_sizes([size] * (len(feats) + 1) + [index.flat.shape[0]])
            return {"feats": feats, "joined": joined, "uni": uni, "fused": fused_rows, "mis": mis_rows,
                    "mis_index": index, "logits_by_class": by_class}
        uni = self.unimodal_logits([f.detach() for f in feats] if detach_unimodal else feats)
        return {"feats": feats, "joined": joined, "uni": uni, "fused": self.fused_head(joined) if fused else None,
                "mis": None, "mis_index": None}


class MisalignedIndex(NamedTuple):
    """The N misaligned rows of a batch, b-major like `materialize_misaligned`: row n is
    anchor `b[n]` with modality `m[n]` taken from row `src[n]`; `rows[n, k]` is the batch
    row that modality k of misaligned row n comes from.

    The flat fields index the batch's (row, modality) pairs laid out row-major, b * M + k,
    which is the layout of `torch.stack(per_modality, dim=1)` viewed as [B * M, ...] (and of
    the concatenated features viewed as [B * M, D]): `flat[n, k] = rows[n, k] * M + k`;
    `anchor_flat[n] = b[n] * M + m[n]` and `source_flat[n] = src[n] * M + m[n]` are the
    swapped modality's entries of the anchor and of the partner. `fused_flat` [B + N, M] is
    the aligned rows' b * M + k followed by `flat` (which is a view of it): the fused head's
    input for both kinds of row in one gather; it is the stream's `misaligned_flat` field.

    With every partner present the anchor-side fields are the same for every batch of a
    size; they then come from a cache and are shared: treat all fields as read-only.
    """

    b: Tensor
    m: Tensor
    src: Tensor
    flat: Tensor
    anchor_flat: Tensor
    source_flat: Tensor
    fused_flat: Tensor

    @property
    def rows(self) -> Tensor:
        """[N, M] source row of each modality, `flat // M` (made when asked: the training
        step reads the flat fields only)."""
        return torch.div(self.flat, self.flat.shape[1], rounding_mode="floor")


class _FullLayout(NamedTuple):
    """The parts of a batch's `MisalignedIndex` that do not depend on the partners when every
    row has one for every modality: N = B * M rows (b, m) in b-major order."""

    b: Tensor  # [N]
    m: Tensor  # [N]
    anchor_flat: Tensor  # [N], b * M + m, which is n itself
    modality: Tensor  # [M], k
    unswapped: Tensor  # [B + N, M]: fused_flat as if every source were the anchor, b * M + k
    swapped_at: tuple[Tensor, Tensor]  # (B + n, m[n]): the entries of fused_flat that the partners fill


@functools.lru_cache(maxsize=32)
def _full_layout(size: int, num_modalities: int, device: torch.device) -> _FullLayout:
    k = torch.arange(num_modalities, device=device)
    b = torch.arange(size, device=device).repeat_interleave(num_modalities)
    m = k.repeat(size)
    anchor_cols = b[:, None] * num_modalities + k[None, :]
    unswapped = torch.cat((torch.arange(size * num_modalities, device=device).view(size, num_modalities), anchor_cols))
    n = torch.arange(size * num_modalities, device=device)
    return _FullLayout(b, m, n, k, unswapped, (n + size, m))


def misaligned_index(partner: Tensor, fused_flat: Tensor | None = None) -> MisalignedIndex:
    """Index of every valid misaligned row of a batch's `partner` [B, M] (-1 = none).

    fused_flat: the batch's `misaligned_flat` field (the stream builds it with the
    partners). It is taken as the index's `fused_flat` when every partner is present and
    its swapped entries are those of `partner` (one comparison); otherwise, e.g. a batch
    whose partners were changed after the stream built it, the index is built from
    `partner` as without it: `partner` decides.
    """
    B, M = partner.shape
    full = B * (M + 1)
    if fused_flat is not None and fused_flat.shape == (full, M) and fused_flat.dtype == torch.int64 and B:
        index = _full_index(partner, fused_flat)
        # its partners' entries, (B + b * M + m, m), against partner * M + m (negative where -1)
        if torch.equal(fused_flat[B:].reshape(B, M, M).diagonal(dim1=1, dim2=2), index.source_flat.view(B, M)):
            return index
    if partner.numel() and int(partner.min()) >= 0:
        # Every row has a partner for every modality (the usual batch): the rows are all
        # (b, m) pairs in b-major order, so only the partners' part is computed per batch.
        return _full_index(partner, None)
    b_idx, m_idx = torch.nonzero(partner >= 0, as_tuple=True)
    src = partner[b_idx, m_idx]
    rows = source_rows(b_idx, m_idx, src, M)
    k = torch.arange(M, device=partner.device)
    fused_flat = torch.cat((torch.arange(B * M, device=partner.device).view(B, M), rows * M + k))
    return MisalignedIndex(b_idx, m_idx, src, fused_flat[B:], b_idx * M + m_idx, src * M + m_idx, fused_flat)


def _full_index(partner: Tensor, fused_flat: Tensor | None) -> MisalignedIndex:
    """The `MisalignedIndex` of a batch whose every row has every partner, [B, M] >= 0."""
    B, M = partner.shape
    full = _full_layout(B, M, partner.device)
    source_flat = torch.add(full.modality, partner, alpha=M).view(-1)  # partner * M + k
    if fused_flat is None:  # the anchor's own entries, the swapped one of each row replaced
        fused_flat = full.unswapped.index_put(full.swapped_at, source_flat)
    return MisalignedIndex(full.b, full.m, partner.reshape(-1), fused_flat[B:], full.anchor_flat, source_flat,
                           fused_flat)


def swap_features(feats: Sequence[Tensor], rows: Tensor) -> list[Tensor]:
    """Per-modality features of misaligned rows: modality k of row n is feats[k][rows[n, k]]."""
    return [f[rows[:, k]] for k, f in enumerate(feats)]


def swapped_joined(joined: Tensor, index: MisalignedIndex) -> Tensor:
    """The fused head's input for the misaligned rows, [N, M * D], from the aligned one.

    joined: [B, M * D], the batch's M per-modality features of width D concatenated, as
    `fuse` takes them. Equal to `torch.cat(swap_features(feats, index.rows), dim=1)`, in one
    gather: one index_add in the backward pass instead of an accumulating index_put per
    modality plus a split (on the CPU index_select and its backward cost a fraction of
    advanced indexing's; both add each row's gradients in row order, so the sums are equal).
    """
    n, M = index.flat.shape
    return joined.reshape(-1, joined.shape[1] // M).index_select(0, index.flat.reshape(-1)).view(n, joined.shape[1])


def aligned_and_swapped_joined(joined: Tensor, index: MisalignedIndex) -> Tensor:
    """The fused head's input for the batch's B aligned rows followed by its N misaligned
    rows, [B + N, M * D]: `torch.cat([joined, swapped_joined(joined, index)])` in one gather."""
    rows, m = index.fused_flat.shape
    width = joined.shape[1]
    return joined.reshape(-1, width // m).index_select(0, index.fused_flat.view(-1)).view(rows, width)
