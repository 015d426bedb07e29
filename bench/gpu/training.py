"""Part `train`: Joint and MIDAS with ResNet-18 encoders (--encoder) on the CREMA-D-sized
fixture.

Three measurements, each answering one question:
- stream alone (`stream_rate`): how fast the loader hands out batches at each num_workers;
- compute alone (`compute_rate`): `train_step` on batches already read and kept in memory
  (CPU tensors as the stream yields them, so the uint8 -> float and host -> GPU copies are
  in), i.e. the trainer with an infinitely fast loader; MIDAS on a post-warm-up epoch;
- end to end (`trainers.run.train`): samples/s per epoch from the `on_step` timestamps
  (validation and checkpoints left out), with the GPU utilisation sampled meanwhile.
The verdict per run: the MIDAS/Joint step-time ratio, and which of stream and GPU bounds
the rate (the stream alone slower than compute alone means the loader is the bottleneck;
otherwise the compute, i.e. the GPU and the main process feeding it).
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import numpy as np

from .fixture import build_fixture
from .harness import Report, sync
from .sampler import UtilSampler, util_in


def train_config(a, method: str, workers: int, device):
    from midas_data.trainers.config import TrainConfig

    return TrainConfig.from_preset(
        "cremad", method=method, epochs=a.epochs, warmup_epochs=a.warmup,
        encoders={"audio": a.encoder, "visual": a.encoder}, device=str(device),
        num_workers=workers, batch_size=a.batch_size, stats_samples=512,
        deterministic=a.deterministic, seed=a.seed)


def epoch_batches(n: int, batch: int) -> list[int]:
    sizes = [batch] * (n // batch)
    return sizes + ([n % batch] if n % batch else [])


def stream_rate(root: Path, batch: int, workers: int, mods: list[str]) -> dict:
    """One epoch of the train stream (policy random) and nothing else."""
    from midas_data.stream.dataset import MidasDataset, MidasLoader

    ds = MidasDataset(root, "train", batch_size=batch, policy="random", seed=0, modalities=mods)
    t0 = time.perf_counter()
    first, samples, nb = None, 0, 0
    for b in MidasLoader(ds, num_workers=workers):
        if first is None:
            first = time.perf_counter() - t0
        samples += len(b["label"])
        nb += 1
    total = time.perf_counter() - t0
    steady = (total - first) if nb > 1 else total
    rest = samples - (batch if nb > 1 else 0)  # the first batch waits on start-up
    return {"samples": samples, "batches": nb, "epoch_s": total, "first_batch_s": first,
            "samples_per_s": rest / steady if steady > 0 else None}


def compute_rate(root: Path, a, device, methods: list[str], budget_s: float) -> dict:
    """Training steps on 6 batches already read: the trainer's rate with an infinitely fast
    loader, per method (samples/s and seconds per step)."""
    import torch
    from midas_data.trainers.distributed import DistInfo
    from midas_data.trainers.loop import EpochTracker, RunState, set_weak, train_step
    from midas_data.trainers.models import MultimodalModel
    from midas_data.trainers.run import build_optimizer

    from midas_data.dataset.reader import open_dataset
    from midas_data.stream.dataset import MidasDataset, MidasLoader

    cfg0 = train_config(a, "joint", 0, device)
    model0 = MultimodalModel.from_dataset(open_dataset(root), cfg0)
    stream = MidasDataset(root, "train", batch_size=a.batch_size, policy="random", seed=0,
                          modalities=model0.modalities)
    batches = []
    for b in MidasLoader(stream, num_workers=0):
        if len(b["label"]) == a.batch_size:
            batches.append(b)
        if len(batches) == 6:
            break
    info = DistInfo(0, 1, device, False)
    det_before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(bool(a.deterministic), warn_only=device.type == "cuda")
    out = {}
    try:
        for method in methods:
            cfg = train_config(a, method, 0, device)
            model = copy.deepcopy(model0).to(device)
            model.train()
            opt, _ = build_optimizer(model, cfg)
            run = RunState()
            epoch = cfg.warmup_epochs if method == "midas" else 0  # MIDAS: after the warm-up
            tracker = EpochTracker(epoch, len(model.modalities))
            if method == "midas":
                set_weak(tracker, [0.9, 0.4])
            for b in batches[:2]:  # warm-up: cuDNN algorithm choice, allocator
                train_step(model, b, opt, cfg, run, tracker, info)
            sync(device)
            steps, t0 = 0, time.perf_counter()
            while steps < 4 * len(batches) and (time.perf_counter() - t0) < budget_s / len(methods):
                train_step(model, batches[steps % len(batches)], opt, cfg, run, tracker, info)
                steps += 1
            sync(device)
            dt = time.perf_counter() - t0
            out[method] = {"steps": steps, "time_s": dt, "step_s": dt / steps,
                           "samples_per_s": steps * a.batch_size / dt}
            del model, opt
    finally:
        torch.use_deterministic_algorithms(det_before)
    return out


def _epochs(run: dict, stamps: list[float], steps_per_epoch: int, sizes: list[int], warmup: int,
            pts) -> None:
    """Per-epoch samples/s, step time and GPU utilisation from the step timestamps."""
    for e in range(len(stamps) // steps_per_epoch):
        st = stamps[e * steps_per_epoch:(e + 1) * steps_per_epoch]
        samples = sum(sizes[1:])  # steps 2..last of the epoch (the first waits on start-up)
        run["epochs"].append({"epoch": e, "warmup": run["method"] == "midas" and e < warmup,
                              "samples_per_s": samples / (st[-1] - st[0]),
                              "step_s": (st[-1] - st[0]) / (len(st) - 1),
                              "gpu_util": util_in(pts, st[0], st[-1])})
    meas = [ep for ep in run["epochs"] if not ep["warmup"]]
    run["samples_per_s"] = float(np.median([ep["samples_per_s"] for ep in meas])) if meas else None
    run["step_s"] = float(np.median([ep["step_s"] for ep in meas])) if meas else None
    utils = [ep["gpu_util"]["mean"] for ep in meas if ep["gpu_util"]]
    run["gpu_util_mean"] = float(np.mean(utils)) if utils else None


def verdicts(runs: dict, streams: dict, comp: dict, methods: list[str], workers: list[int]) -> dict:
    """Per run: end to end vs compute alone vs stream alone, and the bound; per num_workers:
    the MIDAS/Joint step-time ratio (end to end), and once the compute-only one."""
    out: dict = {}
    for w in workers:
        for method in methods:
            run, s = runs.get(f"{method}_w{w}"), streams.get(str(w), {}).get("samples_per_s")
            c = comp.get(method, {}).get("samples_per_s")
            if not run or not run["samples_per_s"] or not s or not c:
                continue
            e = run["samples_per_s"]
            util = run["gpu_util_mean"]
            bound = "stream" if s < c else "compute"
            out[f"{method}_w{w}"] = {
                "end_to_end": e, "stream_only": s, "compute_only": c,
                "end_to_end_over_compute": e / c, "gpu_util_mean": util, "bottleneck": bound,
                # num_workers=0 loads and computes in turn: 1 / (1/stream + 1/compute)
                "expected_if_serial": 1 / (1 / s + 1 / c),
                "text": (f"{method}, num_workers={w}: {e:.0f} samples/s end to end = "
                         f"{100 * e / c:.0f}% of compute alone ({c:.0f}/s); the stream alone "
                         f"gives {s:.0f}/s -> {bound.upper()}-BOUND"
                         + (f"; GPU busy {util:.0f}%" if util is not None else ""))}
        j, m = runs.get(f"joint_w{w}"), runs.get(f"midas_w{w}")
        if j and m and j.get("step_s") and m.get("step_s"):
            out[f"midas_over_joint_step_w{w}"] = m["step_s"] / j["step_s"]
    if comp.get("joint") and comp.get("midas"):
        out["midas_over_joint_step_compute_only"] = comp["midas"]["step_s"] / comp["joint"]["step_s"]
    return out


def part_train(a, rep: Report) -> None:
    import torch
    from midas_data.trainers.run import train

    from midas_data.dataset.reader import open_dataset

    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no GPU")
    if a.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as trainers.run does
    workers = [int(w) for w in str(a.workers).split(",") if w != ""]
    methods = [m for m in a.methods.split(",") if m]
    work = Path(a.work)
    root = work / "cremad_like"
    rep.phase("fixture")
    t = time.perf_counter()
    params = build_fixture(root, a.clips, a.frames, a.frame_size, a.n_mels, a.audio_frames,
                           a.seed, rep.log)
    n_train = len(open_dataset(root).split("train"))
    size = sum(f.stat().st_size for f in (root / "shards").glob("*.tar"))
    rep.set("fixture", {**params, "train_clips": n_train, "shard_bytes": size,
                        "build_s": time.perf_counter() - t, "root": str(root)})
    rep.log(f"fixture: {a.clips} clips ({n_train} train), {size / 2**30:.2f} GiB of shards, "
            f"{rep.data['fixture']['build_s']:.1f} s")
    rep.set("config", {"device": str(dev), "batch_size": a.batch_size, "epochs": a.epochs,
                       "warmup_epochs": a.warmup, "workers": workers, "methods": methods,
                       "deterministic": a.deterministic, "encoder": a.encoder,
                       "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None})

    sampler = UtilSampler(work / "util.txt")
    runs: dict = {}
    try:
        streams: dict = {}
        rep.phase("stream alone")
        for w in workers:
            streams[str(w)] = stream_rate(root, a.batch_size, w, ["audio", "visual"])
            rep.set("stream_only", streams)
            rep.log(f"stream alone, num_workers={w}: {streams[str(w)]['samples_per_s']:.0f} "
                    f"samples/s (epoch {streams[str(w)]['epoch_s']:.1f} s)")
        rep.phase("compute-only steps")
        comp = compute_rate(root, a, dev, methods, budget_s=min(30.0, max(5.0, rep.left() / 6)))
        rep.set("compute_only", comp)
        rep.log("compute alone (batches in memory): " + ", ".join(
            f"{m} {v['samples_per_s']:.0f} samples/s" for m, v in comp.items()))

        last_run_s = 0.0
        # the most workers first, both methods back to back: if time runs short, what is
        # left out is the least informative run
        for w in sorted(workers, reverse=True):
            for method in methods:
                name = f"{method}_w{w}"
                # a run's time: the last run's, else epochs at the slower of stream and step
                slow = min(streams[str(w)]["samples_per_s"] or 1.0, comp[method]["samples_per_s"])
                need = max(last_run_s, 1.2 * a.epochs * n_train / slow + 10)
                if rep.left() < 1.2 * need + 5:
                    rep.stop(f"run {name} skipped: ~{need:.0f} s needed, {rep.left():.0f} s left")
                    continue
                stamps: list[float] = []
                rep.phase(f"training {name}")
                t = time.monotonic()
                res = train(root, work / "runs" / name, train_config(a, method, w, dev),
                            progress=False, plots=False,
                            on_step=lambda _s, st=stamps: st.append(time.time()))
                last_run_s = time.monotonic() - t
                runs[name] = {"method": method, "num_workers": w, "wall_s": last_run_s,
                              "test_accuracy": res["test"]["accuracy"], "epochs": [],
                              "_stamps": stamps}
                rep.log(f"trained {name}: {last_run_s:.1f} s, {len(stamps)} steps")
                rep.set("runs", {k: {kk: vv for kk, vv in v.items() if kk != "_stamps"}
                                 for k, v in runs.items()})
    finally:
        source, pts = sampler.close()
    rep.set("util_source", source)
    sizes = epoch_batches(n_train, a.batch_size)
    for run in runs.values():
        _epochs(run, run.pop("_stamps"), len(sizes), sizes, a.warmup, pts)
    rep.set("runs", runs)
    verdict = verdicts(runs, streams, comp, methods, workers)
    for v in verdict.values():
        if isinstance(v, dict):
            rep.log(v["text"])
    rep.set("verdict", verdict)
    rep.set("status", "partial" if len(runs) < len(methods) * len(workers) else "ok")
