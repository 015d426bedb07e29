"""Different-label mining (FAISS and torch backends) vs an unconstrained IndexFlatIP
self-search, same data, same run.

Run: .venv/bin/python bench/mine.py [--n 100000] [--d 256] [--classes 10] [--k 16]
                                    [--backends faiss,torch] [--precision fp32]
     .venv/bin/python bench/mine.py --big        # 1M x 256: time and peak RSS only
     .venv/bin/python bench/mine.py --big-approx [--n 1000000] [--exact] [--data clustered]

Random float32 data (seeded), labels uniform over the classes, k=16, all FAISS threads.
Both sides count their setup once (baseline: normalised copy + IndexFlatIP.add; mining:
DifferentLabelIndex, which normalises and sorts by class) and then search all n rows as
queries in `--chunks` slices, alternating baseline / mining slice by slice (ABBA order),
so that load from other processes on a shared machine hits both sides alike (with both
backends, three sides rotate). torch uses its own threads (torch.get_num_threads()). `--full`
N adds N end-to-end runs each (`search_different_label` vs normalise + add + search).
CPU seconds (all threads) are printed too.

`--big-approx` runs what `mine-misaligned --approx auto` runs for one modality
(`midas_data.mining.plan.mine_modality`: timed exact probe and estimate, IVF with nprobe
calibrated to recall@16 >= 0.95, held-out recall) and prints wall and CPU time, the
estimate of the exact search, recall and peak RSS; `--exact` also runs the full exact search
on the same data in the same process, for the ratio. Its data (`--data clustered`, the
default) imitate classifier features: per class a mean, 16 sub-cluster centres and a
within-cluster spread with a power-law spectrum (variance ~ 1/i along random directions)
-- the structure IVF relies on. `--data random` (isotropic Gaussian, no structure) is the
worst case: there no index beats exhaustive search at high recall, and the calibration
ends up probing (nearly) every list.

OMP_WAIT_POLICY defaults to PASSIVE here: on a machine shared with other processes,
OpenMP threads that spin-wait at barriers made small products up to 50x slower.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch / FAISS start OpenMP

import faiss
import numpy as np
import torch

from midas_data.mining.knn import DifferentLabelIndex, search_different_label
from midas_data.mining.plan import mine_modality


def data(n: int, d: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, d), dtype=np.float32), rng.integers(0, classes, n)


def clustered_data(n: int, d: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class means + 16 sub-cluster centres per class + power-law within-cluster spread."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, n)
    means = rng.standard_normal((classes, d)).astype(np.float32)
    subs = rng.standard_normal((classes, 16, d)).astype(np.float32) * 0.6
    scale = (np.arange(1, d + 1) ** -0.5).astype(np.float32)
    rot = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
    x = np.empty((n, d), np.float32)
    for i in range(0, n, 1 << 16):  # in slices: bounded temporaries
        j = slice(i, min(n, i + (1 << 16)))
        z = rng.standard_normal((j.stop - i, d), dtype=np.float32) * scale
        x[j] = means[y[j]] + subs[y[j], rng.integers(0, 16, j.stop - i)] + z @ rot
    return x, y


def big_approx(a) -> None:
    x, y = (clustered_data if a.data == "clustered" else data)(a.n, a.d, a.classes)
    print(f"big-approx: n={a.n} d={a.d} C={a.classes} k={a.k} data={a.data}, "
          f"{x.nbytes / 2**30:.2f} GiB; load average {os.getloadavg()}", flush=True)
    clock = Clock()
    _, I, info = clock(lambda: mine_modality(
        x, y, a.k, "cpu", np.arange(a.n), approx="auto", approx_above=0, nlist=a.nlist, nprobe=None,
        recall_target=0.95, recall_queries=1000, rng=np.random.default_rng(0), progress=True))
    if info["approx"] is None:  # the calibration needed every list: auto searched exactly
        print(f"exact (IVF calibration needed all {info['ivf_not_used']['nprobe_exhaustive']} "
              f"other-class lists): {clock.wall:.1f} s wall, {clock.cpu:.1f} CPU s; exact "
              f"estimated {info['estimate_exact_s']:.1f} s; peak RSS {peak_rss_gib():.2f} GiB; "
              f"load average {os.getloadavg()}", flush=True)
    else:
        print(f"approx: {clock.wall:.1f} s wall, {clock.cpu:.1f} CPU s (IVF search "
              f"{info['search_s']:.1f} s); exact estimated {info['estimate_exact_s']:.1f} s; "
              f"recall@{a.k} {info['recall_at_k']:.4f} on {info['recall_anchors']} held-out "
              f"anchors; nlist {max(info['nlist'])} per class, nprobe {info['nprobe']} of "
              f"{info['nprobe_exhaustive']} other-class lists; peak RSS {peak_rss_gib():.2f} GiB; "
              f"load average {os.getloadavg()}", flush=True)
    if a.exact:
        exact = Clock()
        _, I_exact = exact(search_different_label, x, y, a.k)
        from midas_data.mining.knn import recall_at_k
        print(f"exact: {exact.wall:.1f} s wall, {exact.cpu:.1f} CPU s; ratio approx / exact "
              f"{clock.wall / exact.wall:.3f} wall, {clock.cpu / exact.cpu:.3f} CPU; recall@{a.k} "
              f"over all anchors {recall_at_k(I, I_exact):.4f}; estimate / exact "
              f"{info['estimate_exact_s'] / exact.wall:.2f}; peak RSS {peak_rss_gib():.2f} GiB; "
              f"load average {os.getloadavg()}")


def build_baseline(x: np.ndarray):
    xn = x.copy()  # cosine needs normalised rows: both sides pay for it
    faiss.normalize_L2(xn)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(xn)
    return xn, index


class Clock:
    def __init__(self):
        self.wall = self.cpu = 0.0

    def __call__(self, fn, *args):
        t, c = time.perf_counter(), time.process_time()
        out = fn(*args)
        self.wall += time.perf_counter() - t
        self.cpu += time.process_time() - c
        return out


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def chunked(x, y, k: int, chunks: int, backends: list[str], precision: str) -> None:
    """Build each side once, then search all rows in `chunks` slices, rotating the order of
    the sides from slice to slice so that load from other processes hits all alike."""
    clocks = {"baseline": Clock(), **{b: Clock() for b in backends}}
    xn, index = clocks["baseline"](build_baseline, x)
    searchers = {"baseline": lambda q: index.search(xn[q], k)}
    for b in backends:
        kind = "cpu" if b == "faiss" else "torch"
        dli = clocks[b](lambda kind=kind: DifferentLabelIndex(x, y, index=kind, torch_device="cpu",
                                                              precision=precision))
        searchers[b] = lambda q, dli=dli: dli.search(k, q)
    print("setup: " + ", ".join(f"{s} {c.wall:.2f} s" for s, c in clocks.items()), flush=True)
    sides = list(clocks)
    for j, q in enumerate(np.array_split(np.arange(len(x)), chunks)):
        for side in sides[j % len(sides):] + sides[:j % len(sides)]:
            clocks[side](searchers[side], q)
        print(f"  chunk {j + 1}/{chunks}: " + ", ".join(f"{s} {c.wall:.1f} s" for s, c in
                                                       clocks.items()) + " so far", flush=True)
    base = clocks["baseline"]
    print(f"IndexFlatIP self-search (k={k}): {base.wall:.2f} s wall, {base.cpu:.1f} CPU s")
    for b in backends:
        c = clocks[b]
        name = "FAISS" if b == "faiss" else f"torch ({precision})"
        print(f"different-label mining, {name} (k={k}): {c.wall:.2f} s wall, {c.cpu:.1f} CPU s; "
              f"ratio / baseline {c.wall / base.wall:.3f} wall, {c.cpu / base.cpu:.3f} CPU")
    if len(backends) == 2:
        t, f = clocks["torch"], clocks["faiss"]
        print(f"ratio torch / FAISS mining: {t.wall / f.wall:.3f} wall, {t.cpu / f.cpu:.3f} CPU")


def full(x, y, k: int, reps: int) -> None:
    def baseline():
        xn, index = build_baseline(x)
        return index.search(xn, k)

    base, mine = Clock(), Clock()
    for rep in range(reps):
        for side in ((base, mine) if rep % 2 == 0 else (mine, base)):  # ABBA
            w = side.wall
            if side is base:
                base(baseline)
            else:
                mine(search_different_label, x, y, k)
            print(f"  end to end {'baseline' if side is base else 'mining  '}: "
                  f"{side.wall - w:.2f} s", flush=True)
    print(f"end to end, {reps} each: baseline {base.wall:.2f} s, mining {mine.wall:.2f} s, "
          f"ratio {mine.wall / base.wall:.3f} wall, {mine.cpu / base.cpu:.3f} CPU")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None, help="rows (default 100000; 1M with --big-approx)")
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--backends", default="faiss,torch",
                    help="mining backends timed against the baseline: faiss, torch or both")
    ap.add_argument("--precision", default="fp32", help="torch backend's candidate pass (fp32 "
                    "on the CPU; tf32/bf16 re-rank in fp32)")
    ap.add_argument("--full", type=int, default=0, metavar="REPS",
                    help="also time REPS end-to-end calls each (ABBA order)")
    ap.add_argument("--big", action="store_true", help="mine 1M x d once; print time and peak RSS")
    ap.add_argument("--big-approx", action="store_true",
                    help="--n rows (default 1M here) through the --approx auto path, IVF")
    ap.add_argument("--exact", action="store_true", help="--big-approx: also the exact search")
    ap.add_argument("--nlist", type=int, default=None,
                    help="--big-approx: IVF lists per class (default: the library's choice)")
    ap.add_argument("--data", choices=("clustered", "random"), default="clustered",
                    help="--big-approx data (module docstring)")
    a = ap.parse_args()
    if a.big_approx:
        a.n = a.n or 1_000_000
        print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads")
        big_approx(a)
        return
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    if a.big:
        x, y = data(1_000_000, a.d, a.classes)
        print(f"data: {x.nbytes / 2**30:.2f} GiB, peak RSS so far {peak_rss_gib():.2f} GiB", flush=True)
        clock = Clock()
        clock(lambda: search_different_label(x, y, a.k, progress=True))
        print(f"big: n=1000000 d={a.d} C={a.classes} k={a.k}: {clock.wall:.1f} s wall, "
              f"{clock.cpu:.1f} CPU s, peak RSS {peak_rss_gib():.2f} GiB")
        return
    a.n = a.n or 100_000
    x, y = data(a.n, a.d, a.classes)
    print(f"n={a.n} d={a.d} C={a.classes} k={a.k}")
    chunked(x, y, a.k, a.chunks, [b for b in a.backends.split(",") if b], a.precision)
    if a.full:
        full(x, y, a.k, a.full)
    print(f"peak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
