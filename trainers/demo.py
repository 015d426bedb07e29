"""`midas-data demo`: the whole pipeline on the bundled real dataset, then Joint vs MIDAS.

build-shards (UCI Multiple Features, fac + mor) -> extract (warm-up unimodal models) ->
mine-misaligned (exact FAISS k-NN, CPU) -> train Joint and MIDAS -> comparison table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
from midas_data.pipelines import get_pipeline

from midas_data.atomic import write_text_atomic
from midas_data.features.extract import extract_features
from midas_data.mining.stage import mine_misaligned

from .config import TrainConfig
from .run import train

COLUMNS = ("accuracy", "macro_f1")


def comparison_table(results: dict[str, dict], modalities: list[str]) -> str:
    """A markdown table of test metrics, one row per run."""
    head = ["run", "accuracy", "macro-F1", *[f"{m}-only" for m in modalities], "misaligned", "best epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        t = r["test"]
        cells = [name, f"{100 * t['accuracy']:.2f}", f"{100 * t['macro_f1']:.2f}",
                 *[f"{100 * t['only_acc'][m]:.2f}" for m in modalities],
                 f"{100 * t['misaligned_acc']['mean']:.2f}", str(r["best_epoch"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(out: str | Path, modalities: tuple[str, ...] = ("fac", "mor"), epochs: int = 60,
             seed: int = 0, k: int = 16, quiet: bool = False) -> dict:
    out = Path(out)
    t0 = time.perf_counter()
    data = out / "dataset"
    say = (lambda *_: None) if quiet else click.echo
    say(f"[1/4] build-shards: UCI Multiple Features, views {'+'.join(modalities)} -> {data}")
    src = get_pipeline("mfeat")(modalities=list(modalities))
    from midas_data.dataset.shards import build_dataset

    build_dataset(src["samples"], data, classes=src["classes"], modalities=src["modalities"],
                  overwrite=True, source=src["source"], progress=not quiet)
    say("[2/4] extract: warm-up unimodal models -> features and confidences")
    extract_features(data, warmup_epochs=10, seed=seed, progress=not quiet, num_threads=1)
    say(f"[3/4] mine-misaligned: exact cosine k-NN (k={k}) with a different label, CPU")
    mine_misaligned(data, splits=("train",), k=k, index="cpu", report=True, progress=not quiet)
    results = {}
    for name, method in (("Joint", "joint"), ("MIDAS (random partners)", "midas")):
        say(f"[4/4] train {name}")
        cfg = TrainConfig.from_preset("mfeat", method=method, seed=seed, epochs=epochs)
        results[name] = train(data, out / "runs" / method, cfg, progress=not quiet)
    table = comparison_table(results, list(modalities))
    wall = time.perf_counter() - t0
    summary = {"table": table, "wall_time_s": wall,
               "runs": {n: {"test": r["test"], "best_epoch": r["best_epoch"]} for n, r in results.items()}}
    write_text_atomic(out / "comparison.json", json.dumps(summary, indent=2))
    write_text_atomic(out / "comparison.md", table + "\n")
    click.echo("\n" + table)
    click.echo(f"\nwall time {wall:.0f} s; artifacts in {out} (plots: runs/*/confidence.png, "
               "dataset/pairs/train/*.png)")
    return summary
