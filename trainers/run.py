"""`train(dataset_dir, out_dir, config)`: the reference trainer's entry point.

    python -m midas_data.trainers.run DATASET OUT --preset mfeat --method midas
    torchrun --nproc_per_node 2 -m midas_data.trainers.run DATASET OUT --preset mfeat

Under torchrun every rank trains on its own slice of the stream (MidasDataset partitions
by rank by itself, with equal batch counts), gradients are averaged by DDP, the epoch's
alpha statistics are summed over ranks so that every rank holds the same alpha, and only
rank 0 evaluates and writes files. OUT receives metrics.jsonl, last.pt, best.pt,
results.json and curves.png, alpha.png, confidence.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from midas_data.dataset.reader import open_dataset
from midas_data.devices import check_device_available
from midas_data.errors import USER_ERRORS, MidasDataError, where
from midas_data.features.encoders import default_encoder_for
from midas_data.mining.pairs import pairs_fingerprint
from midas_data.storage.click_types import DATASET_ROOT, dataset_root
from midas_data.stream.dataset import MidasDataset, MidasLoader

# `..pipelines.text_encoder` registers `tiny_text_transformer` (and the hook for pretrained
# text models) in the encoder registry. The trainer builds encoders by name for the text
# modalities the image-text readers produce, so it depends on their encoder; the library's
# registry stays free of reader names, and `train()` from Python resolves the same names as
# `midas-data train`.
from ..pipelines import text_encoder  # noqa: F401
from . import artifacts as art
from .cli_options import config_from_options, train_options
from .config import TrainConfig, settings_for_encoders
from .distributed import DistInfo, barrier, setup, teardown
from .loop import EpochTracker, RunState, end_of_epoch_alpha, finish_epoch, is_warmup, train_epoch
from .metrics import evaluate
from .models import MultimodalModel, train_statistics


def build_optimizer(model: torch.nn.Module, config: TrainConfig):
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # step_size 0 = constant lr; a StepLR that never fires keeps one checkpoint layout.
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=config.step_size or 10**9, gamma=config.gamma)
    return opt, sched


def _select(config: TrainConfig, val: dict) -> float:
    """Best-on-validation criterion: fused accuracy (mean unimodal accuracy for `unimodal`)."""
    if config.method == "unimodal":
        return sum(val["unimodal_acc"].values()) / len(val["unimodal_acc"])
    return val["accuracy"]


def train(dataset_dir: str | os.PathLike, out_dir: str | os.PathLike,
          config: TrainConfig | None = None, resume: bool = False, progress: bool = True, *,
          plots: bool = True, on_step: Callable[[int], None] | None = None,
          on_epoch: Callable[[int, torch.nn.Module], None] | None = None) -> dict:
    """Train on `dataset_dir`'s train split, select on val, report on test; return results.

    resume=True continues from OUT/last.pt (mid-epoch too) and, on CPU with the same config,
    ends with the same metrics as an uninterrupted run; without a last.pt it starts afresh,
    so a preemptible job can always be launched with the same command. `on_step(global_step)` is called
    after every optimizer step (a hook for tests and for stopping early); `on_epoch(epoch, model)`
    after every epoch's validation on rank 0 (a hook for analyses of the model over training).
    On ranks other than 0 the returned dict only names the rank.
    """
    config = config or TrainConfig()
    check_device_available(config.device, "TrainConfig.device")
    info = setup(config.device)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(dataset_root(dataset_dir), Path(out_dir), config, resume, progress, plots, on_step,
                      on_epoch, info)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)  # leave the caller's setting
        teardown(info)


def _train(root: str | Path, out: Path, config: TrainConfig, resume: bool, progress: bool, plots: bool,
           on_step, on_epoch, info: DistInfo) -> dict:
    t0 = time.perf_counter()
    device = info.device
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # Exact on CPU; on CUDA some kernels have no deterministic version, so only warn.
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.manual_seed(config.seed)

    ds = open_dataset(root)
    for split in ("train", "val", "test"):
        if split not in ds.splits:
            raise MidasDataError(f"{where(f'{root}/manifest.json', field='splits')}: the trainer needs "
                                 f"train, val and test splits; the dataset has {ds.splits}")
    if config.method == "midas":
        present = np.unique(ds.split("train").labels)
        if len(present) < 2:
            raise MidasDataError(
                f"{where(root / 'index' / 'train.arrow', field='label')}: every train sample is "
                f"class {ds.classes[int(present[0])]!r}; MIDAS pairs samples of different "
                "classes, so it needs at least two (method joint or unimodal can still train)")
    model = MultimodalModel.from_dataset(ds, config).to(device)
    mods = model.modalities
    optimizer, scheduler = build_optimizer(model, config)
    stream = MidasDataset(root, "train", batch_size=config.batch_size, seed=config.seed,
                          modalities=mods, **config.partner_options())
    policy = stream.policy  # none unless method is midas
    # Workers stay up across epochs (each epoch's plan reaches them without a fork).
    loader = MidasLoader(stream, num_workers=config.num_workers,
                         persistent_workers=config.num_workers > 0)
    held_out = {s: MidasDataset(root, s, batch_size=config.eval_batch_size, policy="none",
                                shuffle=False, modalities=mods, rank=0, world_size=1)
                for s in ("val", "test")}

    # What this run reads, recorded in every checkpoint: resuming on other data is refused.
    feats = getattr(stream, "features", None)
    inputs = {"dataset": ds.fingerprint, "features": feats.fingerprint if feats is not None else "",
              "pairs": pairs_fingerprint(root, "train")  # when the policy reads mined pairs
              if getattr(stream.partners, "neighbours", None) is not None else ""}
    run, history, tracker = RunState(), [], None
    best = {"value": -math.inf, "epoch": -1}
    start_epoch, wall_before = 0, 0.0
    last_path, best_path = out / "last.pt", out / "best.pt"
    if resume and last_path.exists():
        ck = art.load_checkpoint(last_path, device)
        art.check_inputs(ck.get("inputs", {}), inputs, last_path)
        art.check_resumable(ck["config"], config.to_dict(), last_path)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        loader.load_state_dict(ck["stream"])
        art.set_rng_state(ck["rng"])
        run, history, best = RunState(**ck["run"]), ck["history"], ck["best"]
        start_epoch = ck["epoch"] + 1 if ck["epoch_done"] else ck["epoch"]
        tracker = None if ck["epoch_done"] else EpochTracker(**ck["tracker"])
        wall_before = ck["wall_time_s"]

    net: torch.nn.Module = model
    if info.enabled:
        # Warm-up and `unimodal` leave the fused head without gradient: let DDP skip it.
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                      find_unused_parameters=config.method != "joint")

    def save_last(epoch: int, done: bool, tr: EpochTracker | None) -> None:
        if not info.is_main:
            return
        art.save_checkpoint(last_path, {
            "config": config.to_dict(), "inputs": inputs, "epoch": epoch, "epoch_done": done,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "stream": loader.state_dict(),
            "rng": art.rng_state(), "run": dataclasses.asdict(run), "history": history,
            "best": best, "tracker": None if tr is None else tr.to_dict(),
            "wall_time_s": wall_before + time.perf_counter() - t0})

    for epoch in range(start_epoch, config.epochs):
        t_epoch = time.perf_counter()
        if tracker is None:
            stream.set_epoch(epoch)
            tracker = EpochTracker(epoch, len(mods))
        train_epoch(net, loader, optimizer, config, run, tracker, info, progress=progress,
                    checkpoint=lambda tr, e=epoch: save_last(e, False, tr), on_step=on_step)
        summary = finish_epoch(tracker, info)
        end_of_epoch_alpha(run, summary, config, epoch)
        weak = tracker.weak
        tracker = None
        lr = optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():
            # A run resumed from a checkpoint taken after an epoch's last step makes no optimizer
            # step before this one; the schedule was restored from the checkpoint, so it is right.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step",
                                    category=UserWarning)
            scheduler.step()
        if info.is_main:
            val = evaluate(model, held_out["val"], config.seed, device)
            summary["alpha_stats"] = dataclasses.asdict(summary["alpha_stats"])
            history.append({
                "epoch": epoch, "warmup": is_warmup(config, epoch), "lr": lr, "alpha": run.alpha,
                "weak_modality": None if weak is None else mods[weak],
                "mean_conf": dict(zip(mods, summary["mean_conf"])), "train": summary, "val": val,
                "epoch_time_s": time.perf_counter() - t_epoch})
            score = _select(config, val)
            # Ties go to the later epoch: a small validation set saturates early, and a strict
            # ">" would keep a model from the first epochs after warm-up, before the
            # misaligned loss has had any effect (mfeat: mor-only 56% instead of 70%).
            if not is_warmup(config, epoch) and score >= best["value"]:
                best = {"value": score, "epoch": epoch}
                art.save_checkpoint(best_path, {"config": config.to_dict(), "inputs": inputs,
                                                "epoch": epoch,
                                                "model": model.state_dict(), "val": val})
            art.write_metrics(out / "metrics.jsonl", history)
            save_last(epoch, True, None)
            if on_epoch is not None:
                on_epoch(epoch, model)
            if progress:
                print(f"epoch {epoch}: loss {summary['loss']:.4f} train acc {summary['acc']:.4f} "
                      f"val acc {val['accuracy']:.4f} misaligned {val['misaligned_acc']['mean']:.4f} "
                      f"alpha {run.alpha:.2f}", flush=True)
        barrier(info)

    if not info.is_main:
        return {"rank": info.rank, "world_size": info.world_size}
    return _finish(root, out, ds.fingerprint, config, model, held_out["test"], history, best,
                   policy, info, wall_before + time.perf_counter() - t0, plots)


def _finish(root: Path, out: Path, fingerprint: str, config: TrainConfig, model: MultimodalModel,
            test: MidasDataset, history: list[dict], best: dict, policy: str, info: DistInfo,
            wall: float, plots: bool) -> dict:
    """Test metrics of the best-on-validation checkpoint, results.json, plots."""
    best_path = out / "best.pt"
    best_val = None
    if best["epoch"] >= 0 and best_path.exists():
        ck = art.load_checkpoint(best_path, info.device)
        model.load_state_dict(ck["model"])
        best_val = ck["val"]
    test_metrics = evaluate(model, test, config.seed, info.device)
    epoch_times = [h["epoch_time_s"] for h in history]
    results = {
        "dataset": str(root), "dataset_fingerprint": fingerprint, "config": config.to_dict(),
        "method": config.method, "stream_policy": policy, "modalities": model.modalities,
        "encoders": model.encoder_names, "best_epoch": best["epoch"], "val": best_val,
        "test": test_metrics, "alpha_trajectory": [h["alpha"] for h in history],
        "weak_modality_trajectory": [h["weak_modality"] for h in history],
        "epochs_run": len(history), "world_size": info.world_size, "device": str(info.device),
        "wall_time_s": wall,
        "mean_epoch_time_s": sum(epoch_times) / len(epoch_times) if epoch_times else None,
    }
    art.write_json(out / "results.json", results)
    if plots and history:
        art.plot_history(out, history, model.modalities)
    return results


def auto_preset(root: str | os.PathLike, config: TrainConfig) -> tuple[str, str]:
    """(preset, reason) for a command line without --preset: by the encoders the model will
    build for the dataset's modalities (`settings_for_encoders`)."""
    ds = open_dataset(root)
    mods = config.modalities or ds.modalities
    shapes, _ = train_statistics(ds, mods, 1)
    encoders = {m: config.encoders.get(m) or default_encoder_for(ds.schema[m]["kind"], shapes[m]) for m in mods}
    return settings_for_encoders(encoders)


def still_improving(history: list[dict], window: float = 0.1) -> str | None:
    """A hint when the first epoch reaching the best validation accuracy is among the last
    `window` of the epochs (at least 2): the run was still improving when it stopped.
    `history`: the lines of metrics.jsonl. The first epoch, not the selected one: a validation
    accuracy that saturates early (ties go to the later epoch) is not a run still improving."""
    scores = [(h["epoch"], h["val"]["accuracy"]) for h in history if not h.get("warmup")]
    if not scores:
        return None
    best = max(v for _, v in scores)
    first = next(e for e, v in scores if v == best)
    epochs = len(history)
    last = max(2, round(window * epochs))
    if first < epochs - last:
        return None
    return (f"the best validation accuracy ({best:.4f}) was first reached at epoch {first} of {epochs}, "
            f"among the last {last}: the model was still improving; train longer, e.g. --epochs {2 * epochs}")


@click.command(context_settings={"show_default": True})
@click.argument("dataset", type=DATASET_ROOT)
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt (mid-epoch too).")
@click.option("--restart", is_flag=True,
              help="Start over although OUT/last.pt exists (e.g. a damaged one); the old file "
                   "is replaced only when the new run writes its first checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
@train_options
def main(dataset: str, out: str, resume: bool, restart: bool, quiet: bool, **options) -> None:
    """Train MIDAS / Joint / unimodal on DATASET; write checkpoints, metrics and plots to OUT."""
    if resume and restart:
        raise click.UsageError("--resume and --restart exclude each other: continue the run in "
                               "OUT, or start it over")
    try:
        if options.get("preset") is None:
            options["preset"], why = auto_preset(dataset, config_from_options(options))
            click.echo(f"settings: --preset {options['preset']}, because {why}. Name --preset to choose; "
                       "options given explicitly override it.")
        config = config_from_options(options)
        results = train(dataset, out, config, resume=resume and not restart, progress=not quiet)
    except USER_ERRORS as e:
        ctx = click.get_current_context()
        if ctx.parent is not None:  # under `midas-data`: the group reports it (or --debug)
            raise
        click.echo(f"error: {' '.join(str(e).split())}", err=True)
        ctx.exit(2)
    if "test" in results:
        t = results["test"]
        only = ", ".join(f"{m}-only {v:.4f}" for m, v in t["only_acc"].items())
        click.echo(f"test acc {t['accuracy']:.4f} macro-F1 {t['macro_f1']:.4f} {only} "
                   f"misaligned {t['misaligned_acc']['mean']:.4f} (best epoch {results['best_epoch']}, "
                   f"{results['wall_time_s']:.1f} s) -> {out}")
        hint = still_improving([json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()])
        if hint:
            click.echo(f"warning: {hint}", err=True)


if __name__ == "__main__":
    main()
