"""Why nearest partners hurt: mined vs random partners, measured on the stored artifacts.

For every data set prepared by bench/results.py and each swapped view m, compares the
partners that `mined` uses (the k nearest different-label neighbours in view m) with
random different-label partners: cosine similarity in view m, the swapped-in view's
stored unimodal confidence in its own label (c^m_j), the soft-label weight it gets
(w_partner = c^m_j / (c_kept_i + c^m_j)), and how often the swapped-in view's unimodal
head would rather predict the anchor's label than the partner's (a near-duplicate view
with the "wrong" label: the label noise suspected in docs/REFERENCE_RESULTS.md).

    python bench/partner_analysis.py --data out/results/data --out docs/partner_analysis.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from midas_data.features.tables import read_features
from midas_data.mining.pairs import read_pairs


def analyse(root: Path, seed: int = 0) -> list[dict]:
    f = read_features(root / "features" / "train.arrow")
    pairs = read_pairs(root, "train")
    mods = f.modalities
    rng = np.random.default_rng(seed)
    y = f.labels
    rows = []
    for m in mods:
        kept = [k for k in mods if k != m]
        x = f.feats[m] / np.linalg.norm(f.feats[m], axis=1, keepdims=True)
        # nearest-centroid proxy for "which label does view m of j look like": class means of view m
        centroids = np.stack([x[y == c].mean(0) for c in np.unique(y)])
        looks_like = (x @ centroids.T).argmax(1)
        sel = np.asarray(pairs.column("modality").to_pylist()) == m
        a = pairs.column("anchor_row").to_numpy()[sel]
        p = pairs.column("partner_row").to_numpy()[sel]
        ra = np.repeat(np.arange(len(y)), 4)
        rp = rng.integers(0, len(y), len(ra))
        keep = y[ra] != y[rp]
        ra, rp = ra[keep], rp[keep]
        for name, (ai, pj) in {"mined (top-k)": (a, p), "random": (ra, rp)}.items():
            c_kept = sum(f.confs[k][ai] for k in kept)
            c_swap = f.confs[m][pj]
            rows.append({
                "set": root.name, "swapped": m, "partners": name,
                "cosine": float(np.mean(np.einsum("nd,nd->n", x[ai], x[pj]))),
                "c_partner": float(np.mean(c_swap)),
                "w_partner": float(np.mean(c_swap / (c_kept + c_swap))),
                "looks_like_anchor": float(np.mean(looks_like[pj] == y[ai])),
            })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="out/results/data")
    ap.add_argument("--out", default="docs/partner_analysis.md")
    args = ap.parse_args()
    lines = ["| set | swapped view | partners | cosine in swapped view | c^m of partner | soft-label weight of partner | swapped view looks like anchor's class |",
             "|---|---|---|---|---|---|---|"]
    for root in sorted(Path(args.data).iterdir()):
        if not (root / "pairs" / "train").exists():
            continue
        for r in analyse(root):
            lines.append(f"| {r['set']} | {r['swapped']} | {r['partners']} | {r['cosine']:.2f} | "
                         f"{r['c_partner']:.2f} | {r['w_partner']:.2f} | {100 * r['looks_like_anchor']:.0f}% |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
