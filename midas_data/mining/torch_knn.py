"""Exact different-label cosine k-NN in torch: chunked matrix products and top-k, any device.

The rows arrive L2-normalised and sorted by class (``xs``, ``bounds`` as `knn` builds them),
so the rows with another label than class c are at most two contiguous slices,
``xs[:bounds[c]]`` and ``xs[bounds[c+1]:]``. A query block holds queries of one class; it
is multiplied with those slices ``chunk`` rows at a time and a running top-k is kept, so
the same class is never searched (the different-label guarantee holds by construction,
no masking) and memory is bounded by ``block x chunk`` similarities, not by n^2.

Precision. ``fp32`` multiplies in float32 (TF32 switched off on CUDA) and is exact up to
float32 rounding, like FAISS. ``tf32`` and ``bf16`` first select ``candidates`` rows per
query with the fast low-precision product, then re-rank those rows with float32 dot
products. The re-rank alone is not a proof, so every query is certified: with ``eps`` a
bound on |low-precision cosine - float32 cosine| (`candidate_error_bound`), no row left
out can beat the k-th re-ranked similarity ``s_k`` when ``s_k >= a_min + eps``, where
``a_min`` is the lowest low-precision similarity among the candidates (every row left
out scored at most ``a_min``). Queries that fail the certificate are searched again in
float32. The result is therefore exact in every precision; only the speed differs.

On the CPU, ``tf32`` is emulated by truncating the mantissas to TF32's 10 bits (what the
tensor cores read), so the certificate is exercised by the tests without a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "tf32", "bf16")
# unit roundoff of the candidate product's inputs, as truncation (the larger of the two)
_INPUT_ROUNDOFF = {"fp32": 0.0, "tf32": 2.0**-10, "bf16": 2.0**-7}
_OUTPUT_ROUNDOFF = {"fp32": 0.0, "tf32": 0.0, "bf16": 2.0**-8}  # bf16 products come out in bf16
_FP32_EPS = 2.0**-24
# similarities per product (block x chunk): 64 MiB on the CPU, 1 GiB on a GPU
_PRODUCT_ELEMS = {"cpu": 1 << 24, "cuda": 1 << 28}
_RERANK_ELEMS = 1 << 26  # block x candidates x d floats gathered for the float32 re-rank


def candidate_error_bound(precision: str, d: int) -> float:
    """Upper bound on |low-precision cosine - float32 cosine| for unit rows of dimension d.

    Inputs rounded with relative error u change a dot product of unit vectors by at most
    2u + u^2 (Cauchy-Schwarz); float32 accumulation over d terms adds at most d * 2^-24 to
    each of the two products compared; a bf16 output adds its own rounding. The 1.25
    covers the float32 normalisation's slack in the norms.
    """
    u = _INPUT_ROUNDOFF[precision]
    return 1.25 * (2 * u + u * u + 2 * d * _FP32_EPS + _OUTPUT_ROUNDOFF[precision])


def default_device() -> torch.device:
    """The GPU of this torchrun rank (LOCAL_RANK modulo the visible GPUs), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


@contextlib.contextmanager
def matmul_precision(tf32: bool):
    """TF32 on or off for float32 CUDA products inside the block; the caller's setting after."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):  # torch >= 2.9: the legacy flag warns when mixed with it
        prev = m.fp32_precision
        m.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            m.fp32_precision = prev
    else:  # pragma: no cover - older torch
        prev = m.allow_tf32
        m.allow_tf32 = tf32
        try:
            yield
        finally:
            m.allow_tf32 = prev


def _truncate_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 with the low 13 mantissa bits cleared: the TF32 value a tensor core reads."""
    return (x.view(torch.int32) & ~((1 << 13) - 1)).view(torch.float32)


def _merge_topk(best_d, best_i, d, i, k: int):
    """Top-k of the union of two candidate lists [B, *] (values, row ids)."""
    cd, ci = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
    kk = min(k, cd.shape[1])
    best_d, pos = cd.topk(kk, dim=1)
    return best_d, ci.gather(1, pos)


class TorchKNN:
    """Searcher over ``xs`` (float32 [n, d], unit rows sorted by class; class c is
    ``xs[bounds[c]:bounds[c+1]]``) on one torch device.

    device: a torch device (default: this rank's GPU if any, else the CPU). precision:
    'auto' (tf32 on CUDA, fp32 elsewhere), 'fp32', 'tf32' or 'bf16' for the candidate
    pass; results are exact in all of them (module docstring). chunk_size: database rows
    per product (default: a 64 MiB product on the CPU, 1 GiB on a GPU). candidates:
    rows re-ranked per query in the low precisions (default 2k + 32 for tf32, 8k + 128 for
    bf16; at least k).
    ``stats`` counts the queries searched, re-ranked and searched again in float32.
    """

    def __init__(self, xs: np.ndarray, bounds: np.ndarray, device: str | torch.device | None = None,
                 precision: str = "auto", chunk_size: int | None = None,
                 candidates: int | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = torch.device(device) if device is not None else default_device()
        if precision == "auto":
            precision = "tf32" if self.device.type == "cuda" else "fp32"
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
        self.precision, self.chunk_size, self.candidates = precision, chunk_size, candidates
        self.bounds = np.asarray(bounds, dtype=np.int64)
        # on the CPU this shares the caller's array: no copy
        self.xb = torch.from_numpy(np.ascontiguousarray(xs, dtype=np.float32)).to(self.device)
        self.dim = int(self.xb.shape[1])
        self.eps = candidate_error_bound(precision, self.dim)
        self.xlow = None  # the database as the candidate pass reads it
        if precision == "bf16":
            self.xlow = self.xb.to(torch.bfloat16)
        elif precision == "tf32" and self.device.type != "cuda":
            self.xlow = _truncate_to_tf32(self.xb)
        self.stats = {"queries": 0, "reranked": 0, "fallback_fp32": 0}

    def describe(self) -> str:
        return f"torch on {self.device} ({self.precision})"

    # ---------------------------------------------------------------- one block
    def search_block(self, rows: np.ndarray, cq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k other-class rows of xs for the query rows ``rows`` of xs (classes ``cq``,
        sorted). Returns D float32 [B, k] and I int64 [B, k] (rows of xs), not yet sorted."""
        nb = len(rows)
        D = np.empty((nb, k), np.float32)
        I = np.empty((nb, k), np.int64)  # noqa: E741 (FAISS naming)
        cuts = np.flatnonzero(np.diff(cq)) + 1
        for r0, r1 in zip(np.r_[0, cuts], np.r_[cuts, nb]):  # one class per run
            c = int(cq[r0])
            ranges = [(0, int(self.bounds[c])), (int(self.bounds[c + 1]), int(self.bounds[-1]))]
            ranges = [(a, b) for a, b in ranges if b > a]
            q_step = self._query_step(k)
            for q0 in range(r0, r1, q_step):
                q1 = min(r1, q0 + q_step)
                qi = torch.from_numpy(np.asarray(rows[q0:q1], np.int64)).to(self.device)
                d, i = self._search_rows(qi, ranges, k)
                D[q0:q1], I[q0:q1] = d.cpu().numpy(), i.cpu().numpy()
        return D, I

    def search_unconstrained(self, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over all rows of xs, labels ignored (the query itself included): the same
        products, precision and certificate without the constraint, as a baseline."""
        D = np.empty((len(rows), k), np.float32)
        I = np.empty((len(rows), k), np.int64)  # noqa: E741 (FAISS naming)
        step, full = self._query_step(k), [(0, int(self.xb.shape[0]))]
        for q0 in range(0, len(rows), step):
            qi = torch.from_numpy(np.asarray(rows[q0:q0 + step], np.int64)).to(self.device)
            d, i = self._search_rows(qi, full, k)
            D[q0:q0 + step], I[q0:q0 + step] = d.cpu().numpy(), i.cpu().numpy()
        return D, I

    def _query_step(self, k: int) -> int:
        per_q = max(self.dim * self._n_candidates(k), 1)
        return int(max(1, min(4096 if self.device.type == "cuda" else 512, _RERANK_ELEMS // per_q)))

    def _n_candidates(self, k: int) -> int:
        if self.precision == "fp32":
            return k
        # enough rows that the k-th re-ranked similarity usually clears the a_min + eps bar:
        # bf16's eps is ~10x TF32's, so it needs a deeper list
        return max(k, self.candidates or (2 * k + 32 if self.precision == "tf32" else 8 * k + 128))

    def _chunk(self, n_queries: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        budget = _PRODUCT_ELEMS["cuda" if self.device.type == "cuda" else "cpu"]
        return max(1024, budget // max(n_queries, 1))

    def _fp32(self):
        return matmul_precision(False) if self.device.type == "cuda" else contextlib.nullcontext()

    def _topk(self, xq, xdb, ranges, k: int, tf32: bool):
        """Top-k of xq @ xdb[range].T over the ranges, chunk by chunk (values in xq's dtype
        family, ids global rows of xs)."""
        nq = xq.shape[0]
        best_d = torch.empty((nq, 0), dtype=torch.float32, device=self.device)
        best_i = torch.empty((nq, 0), dtype=torch.int64, device=self.device)
        step = self._chunk(nq)
        mode = matmul_precision(tf32) if self.device.type == "cuda" else contextlib.nullcontext()
        with mode:
            for a, b in ranges:
                for c0 in range(a, b, step):
                    c1 = min(b, c0 + step)
                    s = xq @ xdb[c0:c1].T
                    v, j = s.topk(min(k, c1 - c0), dim=1)
                    best_d, best_i = _merge_topk(best_d, best_i, v.float(), j + c0, k)
        return best_d, best_i

    def _search_rows(self, qi: torch.Tensor, ranges, k: int):
        xq = self.xb[qi]
        self.stats["queries"] += len(qi)
        if self.precision == "fp32":
            return self._topk(xq, self.xb, ranges, k, tf32=False)
        kc = self._n_candidates(k)
        low = self.xlow if self.xlow is not None else self.xb
        approx, cand = self._topk(low[qi], low, ranges, kc, tf32=self.device.type == "cuda")
        # float32 re-rank of the candidates
        with self._fp32():
            exact = torch.bmm(self.xb[cand], xq[:, :, None])[:, :, 0]
        s, pos = exact.topk(k, dim=1)
        ids = cand.gather(1, pos)
        self.stats["reranked"] += len(qi)
        # certificate: rows left out scored <= a_min in low precision, so <= a_min + eps in fp32
        total = sum(b - a for a, b in ranges)
        if cand.shape[1] < total:
            a_min = approx[:, -1]
            bad = torch.nonzero(s[:, -1] < a_min + self.eps).flatten()
            if len(bad):
                self.stats["fallback_fp32"] += len(bad)
                fd, fi = self._topk(xq[bad], self.xb, ranges, k, tf32=False)
                s[bad], ids[bad] = fd, fi
        return s, ids

