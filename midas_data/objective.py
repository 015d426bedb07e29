"""`MidasObjective`: the MIDAS loss and its weak-modality weight alpha for a user's own loop.

The stream gives every batch its misaligned partners with the stored confidences and hard
weights (`midas-data extract`, `mine-misaligned`); a plain fusion model with no unimodal
heads then needs only its fused logits on the aligned and the misaligned inputs:

    from midas_data import MidasDataset, MidasLoader, MidasObjective, materialize_misaligned

    ds = MidasDataset("data/mfeat", "train", batch_size=64, policy="random", seed=0)
    loader = MidasLoader(ds, num_workers=2)
    model, objective = MyFusionModel(), MidasObjective(lam=1.0)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for epoch in range(60):
        ds.set_epoch(epoch)
        for batch in loader:
            mis = materialize_misaligned(batch)
            loss = objective(model(batch["inputs"]), model(mis["inputs"]), batch, mis)
            opt.zero_grad(); loss.backward(); opt.step()
        objective.end_epoch()                     # alpha step from the epoch's statistics

The loss is CE(z, y) on the aligned samples + lam * L_mis on the misaligned rows, with each
source's stored confidence as its soft-label weight, the weak modality's term times alpha
and the stored hard-sample weight (docs/METHOD.md, "Objective and warm-up"). There are no
unimodal heads and no warm-up: the stored confidences come from the warm-up models of
`extract`. alpha moves by the pooled rule once per epoch (`alpha_update="epoch"`), by the
authors' per-batch rule after every batch (`"batch"`), or stays fixed (`"fixed"`); see
docs/METHOD.md, "Weak-modality weight alpha". Under torch.distributed the statistics are
summed over ranks, so every rank holds the same alpha.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from midas_data.loss.alpha import DirectionSums, authors_alpha_update, direction_sums
from midas_data.loss.batch import (
    aligned_loss,
    batch_alpha_stats,
    batch_misaligned_loss,
    misaligned_targets,
)
from midas_data.loss.terms import AlphaStats, strong_modality, update_alpha, weak_modality

ALPHA_UPDATES = ("epoch", "batch", "fixed")

__all__ = ["MidasObjective"]


def _all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum over torch.distributed ranks when a process group is up (identity otherwise)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [float(v) for v in values]
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class MidasObjective:
    """The MIDAS objective with alpha and its statistics, for a loop of your own.

    lam: weight of the misaligned loss; alpha: starting weak-modality weight (>= 1); eta:
    alpha's step; alpha_update: "epoch" (pooled rule at :meth:`end_epoch`), "batch" (the
    authors' rule after every call) or "fixed"; hard_weighting: scale rows by the stream's
    hard-sample weight; weak: index of the weak modality, or None to take the lowest mean
    stored confidence (the previous epoch's; in the first epoch and in batch mode, the
    current batch's). Keep :meth:`state_dict` in your checkpoint to resume alpha exactly.
    """

    def __init__(self, lam: float = 1.0, alpha: float = 1.0, eta: float = 0.05, alpha_update: str = "epoch",
                 hard_weighting: bool = True, weak: int | None = None):
        if alpha_update not in ALPHA_UPDATES:
            raise ValueError(f"MidasObjective: alpha_update={alpha_update!r}; choose from {ALPHA_UPDATES}")
        if alpha < 1.0 or eta < 0.0 or lam < 0.0:
            raise ValueError(f"MidasObjective: need alpha >= 1, eta >= 0, lam >= 0; got alpha={alpha}, "
                             f"eta={eta}, lam={lam}")
        self.lam, self.alpha, self.eta = float(lam), float(alpha), float(eta)
        self.alpha_update, self.hard_weighting, self.fixed_weak = alpha_update, hard_weighting, weak
        self.weak: int | None = weak  # weak / strong modality of the current epoch (or batch)
        self.strong: int | None = None
        self.stats = AlphaStats()  # pooled statistics of the epoch so far (this rank's)
        self.conf_sum: list[float] = []  # stored confidence summed per modality over aligned samples
        self.conf_count = 0.0
        self.last_terms: dict[str, Tensor] = {}  # detached CE and L_mis of the last call, for logging

    # -- per batch ----------------------------------------------------------------------
    def __call__(self, logits: Tensor, mis_logits: Tensor | None, batch: dict, mis: dict | None) -> Tensor:
        """CE(logits, y) + lam * L_mis for one stream batch; updates alpha's statistics.

        logits: [B, C] your fused logits on ``batch["inputs"]``; mis_logits: [N, C] on
        ``mis["inputs"]`` with ``mis = materialize_misaligned(batch)`` (None, None: aligned
        CE only). Returns a scalar to call ``backward()`` on.
        """
        # the mean over the real rows: fill rows (valid False, the epoch's last step) weigh 0,
        # and a batch without real rows still returns an attached zero
        ce = aligned_loss(logits, batch)
        real = int(batch["valid"].sum()) if "valid" in batch else len(batch["label"])
        conf = self._stored_conf(batch) if real else None
        self._choose_pair(conf, batch["partner"].shape[1])  # in batch mode every rank joins this sum on every call
        rows = 0 if mis is None or mis_logits is None else len(mis["anchor"])
        if rows == 0:
            self.last_terms = {"ce": ce.detach(), "misaligned": ce.detach() * 0.0}
            if self.alpha_update == "batch":
                self._batch_step(DirectionSums())
            return ce
        if mis_logits.shape[0] != rows:
            raise ValueError(f"MidasObjective: mis_logits has {mis_logits.shape[0]} rows but the batch has "
                             f"{rows} misaligned rows; pass the model's logits on mis['inputs']")
        l_mis = batch_misaligned_loss(mis_logits, batch, mis, alpha=self.alpha, weak=self.weak,
                                      hard_weighting=self.hard_weighting)
        self.last_terms = {"ce": ce.detach(), "misaligned": l_mis.detach()}
        if conf is not None:
            self._record(mis_logits, batch, mis, conf)
        elif self.alpha_update == "batch":
            self._batch_step(DirectionSums())
        return ce + self.lam * l_mis

    def _stored_conf(self, batch: dict) -> Tensor | None:
        """The real rows' stored confidences [n, M] in float64 (fill rows left out)."""
        conf = batch.get("conf")
        if conf is not None and "valid" in batch:
            conf = conf[batch["valid"]]
        ok = conf is not None and bool(torch.isfinite(conf).all())
        if not ok and self.alpha_update != "fixed":
            raise ValueError("MidasObjective: the batch has no stored confidences (field 'conf' missing or "
                             "NaN); run `midas-data extract` on the dataset so the stream carries them, "
                             "or use alpha_update='fixed' with an explicit weak=")
        return conf.detach().double() if ok else None

    def _choose_pair(self, conf: Tensor | None, m_count: int) -> None:
        if not self.conf_sum:  # every rank that saw a batch joins end_epoch's sums, empty batches too
            self.conf_sum = [0.0] * m_count
        if self.fixed_weak is not None:
            self.weak = self.fixed_weak
        elif self.weak is None or self.alpha_update == "batch":
            # the batch's mean stored confidence, over all ranks (a rank without rows adds zeros)
            local = [0.0] * (m_count + 1) if conf is None else conf.sum(0).tolist() + [float(conf.shape[0])]
            sums = _all_sum(local, torch.device("cpu"))
            if sums and sums[-1] > 0:
                self.weak = weak_modality([c / sums[-1] for c in sums[:-1]])
        if conf is not None and conf.shape[1] > 1 and self.weak is not None:
            means = self.conf_mean() if self.conf_count else conf.mean(0).tolist()
            order = [strong_modality(means), *range(conf.shape[1])]
            self.strong = next(k for k in order if k != self.weak)

    def _record(self, mis_logits: Tensor, batch: dict, mis: dict, conf: Tensor) -> None:
        self.conf_sum = [a + float(b) for a, b in zip(self.conf_sum, conf.sum(0))]
        self.conf_count += conf.shape[0]
        if self.alpha_update == "epoch":
            self.stats = batch_alpha_stats(self.stats, mis_logits, batch, mis, self.weak, self.strong)
        elif self.alpha_update == "batch":
            src_labels, _ = misaligned_targets(batch, mis)
            pair = (min(self.weak, self.strong), max(self.weak, self.strong))
            self._batch_step(direction_sums(mis_logits, src_labels, mis["swapped"], conf, pair))

    def _batch_step(self, sums: DirectionSums) -> None:
        merged = DirectionSums.from_list(_all_sum(sums.to_list(), torch.device("cpu")))
        self.alpha = authors_alpha_update(self.alpha, merged, self.eta)

    # -- per epoch ----------------------------------------------------------------------
    def conf_mean(self) -> list[float]:
        """Mean stored confidence per modality over the aligned samples seen this epoch."""
        return [c / max(self.conf_count, 1.0) for c in self.conf_sum]

    def end_epoch(self) -> float:
        """Close the epoch: in epoch mode one pooled alpha step from the epoch's statistics
        (summed over ranks); the next epoch's weak modality is this epoch's lowest mean
        stored confidence. Returns the new alpha."""
        if self.alpha_update == "epoch":
            s = self.stats
            total = _all_sum([s.fused_strong, s.fused_weak, s.uni_strong, s.uni_weak, s.count], torch.device("cpu"))
            self.alpha = update_alpha(self.alpha, AlphaStats(*total[:4], int(total[4])), self.eta)
        if self.conf_sum and self.fixed_weak is None:
            sums = _all_sum(self.conf_sum + [self.conf_count], torch.device("cpu"))
            if sums[-1] > 0:
                self.weak = weak_modality([c / sums[-1] for c in sums[:-1]])
        self.stats, self.conf_sum, self.conf_count = AlphaStats(), [], 0.0
        return self.alpha

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly, mid-epoch included (plain Python values)."""
        return {"lam": self.lam, "alpha": self.alpha, "eta": self.eta, "alpha_update": self.alpha_update,
                "hard_weighting": self.hard_weighting, "fixed_weak": self.fixed_weak, "weak": self.weak,
                "strong": self.strong, "stats": dataclasses.asdict(self.stats),
                "conf_sum": list(self.conf_sum), "conf_count": self.conf_count}

    def load_state_dict(self, state: dict) -> None:
        missing = {"alpha", "alpha_update", "weak", "stats"} - set(state)
        if missing:
            raise ValueError(f"MidasObjective.load_state_dict: state lacks {sorted(missing)}; pass the dict "
                             "that MidasObjective.state_dict() returned")
        self.__init__(state.get("lam", self.lam), state["alpha"], state.get("eta", self.eta), state["alpha_update"],
                      state.get("hard_weighting", self.hard_weighting), state.get("fixed_weak"))
        self.weak, self.strong = state["weak"], state.get("strong")
        self.stats = AlphaStats(**state["stats"])
        self.conf_sum, self.conf_count = list(state.get("conf_sum", [])), float(state.get("conf_count", 0.0))
