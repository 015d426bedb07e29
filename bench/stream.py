"""Stream throughput: MidasDataset against in-memory loading and the WebDataset peer.

All readers go through the same data, in the same process, best of `--rounds` interleaved
rounds (each round runs every reader once, so drift in a shared machine hits all alike),
page cache warm (the dataset is read once before timing):

- tensor indexing: torch tensors indexed by a permutation, 64 rows at a time (the floor).
- TensorDataset + DataLoader(shuffle=True, batch_size=64), 0 and `--workers` workers.
- webdataset: shard shuffle + a 1,000-sample shuffle buffer, decode, batches of 64
  (timed on the first `--peer-samples` samples only, to keep the run short).
- The peers, when installed (`make bench-setup`; loaded by bench/peers.py), each read once and
  checked (every sample once, values equal to the arrays) before timing, 0 and `--workers`
  workers: MosaicML Streaming (MDS, uniform shuffle of the whole epoch, as ours) and litdata
  (`optimize` + `StreamingDataset`, its own chunk-then-sample shuffle). Says so when not.
  `--peers-only` times just MidasDataset (aligned and random partners) against the peers.
- SplitReader.read_batch over a shuffled epoch: the dataset layer alone.
- MidasDataset, aligned only (policy none) and random partners, through MidasLoader with
  0 and `--workers` workers: as MidasLoader sends them (each worker sends groups of
  consecutive batches as one packed queue item, the group size picked from the decoded
  batch size), and "one batch per item" (`batches_per_transfer=1`, one packed batch per
  queue item, what MidasLoader did before groups), and "persistent" (grouped, workers kept
  across passes, as a training loop over many epochs would keep them; the workers' CPU of
  a persistent loader is not counted, they are not waited for). Those rows make a new
  dataset and loader every pass; "one loader" rows (0 and `--workers` workers) iterate one
  loader again every pass, as a training loop does, its workers forked afresh each pass;
  "one loader, reused" the same with `reuse_shared_memory=True` (the loader's segment pool).
- Workers with a payload that needs real decoding: 64x64 RGB PNG images (`--png-samples`),
  aligned only, 0 against `--workers` workers, grouped and one batch per item.

CPU time is reported per item for the main process and, with workers, for the workers
together (they are waited for at the end of every pass): on two idle cores the loader can
go no faster than 2 / (main + workers CPU per item), which is how a worker ratio measured
on a busy machine should be read.

Data: `--samples` samples of two float32 modalities of 1,024 and 256 values, batch 64, a
full shuffled epoch. The default is 20,000 samples so that a run stays within about three
minutes on two busy cores; `--samples 50000` is the size the goals were set on (about six
minutes there). Ratios printed at the end. Worker ratios depend on idle cores: on a shared
machine they say little (the run prints the load average).
Run: python bench/stream.py [--samples 20000] [--rounds 3] [--workers 2] [--peers-only]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from peers import check_epoch, load_litdata, load_streaming, why_not  # bench/peers.py
from torch.utils.data import DataLoader, TensorDataset

from midas_data import Sample, build_dataset, open_dataset
from midas_data.stream.dataset import MidasDataset, MidasLoader

BATCH = 64


def make_tensors(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 1024), dtype=np.float32),
            rng.standard_normal((n, 256), dtype=np.float32), (np.arange(n) % 10).astype(np.int64))


def build(root: Path, payloads: dict[str, object], labels: np.ndarray) -> float:
    n = len(labels)
    samples = [Sample(f"k{i:07d}", int(labels[i]), {m: v[i] for m, v in payloads.items()},
                      split="train") for i in range(n)]
    t = time.perf_counter()
    build_dataset(samples, root, shard_max_count=5000, progress=False)
    return time.perf_counter() - t


def png_files(dir_: Path, n: int, seed: int = 1) -> list[Path]:
    """64x64 RGB PNG files: smooth gradients plus noise, so PNG has real work to inflate."""
    from PIL import Image

    dir_.mkdir()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64]
    out = []
    for i in range(n):
        base = np.stack([(xx * (i % 5 + 1)) % 256, (yy * 3) % 256, ((xx + yy) * 2) % 256], -1)
        img = np.clip(base + rng.integers(-12, 12, base.shape), 0, 255).astype(np.uint8)
        out.append(dir_ / f"{i}.png")
        Image.fromarray(img).save(out[-1], format="PNG")
    return out


def count(batches) -> int:
    return sum(len(b["key"]) if isinstance(b, dict) else len(b[-1]) for b in batches)


def midas(root: Path, policy: str, workers: int, per_transfer: int | None = None) -> int:
    ds = MidasDataset(root, batch_size=BATCH, policy=policy)
    return count(MidasLoader(ds, num_workers=workers, batches_per_transfer=per_transfer))


def persistent(root: Path, policy: str, workers: int) -> Callable[[], int]:
    """One pass of a MidasLoader whose workers stay up across passes (started on a first,
    untimed pass), as a training loop over many epochs runs it."""
    loader = MidasLoader(MidasDataset(root, batch_size=BATCH, policy=policy), num_workers=workers,
                         persistent_workers=True)
    count(loader)
    return lambda: count(loader)


def one_loader(root: Path, policy: str, workers: int, reuse: bool = False) -> Callable[[], int]:
    """One pass of a MidasLoader made once (its first pass untimed) and iterated again, as a
    training loop iterates it every epoch: its workers are forked afresh every pass and the
    dataset is not reopened; `reuse`: its shared segments are kept (reuse_shared_memory)."""
    loader = MidasLoader(MidasDataset(root, batch_size=BATCH, policy=policy), num_workers=workers,
                         reuse_shared_memory=reuse)
    count(loader)
    return lambda: count(loader)


def transfer_group(root: Path, workers: int) -> int:
    """The group size MidasLoader picks for this data (batches per worker-queue item)."""
    return MidasLoader(MidasDataset(root, batch_size=BATCH), num_workers=workers).transfer_group()


def children_cpu() -> float:
    """CPU seconds of the finished child processes (DataLoader workers, once joined)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def reader_only(root: Path) -> int:
    sr = open_dataset(root).split("train")
    perm = np.random.default_rng(0).permutation(len(sr))
    return sum(len(sr.read_batch(perm[lo:lo + BATCH])["key"]) for lo in range(0, len(sr), BATCH))


def tensor_index(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> int:
    perm = torch.randperm(len(x))
    n = 0
    for lo in range(0, len(x), BATCH):
        idx = perm[lo:lo + BATCH]
        n += len((x[idx], y[idx], z[idx])[2])
    return n


def tensor_loader(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, workers: int) -> int:
    loader = DataLoader(TensorDataset(x, y, z), batch_size=BATCH, shuffle=True, num_workers=workers)
    return count(loader)


def wds_loader(root: Path, n_peer: int) -> int:
    import webdataset as wds

    urls = sorted(str(p) for p in (root / "shards").glob("train-*.tar"))
    keep = max(1, -(-n_peer // 5000))
    pipe = (wds.WebDataset(urls[:keep], shardshuffle=len(urls[:keep]), empty_check=False)
            .shuffle(1000).decode().to_tuple("a.npy", "b.npy", "cls").batched(BATCH))
    return count(pipe)


# The peers (MosaicML Streaming, litdata): installed by `make bench-setup`, loaded through
# bench/peers.py. Kept in this block, apart from the worker rows above.

class PeerRows:
    """The peer readers on the same arrays, each checked once (untimed) before timing."""

    def __init__(self, tmp: Path, a: np.ndarray, b: np.ndarray, y: np.ndarray, workers: int):
        self.readers: dict[str, tuple[Callable[[], int], int]] = {}
        self.notes: list[str] = []
        n = len(y)
        self.measured: list[tuple[str, str, str]] = []  # (peer, its rows' name, goal)
        peers = (("MosaicML Streaming", "MosaicML Streaming (uniform)", "  (goal >= 3)",
                  load_streaming, mosaic_setup, mosaic_batches),
                 ("litdata", "litdata (chunk shuffle)", "", load_litdata, litdata_setup,
                  litdata_batches))
        for name, row, goal, loader, setup, batches in peers:
            reason = why_not(loader)
            if reason is not None:
                self.notes.append(f"{name} not measured ({reason}; `make bench-setup` installs it)")
                continue
            out = setup(tmp, a, b, y)
            check_epoch(name, batches(out, 0), {"a": a, "b": b, "cls": y}, quiet=True)
            self.measured.append((name, row, goal))
            for k in (0, workers):
                self.readers[f"{row}, {k} workers"] = (
                    lambda k=k, out=out, batches=batches: count_peer(batches(out, k)), n)

    def print_ratios(self, rate: dict[str, float], workers: int) -> None:
        for note in self.notes:
            print(f"  {note}")
        for k in (0, workers):
            ours = rate[f"MidasDataset none, {k} workers"]
            for name, row, goal in self.measured:
                label = f"aligned {k} workers / {name} {k} workers"
                print(f"  {label:<50} {ours / rate[f'{row}, {k} workers']:6.3f}{goal}")


def count_peer(batches) -> int:
    return sum(len(b["cls"]) for b in batches)


def peer_sample(i: int, a: np.ndarray, b: np.ndarray, y: np.ndarray) -> dict:
    return {"id": i, "a": a[i], "b": b[i], "cls": int(y[i])}


def mosaic_setup(dir_: Path, a: np.ndarray, b: np.ndarray, y: np.ndarray) -> Path:
    out = dir_ / "mds"
    cols = {"id": "int", "a": "ndarray:float32:1024", "b": "ndarray:float32:256", "cls": "int"}
    with load_streaming().MDSWriter(out=str(out), columns=cols, size_limit=1 << 26) as w:
        for i in range(len(y)):
            w.write(peer_sample(i, a, b, y))
    return out


def mosaic_batches(local: Path, workers: int) -> DataLoader:
    """A uniform shuffle of every sample ("naive": one permutation of the whole epoch), as ours."""
    ds = load_streaming().StreamingDataset(local=str(local), shuffle=True, shuffle_algo="naive",
                                           batch_size=BATCH)
    return DataLoader(ds, batch_size=BATCH, num_workers=workers)


_LIT: tuple = ()  # the arrays litdata.optimize's forked worker reads


def _lit_sample(i: int) -> dict:
    return peer_sample(i, *_LIT)


def litdata_setup(dir_: Path, a: np.ndarray, b: np.ndarray, y: np.ndarray) -> Path:
    global _LIT
    _LIT = (a, b, y)
    out = dir_ / "litdata"
    load_litdata().optimize(fn=_lit_sample, inputs=list(range(len(y))), output_dir=str(out),
                            chunk_bytes="64MB", num_workers=1, verbose=False, start_method="fork")
    return out


def litdata_batches(out: Path, workers: int) -> DataLoader:
    """litdata's own shuffle: chunks in a random order, samples shuffled within each chunk."""
    ds = load_litdata().StreamingDataset(input_dir=str(out), shuffle=True)
    return DataLoader(ds, batch_size=BATCH, num_workers=workers)


def time_interleaved(readers: dict[str, tuple[Callable[[], int], int]],
                     rounds: int) -> dict[str, float]:
    """Best items/s of `rounds` interleaved rounds (every reader once per round)."""
    best = {name: float("inf") for name in readers}
    for _ in range(rounds):
        for name, (fn, n) in readers.items():
            t = time.perf_counter()
            got = fn()
            best[name] = min(best[name], time.perf_counter() - t)
            assert got == n, (name, got, n)
    return {name: readers[name][1] / best[name] for name in readers}


def peers_only(args: argparse.Namespace) -> None:
    """`--peers-only`: MidasDataset aligned and random against the peers, nothing else."""
    w = args.workers
    with tempfile.TemporaryDirectory(prefix="midas-stream-peers-") as tmp:
        tmp = Path(tmp)
        a, b, y = make_tensors(args.samples)
        root = tmp / "ds"
        build(root, {"a": a, "b": b}, y)
        peers = PeerRows(tmp, a, b, y, w)
        readers: dict[str, tuple[Callable[[], int], int]] = {}
        for policy in ("none", "random"):
            for k in (0, w):
                readers[f"MidasDataset {policy}, {k} workers"] = (
                    lambda p=policy, k=k: midas(root, p, k), args.samples)
        readers.update(peers.readers)
        for path in sorted(tmp.rglob("*")):  # warm the page cache
            if path.is_file():
                path.read_bytes()
        t0 = time.perf_counter()
        rate = time_interleaved(readers, args.rounds)
    print(f"{args.samples} samples of two float32 modalities (1,024 and 256 values), batch {BATCH}, "
          f"shuffled epochs, best of {args.rounds} interleaved rounds ({time.perf_counter() - t0:.0f} s); "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"  {'reader':<44} {'items/s':>10}")
    for name in readers:
        print(f"  {name:<44} {rate[name]:>10.0f}")
    print("ratios (same process):")
    peers.print_ratios(rate, w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--png-samples", type=int, default=3_000)
    ap.add_argument("--peer-samples", type=int, default=5_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--peers-only", action="store_true", help="MidasDataset against the peers only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.peers_only:
        return peers_only(args)
    w = args.workers
    with tempfile.TemporaryDirectory(prefix="midas-stream-bench-") as tmp:
        tmp = Path(tmp)
        a, b, y = make_tensors(args.samples)
        root, png_root = tmp / "ds", tmp / "png"
        t_build = build(root, {"a": a, "b": b}, y)
        build(png_root, {"img": png_files(tmp / "png_files", args.png_samples)},
              np.arange(args.png_samples) % 10)
        tx, ty, tz = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(y)
        peers = PeerRows(tmp, a, b, y, w)
        readers: dict[str, tuple[Callable[[], int], int]] = {
            "tensor indexing by a permutation": (lambda: tensor_index(tx, ty, tz), args.samples),
            "TensorDataset + DataLoader, 0 workers": (lambda: tensor_loader(tx, ty, tz, 0), args.samples),
            f"TensorDataset + DataLoader, {w} workers": (lambda: tensor_loader(tx, ty, tz, w), args.samples),
            "webdataset, shard shuffle + 1000 buffer": (lambda: wds_loader(root, args.peer_samples),
                                                        min(args.peer_samples, args.samples)),
            "SplitReader.read_batch (dataset layer)": (lambda: reader_only(root), args.samples),
        }
        readers.update(peers.readers)
        for policy in ("none", "random"):
            for k in (0, w):
                readers[f"MidasDataset {policy}, {k} workers"] = (
                    lambda p=policy, k=k: midas(root, p, k), args.samples)
            readers[f"MidasDataset {policy}, {w} workers, 1 batch/item"] = (
                lambda p=policy: midas(root, p, w, per_transfer=1), args.samples)
            readers[f"MidasDataset {policy}, {w} workers, persistent"] = (
                persistent(root, policy, w), args.samples)
            for k in (0, w):
                readers[f"MidasDataset {policy}, {k} workers, one loader"] = (
                    one_loader(root, policy, k), args.samples)
            readers[f"MidasDataset {policy}, {w} workers, one loader, reused"] = (
                one_loader(root, policy, w, reuse=True), args.samples)
        for k, per in ((0, None), (w, None), (w, 1)):
            readers[f"PNG 64x64, {k} workers{', 1 batch/item' if per else ''}"] = (
                lambda k=k, per=per: midas(png_root, "none", k, per), args.png_samples)
        readers[f"PNG 64x64, {w} workers, persistent"] = (persistent(png_root, "none", w), args.png_samples)
        for k in (0, w):
            readers[f"PNG 64x64, {k} workers, one loader"] = (one_loader(png_root, "none", k), args.png_samples)
        readers[f"PNG 64x64, {w} workers, one loader, reused"] = (
            one_loader(png_root, "none", w, reuse=True), args.png_samples)
        for path in sorted(tmp.rglob("*.tar")):  # warm the page cache
            path.read_bytes()
        assert midas(root, "random", 0) == args.samples  # and the imports
        best = {name: float("inf") for name in readers}
        cpu = {name: float("inf") for name in readers}  # this process's CPU time
        kids = {name: float("inf") for name in readers}  # its DataLoader workers' CPU time
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            for name, (fn, n) in readers.items():
                t, c, k = time.perf_counter(), time.process_time(), children_cpu()
                got = fn()
                best[name] = min(best[name], time.perf_counter() - t)
                cpu[name] = min(cpu[name], time.process_time() - c)
                kids[name] = min(kids[name], children_cpu() - k)
                assert got == n, (name, got, n)
        rate = {name: readers[name][1] / best[name] for name in readers}
        groups = transfer_group(root, w), transfer_group(png_root, w)
    print(f"{args.samples} samples of two float32 modalities (1,024 and 256 values), batch {BATCH}, "
          f"shuffled epochs, best of {args.rounds} interleaved rounds ({time.perf_counter() - t0:.0f} s); "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"build_dataset: {args.samples / t_build:.0f} samples/s")
    print(f"MidasLoader's groups with {w} workers: {groups[0]} batches per queue item "
          f"(float32 data), {groups[1]} (PNG)")
    print(f"  {'reader':<44} {'items/s':>10} {'CPU us/item: main':>18} {'workers':>8}")
    for name in readers:
        n = readers[name][1]
        print(f"  {name:<44} {rate[name]:>10.0f} {cpu[name] / n * 1e6:>18.1f} {kids[name] / n * 1e6:>8.1f}")
    td0 = rate["TensorDataset + DataLoader, 0 workers"]
    none0, rand0 = rate["MidasDataset none, 0 workers"], rate["MidasDataset random, 0 workers"]
    print("ratios (same process):")
    print(f"  aligned 0 workers / TensorDataset 0 workers     {none0 / td0:6.3f}  (goal >= 0.25)")
    print(f"  random partners / aligned, 0 workers           {rand0 / none0:6.3f}  (goal >= 0.9)")
    once = [rate[f"MidasDataset {p}, 0 workers, one loader"] for p in ("random", "none")]
    print(f"  the same, one loader                           {once[0] / once[1]:6.3f}")
    cores = min(w, os.cpu_count() or 1)

    def bound(name: str, base: str) -> float:
        """The ratio CPU time allows on `cores` idle cores: the CPU per item with workers
        (main process and workers) spread over the cores, against the CPU per item of the
        0-worker run (all in the main process). Latency (workers starting, an uneven tail)
        comes on top."""
        per = (cpu[name] + kids[name]) / readers[name][1]
        return cores * cpu[base] / readers[base][1] / per if per > 0 else float("nan")

    print(f"  {'':<32} {'grouped':>8} {'1 batch/item':>13} {'persistent':>11} {'one loader':>11} "
          f"{'reused':>7} {'CPU bound on ' + str(cores) + ' idle cores':>26}")
    for label, pre in (("none", "MidasDataset none, "), ("random", "MidasDataset random, "),
                       ("PNG", "PNG 64x64, ")):
        base, grouped, single = f"{pre}0 workers", f"{pre}{w} workers", f"{pre}{w} workers, 1 batch/item"
        kept = f"{pre}{w} workers, persistent"
        once, once0 = f"{pre}{w} workers, one loader", f"{pre}0 workers, one loader"
        goal = "(goal >= 1.6 on idle cores)" if label == "PNG" else "(goal >= 1.0)"
        print(f"  {label:<6} {w} workers / 0 workers      {rate[grouped] / rate[base]:8.3f} "
              f"{rate[single] / rate[base]:13.3f} {rate[kept] / rate[base]:11.3f} "
              f"{rate[once] / rate[once0]:11.3f} {rate[once + ', reused'] / rate[once0]:7.3f} "
              f"{bound(grouped, base):26.2f}  {goal}")
    print("  (grouped, 1 batch/item: a new dataset and loader every pass, against the same with 0 "
          "workers; persistent: one loader, workers kept; one loader: one loader, workers forked "
          "every pass, against one loader with 0 workers; reused: the same with "
          "reuse_shared_memory=True)")
    print(f"  aligned 0 workers / webdataset                 {none0 / rate['webdataset, shard shuffle + 1000 buffer']:6.3f}")
    peers.print_ratios(rate, w)


if __name__ == "__main__":
    main()
