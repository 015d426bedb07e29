"""One-shot GPU check: exact GPU mining, IVF on GPU, and the trainer's loader on a GPU.

Written for a lent machine with one NVIDIA H100 (16 cores, no network) and a 10-minute
limit per command; bench/GPU.md says how to bring faiss-gpu there and how to read the
numbers. Three parts, each run in its own child process under a hard time budget (the
child is killed at its budget; what it had measured so far is kept), each skippable:

1. mine (--skip-mine): --n x --d random unit-norm float32 rows, --classes labels, k=16.
   `search_different_label`'s index (`DifferentLabelIndex`, --index gpu) against an
   unconstrained FAISS self-search of the same rows (GpuIndexFlatIP, k=16), both timed
   (build + search, query chunks alternated ABBA). Checks: every result row has k valid,
   distinct rows with another label, similarities descending; on a --sample of queries the
   similarities equal two exact oracles: (a) the unconstrained FAISS index searched with a
   large k (256) and filtered to other labels, (b) a brute-force torch matmul on the GPU
   (fp32, TF32 off) with same-label columns masked.
2. ivf (--skip-ivf): --ivf-n x --ivf-d rows, approx="ivf" on the GPU: build time, search
   time of the --sample queries and recall@k against the exact answer (torch matmul on
   the GPU in blocks, same-label masked), then queries/s over as many queries as
   --ivf-search-s allows, projected to all rows.
3. train (--skip-train): a CREMA-D-sized fixture (--clips, audio [1, n_mels, frames]
   float32, visual [T, 3, S, S] uint8, the layout pipelines/cremad.py writes) built with
   midas_data.build_dataset; the stream alone (samples/s per --workers); the trainer's
   step on batches already loaded ("compute-only"); then `trainers.run.train` with
   ResNet-18 encoders for Joint and MIDAS at each --workers, samples/s per epoch and the
   GPU utilisation sampled every 0.5 s (pynvml, else nvidia-smi) while it trains.

Run (lent GPU machine):  python3 bench/gpu_check.py [--faiss-parts DIR] --out $OUT/gpu_check.json
                         (bench/GPU.md: staging faiss-gpu there, the exact calls)
Smoke test (any CPU):    .venv/bin/python bench/gpu_check.py --cpu-smoke
A final JSON summary is printed and written to --out. Exit 0 when every part that ran
is "ok"; 1 when a check failed or a part errored; 2 when a part stopped early, timed out,
or could not run (no FAISS GPU build for --index gpu).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a plain checkout, the package not installed
    sys.path.insert(0, str(REPO))

PARTS = ("mine", "ivf", "train")
# Sizes of the full check (issue 8) and of the CPU smoke test; flags given override both.
FULL = {"n": 1_000_000, "d": 512, "classes": 10, "k": 16, "sample": 10_000, "chunks": 8,
        "ivf_n": 10_000_000, "ivf_d": 128, "ivf_search_s": 30.0, "ivf_chunk": 65_536,
        "clips": 7442, "frames": 3, "frame_size": 112, "n_mels": 128, "audio_frames": 300,
        "batch_size": 64, "epochs": 3, "warmup": 1, "workers": "0,8", "methods": "joint,midas",
        "index": "gpu", "device": "cuda", "mine_budget": 120.0, "ivf_budget": 180.0,
        "train_budget": 210.0, "time_limit": 520.0}
SMOKE = {**FULL, "n": 3000, "d": 64, "sample": 300, "chunks": 4, "ivf_n": 20_000, "ivf_d": 32,
         "ivf_search_s": 5.0, "ivf_chunk": 4096, "clips": 96, "frames": 1, "frame_size": 32,
         "n_mels": 32, "audio_frames": 48, "batch_size": 16, "epochs": 2, "warmup": 1,
         "workers": "0,2", "index": "cpu", "device": "cpu", "mine_budget": 120.0,
         "ivf_budget": 120.0, "train_budget": 240.0, "time_limit": 520.0}
D_TOL = 1e-4  # |our similarity - oracle's|: fp32 dot products of unit vectors agree far closer


# ------------------------------------------------------------------------------ plumbing
def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating | float):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    return v


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=1) + "\n")
    os.replace(tmp, path)


class Report:
    """A part's results, rewritten to disk after every change, so that the parent keeps
    what was measured even when it has to kill the part at its budget."""

    def __init__(self, part: str, path: Path, budget: float, margin: float):
        self.part, self.path, self.t0 = part, path, time.monotonic()
        self.deadline = self.t0 + budget - margin
        self.data: dict = {"status": "running"}
        self.save()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def phase(self, name: str) -> None:
        """What the part is doing now: a part killed at its budget reports it."""
        self.set("phase", name)

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 3)
        write_json(self.path, self.data)

    def log(self, msg: str) -> None:
        print(f"[{self.part} {time.monotonic() - self.t0:7.1f}s] {msg}", flush=True)

    def stop(self, msg: str) -> None:
        """Out of time: keep what was measured and say why the rest is missing."""
        self.log(f"STOPPED EARLY: {msg}")
        self.data.setdefault("stopped_early", []).append(msg)
        self.save()


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unit_rows(n: int, d: int, classes: int, seed: int, device):
    """Seeded random unit-norm float32 rows (made on `device`, copied to the host) and labels."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    x_t = torch.randn(n, d, generator=g, device=device, dtype=torch.float32)
    x_t /= x_t.norm(dim=1, keepdim=True)
    x = x_t.cpu().numpy()
    y = np.random.default_rng(seed).integers(0, classes, n).astype(np.int64)
    return x, y, x_t, torch.from_numpy(y).to(device)


def torch_exact(x_t, y_t, rows: np.ndarray, k: int, q_block: int = 1024,
                db_block: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine among rows with another label: fp32 matmul (TF32 off), masked."""
    import torch

    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        n, dev = x_t.shape[0], x_t.device
        rows_t = torch.from_numpy(np.asarray(rows, np.int64)).to(dev)
        Ds, Is = [], []
        for q0 in range(0, len(rows_t), q_block):
            qi = rows_t[q0:q0 + q_block]
            xq, yq = x_t[qi], y_t[qi]
            best_d = torch.full((len(qi), k), -math.inf, device=dev)
            best_i = torch.full((len(qi), k), -1, dtype=torch.int64, device=dev)
            for d0 in range(0, n, db_block):
                s = xq @ x_t[d0:d0 + db_block].T
                s.masked_fill_(yq[:, None] == y_t[d0:d0 + db_block][None, :], -math.inf)
                v, i = s.topk(min(k, s.shape[1]), dim=1)
                cd, ci = torch.cat([best_d, v], 1), torch.cat([best_i, i + d0], 1)
                best_d, top = cd.topk(k, dim=1)
                best_i = ci.gather(1, top)
            Ds.append(best_d.cpu())
            Is.append(best_i.cpu())
        return torch.cat(Ds).numpy(), torch.cat(Is).numpy()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def check_rows(D: np.ndarray, I: np.ndarray, y: np.ndarray, rows: np.ndarray) -> dict:
    """The different-label guarantee on every result row, plus distinct and descending."""
    invalid = int((I < 0).sum())
    Ic = np.where(I < 0, 0, I)
    same = int(((y[Ic] == y[rows][:, None]) & (I >= 0)).sum())
    srt = np.sort(I, axis=1)
    dup = int((srt[:, 1:] == srt[:, :-1]).sum())
    unsorted = int((np.diff(D, axis=1) > 0).sum())
    return {"rows": len(rows), "invalid_ids": invalid, "same_label": same, "duplicates": dup,
            "not_descending": unsorted, "ok": invalid == same == dup == unsorted == 0}


def compare(D: np.ndarray, I: np.ndarray, Do: np.ndarray, Io: np.ndarray) -> dict:
    diff = np.abs(D.astype(np.float64) - Do.astype(np.float64))
    same_set = (np.sort(I, axis=1) == np.sort(Io, axis=1)).all(axis=1)
    mx = float(diff.max()) if diff.size else 0.0
    return {"queries": len(D), "max_abs_diff": mx, "tol": D_TOL,
            "same_id_set_fraction": float(same_set.mean()) if len(D) else 1.0,
            "ok": bool(mx <= D_TOL)}


def faiss_flat_ip(faiss, d: int, kind: str):
    """Unconstrained exact inner-product index: IndexFlatIP, or GpuIndexFlatIP on GPU 0."""
    if kind == "cpu":
        return faiss.IndexFlatIP(d), None
    res = faiss.StandardGpuResources()
    cfg = faiss.GpuIndexFlatConfig()
    cfg.device = 0
    return faiss.GpuIndexFlatIP(res, d, cfg), res  # the caller keeps res alive


def faiss_warmup(faiss, kind: str) -> None:
    """CUDA context, cuBLAS handle and kernel load outside the timings."""
    index, res = faiss_flat_ip(faiss, 32, kind)
    xb = np.random.default_rng(0).standard_normal((4096, 32)).astype(np.float32)
    index.add(xb)
    index.search(xb[:256], 8)
    del index, res


# ------------------------------------------------------------------------------ part 1
def part_mine(a, rep: Report) -> None:
    import faiss
    import torch

    from midas_data.mining.knn import GPU_MAX_K, DifferentLabelIndex, resolve_index

    kind = resolve_index(a.index)
    dev = torch.device(a.oracle_device or a.device)
    n, d, k = a.n, a.d, a.k
    rep.set("config", {"n": n, "d": d, "classes": a.classes, "k": k, "index": kind,
                       "faiss": faiss.__version__})
    rep.phase("data")
    t = time.perf_counter()
    x, y, x_t, y_t = unit_rows(n, d, a.classes, a.seed, dev)
    rep.set("data_s", time.perf_counter() - t)
    rep.log(f"data {n} x {d} ready ({rep.data['data_s']:.1f} s)")
    faiss_warmup(faiss, kind)

    rep.phase("build")
    t = time.perf_counter()
    base, base_res = faiss_flat_ip(faiss, d, kind)
    base.add(x)
    base_build = time.perf_counter() - t
    t = time.perf_counter()
    dli = DifferentLabelIndex(x, y, index=kind)
    ours_build = time.perf_counter() - t
    rep.set("build_s", {"unconstrained": base_build, "ours": ours_build})
    rep.log(f"built: unconstrained {base_build:.2f} s, ours {ours_build:.2f} s")

    # probe (also the warm-up of both searches): project the full search, and search only
    # the first rows that fit the time left when all of them would not
    rep.phase("probe")
    m = min(n, max(1024, n // 256))
    t = time.perf_counter()
    base.search(x[:m], k)
    dli.search(k, np.arange(m))
    projected = (time.perf_counter() - t) * n / m
    room = rep.left() - 15 - 0.1 * projected  # the checks and oracles afterwards
    n_search = n if projected <= room else max(m, int(n * max(room, 0) / projected * 0.8))
    rep.set("projected_search_s", projected)
    if n_search < n:
        rep.stop(f"both searches of all {n} queries would take ~{projected:.0f} s, "
                 f"{rep.left():.0f} s left: searching the first {n_search} rows only")
    D = np.empty((n, k), np.float32)
    I = np.empty((n, k), np.int64)
    base_s = ours_s = 0.0
    done = 0
    chunks = np.array_split(np.arange(n_search), min(a.chunks, n_search))
    rep.phase("search")
    for j, q in enumerate(chunks):
        per_chunk = (base_s + ours_s) / j if j else 0.0
        if j and rep.left() < 1.5 * per_chunk + 10:
            rep.stop(f"searched {done}/{n} queries; the next chunk needs ~{per_chunk:.0f} s of "
                     f"the {rep.left():.0f} s left")
            break
        lo, hi = int(q[0]), int(q[-1]) + 1
        for side in (("base", "ours") if j % 2 == 0 else ("ours", "base")):  # ABBA
            t = time.perf_counter()
            if side == "base":
                base.search(x[lo:hi], k)
                base_s += time.perf_counter() - t
            else:
                D[lo:hi], I[lo:hi] = dli.search(k, q)
                ours_s += time.perf_counter() - t
        done = hi
        rep.log(f"chunk {j + 1}/{len(chunks)}: unconstrained {base_s:.2f} s, ours {ours_s:.2f} s")
    full = done == n
    timing = {"queries": done, "complete": full,
              "unconstrained": {"build_s": base_build, "search_s": base_s,
                                "total_s": base_build + base_s},
              "ours": {"build_s": ours_build, "search_s": ours_s, "total_s": ours_build + ours_s}}
    if base_s > 0:
        timing["ratio_search"] = ours_s / base_s
    if base_s > 0 and full:  # with part of the queries only, the builds would weigh too much
        timing["ratio_total"] = (ours_build + ours_s) / (base_build + base_s)
    rep.set("timing", timing)

    rows = np.arange(done)
    rep.phase("checks")
    rep.set("guarantee", check_rows(D[:done], I[:done], y, rows))
    rep.log(f"guarantee over {done} rows: {rep.data['guarantee']}")

    rng = np.random.default_rng(a.seed + 1)
    sample = np.sort(rng.choice(done, min(a.sample, done), replace=False))
    # oracle (a): the unconstrained index with a large k, filtered to other labels
    kbig = int(min(n, GPU_MAX_K, max(256, 8 * k)))
    Db, Ib = base.search(x[sample], kbig)
    ok_lab = (Ib >= 0) & (y[np.where(Ib < 0, 0, Ib)] != y[sample][:, None])
    covered = ok_lab.sum(1) >= k
    pos = np.argsort(~ok_lab, axis=1, kind="stable")[:, :k]  # first k other-label hits
    Da, Ia = np.take_along_axis(Db, pos, 1), np.take_along_axis(Ib, pos, 1)
    orc_a = compare(D[sample][covered], I[sample][covered], Da[covered], Ia[covered])
    orc_a.update(k_search=kbig, uncovered=int((~covered).sum()))
    rep.set("oracle_faiss_unconstrained", orc_a)
    del base, base_res, dli
    # oracle (b): brute-force torch matmul, same-label columns masked
    t = time.perf_counter()
    Dt, It = torch_exact(x_t, y_t, sample, k)
    sync(dev)
    orc_b = compare(D[sample], I[sample], Dt, It)
    orc_b["time_s"] = time.perf_counter() - t
    rep.set("oracle_torch_matmul", orc_b)
    ok = rep.data["guarantee"]["ok"] and orc_a["ok"] and orc_b["ok"]
    rep.set("status", ("ok" if full else "partial") if ok else "failed")
    if "ratio_search" in timing:
        rep.log(f"ours / unconstrained: search {timing['ratio_search']:.3f}x, total "
                f"{timing.get('ratio_total', math.nan):.3f}x; oracles max |dD| "
                f"{orc_a['max_abs_diff']:.2e} (faiss), {orc_b['max_abs_diff']:.2e} (torch)")


# ------------------------------------------------------------------------------ part 2
def part_ivf(a, rep: Report) -> None:
    import faiss
    import torch

    from midas_data.mining.knn import DifferentLabelIndex, default_nlist, recall_at_k, resolve_index

    kind = resolve_index(a.index)
    dev = torch.device(a.oracle_device or a.device)
    n, d, k = a.ivf_n, a.ivf_d, a.k
    n_c = n // a.classes
    nlist = a.ivf_nlist or default_nlist(n_c)
    nprobe = min(nlist, a.ivf_nprobe or max(8, nlist // 16))
    rep.set("config", {"n": n, "d": d, "classes": a.classes, "k": k, "index": kind,
                       "nlist_per_class": nlist, "nprobe": nprobe, "faiss": faiss.__version__})
    rep.phase("data")
    t = time.perf_counter()
    x, y, x_t, y_t = unit_rows(n, d, a.classes, a.seed + 2, dev)
    rep.set("data_s", time.perf_counter() - t)
    rep.log(f"data {n} x {d} ready ({rep.data['data_s']:.1f} s); nlist {nlist}/class, "
            f"nprobe {nprobe}")
    faiss_warmup(faiss, kind)

    rep.phase("build (CPU k-means per class, then copy to the GPU)")
    t = time.perf_counter()
    dli = DifferentLabelIndex(x, y, index=kind, approx="ivf", nlist=a.ivf_nlist,
                              nprobe=a.ivf_nprobe)
    rep.set("build_s", time.perf_counter() - t)
    rep.log(f"IVF index built in {rep.data['build_s']:.1f} s")
    del x  # the index holds its own normalised copy

    sample = np.sort(np.random.default_rng(a.seed + 3).choice(n, min(a.sample, n), replace=False))
    rep.phase("sample search + exact oracle")
    t = time.perf_counter()
    Da, Ia = dli.search(k, sample)
    rep.set("sample_search_s", time.perf_counter() - t)
    rep.set("sample_guarantee", check_rows(Da, Ia, y, sample))
    t = time.perf_counter()
    De, Ie = torch_exact(x_t, y_t, sample, k)
    sync(dev)
    rep.set("exact_s", time.perf_counter() - t)
    recall = recall_at_k(Ia, Ie)
    rep.set("recall_at_k", recall)
    rep.log(f"{len(sample)} queries: IVF {rep.data['sample_search_s']:.2f} s, exact (torch) "
            f"{rep.data['exact_s']:.2f} s, recall@{k} {recall:.4f}")
    del x_t, y_t
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # throughput: consecutive chunks of rows as queries, for at most --ivf-search-s
    searched, spent = 0, 0.0
    rep.phase("throughput search")
    while searched < n:
        # seconds per chunk, from the chunks so far (at first, from the sample's search)
        per = (spent / searched if searched else rep.data["sample_search_s"] / len(sample)) \
            * a.ivf_chunk
        if spent >= a.ivf_search_s or rep.left() < 2 * per + 10:
            break
        q = np.arange(searched, min(n, searched + a.ivf_chunk))
        t = time.perf_counter()
        dli.search(k, q)
        spent += time.perf_counter() - t
        searched += len(q)
    rate = searched / spent if spent else None
    rep.set("throughput", {"queries": searched, "search_s": spent, "queries_per_s": rate,
                           "all_rows": searched == n,
                           "projected_all_rows_s": n / rate if rate else None})
    ok = rep.data["sample_guarantee"]["ok"]
    rep.set("status", "ok" if ok else "failed")
    if rate:
        rep.log(f"throughput {rate:,.0f} queries/s over {searched} queries; all {n} rows would "
                f"take ~{n / rate:.0f} s")


# ------------------------------------------------------------------------------ part 3
def build_fixture(a, root: Path, rep: Report) -> dict:
    """A CREMA-D-shaped dataset as arrays (no wav or jpg files): audio [1, n_mels, frames]
    float32 and visual [T, 3, S, S] uint8 per clip, 6 classes, split 70/10/20 like the
    cremad reader without split lists. A class-dependent band / colour keeps it learnable."""
    from midas_data.pipelines.cremad import CLASSES

    from midas_data import Sample, build_dataset

    params = {"clips": a.clips, "frames": a.frames, "frame_size": a.frame_size,
              "n_mels": a.n_mels, "audio_frames": a.audio_frames, "seed": a.seed}
    manifest = root / "manifest.json"
    if manifest.exists():
        with contextlib.suppress(ValueError, KeyError, OSError):
            if json.loads(manifest.read_text())["source"].get("params") == params:
                rep.log(f"fixture reused: {root}")
                return params
    rng = np.random.default_rng(a.seed)
    labels = np.arange(a.clips) % len(CLASSES)
    band = max(1, a.n_mels // len(CLASSES))
    colours = np.array([[(40 * c) % 256, (90 + 70 * c) % 256, (200 - 30 * c) % 256]
                        for c in range(len(CLASSES))], np.int16)
    samples = []
    for i, c in enumerate(labels):
        audio = rng.standard_normal((1, a.n_mels, a.audio_frames), dtype=np.float32)
        audio[0, c * band:(c + 1) * band] += 0.5
        noise = rng.integers(-40, 40, (a.frames, 3, a.frame_size, a.frame_size), dtype=np.int16)
        visual = np.clip(colours[c][None, :, None, None] + noise, 0, 255).astype(np.uint8)
        samples.append(Sample(key=f"{1001 + i // 100}_{i:05d}_{CLASSES[c]}_XX", label=CLASSES[c],
                              payloads={"audio": audio, "visual": visual}))
    build_dataset(samples, root, classes=list(CLASSES), modalities=["audio", "visual"],
                  overwrite=True, progress=False,
                  source={"pipeline": "gpu_check cremad-like fixture", "params": params})
    return params


class UtilSampler:
    """GPU utilisation every 0.5 s from a separate process (this script in --_sampler mode),
    so that no extra thread lives in the process whose DataLoader forks workers."""

    def __init__(self, path: Path):
        self.path = path
        path.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, __file__, "--_sampler", str(path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def close(self) -> tuple[str, list[tuple[float, float]]]:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()
        if not self.path.exists():
            return "none", []
        lines = self.path.read_text().split("\n")
        source = lines[0].strip() if lines else "none"
        pts = []
        for line in lines[1:]:
            parts = line.split()
            if len(parts) == 2:
                pts.append((float(parts[0]), float(parts[1])))
        return source, pts


def sampler_main(path: str) -> None:
    """--_sampler: write 'source' then 'unix_time util%' lines every 0.5 s until killed."""
    out = open(path, "w", buffering=1)  # noqa: SIM115 - lives until the process is killed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    read = None
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)

        def read():
            return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        out.write("pynvml\n")
    except Exception:
        if shutil.which("nvidia-smi"):
            def read():
                r = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu",
                                    "--format=csv,noheader,nounits", "-i", "0"],
                                   capture_output=True, text=True, timeout=5)
                return float(r.stdout.split()[0])
            out.write("nvidia-smi\n")
    if read is None:
        out.write("none\n")
        return
    while True:
        t = time.time()
        with contextlib.suppress(Exception):
            out.write(f"{t:.3f} {read():.1f}\n")
        time.sleep(max(0.0, 0.5 - (time.time() - t)))


def util_in(pts: list[tuple[float, float]], t0: float, t1: float) -> dict | None:
    vals = [u for t, u in pts if t0 <= t <= t1]
    if not vals:
        return None
    return {"mean": float(np.mean(vals)), "median": float(np.median(vals)), "samples": len(vals)}


def epoch_batches(n: int, batch: int) -> list[int]:
    sizes = [batch] * (n // batch)
    return sizes + ([n % batch] if n % batch else [])


def stream_rate(root: Path, batch: int, workers: int, mods: list[str]) -> dict:
    from midas_data.stream.dataset import MidasDataset, MidasLoader

    ds = MidasDataset(root, "train", batch_size=batch, policy="random", seed=0, modalities=mods)
    loader = MidasLoader(ds, num_workers=workers)
    t0 = time.perf_counter()
    first, samples, nb = None, 0, 0
    for b in loader:
        if first is None:
            first = time.perf_counter() - t0
        samples += len(b["label"])
        nb += 1
    total = time.perf_counter() - t0
    steady = (total - first) if nb > 1 else total
    rest = samples - (batch if nb > 1 else 0)
    return {"samples": samples, "batches": nb, "epoch_s": total, "first_batch_s": first,
            "samples_per_s": rest / steady if steady > 0 else None}


def compute_rate(root: Path, a, device, methods: list[str], budget_s: float) -> dict:
    """Training steps on batches already read (what the stream hands the trainer, kept in
    memory): the trainer's rate with an infinitely fast loader."""
    import copy

    import torch
    from midas_data.trainers.distributed import DistInfo
    from midas_data.trainers.loop import EpochTracker, RunState, set_weak, train_step
    from midas_data.trainers.models import MultimodalModel
    from midas_data.trainers.run import build_optimizer

    from midas_data.dataset.reader import open_dataset
    from midas_data.stream.dataset import MidasDataset, MidasLoader

    cfg0 = train_config(a, "joint", 0, device)
    ds = open_dataset(root)
    model0 = MultimodalModel.from_dataset(ds, cfg0)
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
    for method in methods:
        cfg = train_config(a, method, 0, device)
        model = copy.deepcopy(model0).to(device)
        model.train()
        opt, _ = build_optimizer(model, cfg)
        run = RunState()
        epoch = cfg.warmup_epochs if method == "midas" else 0  # first MIDAS epoch after warm-up
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
        out[method] = {"steps": steps, "time_s": dt, "samples_per_s": steps * a.batch_size / dt}
        del model, opt
    torch.use_deterministic_algorithms(det_before)
    return out


def train_config(a, method: str, workers: int, device):
    from midas_data.trainers.config import TrainConfig

    return TrainConfig.from_preset(
        "cremad", method=method, epochs=a.epochs, warmup_epochs=a.warmup,
        encoders={"audio": "resnet18", "visual": "resnet18"}, device=str(device),
        num_workers=workers, batch_size=a.batch_size, stats_samples=512,
        deterministic=a.deterministic, seed=a.seed)


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
    params = build_fixture(a, root, rep)
    n_train = len(open_dataset(root).split("train"))
    size = sum(f.stat().st_size for f in (root / "shards").glob("*.tar"))
    rep.set("fixture", {**params, "train_clips": n_train, "shard_bytes": size,
                        "build_s": time.perf_counter() - t, "root": str(root)})
    rep.log(f"fixture: {a.clips} clips ({n_train} train), {size / 2**30:.2f} GiB of shards, "
            f"{rep.data['fixture']['build_s']:.1f} s")
    rep.set("config", {"device": str(dev), "batch_size": a.batch_size, "epochs": a.epochs,
                       "warmup_epochs": a.warmup, "workers": workers, "methods": methods,
                       "deterministic": a.deterministic, "encoders": "resnet18 + resnet18",
                       "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None})

    sampler = UtilSampler(work / "util.txt")
    try:
        streams = {}
        rep.phase("stream alone")
        for w in workers:
            streams[str(w)] = stream_rate(root, a.batch_size, w, ["audio", "visual"])
            rep.set("stream_only", streams)
            rep.log(f"stream alone, num_workers={w}: {streams[str(w)]['samples_per_s']:.0f} "
                    f"samples/s (epoch {streams[str(w)]['epoch_s']:.1f} s)")
        rep.phase("compute-only steps")
        comp = compute_rate(root, a, dev, methods, budget_s=min(30.0, max(5.0, rep.left() / 6)))
        rep.set("compute_only", comp)
        rep.log("compute-only (batches in memory): " + ", ".join(
            f"{m} {v['samples_per_s']:.0f} samples/s" for m, v in comp.items()))

        steps_per_epoch = len(epoch_batches(n_train, a.batch_size))
        sizes = epoch_batches(n_train, a.batch_size)
        runs, last_run_s = {}, 0.0
        for method in methods:
            for w in workers:
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
        source, pts = sampler.close()
    finally:
        if sampler.proc.poll() is None:
            sampler.close()
    rep.set("util_source", source)

    for run in runs.values():
        stamps = run.pop("_stamps")
        for e in range(len(stamps) // steps_per_epoch):
            st = stamps[e * steps_per_epoch:(e + 1) * steps_per_epoch]
            samples = sum(sizes[1:])  # steps 2..last of the epoch (the first waits on startup)
            warm = run["method"] == "midas" and e < a.warmup
            run["epochs"].append({"epoch": e, "warmup": warm,
                                  "samples_per_s": samples / (st[-1] - st[0]),
                                  "gpu_util": util_in(pts, st[0], st[-1])})
        meas = [ep for ep in run["epochs"] if not ep["warmup"]]
        run["samples_per_s"] = float(np.median([ep["samples_per_s"] for ep in meas])) if meas else None
        utils = [ep["gpu_util"]["mean"] for ep in meas if ep["gpu_util"]]
        run["gpu_util_mean"] = float(np.mean(utils)) if utils else None
    rep.set("runs", runs)

    verdict = {}
    for w in workers:
        for method in methods:
            run = runs.get(f"{method}_w{w}")
            s = streams.get(str(w), {}).get("samples_per_s")
            c = comp.get(method, {}).get("samples_per_s")
            if not run or not run["samples_per_s"] or not s or not c:
                continue
            e = run["samples_per_s"]
            verdict[f"{method}_w{w}"] = {
                "end_to_end": e, "stream_only": s, "compute_only": c,
                "end_to_end_over_compute": e / c, "gpu_util_mean": run["gpu_util_mean"],
                "loader_bound": bool(s < c),
                # num_workers=0 loads and computes in turn: 1 / (1/stream + 1/compute)
                "expected_if_serial": 1 / (1 / s + 1 / c),
                "text": (f"{method}, num_workers={w}: trains at {e:.0f} samples/s = "
                         f"{100 * e / c:.0f}% of the compute-only {c:.0f}/s; the stream alone "
                         f"gives {s:.0f}/s -> " + ("LOADER-BOUND" if s < c else "not loader-bound")
                         + (f"; GPU busy {run['gpu_util_mean']:.0f}%"
                            if run["gpu_util_mean"] is not None else ""))}
            rep.log(verdict[f"{method}_w{w}"]["text"])
    rep.set("verdict", verdict)
    missing = len(runs) < len(methods) * len(workers)
    rep.set("status", "partial" if missing else "ok")


# ------------------------------------------------------------------------------ faiss-gpu
def install_faiss(parts_dir: Path, prefix: Path) -> dict:
    """faiss-gpu from the wheel parts that bench/GPU.md stages on the lent machine.

    The parts are one tar (SHA256SUMS + the wheels) split into pieces small enough to
    travel one per call. They are joined and checked here, faiss-gpu is installed under
    PREFIX/site and the CUDA 12 cuBLAS and runtime wheels under PREFIX/cu12, off
    PYTHONPATH so that their `nvidia/__init__.py` cannot hide the machine's own `nvidia`
    packages. faiss's import-time preload (which also wants nvidia-curand-cu12, a library
    FAISS never links) is switched off by removing its `_gpu_build` marker; the CUDA 12
    libraries are found through LD_LIBRARY_PATH instead. Returns the environment to run with.
    """
    import hashlib

    site, cu12, wheels = prefix / "site", prefix / "cu12", prefix / "wheels"
    if not (site / "faiss" / "__init__.py").exists():
        parts = sorted(parts_dir.glob("part.*"))
        if not parts:
            raise SystemExit(f"--faiss-parts {parts_dir}: no part.* files there (bench/GPU.md)")
        print(f"faiss-gpu: joining {len(parts)} parts ({sum(p.stat().st_size for p in parts) / 2**20:.0f}"
              f" MiB) from {parts_dir}", flush=True)
        shutil.rmtree(wheels, ignore_errors=True)
        wheels.mkdir(parents=True)
        cat = subprocess.Popen(["cat", *map(str, parts)], stdout=subprocess.PIPE)
        tar = subprocess.run(["tar", "-xf", "-", "-C", str(wheels)], stdin=cat.stdout)
        cat.wait()
        if tar.returncode or cat.returncode or not (wheels / "SHA256SUMS").exists():
            raise SystemExit("faiss-gpu: the parts do not join into a whole tar; is one missing? "
                             f"found {[p.name for p in parts]}")
        for line in (wheels / "SHA256SUMS").read_text().splitlines():
            digest, name = line.split()
            f = wheels / name.lstrip("*")
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 24), b""):
                    h.update(block)
            if h.hexdigest() != digest:
                raise SystemExit(f"faiss-gpu: {name} does not match SHA256SUMS; stage the parts again")
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
               "--no-compile", "--no-cache-dir", "--upgrade", "--target"]
        subprocess.run(pip + [str(site), *map(str, wheels.glob("faiss_gpu-*.whl"))], check=True)
        subprocess.run(pip + [str(cu12), *map(str, wheels.glob("nvidia_*.whl"))], check=True)
        (site / "faiss" / "_gpu_build.py").unlink(missing_ok=True)
        shutil.rmtree(wheels, ignore_errors=True)
        print(f"faiss-gpu: installed under {prefix}", flush=True)
    libs = [str(cu12 / "nvidia" / "cuda_runtime" / "lib"), str(cu12 / "nvidia" / "cublas" / "lib")]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + [v for v in [env.get("PYTHONPATH")] if v])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [v for v in [env.get("LD_LIBRARY_PATH")] if v])
    return env


def without_option(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


# ------------------------------------------------------------------------------ driver
def environment(a) -> dict:
    env: dict = {"python": sys.version.split()[0], "platform": platform.platform(),
                 "cpus": os.cpu_count()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
    except Exception as e:  # pragma: no cover - torch is a dependency
        env["torch"] = f"unavailable: {e}"
    try:
        import faiss

        env["faiss"] = faiss.__version__
        env["faiss_file"] = faiss.__file__
        env["faiss_build"] = "gpu" if hasattr(faiss, "StandardGpuResources") else "cpu"
        env["faiss_gpus"] = faiss.get_num_gpus() if env["faiss_build"] == "gpu" else 0
        env["faiss_gpu"] = env["faiss_gpus"] > 0
    except Exception as e:
        env["faiss"] = f"unavailable: {type(e).__name__}: {e}"
        env["faiss_gpu"] = False
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True)
        env["gpus"] = [line.strip() for line in r.stdout.splitlines() if line.strip()]
    return env


def run_part(part: str, a, budget: float, work: Path) -> dict:
    """Run one part in a child process group; kill it at `budget` seconds."""
    result = work / f"part_{part}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, *sys.argv[1:], "--_part", part, "--_result", str(result),
           "--_budget", f"{budget:.1f}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if a.cpu_smoke:
        env["OMP_NUM_THREADS"] = "1"
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=budget)
        killed = False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the part and its DataLoader workers
        proc.wait()
        rc, killed = proc.returncode, True
    # anything the part left in its group (e.g. a sampler) goes too
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    data = json.loads(result.read_text()) if result.exists() else {}
    data["wall_s"] = time.monotonic() - t0
    data["budget_s"] = budget
    if killed:
        data["status"] = "timeout"
        data["message"] = (f"killed at its {budget:.0f} s budget; the numbers above were measured "
                           "before that")
        print(f"[{part}] TIMEOUT: killed at its {budget:.0f} s budget", flush=True)
    elif rc != 0 and data.get("status") in (None, "running"):
        data["status"] = "error"
        data.setdefault("error", f"exit code {rc}")
    return data


def child_main(a) -> int:
    budget = float(a._budget)
    rep = Report(a._part, Path(a._result), budget, margin=min(10.0, 0.1 * budget))
    if a.cpu_smoke:  # a loaded 2-core machine: more than one thread per op only waits
        import torch

        torch.set_num_threads(1)
    try:
        {"mine": part_mine, "ivf": part_ivf, "train": part_train}[a._part](a, rep)
        rep.data.pop("phase", None)
        rep.save()
    except Exception as e:
        traceback.print_exc()
        rep.set("status", "error")
        rep.set("error", f"{type(e).__name__}: {e}")
        return 1
    return 0


def summary_lines(parts: dict) -> list[str]:
    out = []
    m = parts.get("mine", {})
    if m.get("timing"):
        tm = m["timing"]
        part = "" if tm["complete"] else f" (first {tm['queries']} queries only)"
        out.append(f"mine{part}: {m['config']['n']} x {m['config']['d']}, k={m['config']['k']}: ours "
                   f"{tm['ours']['total_s']:.2f} s (build {tm['ours']['build_s']:.2f} + search "
                   f"{tm['ours']['search_s']:.2f}), unconstrained FAISS "
                   f"{tm['unconstrained']['total_s']:.2f} s -> ratio "
                   f"{tm.get('ratio_total', float('nan')):.3f} total, "
                   f"{tm.get('ratio_search', float('nan')):.3f} search")
    v = parts.get("ivf", {})
    if "recall_at_k" in v:
        tp = v.get("throughput", {})
        out.append(f"ivf: {v['config']['n']} x {v['config']['d']}: build {v['build_s']:.1f} s, "
                   f"{v['config'].get('nprobe')} probes, recall@{v['config']['k']} "
                   f"{v['recall_at_k']:.4f}, {tp.get('queries_per_s') or 0:,.0f} queries/s")
    for text in (d["text"] for d in parts.get("train", {}).get("verdict", {}).values()):
        out.append(f"train: {text}")
    for name, p in parts.items():
        out.append(f"{name}: {p.get('status')}" + (f" ({p['error']})" if p.get("error") else "")
                   + (f" [{'; '.join(p['stopped_early'])}]" if p.get("stopped_early") else ""))
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny sizes, FAISS on CPU, torch on CPU (a test of the script itself)")
    for p in PARTS:
        ap.add_argument(f"--skip-{p}", action="store_true", help=f"skip part {p}")
    g = ap.add_argument_group("part 1: exact mining")
    g.add_argument("--n", type=int, help="rows (1M)")
    g.add_argument("--d", type=int, help="dimension (512)")
    g.add_argument("--classes", type=int, help="labels, uniform (10)")
    g.add_argument("--k", type=int, help="neighbours per query (16)")
    g.add_argument("--sample", type=int, help="queries checked against the exact oracles / "
                   "used for IVF recall (10000)")
    g.add_argument("--chunks", type=int, help="query chunks, alternated ABBA (8)")
    g.add_argument("--index", choices=("cpu", "gpu", "auto"), help="FAISS index (gpu)")
    g.add_argument("--oracle-device", default=None,
                   help="torch device of parts 1-2 (data generation, exact oracles); "
                        "default --device")
    g = ap.add_argument_group("part 2: IVF")
    g.add_argument("--ivf-n", type=int, help="rows (10M)")
    g.add_argument("--ivf-d", type=int, help="dimension (128)")
    g.add_argument("--ivf-nlist", type=int, default=None, help="lists per class (library default)")
    g.add_argument("--ivf-nprobe", type=int, default=None, help="probes (library default)")
    g.add_argument("--ivf-search-s", type=float, help="seconds of throughput search at most (30)")
    g.add_argument("--ivf-chunk", type=int, help="queries per throughput call (65536)")
    g = ap.add_argument_group("part 3: training")
    g.add_argument("--clips", type=int, help="fixture clips (7442, CREMA-D's count)")
    g.add_argument("--frames", type=int, help="visual frames per clip (3, the cremad reader's)")
    g.add_argument("--frame-size", type=int, help="frame side in pixels (112; the reader's 224)")
    g.add_argument("--n-mels", type=int, help="spectrogram mel bands (128)")
    g.add_argument("--audio-frames", type=int, help="spectrogram frames (300)")
    g.add_argument("--batch-size", type=int, help="anchors per batch (64, the cremad preset's)")
    g.add_argument("--epochs", type=int, help="epochs per run (3)")
    g.add_argument("--warmup", type=int, help="MIDAS warm-up epochs (1)")
    g.add_argument("--workers", help="DataLoader workers to try, comma-separated (0,8)")
    g.add_argument("--methods", help="trainer methods, comma-separated (joint,midas)")
    g.add_argument("--device", help="torch device (cuda)")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="TrainConfig.deterministic (the trainer's default: on)")
    g = ap.add_argument_group("time and output")
    g.add_argument("--time-limit", type=float, help="seconds for the whole script (520)")
    g.add_argument("--mine-budget", type=float, help="seconds for part 1 at most (120)")
    g.add_argument("--ivf-budget", type=float, help="seconds for part 2 at most (180)")
    g.add_argument("--train-budget", type=float, help="seconds for part 3 at most (210)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--work", default="/tmp/midas_gpu_check", help="scratch folder (fixture, runs)")
    g.add_argument("--out", default="out/gpu_check.json", help="JSON summary")
    g.add_argument("--faiss-parts", default=None, metavar="DIR",
                   help="install faiss-gpu from the wheel parts staged in DIR (bench/GPU.md), "
                        "then run with it")
    g.add_argument("--faiss-prefix", default="/tmp/midas-faiss",
                   help="where --faiss-parts installs (reused while it is there)")
    ap.add_argument("--_part", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)
    ap.add_argument("--_budget", help=argparse.SUPPRESS)
    ap.add_argument("--_sampler", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    for key, value in (SMOKE if a.cpu_smoke else FULL).items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a._sampler:
        sampler_main(a._sampler)
        return 0
    if a._part:
        return child_main(a)
    if a.faiss_parts:  # install, then start again with the new paths (ld.so reads them at start)
        env = install_faiss(Path(a.faiss_parts), Path(a.faiss_prefix))
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, __file__,
                                   *without_option(sys.argv[1:], "--faiss-parts")], env)
    t_start = time.monotonic()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env = environment(a)
    print("environment: " + json.dumps(env), flush=True)
    parts: dict = {}
    budgets = {"mine": a.mine_budget, "ivf": a.ivf_budget, "train": a.train_budget}
    for part in PARTS:
        if getattr(a, f"skip_{part}"):
            parts[part] = {"status": "skipped", "message": f"--skip-{part}"}
            continue
        if part in ("mine", "ivf") and a.index == "gpu" and not env.get("faiss_gpu"):
            why = ("a GPU build of FAISS that sees no GPU (faiss.get_num_gpus() == 0)"
                   if env.get("faiss_build") == "gpu" else
                   f"no GPU build of FAISS ({env.get('faiss')}, {env.get('faiss_file', '-')})")
            parts[part] = {"status": "unavailable", "message": (
                f"--index gpu needs faiss-gpu: {why}; bench/GPU.md says how to bring it")}
            print(f"[{part}] UNAVAILABLE: {parts[part]['message']}", flush=True)
            continue
        left = a.time_limit - (time.monotonic() - t_start) - 5
        budget = min(budgets[part], left)
        if budget < 30:
            parts[part] = {"status": "skipped", "message": (
                f"out of time: {left:.0f} s of the {a.time_limit:.0f} s limit left")}
            print(f"[{part}] SKIPPED: {parts[part]['message']}", flush=True)
            continue
        print(f"[{part}] starting, budget {budget:.0f} s", flush=True)
        parts[part] = run_part(part, a, budget, work)
    ran = [p["status"] for p in parts.values() if p["status"] != "skipped"]
    code = 1 if any(s in ("failed", "error") for s in ran) else (
        2 if any(s in ("partial", "timeout", "unavailable") for s in ran) else 0)
    summary = {"script": "bench/gpu_check.py", "argv": sys.argv[1:], "cpu_smoke": a.cpu_smoke,
               "environment": env, "parts": parts, "total_s": time.monotonic() - t_start,
               "exit_code": code}
    lines = summary_lines(parts)
    summary["summary"] = lines
    write_json(Path(a.out), summary)
    print(json.dumps(_jsonable(summary), indent=1))  # the summary lines last: the tail of a log
    print("\n".join(["", "== summary =="] + lines))
    print(f"written to {a.out}; exit {code}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
