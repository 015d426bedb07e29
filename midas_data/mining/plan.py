"""How one modality is searched: a timed probe, the exact search's estimate, exact or IVF.

`mine_modality` builds the exact index and searches a seeded sample of the anchors with it
(the *probe*). The probe's time, scaled by the inner products the whole search needs
(each anchor meets every row with another label: sum over anchors of n - n_class), is the
estimate of the exact search's time, printed before the search starts. Then:

- exact (``approx`` None, or 'auto' at or below ``approx_above`` rows, or any size on a GPU):
  the probe's rows are already answered, the other anchors are searched; the estimate cost
  nothing extra.
- IVF (``approx`` 'ivf', or 'auto' above ``approx_above`` rows on the CPU): IVF over the
  same normalised rows (`knn.DifferentLabelIndex.use_approx`). Without an explicit
  ``nprobe`` the probe sample calibrates it: from 2 lists, nprobe grows by a quarter (at
  least one list) until recall@k on the sample, less two standard errors of its mean,
  reaches ``recall_target`` (or the search is exhaustive); the margin makes a held-out
  sample land above the target too. After the full search, recall@k is measured again on a
  second, disjoint sample (so the reported figure is not the one nprobe was tuned on) and a
  warning is raised when it is below the target. With 'auto', a calibration that ends
  needing every list (features without cluster structure) runs the exact search instead
  (`exact_instead`); the calibration is recorded under ``ivf_not_used``.

Why a threshold on rows, 200,000 by default: the exact search costs n^2 d inner products,
so its time grows with the square of the rows, while building the IVF lists and measuring
recall costs a roughly fixed few seconds plus two exact sample searches. At 200,000 x 256
the exact search takes about 2 minutes on 2 cores (the 1M figure of ~52 minutes scaled by
n^2); below that an exact answer is cheap enough to be worth having, above it the quadratic
growth takes over (1M rows: ~25x the 200k time).
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings

import numpy as np

from midas_data.mining.knn import DifferentLabelIndex, recall_at_k

log = logging.getLogger(__name__)

_CALIBRATION_START = 2  # lists probed at the first calibration step (then +25% a step)


def say(message: str, echo: bool) -> None:
    """Log at INFO and, when `echo` (the stage's progress flag), print to stderr."""
    log.info(message)
    if echo:
        print(message, file=sys.stderr, flush=True)


def _inner_products(index: DifferentLabelIndex, queries: np.ndarray) -> float:
    """Inner products an exact search of `queries` computes: sum of (n - n_class)."""
    n = len(index.cls)
    return float((n - index.counts[index.cls[queries]]).sum())


def recall_per_query(I_approx: np.ndarray, I_exact: np.ndarray) -> np.ndarray:
    """|approx top-k ∩ exact top-k| / k per query (-1 = none); its mean is `recall_at_k`."""
    return np.array([len(np.intersect1d(a[a >= 0], e)) / max(len(e), 1)
                     for a, e in zip(I_approx, I_exact)], dtype=np.float64)


def lower_bound(per_query: np.ndarray) -> float:
    """Mean minus two standard errors: the sample's recall, less what sampling could add."""
    n = len(per_query)
    se = per_query.std(ddof=1) / math.sqrt(n) if n > 1 else 0.0
    return float(per_query.mean() - 2 * se)


def choose_approx(approx: str | None, n: int, approx_above: int, device: str,
                  on_cpu: bool) -> str | None:
    """The search `approx` asks for at n rows: None (exact) or 'ivf' ('auto' decides)."""
    if approx != "auto":
        return approx
    return "ivf" if n > approx_above and on_cpu and device == "cpu" else None


def exact_instead(approx: str | None, nprobe: int | None, exhaustive: bool) -> bool:
    """After calibration: search exactly rather than by IVF?

    Only for 'auto' with a calibrated nprobe, and only when the recall target needed every
    list: that IVF reads every row anyway, and the exact search gives the exact answer (and
    FAISS's tie order) with no held-out recall to measure. Decided from the seeded
    calibration alone, never from timings, so a rerun makes the same choice.
    """
    return approx == "auto" and nprobe is None and exhaustive


def _format_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _exact_rest(index: DifferentLabelIndex, k: int, queries: np.ndarray, probe: np.ndarray,
                D_probe: np.ndarray, I_probe: np.ndarray, block_size: int,
                progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """The exact answer for all `queries`, reusing the probe's (already exact) rows."""
    D = np.empty((len(queries), k), np.float32)
    I = np.empty((len(queries), k), np.int64)  # noqa: E741 (FAISS naming)
    pos = np.searchsorted(queries, probe)
    D[pos], I[pos] = D_probe, I_probe
    rest = np.setdiff1d(queries, probe, assume_unique=True)
    if len(rest):
        at = np.searchsorted(queries, rest)
        D[at], I[at] = index.search(k, rest, block_size, progress)
    return D, I


def mine_modality(x: np.ndarray, labels: np.ndarray, k: int, device: str, queries: np.ndarray,
                  *, approx: str | None, approx_above: int, nlist: int | None,
                  nprobe: int | None, recall_target: float, recall_queries: int,
                  rng: np.random.Generator, block_size: int = 16384, progress: bool = False,
                  name: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(D [q, k], I [q, k], info) for anchors `queries` (sorted, unique) of one modality.

    info: the search actually run (approx, nlist per class, nprobe and the nprobe that is
    exhaustive, estimate_exact_s, recall_at_k measured on held-out anchors and whether it
    met recall_target).
    """
    label = f"modality {name!r}" if name else "features"
    n, nq = len(x), len(queries)
    index = DifferentLabelIndex(x, labels, device, None, name=name)
    on_cpu = device == "cpu" or (index.torch is not None and index.torch.device.type == "cpu")
    info: dict = {"rows": n, "anchors": nq}
    if nq == 0:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64), {**info, "approx": None}
    probe = np.sort(rng.choice(queries, min(recall_queries, nq), replace=False))
    t0 = time.perf_counter()
    D_probe, I_probe = index.search(k, probe, block_size)
    probe_s = time.perf_counter() - t0
    estimate = probe_s * _inner_products(index, queries) / _inner_products(index, probe)
    info.update(estimate_exact_s=estimate, probe_anchors=len(probe), probe_s=probe_s)
    say(f"{label}: exact search of {nq} anchors x {n} rows (d={x.shape[1]}, k={k}, {device}) "
        f"estimated at {_format_seconds(estimate)} (probe: {len(probe)} anchors in "
        f"{probe_s:.2f} s)", progress)
    chosen = choose_approx(approx, n, approx_above, device, on_cpu)
    if approx == "auto":
        say(f"{label}: --approx auto: {n} rows {'>' if n > approx_above else '<='} "
            f"{approx_above}{'' if on_cpu and device == 'cpu' else ' (IVF only with --index cpu)'}"
            f": {'IVF' if chosen else 'exact'} search", progress)
    elif approx is None and n > approx_above:
        say(f"{label}: {n} rows is above {approx_above}: --approx ivf (or --approx auto) searches "
            "approximately, at a fraction of that time, and reports recall@k", progress)
    info["approx"] = chosen
    if chosen is None:
        return (*_exact_rest(index, k, queries, probe, D_probe, I_probe, block_size, progress),
                info)

    index.use_approx(chosen, nlist, nprobe)
    lists = index.ivf_lists()
    if nprobe is None:
        index.set_nprobe(_CALIBRATION_START)
    tuned = []
    while True:
        per_query = recall_per_query(index.search(k, probe, block_size)[1], I_probe)
        r, low = per_query.mean(), lower_bound(per_query)
        tuned.append({"nprobe": index.nprobe, "recall_at_k": round(float(r), 4),
                      "lower_bound": round(low, 4)})
        if nprobe is not None or low >= recall_target or index.nprobe >= index.exhaustive_nprobe:
            break
        index.set_nprobe(max(index.nprobe + 1, math.ceil(1.25 * index.nprobe)))
    scope = "over the other classes" if device == "cpu" else "per class"
    say(f"{label}: IVF {max(lists)} lists per class, nprobe {index.nprobe} {scope} (sample "
        f"recall@{k} {r:.3f}; tried {[t['nprobe'] for t in tuned]})", progress)
    ivf = {"nlist": lists, "nprobe": index.nprobe, "nprobe_exhaustive": index.exhaustive_nprobe,
           "calibration": tuned}
    if exact_instead(approx, nprobe, index.nprobe >= index.exhaustive_nprobe):
        say(f"{label}: that recall needs every list (no cluster structure for IVF to use): "
            "exact search", progress)
        index.use_approx(None)
        info.update(approx=None, ivf_not_used=ivf)
        return (*_exact_rest(index, k, queries, probe, D_probe, I_probe, block_size, progress),
                info)
    info.update(ivf)
    t0 = time.perf_counter()
    D, I = index.search(k, queries, block_size, progress)  # noqa: E741
    search_s = time.perf_counter() - t0
    held = np.setdiff1d(queries, probe, assume_unique=True)
    if len(held) == 0:
        held = probe  # every anchor was in the probe: nothing left to hold out
    held = np.sort(rng.choice(held, min(recall_queries, len(held)), replace=False))
    recall = recall_at_k(I[np.searchsorted(queries, held)], index.search(k, held, block_size,
                                                                         exact=True)[1])
    info.update(search_s=round(search_s, 3),
                recall_at_k=round(recall, 4), recall_anchors=len(held),
                recall_target=recall_target, recall_target_met=bool(recall >= recall_target))
    if recall < recall_target:
        msg = (f"{label}: IVF recall@{k} {recall:.3f} on {len(held)} held-out anchors is below "
               f"the target {recall_target}; raise --nprobe (now {index.nprobe}, exhaustive "
               f"at {index.exhaustive_nprobe}) or search exactly")
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    say(f"{label}: IVF search {search_s:.1f} s (exact estimated {_format_seconds(estimate)}); "
        f"recall@{k} {recall:.3f} on {len(held)} held-out anchors", progress)
    return D, I, info
