"""The evidence protocol: Joint vs MIDAS (random, mined, mixed, ... partners) on real data.

Data sets: UCI Multiple Features view pairs (strong view + weak view) and AV digits
(8x8 digit images paired by class with spoken-digit MFCCs; "av-noisy" adds noise to the
image). Per set: build shards (stratified 70/10/20, split seed 0), extract warm-up
features, mine k-NN partners; then train every (method, seed) with the mfeat preset (the
independent prototype's protocol, docs/REFERENCE_RESULTS.md: Adam 1e-3, batch 64, 60
epochs, warm-up 10, lambda 1, best epoch on validation) and report test metrics. Runs are
cached (results.json per run), so an interrupted protocol resumes. Paired comparisons use
an exact sign-flip permutation test over seeds.

    python bench/results.py --out out/results              # the default protocol: 3 seeds
    python bench/results.py --seeds 0-9 --methods random,soft --out out/policies
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

SETS = {
    "fac/mor": ("mfeat", ("fac", "mor"), {}),
    "pix/mor": ("mfeat", ("pix", "mor"), {}),
    "kar/zer": ("mfeat", ("kar", "zer"), {}),
    "fou/mor": ("mfeat", ("fou", "mor"), {}),
    "av": ("av_digits", ("image", "audio"), {}),
    "av-noisy": ("av_digits", ("image", "audio"), {"noise_std": 4.0}),
}
# method name -> TrainConfig overrides
METHODS = {
    "joint": {"method": "joint"},
    "random": {"method": "midas", "policy": "random"},
    "mined": {"method": "midas", "policy": "mined"},
    "mixed": {"method": "midas", "policy": "mixed", "mined_fraction": 0.5},
    "soft": {"method": "midas", "policy": "soft"},
    # First round (docs/partner_study.md): a matched pair swaps only the weak modality (the
    # other swap gets a random partner, so no misaligned sample is repeated). "cross" pairs
    # anchors that are near in the strong view, so the strong view is ambiguous and the weak
    # one decides; "self" pairs anchors that are near in the weak view (the swapped view).
    "cross": {"method": "midas", "policy": "mined", "knn_modalities": ["strong"],
              "swap_modalities": ["weak"]},
    "self": {"method": "midas", "policy": "mined", "knn_modalities": ["weak"], "swap_modalities": ["weak"]},
    "cross-soft": {"method": "midas", "policy": "soft", "knn_temperature": 0.05,
                   "knn_modalities": ["strong"], "swap_modalities": ["weak"]},
    # Second round (docs/partner_selection.md): the weak view's partner drawn among all
    # other-label rows of the batch by softmax(strong-view cosine / T) (from random at large T
    # to nearest at small T); half the anchors on the cross graph; a curriculum from random
    # to cross partners.
    "cross-t0.1": {"method": "midas", "policy": "tempered", "similarity_temperature": 0.1,
                   "similarity_modalities": ["strong"], "swap_modalities": ["weak"]},
    "cross-t0.03": {"method": "midas", "policy": "tempered", "similarity_temperature": 0.03,
                    "similarity_modalities": ["strong"], "swap_modalities": ["weak"]},
    "cross-mixed": {"method": "midas", "policy": "mixed", "mined_fraction": 0.5,
                    "knn_modalities": ["strong"], "swap_modalities": ["weak"]},
    "cross-ramp": {"method": "midas", "policy": "mixed", "mined_fraction": 1.0, "mined_ramp": [10, 60],
                   "knn_modalities": ["strong"], "swap_modalities": ["weak"]},
}


def set_dir(out: Path, name: str) -> Path:
    return out / "data" / name.replace("/", "-")


def prepare_set(out: Path, name: str, k: int) -> Path:
    """Shards, warm-up features and mined pairs of one data set (cached)."""
    import torch
    from midas_data.pipelines import get_pipeline

    from midas_data.dataset.shards import build_dataset
    from midas_data.features.extract import extract_features
    from midas_data.mining.stage import mine_misaligned

    torch.set_num_threads(1)
    root = set_dir(out, name)
    if (root / "pairs" / "train").exists():
        return root
    pipeline, mods, opts = SETS[name]
    src = get_pipeline(pipeline)(modalities=list(mods), **opts)
    build_dataset(src["samples"], root, classes=src["classes"], modalities=src["modalities"],
                  overwrite=True, source=src["source"], progress=False)
    extract_features(root, warmup_epochs=10, seed=0, progress=False, num_threads=1)
    mine_misaligned(root, splits=("train",), k=k, report=True, progress=False)
    return root


def run_one(out: str, name: str, method: str, seed: int, epochs: int, overrides: dict) -> dict:
    """Train one (set, method, seed); return its results (cached on disk)."""
    import torch
    from midas_data.trainers.config import TrainConfig
    from midas_data.trainers.run import train

    torch.set_num_threads(1)
    run_dir = Path(out) / "runs" / name.replace("/", "-") / method / f"seed{seed}"
    cached = run_dir / "results.json"
    if cached.exists():
        return json.loads(cached.read_text())
    cfg = TrainConfig.from_preset("mfeat", seed=seed, epochs=epochs, **{**METHODS.get(method, {}), **overrides})
    res = train(set_dir(Path(out), name), run_dir, cfg, progress=False, plots=seed == 0)
    for p in run_dir.glob("*.pt"):  # checkpoints are not needed for the report
        p.unlink()
    return res


def sign_flip_p(diff: np.ndarray) -> float:
    """Two-sided exact paired permutation test of mean(diff) == 0 (all 2^n sign flips)."""
    diff = np.asarray(diff, dtype=np.float64)
    n = len(diff)
    if n == 0 or np.allclose(diff, 0):
        return 1.0
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n))) if n <= 16 else \
        np.random.default_rng(0).choice((1.0, -1.0), size=(65536, n))
    null = np.abs((signs * diff).mean(axis=1))
    return float(np.mean(null >= abs(diff.mean()) - 1e-12))


def metric_rows(res: dict, mods: tuple[str, ...]) -> dict:
    t = res["test"]
    row = {"accuracy": t["accuracy"], "val_accuracy": res["val"]["accuracy"], "macro_f1": t["macro_f1"],
           "misaligned": t["misaligned_acc"]["mean"]}
    for m in mods:
        row[f"uni_{m}"] = t["unimodal_acc"][m]
        row[f"only_{m}"] = t["only_acc"][m]
    return row


def summarise(all_results: dict, seeds: list[int], methods: list[str]) -> tuple[str, dict]:
    lines = ["| set | method | val acc | accuracy | macro-F1 | unimodal heads (m1 / m2) | m1-only | m2-only | misaligned |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary: dict = {}
    for name, (_, mods, _) in SETS.items():
        if name not in all_results:
            continue
        summary[name] = {}
        for method in methods:
            runs = [all_results[name].get(method, {}).get(s) for s in seeds]
            runs = [r for r in runs if r is not None]
            if not runs:
                continue
            rows = [metric_rows(r, mods) for r in runs]
            agg = {k: (100 * float(np.mean([r[k] for r in rows])), 100 * float(np.std([r[k] for r in rows])))
                   for k in rows[0]}
            agg["per_seed_accuracy"] = [100 * r["accuracy"] for r in rows]
            agg["per_seed_misaligned"] = [100 * r["misaligned"] for r in rows]
            agg["per_seed_weak_only"] = [100 * r[f"only_{mods[1]}"] for r in rows]
            summary[name][method] = agg

            def f(key: str, agg=agg) -> str:
                return f"{agg[key][0]:.2f} ± {agg[key][1]:.2f}"
            lines.append(f"| {name} | {method} | {agg['val_accuracy'][0]:.2f} | {f('accuracy')} | {f('macro_f1')} | "
                         f"{agg[f'uni_{mods[0]}'][0]:.1f} / {agg[f'uni_{mods[1]}'][0]:.1f} | "
                         f"{f(f'only_{mods[0]}')} | {f(f'only_{mods[1]}')} | {f('misaligned')} |")
    return "\n".join(lines), summary


def paired_table(summary: dict, base: str, methods: list[str]) -> str:
    lines = [f"| set | method | Δ val acc vs {base} | Δ accuracy vs {base} (points) | seeds better / tied / worse | "
             "p (sign-flip) | Δ needed for p < 0.05 | misaligned kept | weak-only gain kept |",
             "|---|---|---|---|---|---|---|---|---|"]
    pooled: dict[str, list[float]] = {}
    for name, by_method in summary.items():
        if base not in by_method or "joint" not in by_method:
            continue
        b, j = by_method[base], by_method["joint"]
        for m in methods:
            if m in (base, "joint") or m not in by_method:
                continue
            a = by_method[m]
            n = min(len(a["per_seed_accuracy"]), len(b["per_seed_accuracy"]))
            d = np.array(a["per_seed_accuracy"][:n]) - np.array(b["per_seed_accuracy"][:n])
            gain_mis = (a["misaligned"][0] - j["misaligned"][0]) / max(b["misaligned"][0] - j["misaligned"][0], 1e-9)
            wk = [k for k in a if k.startswith("only_")][-1]
            gain_wk = (a[wk][0] - j[wk][0]) / max(b[wk][0] - j[wk][0], 1e-9)
            dv = a["val_accuracy"][0] - b["val_accuracy"][0]
            wins = f"{int((d > 1e-9).sum())} / {int((np.abs(d) <= 1e-9).sum())} / {int((d < -1e-9).sum())}"
            # about the smallest mean difference this seed-to-seed spread lets a paired test detect
            sd = d.std(ddof=1) if n > 1 else 0.0
            need = f"{2.262 * sd / np.sqrt(n):.2f}" if sd > 0 else "n/a (no spread)"
            pooled.setdefault(m, []).extend(d.tolist())
            lines.append(f"| {name} | {m} | {dv:+.2f} | {d.mean():+.2f} | {wins} | {sign_flip_p(d):.3f} | "
                         f"{need} | {100 * gain_mis:.0f}% | {100 * gain_wk:.0f}% |")
    for m, d in pooled.items():  # every (set, seed) pair together: a weaker claim than per set
        d = np.asarray(d)
        lines.append(f"| all sets pooled | {m} | | {d.mean():+.2f} | {int((d > 1e-9).sum())} / "
                     f"{int((np.abs(d) <= 1e-9).sum())} / {int((d < -1e-9).sum())} | "
                     f"{sign_flip_p(d):.3f} | | | |")
    return "\n".join(lines)


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/results")
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--methods", default="joint,random,mined,mixed")
    ap.add_argument("--seeds", default="0-2")
    ap.add_argument("--joint-seeds", default=None,
                    help="seeds for the Joint baseline when fewer than --seeds suffice (e.g. 0-2)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--k", type=int, default=16, help="mined partners per anchor and modality")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--override", action="append", default=[], metavar="METHOD:KEY=VALUE",
                    help="extra TrainConfig setting for one method (JSON value), repeatable")
    args = ap.parse_args()
    out = Path(args.out)
    sets, methods, seeds = args.sets.split(","), args.methods.split(","), parse_seeds(args.seeds)
    overrides: dict[str, dict] = {m: {} for m in methods}
    for o in args.override:
        m, kv = o.split(":", 1)
        key, val = kv.split("=", 1)
        try:
            overrides.setdefault(m, {})[key] = json.loads(val)
        except json.JSONDecodeError:
            overrides.setdefault(m, {})[key] = val
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    with ProcessPoolExecutor(args.jobs) as pool:
        for f in as_completed([pool.submit(prepare_set, out, s, args.k) for s in sets]):
            f.result()
        seeds_of = {m: parse_seeds(args.joint_seeds) if m == "joint" and args.joint_seeds else seeds
                    for m in methods}
        jobs = {pool.submit(run_one, str(out), s, m, seed, args.epochs, overrides.get(m, {})): (s, m, seed)
                for s in sets for m in methods for seed in seeds_of[m]}
        results: dict = {}
        for f in tqdm(as_completed(jobs), total=len(jobs), desc="runs"):
            s, m, seed = jobs[f]
            results.setdefault(s, {}).setdefault(m, {})[seed] = f.result()
    table, summary = summarise(results, sorted(set().union(*seeds_of.values())), methods)
    base = "random" if "random" in methods else methods[0]
    paired = paired_table(summary, base, methods)
    wall = time.perf_counter() - t0
    text = (f"Test metrics (%), mean ± std over seeds {seeds}; {args.epochs} epochs, best epoch on "
            f"validation.\n\n{table}\n\nPaired against {base} over seeds:\n\n{paired}\n\n"
            f"wall time {wall / 60:.1f} min on {args.jobs} process(es)\n")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"seeds": seeds, "methods": methods, "epochs": args.epochs,
                                                  "overrides": overrides, "summary": summary,
                                                  "wall_time_s": wall}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
