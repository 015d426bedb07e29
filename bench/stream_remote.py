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
MosaicML Streaming (installed by `make bench-setup`, loaded by bench/peers.py; says so when
not), on the same samples written by its MDSWriter into shards of about the same size, from
the same moto server (S3_ENDPOINT_URL, as it expects), in the same run:
`StreamingDataset(remote="s3://...", local=<fresh dir>)` cold, the same `local` again warm,
and `StreamingDataset(local=<the MDS directory>)` from disk; a uniform shuffle of the whole
epoch (shuffle_algo="naive", as ours), batches collated by a 0-worker DataLoader. Against it,
ours without partners (policy none, "aligned") as well as with random partners. It neither
verifies a hash on arrival (we check sha256) nor mines partners.

Run: .venv/bin/python bench/stream_remote.py [--n 10000] [--shard-samples 500]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from peers import check_epoch, load_streaming, why_not  # bench/peers.py

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


def epoch(ds, batch: int, epoch_no: int = 0, max_batches: int | None = None,
          policy: str = "random") -> tuple[float, int]:
    stream = MidasDataset(ds, batch_size=batch, seed=0, policy=policy)
    stream.set_epoch(epoch_no)
    t, items = time.perf_counter(), 0
    for k, b in enumerate(stream):
        items += len(b["key"])
        if max_batches is not None and k + 1 >= max_batches:
            break
    return items / (time.perf_counter() - t), items


# MosaicML Streaming: the peer rows, kept apart from ours -----------------------------------

def mosaic_write(local: Path, out: Path) -> dict[str, np.ndarray]:
    """The dataset's train samples in MDS shards of about the same size as ours, with an "id"
    column (the row); returns the columns written, for the check of what comes back."""
    ms = load_streaming()
    sr = open_dataset(local).split("train")
    batch = sr.read_batch(np.arange(len(sr)))
    columns = {**{m: batch["inputs"][m] for m in DIMS}, "cls": np.asarray(batch["label"])}
    shard_bytes = max(s["bytes"] for s in open_dataset(local).manifest["shards"])
    types = {"id": "int", **{m: f"ndarray:float32:{d}" for m, d in DIMS.items()}, "cls": "int"}
    with ms.MDSWriter(out=str(out), columns=types, size_limit=shard_bytes) as w:
        for i in range(len(sr)):
            w.write({"id": i, **{m: columns[m][i] for m in DIMS}, "cls": int(columns["cls"][i])})
    return columns


def mosaic_check(batch: int, local: Path, remote: str, columns: dict[str, np.ndarray]) -> None:
    """One cold epoch from the server, untimed: every sample once, with the values written."""
    from torch.utils.data import DataLoader

    ds = load_streaming().StreamingDataset(remote=remote, local=str(local), shuffle=True,
                                           shuffle_algo="naive", batch_size=batch)
    check_epoch("MosaicML s3", DataLoader(ds, batch_size=batch, num_workers=0), columns, quiet=True)
    del ds


def mosaic_epoch(batch: int, local: Path, remote: str | None = None) -> tuple[float, int]:
    from torch.utils.data import DataLoader

    ms = load_streaming()
    # constructed outside the timing, as our rows open the dataset outside theirs
    ds = ms.StreamingDataset(remote=remote, local=str(local), shuffle=True, shuffle_algo="naive",
                             batch_size=batch)
    t = time.perf_counter()
    items = sum(len(b["cls"]) for b in DataLoader(ds, batch_size=batch, num_workers=0))
    rate = items / (time.perf_counter() - t)
    del ds  # frees its shared memory, so that `local` may be opened again (warm)
    return rate, items


def fetched(ds) -> int:
    sr = ds.split("train")
    return ds.cache.fetched_bytes + sr.range_bytes


def mosaic_ratios(rates: dict[str, list[float]], no_mosaic: str | None) -> None:
    if no_mosaic:
        print(f"MosaicML Streaming not measured ({no_mosaic}; `make bench-setup` installs it)")
        return
    best = {k: max(v) for k, v in rates.items()}
    print("against MosaicML Streaming, same samples, same server, same run:")
    for ours, theirs in (("s3 warm, aligned", "MosaicML s3 warm"),
                         ("s3 warm", "MosaicML s3 warm"),
                         ("s3 cold, aligned", "MosaicML s3 cold"),
                         ("s3 cold (prefetch 4)", "MosaicML s3 cold"),
                         ("local disk, aligned", "MosaicML local disk")):
        goal = "  (goal >= 1.0)" if ours == "s3 warm, aligned" else ""
        print(f"  ours {ours:<22} / {theirs:<20} {best[ours] / best[theirs]:6.2f}{goal}")


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
        no_mosaic = why_not(load_streaming)
        with moto_s3() as (endpoint, opts):
            upload(local, "s3://bench/ds", opts)
            url = "s3://bench/ds"
            rates: dict[str, list[float]] = {}
            fetched_mb: dict[str, float] = {}

            def run(name: str, ds, **kw) -> None:
                rates.setdefault(name, []).append(epoch(ds, args.batch, **kw)[0])
                if hasattr(ds, "cache"):
                    fetched_mb[name] = fetched(ds) / 1e6

            def run_mosaic(name: str, local_dir: Path, remote: str | None = None) -> None:
                rate, items = mosaic_epoch(args.batch, local_dir, remote)
                assert items == n_train, (name, items, n_train)
                rates.setdefault(name, []).append(rate)

            n_train = len(open_dataset(local).split("train"))
            if no_mosaic is None:
                mds = work / "mds"
                columns = mosaic_write(local, mds)
                upload(mds, "s3://bench/mds", opts)
                os.environ["S3_ENDPOINT_URL"] = endpoint  # where MosaicML Streaming's boto3 looks
                mosaic_check(args.batch, work / "m-check", "s3://bench/mds", columns)
            for r in range(args.repeat):
                run("local disk", open_dataset(local))
                run("s3 cold (prefetch 4)", open_dataset(url, storage_options=opts,
                                                         cache_dir=work / f"a{r}"))
                run("s3 cold (no prefetch)", open_dataset(url, storage_options=opts,
                                                          cache_dir=work / f"b{r}", prefetch=0))
                run("s3 warm", open_dataset(url, storage_options=opts, cache_dir=work / "a0"))
                if no_mosaic is None:
                    run("local disk, aligned", open_dataset(local), policy="none")
                    run("s3 cold, aligned", open_dataset(url, storage_options=opts,
                                                         cache_dir=work / f"c{r}"), policy="none")
                    run("s3 warm, aligned", open_dataset(url, storage_options=opts,
                                                         cache_dir=work / "a0"), policy="none")
                    run_mosaic("MosaicML local disk", mds)
                    run_mosaic("MosaicML s3 cold", work / f"m{r}", "s3://bench/mds")
                    run_mosaic("MosaicML s3 warm", work / "m0", "s3://bench/mds")
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
            mosaic_ratios(rates, no_mosaic)

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
