"""Parts `mine` and `mine_big`: the torch backend's exact different-label search on the GPU.

`mine` (1M x 512, 10 classes, k=16): `DifferentLabelIndex(index="torch")` timed against an
unconstrained exact self-search of the same rows by the same engine on the same GPU
(`TorchKNN.search_unconstrained`: same products, precision and re-rank, no label
constraint), query chunks alternated ABBA; then the guarantee on every result row,
exactness on a sample of queries against the float64 oracle, the peak GPU memory, and, as
time allows, the other candidate precisions on a slice of the queries.
`mine_big` (10M x 128): ours alone, as many queries as the budget allows after a probe,
the time for all of them projected, exactness on a sample of the searched rows.
"""

from __future__ import annotations

import time

import numpy as np

from .exactness import (
    add_guarantee,
    compare,
    guarantee,
    guarantee_ok,
    oracle_topk,
    unit_rows_float64,
)
from .harness import Report, sync


def unit_rows(n: int, d: int, classes: int, seed: int, device):
    """Seeded random float32 rows made on `device` (x_t) and copied to the host (x), and
    labels uniform over the classes (y on the host, y_t on the device)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    x_t = torch.randn(n, d, generator=g, device=device, dtype=torch.float32)
    x = x_t.cpu().numpy()
    y = np.random.default_rng(seed).integers(0, classes, n).astype(np.int64)
    return x, y, x_t, torch.from_numpy(y).to(device)


def _gib(b: int) -> float:
    return round(b / 2**30, 3)


class PeakMemory:
    """Peak GPU memory allocated inside the block, and above what was allocated before."""

    def __init__(self, device):
        import torch

        self.on = torch.device(device).type == "cuda"
        self.device, self.peak_gib, self.extra_gib = device, None, None

    def __enter__(self):
        import torch

        if self.on:
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        import torch

        if self.on:
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_gib, self.extra_gib = _gib(peak), _gib(peak - self.before)


def _build(a, x, y, dev, precision):
    from midas_data.mining.knn import DifferentLabelIndex

    return DifferentLabelIndex(x, y, index="torch", torch_device=dev, precision=precision,
                               chunk_size=a.chunk_size)


def _data_and_index(a, rep: Report, n: int, d: int, seed: int, dev):
    """Phases "data" (n x d unit rows, `a.classes` classes) and "build" (our index on them):
    (x, y, x_t, y_t, index, build seconds, the build's PeakMemory)."""
    rep.phase("data")
    t = time.perf_counter()
    x, y, x_t, y_t = unit_rows(n, d, a.classes, seed, dev)
    rep.set("data_s", time.perf_counter() - t)
    rep.log(f"data {n} x {d} ready ({rep.data['data_s']:.1f} s)")
    rep.phase("build")
    with PeakMemory(dev) as mem:
        t = time.perf_counter()
        index = _build(a, x, y, dev, a.precision)
        sync(dev)
        build_s = time.perf_counter() - t
    return x, y, x_t, y_t, index, build_s, mem


def _check_sample(rep: Report, key: str, D, I, rows, x_t, y_t, k) -> dict:
    """Exactness of (D, I) for the queries `rows` against the float64 oracle."""
    t = time.perf_counter()
    x64 = unit_rows_float64(x_t)
    Do, Io = oracle_topk(x64, y_t, rows, k)
    res = compare(D, I, Do, Io, x64, rows)
    del x64
    res["oracle_s"] = time.perf_counter() - t
    rep.set(key, res)
    rep.log(f"{key}: {res}")
    return res


def part_mine(a, rep: Report) -> None:
    import torch

    from midas_data.mining.torch_knn import TorchKNN

    dev = torch.device(a.device)
    n, d, k = a.n, a.d, a.k
    rep.set("config", {"n": n, "d": d, "classes": a.classes, "k": k, "device": str(dev),
                       "precision": a.precision, "chunk_size": a.chunk_size,
                       "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None})
    x, y, x_t, y_t, ours, ours_build, mem = _data_and_index(a, rep, n, d, a.seed, dev)
    t = time.perf_counter()
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)  # the baseline normalises too
    base = TorchKNN(xn, np.array([0, n]), dev, a.precision, a.chunk_size)
    sync(dev)
    base_build = time.perf_counter() - t
    del xn
    rep.set("build_s", {"unconstrained": base_build, "ours": ours_build})
    rep.set("gpu_memory_gib", {"ours_index": mem.extra_gib})
    rep.log(f"built: ours {ours_build:.2f} s ({ours.torch.describe()}), unconstrained "
            f"{base_build:.2f} s")

    # probe (also the warm-up of both): project the full search; search only the first
    # rows that fit when all of them would not
    rep.phase("probe")
    m = min(n, max(1024, n // 128))
    probe = np.arange(m)
    with PeakMemory(dev) as mem_ours:
        t = time.perf_counter()
        ours.search(k, probe)
        t_ours = time.perf_counter() - t
    with PeakMemory(dev) as mem_base:
        t = time.perf_counter()
        base.search_unconstrained(probe, k)
        t_base = time.perf_counter() - t
    projected = (t_ours + t_base) * n / m
    rep.set("gpu_memory_gib", {"ours_index": mem.extra_gib, "ours_search_peak": mem_ours.peak_gib,
                               "ours_search_extra": mem_ours.extra_gib,
                               "unconstrained_search_peak": mem_base.peak_gib})
    rep.set("projected_search_s", projected)
    ours.torch.stats = dict.fromkeys(ours.torch.stats, 0)  # count the timed search only
    room = rep.left() - 20 - 0.2 * projected  # the checks and the oracle afterwards
    n_search = n if projected <= room else max(m, int(n * max(room, 0) / projected * 0.8))
    if n_search < n:
        rep.stop(f"both searches of all {n} queries would take ~{projected:.0f} s, "
                 f"{rep.left():.0f} s left: searching the first {n_search} rows only")

    rep.phase("search")
    D = np.empty((n, k), np.float32)
    I = np.empty((n, k), np.int64)  # noqa: E741 (FAISS naming)
    ours_s = base_s = 0.0
    done = 0
    chunks = np.array_split(np.arange(n_search), min(a.chunks, n_search))
    for j, q in enumerate(chunks):
        per_chunk = (base_s + ours_s) / j if j else 0.0
        if j and rep.left() < 1.5 * per_chunk + 15:
            rep.stop(f"searched {done}/{n} queries; the next chunk needs ~{per_chunk:.0f} s of "
                     f"the {rep.left():.0f} s left")
            break
        lo, hi = int(q[0]), int(q[-1]) + 1
        for side in (("base", "ours") if j % 2 == 0 else ("ours", "base")):  # ABBA
            t = time.perf_counter()
            if side == "base":
                base.search_unconstrained(q, k)
                base_s += time.perf_counter() - t
            else:
                D[lo:hi], I[lo:hi] = ours.search(k, q)
                ours_s += time.perf_counter() - t
        done = hi
        rep.log(f"chunk {j + 1}/{len(chunks)}: ours {ours_s:.2f} s, unconstrained {base_s:.2f} s")
    full = done == n
    timing = {"queries": done, "complete": full,
              "ours": {"build_s": ours_build, "search_s": ours_s, "total_s": ours_build + ours_s},
              "unconstrained": {"build_s": base_build, "search_s": base_s,
                                "total_s": base_build + base_s},
              "stats": dict(ours.torch.stats)}
    if base_s > 0:
        timing["ratio_search"] = ours_s / base_s
        if full:  # with part of the queries only, the builds would weigh too much
            timing["ratio_total"] = (ours_build + ours_s) / (base_build + base_s)
    rep.set("timing", timing)
    del base
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    rep.phase("checks")
    g = guarantee(D[:done], I[:done], y, np.arange(done))
    rep.set("guarantee", g)
    rng = np.random.default_rng(a.seed + 1)
    sample = np.sort(rng.choice(done, min(a.sample, done), replace=False))
    ex = _check_sample(rep, "exactness", D[sample], I[sample], sample, x_t, y_t, k)
    ok = guarantee_ok(g) and ex["exact"]
    rep.set("status", ("ok" if full else "partial") if ok else "failed")

    # the other precisions of the candidate pass, on a slice of the queries, as time allows
    variants = {}
    for precision in [p for p in a.variants.split(",") if p and p != ours.torch.precision]:
        q = np.arange(min(n, a.variant_queries))
        guess = ours_s / max(done, 1) * len(q) * (8 if precision == "fp32" else 1) + 10
        if rep.left() < 2 * guess + 10:
            rep.stop(f"precision {precision} skipped: ~{guess:.0f} s needed, {rep.left():.0f} s left")
            continue
        rep.phase(f"variant {precision}")
        del ours
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        ours = _build(a, x, y, dev, precision)
        ours.search(k, q[:1024])  # warm-up
        t = time.perf_counter()
        Dv, Iv = ours.search(k, q)
        sync(dev)
        dt = time.perf_counter() - t
        sub = q[:: max(1, len(q) // 1000)]
        exv = _check_sample(rep, f"exactness_{precision}", Dv[sub], Iv[sub], sub, x_t, y_t, k)
        ref = ours_s / max(done, 1) * len(q)
        variants[precision] = {"queries": len(q), "search_s": dt, "vs_default_precision": dt / ref,
                               "stats": dict(ours.torch.stats), "exact_on_sample": exv["exact"]}
        rep.set("precision_variants", variants)
        rep.log(f"precision {precision}: {dt:.2f} s for {len(q)} queries ({dt / ref:.2f}x the "
                f"default's time), {ours.torch.stats}")
        if not exv["exact"]:
            rep.set("status", "failed")
    if "ratio_search" in timing:
        rep.log(f"ours / unconstrained: search {timing['ratio_search']:.3f}x, total "
                f"{timing.get('ratio_total', float('nan')):.3f}x; ours {ours_build + ours_s:.2f} s "
                f"for {done} queries")


def part_mine_big(a, rep: Report) -> None:
    import torch

    dev = torch.device(a.device)
    n, d, k = a.big_n, a.big_d, a.k
    rep.set("config", {"n": n, "d": d, "classes": a.classes, "k": k, "device": str(dev),
                       "precision": a.precision, "chunk_size": a.chunk_size})
    x, y, x_t, y_t, ours, build_s, mem = _data_and_index(a, rep, n, d, a.seed + 2, dev)
    del x
    rep.set("build_s", build_s)
    rep.log(f"built in {build_s:.1f} s ({ours.torch.describe()})")

    rep.phase("probe")
    m = min(n, max(1024, n // 1024))
    ours.search(k, np.arange(min(m, 1024)))  # warm-up
    t = time.perf_counter()
    ours.search(k, np.arange(m))
    projected = (time.perf_counter() - t) * n / m
    rep.set("projected_search_s", projected)
    rep.log(f"probe of {m} queries: all {n} would take ~{projected:.0f} s")

    rep.phase("search")
    g, done, spent = None, 0, 0.0
    keep = {}  # results of the sampled rows, for the oracle
    rng = np.random.default_rng(a.seed + 3)
    step = max(m, n // 32)
    with PeakMemory(dev) as mem_search:
        while done < n:
            per = spent / done * step if done else projected / n * step
            if rep.left() < 1.3 * per + 20:
                rep.stop(f"searched {done}/{n} queries; the next {step} need ~{per:.0f} s of the "
                         f"{rep.left():.0f} s left")
                break
            q = np.arange(done, min(n, done + step))
            t = time.perf_counter()
            D, I = ours.search(k, q)
            spent += time.perf_counter() - t
            g = add_guarantee(g, guarantee(D, I, y, q))
            pick = np.sort(rng.choice(len(q), min(len(q), max(1, a.big_sample * step // n)),
                                      replace=False))
            keep.update({int(q[p]): (D[p], I[p]) for p in pick})
            done = int(q[-1]) + 1
    rate = done / spent if spent else None
    rep.set("timing", {"queries": done, "complete": done == n, "search_s": spent,
                       "build_s": build_s, "total_s": build_s + spent, "queries_per_s": rate,
                       "projected_all_s": (build_s + n / rate) if rate else None,
                       "stats": dict(ours.torch.stats)})
    rep.set("gpu_memory_gib", {"index": mem.extra_gib, "search_peak": mem_search.peak_gib})
    rep.set("guarantee", g)
    del ours
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    ok = g is not None and guarantee_ok(g)
    if keep and rep.left() > 15:
        rows = np.array(sorted(keep))
        ex = _check_sample(rep, "exactness", np.stack([keep[r][0] for r in rows]),
                           np.stack([keep[r][1] for r in rows]), rows, x_t, y_t, k)
        ok = ok and ex["exact"]
    rep.set("status", ("ok" if done == n else "partial") if ok else "failed")
