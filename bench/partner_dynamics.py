"""How the fused model treats mined vs random misaligned samples over training.

For each data set prepared by bench/results.py, trains MIDAS (mfeat preset, seed 0) once
with random partners and once with nearest mined partners (`mined`), and after every
epoch feeds the fused model the train split with its weak view swapped in from three
kinds of different-label partner j of anchor i:
  - nearest: j = i's nearest different-label neighbour in the weak view (what `mined` uses),
  - cross: j = i's nearest different-label neighbour in the strong view (policy `cross`),
  - random: j = a uniformly drawn different-label sample (the paper's partner).
Per kind and epoch it records how often the fused prediction is the partner's label (the
model "follows" the swapped-in weak view), the anchor's label, or neither, and the mean
cross-entropy against the MIDAS soft label (weights from the stored confidences).

    python bench/partner_dynamics.py --data out/results/data --out docs
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from midas_data.trainers.config import TrainConfig
from midas_data.trainers.metrics import encode_split
from midas_data.trainers.run import train
from tqdm import tqdm

from midas_data.features.tables import Features
from midas_data.loss import normalised_confidences
from midas_data.mining.pairs import read_pairs
from midas_data.stream.dataset import MidasDataset

KINDS = ("nearest", "cross", "random")
REPORT_EPOCHS = (10, 20, 40, 59)


def partners(root: Path, f: Features, weak: str, strong: str, seed: int = 0
             ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Row of the partner of every train anchor, per kind; and the labels."""
    t = read_pairs(root, "train", f.fingerprint)
    anchor, partner = t.column("anchor_row").to_numpy(), t.column("partner_row").to_numpy()
    mod, rank = np.asarray(t.column("modality").to_pylist()), t.column("rank").to_numpy()
    n, y = len(f.labels), np.asarray(f.labels)
    out = {}
    for kind, m in (("nearest", weak), ("cross", strong)):
        sel = (mod == m) & (rank == 0)
        p = np.full(n, -1, np.int64)
        p[anchor[sel]] = partner[sel]
        out[kind] = p
    rng = np.random.default_rng(seed)
    p = rng.integers(0, n, size=n)
    while np.any(bad := y[p] == y):  # redraw until every partner has another label
        p[bad] = rng.integers(0, n, size=int(bad.sum()))
    out["random"] = p
    return out, y


def epoch_stats(model, data: MidasDataset, weak_k: int, parts: dict[str, np.ndarray],
                y: np.ndarray, w_partner: dict[str, np.ndarray]) -> dict:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        feats, _ = encode_split(model, data, torch.device("cpu"))
        out = {}
        for kind, p in parts.items():
            ok = np.flatnonzero(p >= 0)
            swapped = [f[ok] if k != weak_k else f[p[ok]] for k, f in enumerate(feats)]
            logp = torch.log_softmax(model.fuse(swapped), 1).double().numpy()
            pred = logp.argmax(1)
            ya, yp, w = y[ok], y[p[ok]], w_partner[kind][ok]
            rows = np.arange(len(ok))
            ce = -((1 - w) * logp[rows, ya] + w * logp[rows, yp])
            out[kind] = {"follows_partner": float(np.mean(pred == yp)),
                         "anchor_label": float(np.mean(pred == ya)),
                         "soft_ce": float(ce.mean()), "partner_weight": float(w.mean())}
    model.train(was_training)
    return out


def run_set(root: Path, policy: str, epochs: int) -> list[dict]:
    data = MidasDataset(root, "train", batch_size=256, policy="none", shuffle=False, rank=0, world_size=1)
    f = data.features
    weak, strong = data.resolve_modalities(["weak", "strong"])
    parts, y = partners(root, f, weak, strong)
    # soft-label weight of the partner: c^weak_j / (c^strong_i + c^weak_j), as the stream gives it
    w_partner = {}
    for kind, p in parts.items():
        cj = f.confs[weak][np.maximum(p, 0)].astype(np.float64)
        ci = f.confs[strong].astype(np.float64)
        w_partner[kind] = normalised_confidences(torch.from_numpy(np.stack([ci, cj], 1))).numpy()[:, 1]
    cfg = TrainConfig.from_preset("mfeat", seed=0, epochs=epochs, method="midas", policy=policy)
    weak_k = data.modalities.index(weak)
    history: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        train(root, tmp, cfg, progress=False, plots=False,
              on_epoch=lambda e, m: history.append(
                  {"epoch": e, **epoch_stats(m, data, weak_k, parts, y, w_partner)}))
    return history


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), sharey=True, squeeze=False)
    axes = axes.reshape(-1)
    for ax in axes[len(names):]:
        ax.axis("off")
    colors = {"nearest": "tab:red", "cross": "tab:blue", "random": "tab:green"}
    for ax, name in zip(axes, names):
        for policy, style in (("random", "-"), ("mined", "--")):
            hist = results[name][policy]
            ep = [h["epoch"] for h in hist]
            for kind in KINDS:
                ax.plot(ep, [h[kind]["follows_partner"] for h in hist], style, color=colors[kind],
                        label=f"{kind} partners, trained {policy}")
        ax.set_title(name)
        ax.set_xlabel("epoch")
    for ax in axes[::cols]:
        ax.set_ylabel("fused pred. = partner's label")
    axes[0].legend(fontsize=6, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict) -> str:
    lines = ["| set | trained with | partners | " + " | ".join(f"follows partner @{e}" for e in REPORT_EPOCHS)
             + " | anchor label (end) | soft-label CE (end) | partner weight |",
             "|---|---|---|" + "---|" * (len(REPORT_EPOCHS) + 3)]
    for name, by_policy in results.items():
        for policy, hist in by_policy.items():
            at = {h["epoch"]: h for h in hist}
            last = hist[-1]
            for kind in KINDS:
                cells = [f"{100 * at[e][kind]['follows_partner']:.0f}%" if e in at else "-" for e in REPORT_EPOCHS]
                lines.append(f"| {name} | {policy} | {kind} | " + " | ".join(cells)
                             + f" | {100 * last[kind]['anchor_label']:.0f}% | {last[kind]['soft_ce']:.2f}"
                             + f" | {last[kind]['partner_weight']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="out/results/data")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--sets", default="")
    ap.add_argument("--replot", action="store_true", help="redraw OUT's plot from its json")
    a = ap.parse_args()
    if a.replot:
        plot(json.loads((Path(a.out) / "partner_dynamics.json").read_text()),
             Path(a.out) / "partner_dynamics.png")
        return
    torch.set_num_threads(1)
    roots = sorted(p for p in Path(a.data).iterdir() if (p / "pairs" / "train").exists())
    if a.sets:
        roots = [r for r in roots if r.name in a.sets.split(",")]
    results: dict = {}
    for root in tqdm(roots, desc="sets"):
        results[root.name] = {p: run_set(root, p, a.epochs) for p in ("random", "mined")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "partner_dynamics.json").write_text(json.dumps(results))
    plot(results, out / "partner_dynamics.png")
    (out / "partner_dynamics.md").write_text(
        "Fused-model predictions on misaligned train samples (weak view swapped in from the "
        "partner), MIDAS seed 0, by epoch (`python bench/partner_dynamics.py`). Warm-up ends "
        "at epoch 10.\n\n" + table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
