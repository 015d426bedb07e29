"""The README's picture: does the fused model listen to the weak modality? Joint vs MIDAS.

Reads the per-epoch validation metrics of the protocol's runs (bench/results.py) and plots,
per data set, the fused head's normalised probability of the weak view's label on misaligned
samples, next to the weak-view-only accuracy, for Joint and MIDAS (random partners).

    python bench/plot_story.py --runs out/results/runs --out docs/weak_modality_story.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SETS = {"fac-mor": ("fac/mor", "mor"), "kar-zer": ("kar/zer", "zer"), "av-noisy": ("AV-noisy", "audio")}
METHODS = {"joint": ("Joint", "tab:gray"), "random": ("MIDAS (random partners)", "tab:blue")}


def history(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="out/results/runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/weak_modality_story.png")
    args = ap.parse_args()
    fig, axes = plt.subplots(2, len(SETS), figsize=(4.2 * len(SETS), 6.4), sharex=True)
    for col, (name, (title, weak)) in enumerate(SETS.items()):
        for method, (label, color) in METHODS.items():
            f = Path(args.runs) / name / method / f"seed{args.seed}" / "metrics.jsonl"
            if not f.exists():
                continue
            h = history(f)
            ep = [r["epoch"] for r in h]
            axes[0, col].plot(ep, [r["val"]["mis_conf"][weak] for r in h], color=color, label=label)
            axes[1, col].plot(ep, [100 * r["val"]["only_acc"][weak] for r in h], color=color, label=label)
            if method == "random":
                axes[0, col].plot(ep, [r["val"]["uni_conf"][weak] for r in h], color=color, ls="--",
                                  label=f"unimodal c~ {weak} (target)")
        axes[0, col].set_title(f"{title}: weak view = {weak}")
        axes[0, col].set_ylim(0, 0.7)
        axes[1, col].set_xlabel("epoch")
    axes[0, 0].set_ylabel("fused p~ of the weak view's label\non misaligned samples (val)")
    axes[1, 0].set_ylabel("accuracy with only the weak view (val, %)")
    axes[0, 0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
