"""Streaming from object storage: items/s of a shuffled epoch from a local S3 server (moto on
127.0.0.1, through s3fs) against the same dataset on local disk, measured in the same run;
and bytes fetched per epoch when the cache holds 25% of the dataset.

Rows (one epoch each, MidasDataset, policy random, batch 256, in-process reading):
- local: the dataset directory on local disk (the baseline of every ratio).
- s3 cold: a fresh cache (whole shards fetched, sha256-checked, prefetched from the plan).
- s3 cold, no prefetch: the same without the background prefetch.
- s3 warm: the same cache again (no fetch; ratio vs local should be >= 0.9).
- s3 range: fetch="range", every sample read by a ranged GET (no cache).
- http cold over a throttled link (a local HTTP server sending each body at --link-mb MB/s,
  sleeping meanwhile, as a network would), with and without prefetch: moto runs on the
  same CPUs as the reader, so only a link-bound server shows what prefetch overlaps.
Cache at 25% of the dataset (two epochs, the second reported; minimum = the bytes of the
samples not resident, 75% of the dataset: each sample is read once per epoch, so whatever
is not in the cache when the epoch starts must be fetched):
- fetch="auto": the dataset's shards stay resident while they fit, the rest by range.
- fetch="shard": whole-shard LRU; measured over the first batches and extrapolated (it
  fetches nearly every shard for every batch of a random order).
MosaicML Streaming is not compared: installing it replaces torch 2.13.0 and downgrades
numpy in this environment.

Run: .venv/bin/python bench/stream_remote.py [--n 10000] [--shard-samples 500]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from midas_data import Sample, build_dataset, open_dataset
from midas_data.stream.dataset import MidasDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.remote_servers import FaultyHTTPServer, moto_s3, upload  # noqa: E402

DIMS = {"small": 256, "large": 1024}  # float32 payloads of 1 KiB and 4 KiB


def make(root: Path, n: int, shard: int) -> Path:
    rng = np.random.default_rng(0)
    views = {m: rng.standard_normal((n, d), dtype=np.float32) for m, d in DIMS.items()}
    labels = rng.integers(0, 10, n)
    samples = [Sample(f"s{i:07d}", int(labels[i]), {m: views[m][i] for m in DIMS}, split="train")
               for i in range(n)]
    build_dataset(samples, root, shard_max_count=shard, progress=False)
    return root


def epoch(ds, batch: int, epoch_no: int = 0, max_batches: int | None = None) -> tuple[float, int]:
    stream = MidasDataset(ds, batch_size=batch, seed=0)
    stream.set_epoch(epoch_no)
    t, items = time.perf_counter(), 0
    for k, b in enumerate(stream):
        items += len(b["key"])
        if max_batches is not None and k + 1 >= max_batches:
            break
    return items / (time.perf_counter() - t), items


def fetched(ds) -> int:
    sr = ds.split("train")
    return ds.cache.fetched_bytes + sr.range_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--shard-samples", type=int, default=500)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2, help="best of, local and remote alternating")
    ap.add_argument("--link-mb", type=float, default=40.0,
                    help="MB/s per connection of the throttled HTTP server (prefetch rows)")
    ap.add_argument("--cache-n", type=int, default=2000,
                    help="samples of the (smaller) dataset of the 25%% cache measurement")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="midas-bench-remote-"))
    try:
        local = make(work / "ds", args.n, args.shard_samples)
        total = sum(s["bytes"] for s in open_dataset(local).manifest["shards"])
        shards = len(open_dataset(local).manifest["shards"])
        print(f"dataset: {args.n} samples, {shards} shards, {total / 1e6:.1f} MB; batch "
              f"{args.batch}; best of {args.repeat}, local and remote alternating")
        with moto_s3() as (_, opts):
            upload(local, "s3://bench/ds", opts)
            url = "s3://bench/ds"
            rates: dict[str, list[float]] = {}
            fetched_mb: dict[str, float] = {}

            def run(name: str, ds, **kw) -> None:
                rates.setdefault(name, []).append(epoch(ds, args.batch, **kw)[0])
                if hasattr(ds, "cache"):
                    fetched_mb[name] = fetched(ds) / 1e6

            for r in range(args.repeat):
                run("local disk", open_dataset(local))
                run("s3 cold (prefetch 4)", open_dataset(url, storage_options=opts,
                                                         cache_dir=work / f"a{r}"))
                run("s3 cold (no prefetch)", open_dataset(url, storage_options=opts,
                                                          cache_dir=work / f"b{r}", prefetch=0))
                run("s3 warm", open_dataset(url, storage_options=opts, cache_dir=work / "a0"))
            srv = FaultyHTTPServer(work, bytes_per_s=args.link_mb * 1e6).start()
            try:
                for r in range(args.repeat):
                    run(f"http {args.link_mb:.0f} MB/s link, cold", open_dataset(
                        srv.url + "/ds", cache_dir=work / f"h{r}"))
                    run(f"http {args.link_mb:.0f} MB/s, no prefetch", open_dataset(
                        srv.url + "/ds", cache_dir=work / f"i{r}", prefetch=0))
            finally:
                srv.stop()
            run("s3 range reads (3 batches)", open_dataset(
                url, storage_options=opts, cache_dir=work / "r", fetch="range"), max_batches=3)
            base = max(rates["local disk"])
            for name, rs in rates.items():
                extra = f"   fetched {fetched_mb[name]:.1f} MB" if name in fetched_mb else ""
                print(f"{name:<28} {max(rs):>8.0f} items/s   {max(rs) / base:.2f} x local{extra}")

            small = make(work / "small", args.cache_n, max(args.cache_n // 20, 1))
            upload(small, "s3://bench/small", opts)
            total = sum(s["bytes"] for s in open_dataset(small).manifest["shards"])
            limit = total // 4
            print(f"\ncache_limit = 25% of a {args.cache_n}-sample dataset of "
                  f"{len(open_dataset(small).manifest['shards'])} shards ({total / 1e6:.1f} MB); "
                  f"minimum per epoch = the 75% not resident = {0.75 * total / 1e6:.1f} MB")
            ds = open_dataset("s3://bench/small", storage_options=opts, cache_dir=work / "c4",
                              cache_limit=limit, fetch="auto")
            epoch(ds, args.batch, 0)
            first = fetched(ds)
            rate, _ = epoch(ds, args.batch, 1)
            second = fetched(ds) - first
            print(f"{'fetch=auto':<20} epoch 1 {first / 1e6:.1f} MB, epoch 2 {second / 1e6:.1f} MB"
                  f" = {second / (0.75 * total):.2f} x minimum ({rate:.0f} items/s)")
            ds = open_dataset("s3://bench/small", storage_options=opts, cache_dir=work / "c5",
                              cache_limit=limit, fetch="shard")
            k = 2
            epoch(ds, args.batch, 0, max_batches=k)
            per_batch = fetched(ds) / k
            n_batches = -(-args.cache_n // args.batch)
            print(f"{'fetch=shard (LRU)':<20} {per_batch / 1e6:.1f} MB per batch over {k} "
                  f"batches -> ~{per_batch * n_batches / 1e6:.0f} MB per epoch = "
                  f"{per_batch * n_batches / (0.75 * total):.1f} x minimum")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
