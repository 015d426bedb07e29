"""One training epoch of MIDAS, Joint or unimodal training, readable top to bottom.

Per batch: encode every modality once; aligned fused CE and unimodal CEs; for MIDAS after
warm-up, the misaligned rows (b, m) whose modality m comes from row partner[b, m] (features
swapped inside the batch, so the only extra cost is the fused head on those rows). All the
MIDAS math (confidences, soft labels, modality and hard weights, the alpha step) is
`midas_data.loss.terms`; this file only wires it up.

- midas:    L = CE + L_uni + lam * L_mis; warm-up epochs L = L_uni.
- joint:    the encoders and fused head train on CE alone. The unimodal heads train as linear
            probes on *detached* features, so they report unimodal accuracy and confidence
            without changing what Joint learns.
- unimodal: L = L_uni.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from midas_data.loss import (
    AlphaStats,
    DirectionSums,
    LossTerms,
    accumulate,
    aligned_loss,
    authors_alpha_update,
    direction_sums,
    in_batch_hard_weight,
    midas_loss_by_class,
    midas_total_loss,
    modality_weights,
    normalised_confidences,
    unimodal_confidence,
    update_alpha,
    weak_and_strong,
)
from midas_data.progress import progress_bar as tqdm
from midas_data.stream.dataset import MidasLoader

from .config import TrainConfig
from .distributed import DistInfo, all_sum, all_sum_named
from .models import MisalignedIndex

ALPHA_CHUNK = 16  # batches of misaligned rows per `accumulate` call (epoch-mode alpha)


@dataclass
class RunState:
    """What carries over from epoch to epoch (saved in every checkpoint)."""

    alpha: float = 1.0
    prev_conf: list[float] | None = None  # last epoch's mean unimodal confidence per modality
    global_step: int = 0


@dataclass
class EpochTracker:
    """This rank's running sums over the current epoch. Saved in mid-epoch checkpoints, so a
    resumed epoch reports exactly what an uninterrupted one would."""

    epoch: int
    num_modalities: int
    steps: int = 0
    n: float = 0.0
    loss: float = 0.0
    fused: float = 0.0
    uni: float = 0.0
    mis: float = 0.0
    n_fused: float = 0.0  # samples seen by the fused head (none in warm-up)
    correct_fused: float = 0.0
    correct_uni: list[float] = field(default_factory=list)
    conf: list[float] = field(default_factory=list)
    alpha_stats: AlphaStats = field(default_factory=AlphaStats)
    weak: int | None = None  # weak / strong modality used by this epoch's misaligned loss
    strong: int | None = None
    # Misaligned rows not yet summed into alpha_stats: [logits, src_labels, src_conf] per
    # batch, detached, read at the (strong, weak) columns when summed (this epoch's pair,
    # fixed while rows are pending). Summing every ALPHA_CHUNK batches instead of every
    # batch takes `accumulate` (and its host syncs on CUDA) off the per-step path.
    pending: list[list[Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.correct_uni = self.correct_uni or [0.0] * self.num_modalities
        self.conf = self.conf or [0.0] * self.num_modalities
        if isinstance(self.alpha_stats, dict):
            self.alpha_stats = AlphaStats(**self.alpha_stats)

    def add_alpha_rows(self, logits: Tensor, src_labels: Tensor, src_conf: Tensor) -> None:
        """Keep one batch's misaligned rows (fused logits [N, C], source labels and
        confidences [N, M]) for the alpha statistics."""
        self.pending.append([logits.detach(), src_labels, src_conf])
        if len(self.pending) >= ALPHA_CHUNK:  # a fixed chunking: resumed runs sum identically
            self.flush_alpha_rows()

    def flush_alpha_rows(self) -> None:
        if self.pending:
            s, w = self.strong, self.weak
            if all(len(r) == 3 for r in self.pending):  # one concatenation, then the two columns
                logits, labels, conf = (torch.cat(c) for c in zip(*self.pending))
                cols = (logits, labels[:, s], labels[:, w], conf[:, s], conf[:, w])
            else:  # mid-epoch checkpoints of earlier versions hold [logits, y_s, y_w, c_s, c_w]
                rows = [r if len(r) == 5 else [r[0], r[1][:, s], r[1][:, w], r[2][:, s], r[2][:, w]]
                        for r in self.pending]
                cols = tuple(torch.cat(c) for c in zip(*rows))
            self.alpha_stats = accumulate(self.alpha_stats, *cols)
            self.pending = []

    def to_dict(self) -> dict:
        # floats, lists and tensors only: loads with torch.load(weights_only=True)
        return dataclasses.asdict(self)


def is_warmup(config: TrainConfig, epoch: int) -> bool:
    return config.method == "midas" and epoch < config.warmup_epochs


def set_weak(tracker: EpochTracker, mean_conf: list[float]) -> None:
    """The weak modality has the lowest mean confidence; the strong one the highest other."""
    tracker.weak, tracker.strong = weak_and_strong(mean_conf)


@functools.lru_cache(maxsize=8)
def _modality_weights(num_modalities: int, weak: int, alpha: float, device: torch.device) -> Tensor:
    """`modality_weights` on the device, built once per (weak, alpha) rather than per step."""
    return modality_weights(num_modalities, weak, alpha).to(device)


def _swapped_hard_weight(out: dict, idx: MisalignedIndex) -> Tensor:
    """`hard_sample_weight(feats[m][b], feats[m][src])` of every misaligned row (b, m, src).

    The batch's features (all of one width D) are read as one [B * M, D] matrix in idx's flat
    layout, the model's concatenated `joined` features when it returns them, so that each
    feature row is normalised once and nothing is gathered twice."""
    feats = out["feats"]
    joined = out.get("joined")
    if joined is None:
        joined = torch.stack(feats, dim=1)
    flat = joined.detach().reshape(-1, feats[0].shape[1])
    whole = idx.anchor_flat.shape[0] == flat.shape[0]  # every (b, m) in order: the anchor rows are 0..N-1
    return in_batch_hard_weight(flat, None if whole else idx.anchor_flat, idx.source_flat)


def train_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer,
               config: TrainConfig, run: RunState, tracker: EpochTracker, info: DistInfo) -> LossTerms:
    """One optimizer step on one batch; updates `tracker` (and `run.alpha` in batch mode)."""
    M, warmup = tracker.num_modalities, is_warmup(config, tracker.epoch)
    use_fused = config.method != "unimodal" and not warmup
    use_mis = config.method == "midas" and not warmup
    y = batch["label"].to(info.device)
    size = y.shape[0]
    # Fill rows (repeats padding the epoch's last batches) go through the model, so that
    # BatchNorm sees two rows and DDP sees every parameter, but count nowhere: the losses
    # weight them 0 (`aligned_loss`), they have no misaligned partner, and the sums below
    # take the real rows only, so each real sample counts once per epoch.
    valid = batch["valid"].to(info.device) if "valid" in batch else torch.ones_like(y, dtype=torch.bool)
    n = int(valid.sum())

    if size == 0:  # an unpadded stream (last_batch="uneven") gave this rank an empty last batch;
        loss = model(None, fused=use_fused)["zero"]  # it must still join DDP's all-reduce
        conf = torch.zeros(0, M, device=info.device)
        terms = LossTerms(loss, loss, loss, loss)
    else:
        # a stream batch brings its misaligned rows' index, built with the partners, for a
        # model that takes it (models.py; DDP keeps the model in .module)
        takes = getattr(getattr(model, "module", model), "takes_misaligned_flat", False)
        index = {"misaligned_flat": batch["misaligned_flat"]} if use_mis and takes and "misaligned_flat" in batch else {}
        out = model(batch["inputs"], batch["partner"] if use_mis else None, fused=use_fused,
                    detach_unimodal=config.method == "joint", **index)
        if use_mis:  # every head's logits side by side, classes first, under one log_softmax
            logits = out.get("logits_by_class")
            if logits is None:  # a model that gives only 'uni', 'fused' and 'mis'
                logits = torch.cat([z.t() for z in (*out["uni"], out["fused"], out["mis"])], dim=1)
            logp = torch.log_softmax(logits, dim=0)  # [C, M * B + B + N]
            # Live confidences c^m = softmax(g_m(f^m))[y], detached (the paper's, not the
            # stored ones), read off the unimodal heads' columns of that log-softmax.
            at_label = y.repeat(M).view(1, M * size)
            all_conf = logp.detach()[:, :M * size].gather(0, at_label).exp_().view(M, size).t()  # [B, M]
        else:
            all_conf = torch.stack([unimodal_confidence(z, y) for z in out["uni"]], dim=1)  # [B, M]
        conf = all_conf[valid]  # [n, M]

    if use_mis and (config.alpha_update == "batch" or tracker.weak is None):
        # Per batch (or the first batch when no earlier epoch exists): weak modality from this
        # batch's mean confidence over every rank, so all ranks weight the same modality.
        s = all_sum(conf.sum(0).tolist() + [float(n)], info)
        set_weak(tracker, [c / max(s[M], 1.0) for c in s[:M]])

    batch_stats, batch_sums = AlphaStats(), DirectionSums()
    if size > 0:
        if use_mis:  # L = L_uni + CE + lam * L_mis, from one target product (midas_loss_by_class)
            idx = out["mis_index"]  # row n: anchor idx.b[n], modality idx.m[n] from row idx.src[n]
            # [N, M] label of each modality's source: y[idx.rows], read through the flat index
            src_labels = y.unsqueeze(1).expand(size, M).take(idx.flat)
            src_conf = all_conf.take(idx.flat)  # its c^m: all_conf[idx.rows, k], [B, M] read as [B * M]
            h = None
            if config.hard_weighting:  # cosine on the swapped modality's features
                h = _swapped_hard_weight(out, idx)
            a = _modality_weights(M, tracker.weak, run.alpha, y.device)
            total, uni, fused_ce, mis = midas_loss_by_class(
                logp, y, M, src_labels, normalised_confidences(src_conf), a, h, config.lam, batch.get("weight"))
            terms = LossTerms(total, fused_ce, uni, mis)
            mis_logits = logits[:, (M + 1) * size:].t()  # [N, C]
            w, s_ = tracker.weak, tracker.strong
            if config.alpha_update == "batch":
                batch_stats = accumulate(batch_stats, mis_logits, src_labels[:, s_], src_labels[:, w],
                                         src_conf[:, s_], src_conf[:, w])  # pooled, for the epoch's report only
                # The authors' step keeps the two swap directions apart (midas_data.loss.alpha).
                batch_sums = direction_sums(mis_logits, src_labels, idx.m, conf, (min(w, s_), max(w, s_)))
            else:
                tracker.add_alpha_rows(mis_logits, src_labels, src_conf)
        else:  # Joint: CE + the probes' CE (their gradient stops at the detached features).
            uni_ces = [aligned_loss(z, batch) for z in out["uni"]]
            fused_ce = aligned_loss(out["fused"], batch) if use_fused else None
            terms = midas_total_loss(fused_ce, uni_ces, None, config.lam, warmup=not use_fused)
        loss = terms.total

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

    if use_mis and config.alpha_update == "batch":  # the authors' per-batch alpha step, over all ranks
        run.alpha = authors_alpha_update(run.alpha, DirectionSums.from_list(all_sum(batch_sums.to_list(), info)),
                                         config.eta)
    tracker.alpha_stats = tracker.alpha_stats + batch_stats
    tracker.steps += 1
    if n > 0:
        tracker.n += n
        tracker.loss += float(loss.detach()) * n
        tracker.fused += float(terms.fused.detach()) * n
        tracker.uni += float(terms.unimodal.detach()) * n
        tracker.mis += float(terms.misaligned.detach()) * n
        if use_mis:  # every head's prediction at once: max over the classes of each column
            preds = logits[:, :(M + 1) * size].view(-1, M + 1, size).max(0).indices  # [M + 1, B]
            *correct_uni, correct_fused = ((preds == y) & valid).sum(1).tolist()
            tracker.n_fused += n
            tracker.correct_fused += correct_fused
            for k, c in enumerate(correct_uni):
                tracker.correct_uni[k] += c
        else:
            if use_fused:
                tracker.n_fused += n
                tracker.correct_fused += float((out["fused"].argmax(1) == y)[valid].sum())
            for k, z in enumerate(out["uni"]):
                tracker.correct_uni[k] += float((z.argmax(1) == y)[valid].sum())
        for k, c in enumerate(conf.sum(0).tolist()):
            tracker.conf[k] += c
    return terms


def _stats_list(s: AlphaStats) -> list[float]:
    return [s.fused_strong, s.fused_weak, s.uni_strong, s.uni_weak, float(s.count)]


def train_epoch(model: nn.Module, loader: MidasLoader, optimizer: torch.optim.Optimizer, config: TrainConfig,
                run: RunState, tracker: EpochTracker, info: DistInfo, *,
                checkpoint: Callable[[EpochTracker], None] | None = None,
                on_step: Callable[[int], None] | None = None, progress: bool = True) -> EpochTracker:
    """Train on the rest of the epoch the loader is at. `checkpoint(tracker)` runs every
    `config.checkpoint_every` steps; `on_step(global_step)` after each step (a test hook)."""
    model.train()
    if (config.method == "midas" and config.alpha_update == "epoch" and tracker.weak is None
            and run.prev_conf is not None):
        set_weak(tracker, run.prev_conf)  # the weak modality of the epoch: last epoch's argmin
    bar = tqdm(loader, total=len(loader), desc=f"epoch {tracker.epoch}", unit="batch",
               disable=not (progress and info.is_main), leave=False)
    for batch in bar:
        terms = train_step(model, batch, optimizer, config, run, tracker, info)
        run.global_step += 1
        if info.is_main and progress:
            bar.set_postfix(loss=f"{float(terms.total):.3f}", alpha=f"{run.alpha:.2f}")
        if checkpoint is not None and config.checkpoint_every and run.global_step % config.checkpoint_every == 0:
            checkpoint(tracker)
        if on_step is not None:
            on_step(run.global_step)
    return tracker


def finish_epoch(tracker: EpochTracker, info: DistInfo) -> dict:
    """Epoch summary summed over ranks: losses, train accuracies, mean confidences, alpha
    statistics and each rank's batch count (equal on every rank, or DDP would hang)."""
    tracker.flush_alpha_rows()
    batches = [0.0] * info.world_size
    batches[info.rank] = float(tracker.steps)
    alpha_fields = [f.name for f in dataclasses.fields(AlphaStats)]
    s = all_sum_named({
        "n": tracker.n, "loss": tracker.loss, "fused": tracker.fused, "uni": tracker.uni,
        "mis": tracker.mis, "n_fused": tracker.n_fused, "correct_fused": tracker.correct_fused,
        "correct_uni": tracker.correct_uni, "conf": tracker.conf, "batches": batches,
        **{f"alpha.{f}": getattr(tracker.alpha_stats, f) for f in alpha_fields}}, info)
    n, n_fused = max(s["n"], 1.0), s["n_fused"]
    stats = AlphaStats(**{f: s[f"alpha.{f}"] for f in alpha_fields})
    stats = dataclasses.replace(stats, count=int(stats.count))
    return {"samples": int(s["n"]), "loss": s["loss"] / n, "loss_fused": s["fused"] / n,
            "loss_unimodal": s["uni"] / n, "loss_misaligned": s["mis"] / n,
            "acc": s["correct_fused"] / n_fused if n_fused else math.nan,  # NaN: the fused head did not train
            "unimodal_acc": [c / n for c in s["correct_uni"]],
            "mean_conf": [c / n for c in s["conf"]],
            "alpha_stats": stats, "batches_per_rank": [int(b) for b in s["batches"]]}


def end_of_epoch_alpha(run: RunState, summary: dict, config: TrainConfig, epoch: int) -> None:
    """Epoch mode: one alpha step from the epoch's statistics (all ranks hold the same sums)."""
    if config.method == "midas" and config.alpha_update == "epoch" and not is_warmup(config, epoch):
        run.alpha = update_alpha(run.alpha, summary["alpha_stats"], config.eta)
    run.prev_conf = summary["mean_conf"]
