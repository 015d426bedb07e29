"""Is a different-label k-NN result exact? The float64 oracle in torch and the checks.

`oracle_topk` computes, in float64 on any torch device, the k most similar rows with another
label for a sample of queries (chunked: memory q_block x db_block). `compare` asks of a
result what the library's tests ask (tests/test_mining.py), allowing for ties: the reported
similarities are the k best values, each reported row really has its reported similarity,
and every row strictly better than the k-th (beyond TOL) is among the reported ones.
`guarantee` checks every result row: valid ids, another label, no repeats, descending.
"""

from __future__ import annotations

import math

import numpy as np

TOL = 1e-5  # float32 cosines of unit rows against float64: agreement is ~1e-7


def unit_rows_float64(x_t):
    """x (torch, any float) as float64 rows of unit norm, on x's device."""
    import torch

    x64 = x_t.to(torch.float64)
    return x64 / x64.norm(dim=1, keepdim=True)


def oracle_topk(x64, y_t, rows: np.ndarray, k: int, q_block: int = 1024,
                db_block: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """float64 top-k cosine among rows with another label: D [q, k] desc, I [q, k]."""
    import torch

    n, dev = x64.shape[0], x64.device
    rows_t = torch.from_numpy(np.asarray(rows, np.int64)).to(dev)
    Ds, Is = [], []
    for q0 in range(0, len(rows_t), q_block):
        qi = rows_t[q0:q0 + q_block]
        xq, yq = x64[qi], y_t[qi]
        best_d = torch.full((len(qi), 0), -math.inf, dtype=torch.float64, device=dev)
        best_i = torch.full((len(qi), 0), -1, dtype=torch.int64, device=dev)
        for d0 in range(0, n, db_block):
            s = xq @ x64[d0:d0 + db_block].T
            s.masked_fill_(yq[:, None] == y_t[d0:d0 + db_block][None, :], -math.inf)
            v, i = s.topk(min(k, s.shape[1]), dim=1)
            cd, ci = torch.cat([best_d, v], 1), torch.cat([best_i, i + d0], 1)
            best_d, top = cd.topk(min(k, cd.shape[1]), dim=1)
            best_i = ci.gather(1, top)
        Ds.append(best_d.cpu())
        Is.append(best_i.cpu())
    return torch.cat(Ds).numpy(), torch.cat(Is).numpy()


def guarantee(D: np.ndarray, I: np.ndarray, y: np.ndarray, rows: np.ndarray) -> dict:
    """Counts of violations over result rows (all 0 when fine): invalid ids, a partner with
    the query's label, a repeated partner, similarities not descending."""
    n = len(y)
    invalid = int(((I < 0) | (n <= I)).sum())
    Ic = np.clip(I, 0, n - 1)
    same = int(((y[Ic] == y[rows][:, None]) & (I >= 0)).sum())
    srt = np.sort(I, axis=1)
    dup = int((srt[:, 1:] == srt[:, :-1]).sum())
    unsorted = int((np.diff(D, axis=1) > 0).sum())
    return {"rows": len(rows), "invalid_ids": invalid, "same_label": same, "duplicates": dup,
            "not_descending": unsorted}


def add_guarantee(total: dict | None, part: dict) -> dict:
    """Sum of two `guarantee` results (a search checked chunk by chunk)."""
    if total is None:
        return dict(part)
    return {key: total[key] + part[key] for key in total}


def guarantee_ok(g: dict) -> bool:
    return g["invalid_ids"] == g["same_label"] == g["duplicates"] == g["not_descending"] == 0


def compare(D: np.ndarray, I: np.ndarray, Do: np.ndarray, Io: np.ndarray, x64,
            rows: np.ndarray) -> dict:
    """A result (D, I) for the queries `rows` against the oracle's (Do, Io); x64 (torch,
    unit float64 rows) gives the true similarity of each reported row."""
    import torch

    q_t = torch.from_numpy(np.asarray(rows, np.int64)).to(x64.device)
    I_t = torch.from_numpy(np.asarray(I, np.int64)).to(x64.device)
    true = torch.einsum("qd,qkd->qk", x64[q_t], x64[I_t]).cpu().numpy()  # of the reported rows
    value_err = np.abs(D.astype(np.float64) - Do)  # k best values, in order
    row_err = np.abs(D.astype(np.float64) - true)  # each reported row has its similarity
    must = Do > Do[:, -1:] + TOL  # oracle rows strictly better than the k-th
    missed = sum(len(set(Io[r][must[r]]) - set(I[r])) for r in range(len(rows)))
    same_set = (np.sort(I, axis=1) == np.sort(Io, axis=1)).all(axis=1)
    out = {"queries": len(rows), "tol": TOL,
           "max_value_error": float(value_err.max()) if value_err.size else 0.0,
           "max_row_error": float(row_err.max()) if row_err.size else 0.0,
           "missed_strictly_better_rows": int(missed),
           "same_id_set_fraction": float(same_set.mean()) if len(rows) else 1.0}
    out["exact"] = bool(out["max_value_error"] <= TOL and out["max_row_error"] <= TOL
                        and missed == 0)
    return out
