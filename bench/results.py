"""The evidence protocol: Joint vs MIDAS (random, mined, mixed, ... partners) on real data.

Data sets: UCI Multiple Features view pairs (strong view + weak view) and AV digits
(8x8 digit images paired by class with spoken-digit MFCCs; "av-noisy" adds noise to the
image); "user-av-noisy" is av-noisy as a user brings it (PNG images, .npy audio features,
a CSV manifest without splits), trained with the settings chosen automatically for its
encoders, as `midas-data train` without --preset. Per set: build shards (stratified
70/10/20, split seed 0), extract warm-up features, mine k-NN partners; then train every
(method, seed) with the mfeat preset (the independent prototype's protocol,
docs/REFERENCE_RESULTS.md: Adam 1e-3, batch 64, 60 epochs, warm-up 10, lambda 1, best
epoch on validation) or, on the user set, the automatic choice, and report test metrics. Runs are
cached (results.json per run), so an interrupted protocol resumes. Paired comparisons use
an exact sign-flip permutation test over seeds.

    python bench/results.py --out out/results              # the default protocol: 3 seeds
    python bench/results.py --seeds 0-9 --methods random,soft --out out/policies
    python bench/results.py --methods joint,random,midas-stored --out out/results
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
    # A user's own files: av-noisy written as PNG images and .npy audio features with a CSV
    # manifest (no split column), read back by the manifest reader, extracted and trained
    # with the settings chosen automatically for its encoders (no preset named).
    "user-av-noisy": ("av_digits_files", ("image", "audio"), {"noise_std": 4.0}),
}
# set pipelines written out as a user's files (a writer returning the manifest path)
USER_FILES = {"av_digits_files": "write_av_digits_manifest"}
# method name -> TrainConfig overrides
METHODS = {
    "joint": {"method": "joint"},
    "random": {"method": "midas", "policy": "random"},
    # trained by train_stored, not the trainer; no warm-up: its confidences come from extract
    "midas-stored": {"method": "midas", "policy": "random", "warmup_epochs": 0},
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


STORED = "midas-stored"
EXTRACT_WARMUP = 10  # warm-up epochs of the models whose confidences `extract` stores


def stored_warmup(method: str) -> int | None:
    """Extract warm-up epochs a `midas-stored[-wN]` method reads confidences from, else None."""
    if not method.startswith(STORED):
        return None
    tail = method[len(STORED):]
    if tail and not (tail.startswith("-w") and tail[2:].isdigit()):
        raise ValueError(f"method {method!r}: use {STORED} or {STORED}-wN (N extract warm-up epochs)")
    return int(tail[2:]) if tail else EXTRACT_WARMUP


def set_dir(out: Path, name: str, warmup: int = EXTRACT_WARMUP) -> Path:
    suffix = "" if warmup == EXTRACT_WARMUP else f"@w{warmup}"
    return out / "data" / (name.replace("/", "-") + suffix)


def prepare_set(out: Path, name: str, k: int, warmup: int = EXTRACT_WARMUP) -> Path:
    """Shards, warm-up features (confidences from `warmup`-epoch models) and mined pairs of
    one data set (cached)."""
    import torch
    from midas_data.pipelines import get_pipeline

    from midas_data.dataset.shards import build_dataset
    from midas_data.features.extract import extract_features
    from midas_data.mining.stage import mine_misaligned

    torch.set_num_threads(1)
    root = set_dir(out, name, warmup)
    if (root / "pairs" / "train").exists():
        return root
    pipeline, mods, opts = SETS[name]
    if pipeline in USER_FILES:
        from midas_data.pipelines import fixtures

        manifest = getattr(fixtures, USER_FILES[pipeline])(root.parent / f"{root.name}-files", **opts)
        src = get_pipeline("manifest")(manifest, modalities=list(mods))
    else:
        src = get_pipeline(pipeline)(modalities=list(mods), **opts)
    build_dataset(src["samples"], root, classes=src["classes"], modalities=src["modalities"],
                  overwrite=True, source=src["source"], progress=False)
    extract_features(root, warmup_epochs=warmup, seed=0, progress=False, num_threads=1)
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
    settings = METHODS.get(STORED if stored_warmup(method) is not None else method, {})
    warm = stored_warmup(method)
    preset, why = preset_for(out, name, warm)
    cfg = TrainConfig.from_preset(preset, seed=seed, epochs=epochs, **{**settings, **overrides})
    if warm is not None:
        res = train_stored(set_dir(Path(out), name, warm), run_dir, cfg)
        res["extract_warmup_epochs"] = warm
        if why:
            res["automatic_settings"] = why
        run_dir.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(res))
        return res
    res = train(set_dir(Path(out), name), run_dir, cfg, progress=False, plots=seed == 0)
    for p in run_dir.glob("*.pt"):  # checkpoints are not needed for the report
        p.unlink()
    if why:
        res["automatic_settings"] = why
        cached.write_text(json.dumps(res))
    return res


def preset_for(out: str, name: str, warmup: int | None) -> tuple[str, str]:
    """(preset, reason): the mfeat protocol on the bundled sets; on a user's files the
    trainer's automatic choice for a command line without --preset (reason "" otherwise)."""
    if SETS[name][0] not in USER_FILES:
        return "mfeat", ""
    from midas_data.trainers.config import TrainConfig
    from midas_data.trainers.run import auto_preset

    return auto_preset(set_dir(Path(out), name, warmup or EXTRACT_WARMUP), TrainConfig())


def train_stored(root: Path, run_dir: Path, cfg) -> dict:
    """A user's loop: MidasObjective on the stream's stored confidences, no unimodal heads.

    The model is the reference trainer's (same encoders, input standardisation and fused
    head, so only the training path differs); its unimodal heads are never trained or used.
    Same protocol otherwise: optimizer and batch size of `cfg`, `cfg.epochs` epochs (all of
    them MIDAS epochs: the confidences come from `extract`'s warm-up models), best epoch on
    validation accuracy (ties to the later epoch), test metrics of that epoch.
    """
    import copy
    import math

    import torch
    from midas_data.trainers.metrics import evaluate
    from midas_data.trainers.models import MultimodalModel

    from midas_data import MidasDataset, MidasObjective, materialize_misaligned, open_dataset

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    cpu = torch.device("cpu")
    model = MultimodalModel.from_dataset(open_dataset(root), cfg)
    mods = model.modalities
    params = [*model.encoders.parameters(), *model.fused_head.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    stream = MidasDataset(root, "train", batch_size=cfg.batch_size, policy=cfg.policy, seed=cfg.seed,
                          modalities=mods)
    held = {s: MidasDataset(root, s, batch_size=cfg.eval_batch_size, policy="none", shuffle=False,
                            modalities=mods, rank=0, world_size=1) for s in ("val", "test")}
    objective = MidasObjective(lam=cfg.lam, eta=cfg.eta, alpha_update=cfg.alpha_update)

    def fused(inputs: dict) -> torch.Tensor:
        return model.fuse(model.encode(inputs))

    best: dict = {"value": -math.inf, "epoch": -1}
    alphas = []
    for epoch in range(cfg.epochs):
        stream.set_epoch(epoch)
        model.train()
        for batch in stream:
            mis = materialize_misaligned(batch, mods)
            loss = objective(fused(batch["inputs"]), fused(mis["inputs"]), batch, mis)
            opt.zero_grad()
            loss.backward()
            opt.step()
        alphas.append(objective.end_epoch())
        val = evaluate(model, held["val"], cfg.seed, cpu)
        if val["accuracy"] >= best["value"]:
            best = {"value": val["accuracy"], "epoch": epoch, "val": val,
                    "state": copy.deepcopy(model.state_dict())}
    model.load_state_dict(best["state"])
    test = evaluate(model, held["test"], cfg.seed, cpu)
    test["unimodal_acc"] = {m: math.nan for m in mods}  # no unimodal heads on this path
    test["uni_conf"] = {m: math.nan for m in mods}
    return {"dataset": str(root), "config": cfg.to_dict(), "method": STORED, "modalities": mods,
            "best_epoch": best["epoch"], "val": best["val"], "test": test, "alpha_trajectory": alphas,
            "epochs_run": cfg.epochs, "wall_time_s": time.perf_counter() - t0}


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
            agg["per_seed_only"] = {m: [100 * r[f"only_{m}"] for r in rows] for m in mods}
            summary[name][method] = agg

            def f(key: str, agg=agg) -> str:
                return f"{agg[key][0]:.2f} ± {agg[key][1]:.2f}"
            lines.append(f"| {name} | {method} | {agg['val_accuracy'][0]:.2f} | {f('accuracy')} | {f('macro_f1')} | "
                         f"{agg[f'uni_{mods[0]}'][0]:.1f} / {agg[f'uni_{mods[1]}'][0]:.1f} | "
                         f"{f(f'only_{mods[0]}')} | {f(f'only_{mods[1]}')} | {f('misaligned')} |")
    return "\n".join(lines), summary


def weak_view(joint: dict) -> str:
    """A set's weak view: the modality whose unimodal probe is less accurate under Joint (the
    second modality on the mfeat pairs and av, the noisy image on av-noisy)."""
    return min(joint["per_seed_only"], key=lambda m: joint[f"uni_{m}"][0])


def _kept(value: float, base: float, joint: float) -> str:
    """The share of `base`'s gain over Joint that `value` keeps; n/a when `base` gains nothing."""
    return f"{100 * (value - joint) / (base - joint):.0f}%" if base - joint > 0.05 else "n/a (no base gain)"


def paired_table(summary: dict, base: str, methods: list[str]) -> str:
    lines = [f"| set | method | Δ val acc vs {base} | Δ accuracy vs {base} (points) | seeds better / tied / worse | "
             "p (sign-flip) | Δ needed for p < 0.05 | misaligned gain kept | weak-view gain kept |",
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
            wk = f"only_{weak_view(j)}"
            kept_mis, kept_wk = (_kept(a[k][0], b[k][0], j[k][0]) for k in ("misaligned", wk))
            dv = a["val_accuracy"][0] - b["val_accuracy"][0]
            wins = f"{int((d > 1e-9).sum())} / {int((np.abs(d) <= 1e-9).sum())} / {int((d < -1e-9).sum())}"
            # about the smallest mean difference this seed-to-seed spread lets a paired test detect
            sd = d.std(ddof=1) if n > 1 else 0.0
            need = f"{2.262 * sd / np.sqrt(n):.2f}" if sd > 0 else "n/a (no spread)"
            pooled.setdefault(m, []).extend(d.tolist())
            lines.append(f"| {name} | {m} | {dv:+.2f} | {d.mean():+.2f} | {wins} | {sign_flip_p(d):.3f} | "
                         f"{need} | {kept_mis} | {kept_wk} |")
    for m, d in pooled.items():  # every (set, seed) pair together: a weaker claim than per set
        d = np.asarray(d)
        lines.append(f"| all sets pooled | {m} | | {d.mean():+.2f} | {int((d > 1e-9).sum())} / "
                     f"{int((np.abs(d) <= 1e-9).sum())} / {int((d < -1e-9).sum())} | "
                     f"{sign_flip_p(d):.3f} | | | |")
    return "\n".join(lines)


def joint_table(summary: dict, methods: list[str]) -> str:
    """Every method against Joint, paired by seed: accuracy, misaligned and weak-view accuracy.

    The weak view is :func:`weak_view` of the set's Joint runs."""
    head = " | ".join(f"Δ {k} (points) | better/tied/worse | p" for k in ("accuracy", "misaligned", "weak-only"))
    lines = [f"| set | weak view | method | {head} |", "|---|---|---|" + "---|---|---|" * 3]
    pooled: dict[str, list[list[float]]] = {}
    for name, by_method in summary.items():
        if "joint" not in by_method:
            continue
        j = by_method["joint"]
        weak = weak_view(j)
        for m in methods:
            if m == "joint" or m not in by_method:
                continue
            a, cells = by_method[m], []
            for x, y in ((a["per_seed_accuracy"], j["per_seed_accuracy"]),
                         (a["per_seed_misaligned"], j["per_seed_misaligned"]),
                         (a["per_seed_only"][weak], j["per_seed_only"][weak])):
                n = min(len(x), len(y))
                d = np.array(x[:n]) - np.array(y[:n])
                pooled.setdefault(m, [[], [], []])[len(cells)].extend(d.tolist())
                cells.append(f"{d.mean():+.2f} | {int((d > 1e-9).sum())}/{int((np.abs(d) <= 1e-9).sum())}/"
                             f"{int((d < -1e-9).sum())} | {sign_flip_p(d):.3f}")
            lines.append(f"| {name} | {weak} | {m} | {' | '.join(cells)} |")
    for m, diffs in pooled.items():  # every (set, seed) pair together: a weaker claim than per set
        cells = [f"{np.mean(d):+.2f} | {int((np.array(d) > 1e-9).sum())}/{int((np.abs(d) <= 1e-9).sum())}/"
                 f"{int((np.array(d) < -1e-9).sum())} | {sign_flip_p(np.array(d)):.3f}" for d in diffs]
        lines.append(f"| all sets pooled | | {m} | {' | '.join(cells)} |")
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
        warmups = {EXTRACT_WARMUP} | {w for w in map(stored_warmup, methods) if w is not None}
        for f in as_completed([pool.submit(prepare_set, out, s, args.k, w) for s in sets for w in warmups]):
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
    versus_joint = joint_table(summary, methods)
    wall = time.perf_counter() - t0
    text = (f"Test metrics (%), mean ± std over seeds {seeds}; {args.epochs} epochs, best epoch on "
            f"validation.\n\n{table}\n\nPaired against {base} over seeds:\n\n{paired}\n\n"
            f"Paired against joint over seeds:\n\n{versus_joint}\n\n"
            f"wall time {wall / 60:.1f} min on {args.jobs} process(es)\n")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"seeds": seeds, "methods": methods, "epochs": args.epochs,
                                                  "overrides": overrides, "summary": summary,
                                                  "wall_time_s": wall}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
