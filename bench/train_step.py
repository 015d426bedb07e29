"""Cost of a MIDAS training step against a Joint step, same model, same batches, same run.

MIDAS swaps encoder *features* inside the batch, so its extra work over Joint is the fused
head on the 2B misaligned rows (forward and backward), the unimodal losses' gradient into
the encoders, and the loss bookkeeping (source labels and confidences, hard-sample weights,
the soft-label cross-entropy, the alpha statistics); the target is a per-sample time ratio
MIDAS / Joint <= 1.2. Two cases:
- mfeat fac+mor (216-d and 6-d views, MLP encoders in -> 128 -> 64): the cheapest encoders,
  where any per-step overhead shows most;
- a ResNet-18 on a synthetic spectrogram [1, 64, 64] plus an MLP on a 32-d vector: the
  encoder-dominated case of audio-visual benchmarks.

Run: .venv/bin/python bench/train_step.py [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch
from midas_data.pipelines.mfeat import load_mfeat
from midas_data.trainers.config import TrainConfig
from midas_data.trainers.distributed import DistInfo
from midas_data.trainers.loop import EpochTracker, RunState, set_weak, train_step
from midas_data.trainers.models import MultimodalModel

from midas_data.stream.dataset import misaligned_flat
from midas_data.stream.epoch_plan import assign_partners, partner_rng

BATCH = 64
TARGET = 1.2  # MIDAS / Joint time per step


def make_batches(inputs: dict[str, np.ndarray], labels: np.ndarray, count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        rows = rng.choice(len(labels), BATCH, replace=False)
        y = labels[rows]
        partner = assign_partners(y, len(inputs), partner_rng(seed, 0, k * BATCH))
        # the partner fields a MidasDataset batch carries for the step (midas_data.stream.dataset)
        out.append({"label": torch.from_numpy(y), "partner": torch.from_numpy(partner),
                    "misaligned_flat": torch.from_numpy(misaligned_flat(partner)),
                    "inputs": {m: torch.from_numpy(x[rows]) for m, x in inputs.items()}})
    return out


def compare(name: str, model: MultimodalModel, batches: list[dict], device: torch.device,
            reps: int) -> float:
    """Steps of Joint and MIDAS alternate batch by batch, so that both see the same machine
    load; the ratio is of the median step times. The ratio of median process CPU times is
    printed beside it: on a shared machine it leaves out the time spent waiting for a core."""
    info = DistInfo(0, 1, device, False)
    arms = {}
    for method in ("joint", "midas"):
        cfg = TrainConfig.from_preset("mfeat", method=method)
        m = copy.deepcopy(model).to(device)
        tracker = EpochTracker(cfg.warmup_epochs, len(m.modalities))  # first MIDAS epoch
        set_weak(tracker, [0.9, 0.4])  # weak = modality 1, as after warm-up
        arms[method] = (m, torch.optim.Adam(m.parameters(), lr=cfg.lr), cfg, RunState(), tracker)
    times: dict[str, list[float]] = {m: [] for m in arms}
    cpu: dict[str, list[float]] = {m: [] for m in arms}
    for rep in range(reps + 1):
        for b in batches:
            for method, (m, opt, cfg, run, tracker) in arms.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t, c = time.perf_counter(), time.process_time()
                train_step(m, b, opt, cfg, run, tracker, info)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if rep:  # the first pass warms caches and the allocator
                    times[method].append(time.perf_counter() - t)
                    cpu[method].append(time.process_time() - c)
    joint, midas = (statistics.median(times[m]) for m in ("joint", "midas"))
    ratio = midas / joint
    cpu_ratio = statistics.median(cpu["midas"]) / statistics.median(cpu["joint"])
    print(f"{name:36s} joint {joint * 1e3:8.3f} ms/step ({joint / BATCH * 1e6:7.1f} us/sample)  "
          f"midas {midas * 1e3:8.3f} ms/step ({midas / BATCH * 1e6:7.1f} us/sample)  "
          f"ratio {ratio:.3f} {'ok' if ratio <= TARGET else f'OVER {TARGET}'} (cpu time {cpu_ratio:.3f})")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    print(f"device {device}, threads {torch.get_num_threads()}, batch {BATCH} anchors "
          f"(MIDAS adds {2 * BATCH} misaligned rows)")

    views, labels = load_mfeat()
    inputs = {m: views[m] for m in ("fac", "mor")}
    stats = {m: (torch.from_numpy(x.mean(0)), torch.from_numpy(x.std(0) + 1e-6)) for m, x in inputs.items()}
    mlp = MultimodalModel(["fac", "mor"], {"fac": "tensor", "mor": "tensor"},
                          {"fac": (216,), "mor": (6,)}, 10, 64, stats=stats)
    r1 = compare("mfeat fac+mor, MLP encoders", mlp, make_batches(inputs, labels, 20), device, 25)

    rng = np.random.default_rng(1)
    n = 256
    spec = {"spec": rng.standard_normal((n, 1, 64, 64)).astype(np.float32),
            "vec": rng.standard_normal((n, 32)).astype(np.float32)}
    y = rng.integers(0, 10, n)
    conv = MultimodalModel(["spec", "vec"], {"spec": "tensor", "vec": "tensor"},
                           {"spec": (1, 64, 64), "vec": (32,)}, 10, 512,
                           encoders={"spec": "resnet18", "vec": "mlp"})
    r2 = compare("ResNet-18 spectrogram [1,64,64]+MLP", conv, make_batches(spec, y, 2), device, 3)
    raise SystemExit(0 if max(r1, r2) <= TARGET else 1)


if __name__ == "__main__":
    main()
