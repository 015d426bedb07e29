"""Build throughput and random-access latency of the shard writer and reader.

Build: `midas_data.build_dataset` on a synthetic dataset (default 10k samples, two float32
modalities of 256 and 1024 values, i.e. ~1 KB and ~4 KB payloads), against plain
`webdataset.ShardWriter` writing the same .npy bytes (encoded in the loop, same shard
size) and, when the peers are installed (`make bench-setup`, loaded by bench/peers.py),
MosaicML's `MDSWriter` and `litdata.optimize` (1 worker process, and one per core) on the
same arrays, in the same run. Each is timed from in-memory arrays to files on disk, best of `--repeat`
interleaved rounds. Ours also fsyncs every shard and renames the finished directory into
place; the peers do neither. Goals: >= 2x ShardWriter and >= 0.5x MDSWriter; the script
fails below 0.8x ShardWriter.

Random access: p50/p99 of `SplitReader.get(key)` over 2000 random keys of the train split,
cold-ish (a freshly opened dataset with the shards dropped from the page cache via
posix_fadvise, where the OS allows) and warm (the same keys again).

Run: .venv/bin/python bench/build_shards.py [--n 10000] [--repeat 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from peers import load_litdata, load_streaming, why_not  # bench/peers.py

from midas_data import Sample, build_dataset, open_dataset

DIMS = {"small": 256, "large": 1024}  # float32: 1 KiB and 4 KiB
SHARD_COUNT = 5000
SHARD_MB = 1024.0


def make_samples(n: int, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    views = {m: rng.standard_normal((n, d), dtype=np.float32) for m, d in DIMS.items()}
    labels = rng.integers(0, 10, n)
    return [Sample(f"s{i:07d}", int(labels[i]), {m: views[m][i] for m in DIMS}) for i in range(n)]


def npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def build_ours(samples: list[Sample], out: Path) -> float:
    t = time.perf_counter()
    build_dataset(samples, out, classes=[str(c) for c in range(10)], modalities=list(DIMS),
                  shard_max_count=SHARD_COUNT, shard_max_mb=SHARD_MB, progress=False)
    return time.perf_counter() - t


def build_plain(samples: list[Sample], out: Path) -> float:
    import webdataset as wds

    t = time.perf_counter()
    out.mkdir()
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=SHARD_COUNT,
                         maxsize=SHARD_MB * 1024 * 1024, verbose=0, encoder=False) as sink:
        for s in samples:
            rec = {"__key__": s.key, "cls": str(s.label).encode()}
            for m in DIMS:
                rec[f"{m}.npy"] = npy_bytes(s.payloads[m])
            sink.write(rec)
    return time.perf_counter() - t


def build_mds(samples: list[Sample], out: Path) -> float:
    MDSWriter = load_streaming().MDSWriter  # bench/peers.py: without torchvision/transformers
    t = time.perf_counter()
    columns = {m: f"ndarray:float32:{d}" for m, d in DIMS.items()} | {"cls": "int"}
    with MDSWriter(out=str(out), columns=columns, size_limit=int(SHARD_MB * 1024 * 1024)) as w:
        for s in samples:
            w.write({**{m: s.payloads[m] for m in DIMS}, "cls": int(s.label)})
    return time.perf_counter() - t


_LIT_SAMPLES: list[Sample] = []  # what litdata.optimize's forked worker reads


def _lit_sample(i: int) -> dict:
    s = _LIT_SAMPLES[i]
    return {**{m: s.payloads[m] for m in DIMS}, "cls": int(s.label)}


def build_litdata(samples: list[Sample], out: Path, workers: int = 1) -> float:
    """litdata.optimize with `workers` worker processes (forked; their start is timed too)."""
    optimize = load_litdata().optimize
    global _LIT_SAMPLES
    _LIT_SAMPLES = samples
    t = time.perf_counter()
    optimize(fn=_lit_sample, inputs=list(range(len(samples))), output_dir=str(out),
             chunk_bytes=f"{int(SHARD_MB)}MB", num_workers=workers, verbose=False,
             start_method="fork")
    return time.perf_counter() - t


def drop_page_cache(paths: list[Path]) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def latencies(sr, keys: list[str]) -> np.ndarray:
    out = np.empty(len(keys))
    for i, k in enumerate(keys):
        t = time.perf_counter()
        sr.get(k)
        out[i] = time.perf_counter() - t
    return out * 1e6  # microseconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keys", type=int, default=2000)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="midas-bench-", dir=args.dir))
    try:
        samples = make_samples(args.n)
        payload_mb = args.n * sum(len(npy_bytes(np.zeros(d, np.float32))) for d in DIMS.values()) / 1e6
        no_mds, no_lit = why_not(load_streaming), why_not(load_litdata)
        writers = {"webdataset.ShardWriter": build_plain, "midas_data.build_dataset": build_ours}
        if no_mds is None:
            writers["MosaicML MDSWriter"] = build_mds
        if no_lit is None:
            writers["litdata.optimize, 1 worker"] = build_litdata
            writers[f"litdata.optimize, {os.cpu_count()} workers"] = (
                lambda s, o: build_litdata(s, o, workers=os.cpu_count()))
        times: dict[str, list[float]] = {k: [] for k in writers}
        for r in range(args.repeat):  # interleaved, so drift in the machine hits all alike
            for k, fn in writers.items():
                out = root / f"{k.split('.')[0]}{r}"
                times[k].append(fn(samples, out))
                if r < args.repeat - 1 or k != "midas_data.build_dataset":
                    shutil.rmtree(out)
        print(f"build: {args.n} samples, {payload_mb:.1f} MB of .npy payloads, shards of "
              f"<= {SHARD_COUNT} samples, best of {args.repeat}, in {root}")
        for name, why in (("MosaicML MDSWriter", no_mds), ("litdata.optimize", no_lit)):
            if why:
                print(f"  {name} not measured ({why}; `make bench-setup` installs it)")
        print(f"  {'writer':<30} {'s':>7} {'samples/s':>11} {'MB/s':>8}")
        best = {k: min(v) for k, v in times.items()}
        for k, t in best.items():
            print(f"  {k:<30} {t:>7.3f} {args.n / t:>11.0f} {payload_mb / t:>8.1f}")
        ratio = best["webdataset.ShardWriter"] / best["midas_data.build_dataset"]
        print(f"  throughput ratio ours/ShardWriter = {ratio:.2f} (goal >= 2)")
        if no_mds is None:
            print(f"  throughput ratio ours/MDSWriter = "
                  f"{best['MosaicML MDSWriter'] / best['midas_data.build_dataset']:.2f} (goal >= 0.5)")
        if no_lit is None:
            print(f"  throughput ratio ours/litdata.optimize = "
                  f"{best['litdata.optimize, 1 worker'] / best['midas_data.build_dataset']:.2f} "
                  f"(1 worker process), {best[f'litdata.optimize, {os.cpu_count()} workers'] / best['midas_data.build_dataset']:.2f} "
                  f"({os.cpu_count()} worker processes)")

        ds_dir = root / f"midas_data{args.repeat - 1}"
        probe = open_dataset(ds_dir).split("train")
        keys = [probe.keys[i] for i in np.random.default_rng(1).choice(len(probe), args.keys, replace=False)]
        dropped = drop_page_cache(probe.shard_paths)
        sr = open_dataset(ds_dir).split("train")  # fresh reader: no descriptors, no key map yet
        cold = latencies(sr, keys)
        warm = latencies(sr, keys)
        print(f"random access: SplitReader.get(key), {args.keys} random keys of {len(sr)} (train)")
        print(f"  {'':<32} {'p50 us':>8} {'p99 us':>8} {'max us':>9}")
        label = "cold-ish (page cache dropped)" if dropped else "cold-ish (fresh reader)"
        for name, lat in ((label, cold), ("warm", warm)):
            p50, p99 = np.percentile(lat, [50, 99])
            print(f"  {name:<32} {p50:>8.1f} {p99:>8.1f} {lat.max():>9.1f}")
        if ratio < 0.8:
            raise SystemExit(f"build throughput ratio {ratio:.2f} is below 0.8")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
