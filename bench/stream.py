"""Stream throughput: MidasDataset items/s against plain `webdataset` on the same shards.

Both sides decode every payload to arrays and form batches of 64; the ratio is
(our items/s) / (webdataset items/s), measured in the same process, best of `--repeat`.
Run: python bench/stream.py [--samples 20000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

from midas_data import Sample, build_dataset
from midas_data.stream.dataset import MidasDataset


def make_dataset(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n, 256)).astype(np.float32)
    b = rng.normal(size=(n, 64)).astype(np.float32)
    samples = [Sample(f"k{i:07d}", int(i % 10), {"a": a[i], "b": b[i]}, split="train") for i in range(n)]
    build_dataset(samples, root, shard_max_count=2000, progress=False)


def run_wds(root: Path) -> int:
    urls = sorted(str(p) for p in (root / "shards").glob("train-*.tar"))
    pipe = (wds.WebDataset(urls, shardshuffle=False).decode()
            .to_tuple("a.npy", "b.npy", "cls").batched(64))
    return sum(len(batch[2]) for batch in pipe)


def run_stream(root: Path, policy: str) -> int:
    return sum(len(b["key"]) for b in MidasDataset(root, batch_size=64, policy=policy))


def timed(fn, *args, repeat: int) -> tuple[float, int]:
    best, n = float("inf"), 0
    for _ in range(repeat):
        t = time.perf_counter()
        n = fn(*args)
        best = min(best, time.perf_counter() - t)
    return best, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        make_dataset(root, args.samples)
        t_wds, n_wds = timed(run_wds, root, repeat=args.repeat)
        t_none, n_none = timed(run_stream, root, "none", repeat=args.repeat)
        t_rand, n_rand = timed(run_stream, root, "random", repeat=args.repeat)
        assert n_wds == n_none == n_rand == args.samples
    rate = {k: args.samples / t for k, t in (("wds", t_wds), ("none", t_none), ("random", t_rand))}
    print(f"{args.samples} samples, two float32 modalities (1 KiB + 256 B), batches of 64")
    print(f"webdataset (sequential, decode):     {rate['wds']:10.0f} items/s")
    print(f"MidasDataset aligned only (shuffled): {rate['none']:10.0f} items/s  ratio {rate['none'] / rate['wds']:.2f}")
    print(f"MidasDataset + misaligned partners:   {rate['random']:10.0f} items/s  ratio {rate['random'] / rate['wds']:.2f}")


if __name__ == "__main__":
    main()
