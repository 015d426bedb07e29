"""Cosine k-NN restricted to partners with a different label: FAISS (CPU, GPU) or torch.

Method (FAISS): one searcher per class. Rows are L2-normalised into a copy sorted by label, so
class c is the contiguous slice ``xs[bounds[c]:bounds[c+1]]`` and each class gets its own
inner-product searcher over its own rows. Queries are taken in blocks sorted by label;
the rows of a block that belong to class c form one contiguous run, so class c's searcher
is asked with the (at most two) runs *outside* it and the query's own class is simply
never searched. Each query then holds k candidates from every other class, and a top-k
over those (C-1)*k candidates (numpy argpartition) is the exact answer.

Why this and not the alternatives:
- The different-label guarantee holds by construction, without IDSelector, which the
  classic FAISS GPU indexes silently ignore. CPU and GPU share everything except how a
  class's searcher is built (``_make_searchers``).
- It does less work than one unconstrained self-search: n * (n - n_c) inner products
  instead of n * n, with the same BLAS-blocked kernels FAISS uses for IndexFlatIP; the
  extra heap updates (C heaps per query) cost back part of that. bench/mine.py, 100k x
  256, 10 classes, k=16, 2 cores: 0.83-1.06x the IndexFlatIP self-search time.
- Over-fetch-and-filter has no useful guarantee (a query may need n_c + k neighbours);
  one index per class *complement* would hold C copies of the data.
- A masked GEMM + top-k measured slower here (the masked block is computed anyway).
Memory: the caller's array, one normalised copy, and per block q_block x C x k
candidates (block rows shrink when C*k is large). On CPU the exact searcher reads the
class slice in place (``faiss.knn``), so no index copies the data again.

IVF (``approx="ivf"``): on the CPU one `ivf.CrossClassIVF` over all classes, whose lists
each hold one label and whose queries never probe their own class's lists, so the guarantee
holds; ``nprobe`` counts lists over all other classes, spent on the classes nearest the
query (list-major matrix products; FAISS's IndexIVFFlat scans lists query by query and is
bound by memory bandwidth at a million rows). On the GPU one FAISS IndexIVFFlat per class
with the merge above (``nprobe`` lists in every class). Rows left with fewer than k hits
(short inverted lists) are redone exactly.

Backends (``index``, one of INDEX_CHOICES): ``cpu`` FAISS on the CPU; ``gpu`` FAISS on the
GPU when faiss-gpu is installed and sees a GPU, else the torch backend on CUDA (logged),
else an error; ``torch`` the torch backend (`torch_knn`: chunked matmul + top-k, exact,
on this rank's GPU if torch sees one, else the CPU; needs no FAISS); ``auto`` the fastest
available: FAISS GPU, else torch on CUDA, else torch on the CPU (bench/mine.py, k=16, 10
classes: the torch backend took 0.33x the FAISS backend's time at 30k x 256 on 2 cores,
0.35x at 20k x 128 on 1 thread).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable

import numpy as np

from midas_data.errors import MidasDataError
from midas_data.mining.ivf import CrossClassIVF, default_nlist, default_nprobe
from midas_data.progress import progress_bar as tqdm

log = logging.getLogger(__name__)

INDEX_CHOICES = ("cpu", "gpu", "torch", "auto")  # the --index values; the CLI reads them here
APPROX_KINDS = (None, "ivf")
GPU_MAX_K = 2048  # FAISS GPU k-selection limit (also for nprobe)
_CANDIDATE_BUDGET = 1 << 23  # candidates per block (x 12 bytes): caps q_block when C*k
# (or, for the CPU IVF, nprobe*k) is large

Searcher = Callable[[np.ndarray, int], "tuple[np.ndarray, np.ndarray]"]


class MiningInputError(MidasDataError):
    """Bad input to the search; ``row`` is the offending row (input order) when there is one."""

    def __init__(self, message: str, row: int | None = None):
        super().__init__(message)
        self.row = row


def _at(name: str | None, row: int | None = None) -> str:
    parts = ([f"modality {name!r}"] if name else []) + ([f"row {row}"] if row is not None else [])
    return ", ".join(parts) or "features"


def _faiss():
    try:
        import faiss
    except ImportError as e:  # neither extra installed
        raise MidasDataError("mining with --index cpu/gpu needs FAISS: pip install "
                             "'midas-data[cpu]' (or the [gpu] extra on a CUDA machine), or use "
                             "--index torch, which needs only torch") from e
    return faiss


def faiss_installed() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def gpu_available() -> bool:
    """faiss-gpu is installed and sees a GPU."""
    if not faiss_installed():
        return False
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def cuda_available() -> bool:
    """torch sees a CUDA GPU (the torch backend then runs there)."""
    import torch

    return torch.cuda.is_available()


def resolve_index(index: str) -> str:
    """An INDEX_CHOICES value -> the backend that runs: 'cpu' | 'gpu' (FAISS) | 'torch'.

    'gpu' without faiss-gpu falls back to torch on CUDA (logged), and without CUDA is an
    error; 'auto' picks the fastest available (module docstring) and warns when that is
    the CPU. Resolving a resolved value gives it back.
    """
    if index not in INDEX_CHOICES:
        raise MidasDataError(f"index must be one of {INDEX_CHOICES}, got {index!r}")
    if index in ("cpu", "torch"):
        return index
    if gpu_available():
        return "gpu"
    if cuda_available():
        from midas_data.mining.torch_knn import default_device

        log.warning("index %r: no GPU visible to FAISS (faiss-gpu not installed, or it sees no "
                    "GPU); mining with the torch backend on %s", index, default_device())
        return "torch"
    if index == "gpu":
        raise MidasDataError("--index gpu: no GPU visible to FAISS (faiss.get_num_gpus() == 0, or "
                             "this is the faiss-cpu build) and torch sees no CUDA device either; "
                             "on a CUDA machine install the `gpu` extra (pip install "
                             "'midas-data[gpu]', not together with [cpu]) or use --index torch; "
                             "here use --index cpu")
    msg = "index 'auto': no GPU visible to FAISS or torch, mining on CPU with the torch backend"
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return "torch"


def _check_data(x, labels, name) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate x and labels; return (labels int64, classes, class id per row, class counts)."""
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        shape = getattr(x, "shape", type(x).__name__)
        raise MiningInputError(f"{_at(name)}: expected a non-empty 2-D array [n, d], got {shape}")
    if x.dtype.kind != "f":
        raise MiningInputError(f"{_at(name)}: features must be floating point, got dtype {x.dtype}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != x.shape[0] or labels.dtype.kind not in "iu":
        raise MiningInputError(f"{_at(name)}: labels must be integers of shape [{x.shape[0]}], "
                               f"got {labels.dtype} {labels.shape}")
    labels = labels.astype(np.int64)
    classes, cls = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise MiningInputError(f"{_at(name)}: every row has label {int(classes[0])}; a partner "
                               "must have a different label, so at least two classes are needed")
    return labels, classes, cls.astype(np.int64), np.bincount(cls, minlength=len(classes))


def _check_query(k, queries, classes, cls, counts, name) -> np.ndarray:
    """Validate k and the query rows (every query needs k different-label rows); int64 queries."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise MiningInputError(f"{_at(name)}: k must be a positive integer, got {k!r}")
    n = len(cls)
    queries = np.arange(n, dtype=np.int64) if queries is None else np.asarray(queries)
    if queries.ndim != 1 or queries.dtype.kind not in "iu":
        raise MiningInputError(f"{_at(name)}: queries must be a 1-D integer array of row indices")
    queries = queries.astype(np.int64)
    bad = np.flatnonzero((queries < 0) | (queries >= n))
    if bad.size:
        raise MiningInputError(f"{_at(name)}: query {int(queries[bad[0]])} is out of range [0, {n})")
    short = np.flatnonzero(n - counts < k)
    qshort = np.flatnonzero(np.isin(cls[queries], short)) if short.size else short
    if qshort.size:
        row = int(queries[qshort[0]])
        c = int(cls[row])
        raise MiningInputError(f"{_at(name, row)}: k={k} but label {int(classes[c])} has only "
                               f"{n - counts[c]} rows with a different label; lower k", row)
    return queries


def _normalised_by_class(x: np.ndarray, cls: np.ndarray, name: str | None, block: int = 16384):
    """L2-normalised float32 copy of x with rows sorted by class: (xs, order, bounds).

    float32 like FAISS; rows whose float32 norm is not comfortably in range (overflow,
    underflow, NaN/inf, zero) are redone in float64 with scaling, which tells huge or tiny
    but valid rows from NaN/inf entries and all-zero rows (cosine undefined).
    """
    order = np.argsort(cls, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(cls))]).astype(np.int64)
    xs = np.empty(x.shape, dtype=np.float32)
    for b0 in range(0, len(order), block):
        rows = order[b0:b0 + block]
        xb = np.asarray(x[rows], dtype=np.float32)
        with np.errstate(all="ignore"):  # odd rows are redone below
            norm = np.sqrt(np.einsum("ij,ij->i", xb, xb))
            odd = np.flatnonzero(~((norm > 1e-15) & (norm < 1e15)))  # also catches NaN
            xb /= norm[:, None]
        for j in odd:
            row = int(rows[j])
            v = np.array(x[row], dtype=np.float64)  # a copy: never touch the caller's array
            if not np.isfinite(v).all():
                raise MiningInputError(f"{_at(name, row)}: feature vector contains NaN or inf", row)
            scale = np.abs(v).max()
            if scale == 0:
                raise MiningInputError(f"{_at(name, row)}: feature vector is all zeros "
                                       "(cosine undefined)", row)
            v /= scale
            xb[j] = v / np.linalg.norm(v)
        xs[b0:b0 + len(rows)] = xb
    return xs, order, bounds


def _faiss_ivf(faiss, xb: np.ndarray, nlist: int | None, nprobe: int | None, seed: int = 0):
    """FAISS IndexIVFFlat for a class (the GPU path; the CPU uses `ivf.CrossClassIVF`)."""
    nl = max(1, min(nlist or default_nlist(len(xb)), len(xb)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(xb.shape[1]), xb.shape[1], nl,
                               faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)  # train on a seeded sample: k-means is the slow part
    sample = xb if len(xb) <= 100 * nl else xb[np.sort(rng.choice(len(xb), 100 * nl, replace=False))]
    index.train(sample)
    index.add(xb)
    index.nprobe = min(nl, nprobe or default_nprobe(nl))
    return index


class _GpuSearcher:
    """A FAISS GPU index as a searcher; holds the GPU resources as long as it lives."""

    def __init__(self, index, res):
        self.index, self.res = index, res

    def __call__(self, xq: np.ndarray, k: int):
        return self.index.search(xq, k)


def set_nprobe(searcher, nprobe: int) -> None:
    """Set the lists probed by a FAISS IVF searcher (capped at its lists: exhaustive)."""
    target = getattr(searcher, "index", searcher)
    target.nprobe = int(min(nprobe, target.nlist))


def _make_searchers(xs, bounds, device: str, approx: str | None, nlist, nprobe) -> list[Searcher]:
    """One searcher per class, returning (D, I) with I local to the class slice (-1 = none).

    Exact on the CPU (FAISS knn on the slice in place); exact or IVF on the GPU. IVF on the
    CPU is `CrossClassIVF`, built by `DifferentLabelIndex.use_approx`.
    """
    faiss = _faiss()
    slices = [xs[bounds[c]:bounds[c + 1]] for c in range(len(bounds) - 1)]
    if device == "cpu" and approx is None:
        # faiss.knn reads the slice in place: no per-class copy of the data
        return [lambda xq, kk, xb=xb: faiss.knn(xq, xb, kk, faiss.METRIC_INNER_PRODUCT)
                for xb in slices]
    cpu_indexes = []
    for xb in slices:
        if approx == "ivf":
            cpu_indexes.append(_faiss_ivf(faiss, xb, nlist, nprobe))
        else:
            flat = faiss.IndexFlatIP(xs.shape[1])
            flat.add(xb)
            cpu_indexes.append(flat)
    res = faiss.StandardGpuResources()
    dev = int(os.environ.get("LOCAL_RANK", 0)) % faiss.get_num_gpus()  # one GPU per torchrun rank
    gpu_indexes = [faiss.index_cpu_to_gpu(res, dev, ix) for ix in cpu_indexes]
    del cpu_indexes
    return [_GpuSearcher(ix, res) for ix in gpu_indexes]


def _search_block(searchers, xq, cq, bounds, k) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over other-class candidates for one block; cq (class of each row) is sorted.

    Returns D float32 [B, k] and I int64 [B, k] (rows of xs, -1 = none), not yet sorted.
    """
    nb, n_cls = len(xq), len(bounds) - 1
    cand_d = np.full((nb, n_cls, k), -np.inf, dtype=np.float32)
    cand_i = np.full((nb, n_cls, k), -1, dtype=np.int64)
    starts = np.searchsorted(cq, np.arange(n_cls), "left")
    ends = np.searchsorted(cq, np.arange(n_cls), "right")
    for c in range(n_cls):
        kk = min(k, int(bounds[c + 1] - bounds[c]))
        for r0, r1 in ((0, starts[c]), (ends[c], nb)):  # the rows outside class c's run
            if r1 > r0 and kk > 0:
                d, i = searchers[c](xq[r0:r1], kk)
                cand_d[r0:r1, c, :kk] = np.where(i >= 0, d, -np.inf)
                cand_i[r0:r1, c, :kk] = np.where(i >= 0, i + bounds[c], -1)
    cand_d, cand_i = cand_d.reshape(nb, -1), cand_i.reshape(nb, -1)
    if cand_d.shape[1] > k:
        top = np.argpartition(-cand_d, k - 1, axis=1)[:, :k]
        cand_d = np.take_along_axis(cand_d, top, 1)
        cand_i = np.take_along_axis(cand_i, top, 1)
    return cand_d, cand_i


class DifferentLabelIndex:
    """Build once, search many: per-class searchers over an L2-normalised copy of x.

    x: float [n, d] (searched as float32; never modified); labels: int [n].
    index: one of INDEX_CHOICES (module docstring); approx: None (exact) or 'ivf' (not with
    the torch backend; nlist: lists per class, default ~sqrt(n_c)/4; nprobe: lists probed
    per query, over all other classes on the CPU, per class on the GPU; default 5% of the
    lists; `exhaustive_nprobe` lists make it exact). name: the modality, for
    error messages. The torch backend only: torch_device (default this rank's GPU, else
    the CPU), precision and chunk_size (see `torch_knn.TorchKNN`); ``self.torch`` is its
    searcher (``stats``), None for FAISS.
    """

    def __init__(self, x: np.ndarray, labels: np.ndarray, index: str = "cpu",
                 approx: str | None = None, nlist: int | None = None, nprobe: int | None = None,
                 name: str | None = None, torch_device=None, precision: str = "auto",
                 chunk_size: int | None = None):
        if approx not in APPROX_KINDS:
            raise MidasDataError(f"approx must be one of {APPROX_KINDS}, got {approx!r}")
        self.device, self.approx, self.name = resolve_index(index), approx, name
        if self.device == "torch" and approx is not None:
            raise MidasDataError(f"approx={approx!r} needs FAISS (--index cpu or gpu); the torch "
                                 "backend searches exactly")
        if self.device == "gpu" and (nprobe or 0) > GPU_MAX_K:
            raise MiningInputError(f"{_at(name)}: nprobe={nprobe}: FAISS on GPU allows at most "
                                   f"{GPU_MAX_K}")
        self.labels, self.classes, self.cls, self.counts = _check_data(x, labels, name)
        self.xs, self.order, self.bounds = _normalised_by_class(x, self.cls, name)
        self.pos = np.empty_like(self.order)
        self.pos[self.order] = np.arange(len(self.order))  # input row -> row of xs
        self.torch = None
        self._exact_searchers: list[Searcher] | None = None  # exact, for recall and fallback
        self._cross: CrossClassIVF | None = None
        if self.device == "torch":
            from midas_data.mining.torch_knn import TorchKNN

            self.torch = TorchKNN(self.xs, self.bounds, torch_device, precision, chunk_size)
            self._searchers = []
            log.info("%s: mining with %s", _at(name), self.torch.describe())
        else:
            self._searchers = []
            self.use_approx(approx, nlist, nprobe)

    def use_approx(self, approx: str | None, nlist: int | None = None,
                   nprobe: int | None = None) -> None:
        """Switch to another search (None: exact; 'ivf') over the same normalised rows.

        IVF on the CPU is one `CrossClassIVF` (nprobe: lists per query over all other
        classes); on the GPU one FAISS IndexIVFFlat per class (nprobe: lists per class).
        """
        if approx not in APPROX_KINDS:
            raise MidasDataError(f"approx must be one of {APPROX_KINDS}, got {approx!r}")
        if self.device == "torch" and approx is not None:
            raise MidasDataError(f"approx={approx!r} needs FAISS (--index cpu or gpu); the torch "
                                 "backend searches exactly")
        self.approx = approx
        self._cross = None
        if self.torch is not None:
            return
        if approx is None:
            if self._exact_searchers is None:
                self._exact_searchers = _make_searchers(self.xs, self.bounds, self.device, None,
                                                        None, None)
            self._searchers = self._exact_searchers
        elif self.device == "cpu":
            self._cross = CrossClassIVF(self.xs, self.bounds, nlist, nprobe)
            self._searchers = []
        else:
            self._searchers = _make_searchers(self.xs, self.bounds, self.device, approx, nlist,
                                              nprobe)

    def _ivf_only(self) -> None:
        if self.approx is None:
            raise MidasDataError(f"{_at(self.name)}: an exact index has no IVF lists; "
                                 "use_approx('ivf') first")

    def ivf_lists(self) -> list[int]:
        """IVF lists of each class (present classes, in label order)."""
        self._ivf_only()
        if self._cross is not None:
            return list(self._cross.lists_per_class)
        return [int(getattr(s, "index", s).nlist) for s in self._searchers]

    @property
    def nprobe(self) -> int:
        """IVF lists probed per query: over all other classes (CPU), per class (GPU)."""
        self._ivf_only()
        if self._cross is not None:
            return int(self._cross.nprobe)
        return max(int(getattr(s, "index", s).nprobe) for s in self._searchers)

    @property
    def exhaustive_nprobe(self) -> int:
        """The nprobe from which the IVF reads every candidate row (an exact search)."""
        self._ivf_only()
        if self._cross is not None:
            return self._cross.exhaustive_nprobe
        return max(self.ivf_lists())

    def set_nprobe(self, nprobe: int) -> None:
        """IVF lists probed per query (capped where the search becomes exhaustive)."""
        self._ivf_only()
        if self._cross is not None:
            self._cross.nprobe = nprobe
        for s in self._searchers:
            set_nprobe(s, nprobe)

    def _exact(self) -> list[Searcher]:
        # an index made approximate: for the recall checks and short-list redos, on the CPU
        if self._exact_searchers is None:
            self._exact_searchers = _make_searchers(self.xs, self.bounds, "cpu", None, None, None)
        return self._exact_searchers

    def search(self, k: int, queries: np.ndarray | None = None, block_size: int = 16384,
               progress: bool = False, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """D float32 [q, k] cosine, descending, and I int64 [q, k] rows with another label.

        queries: int64 [q] rows of x (default all). Equal similarities are listed by
        ascending row (which of several rows tied for the k-th place is kept is unspecified).
        block_size: query rows per block (memory ~ block x C x k candidates, block x nprobe x k
        for the CPU IVF, blocks shrink to keep that within a budget; the torch backend splits
        it further to keep each product within its chunk budget).
        exact: search exactly even when the index is approximate (for measuring recall).
        """
        if self.device == "gpu" and k > GPU_MAX_K:
            raise MiningInputError(f"{_at(self.name)}: k={k}: FAISS on GPU allows at most {GPU_MAX_K}")
        queries = _check_query(k, queries, self.classes, self.cls, self.counts, self.name)
        n_cls, cls, xs = len(self.classes), self.cls, self.xs
        per_query = n_cls if self._cross is None or exact else max(n_cls, self._cross.nprobe)
        step = int(max(1, min(block_size, _CANDIDATE_BUDGET // (per_query * k))))
        qorder = np.argsort(cls[queries], kind="stable")  # blocks sorted by class: contiguous runs
        D = np.empty((len(queries), k), dtype=np.float32)
        I = np.empty((len(queries), k), dtype=np.int64)  # noqa: E741 (FAISS naming)
        for b0 in tqdm(range(0, len(queries), step), disable=not progress, unit="block",
                       desc=f"mining {self.name or ''}".strip()):
            sel = qorder[b0:b0 + step]
            rows = self.pos[queries[sel]]
            if self.torch is not None:
                d, i = self.torch.search_block(rows, cls[queries[sel]], k)
                missing = ()
            else:
                if self._cross is not None and not exact:
                    d, i = self._cross.search(xs[rows], cls[queries[sel]], k)
                else:
                    searchers = self._exact() if exact else self._searchers
                    d, i = _search_block(searchers, xs[rows], cls[queries[sel]], self.bounds, k)
                missing = np.flatnonzero((i < 0).any(axis=1))
            if len(missing):  # IVF probed too few vectors for these rows: redo them exactly
                d[missing], i[missing] = _search_block(self._exact(), xs[rows[missing]],
                                                       cls[queries[sel[missing]]], self.bounds, k)
                log.info("%s: %d queries had < k IVF hits and were searched exactly",
                         _at(self.name), missing.size)
            i = self.order[i]  # back to input rows, then similarity descending, ties by row
            srt = np.lexsort((i, -d), axis=1)
            D[sel], I[sel] = np.take_along_axis(d, srt, 1), np.take_along_axis(i, srt, 1)
        if self.torch is not None and self.torch.stats["fallback_fp32"]:
            log.info("%s: %d of %d queries so far could not be certified from the %s candidates "
                     "and were searched again in float32", _at(self.name),
                     self.torch.stats["fallback_fp32"], self.torch.stats["queries"],
                     self.torch.precision)
        return D, I


def search_different_label(x: np.ndarray, labels: np.ndarray, k: int, index: str = "cpu",
                           approx: str | None = None, nlist: int | None = None,
                           nprobe: int | None = None, block_size: int = 16384,
                           queries: np.ndarray | None = None, progress: bool = False,
                           name: str | None = None, torch_device=None, precision: str = "auto",
                           chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each query row i, the k rows j with labels[j] != labels[i] of highest cosine.

    x: float [n, d]; labels: int [n]; k: neighbours per query; queries: int64 [q] rows
    (default all n). index, approx, nlist, nprobe, name, torch_device, precision,
    chunk_size: see DifferentLabelIndex.
    Returns D float32 [q, k] cosine similarities, descending, and I int64 [q, k] rows of x
    (equal similarities by ascending row). Raises MiningInputError (a MidasDataError) on bad input.
    """
    # cheap checks first, so a bad k fails before the data is copied and indexed
    _, classes, cls, counts = _check_data(x, labels, name)
    _check_query(k, queries, classes, cls, counts, name)
    return DifferentLabelIndex(x, labels, index, approx, nlist, nprobe, name, torch_device,
                               precision, chunk_size).search(k, queries, block_size, progress)


def recall_at_k(I_approx: np.ndarray, I_exact: np.ndarray) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k (I arrays [q, k], -1 = none)."""
    I_approx, I_exact = np.asarray(I_approx), np.asarray(I_exact)
    if I_approx.shape != I_exact.shape or I_approx.ndim != 2:
        raise ValueError(f"recall_at_k: shapes differ or are not 2-D: {I_approx.shape} vs {I_exact.shape}")
    if I_exact.size == 0:
        return 1.0
    hits = sum(len(np.intersect1d(a[a >= 0], e)) for a, e in zip(I_approx, I_exact))
    return hits / I_exact.size
