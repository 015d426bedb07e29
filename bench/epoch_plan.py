"""Scale check for midas_data.stream.epoch_plan: matched_order on n=1e6 anchors, k=16 neighbours.

Run: .venv/bin/python bench/epoch_plan.py [n] [k]
"""

from __future__ import annotations

import sys
import time

import numpy as np

from midas_data.stream.epoch_plan import assign_partners, epoch_order, matched_order, partner_rng


def main(n: int = 1_000_000, k: int = 16) -> None:
    rng = np.random.default_rng(0)
    neighbours = rng.integers(0, n, size=(n, k), dtype=np.int64)
    neighbours[rng.random((n, k)) < 0.05] = -1  # some missing neighbours
    probs = rng.random((n, k))

    t = time.perf_counter()
    epoch_order(n, seed=0, epoch=0)
    print(f"epoch_order        n={n}: {time.perf_counter() - t:.3f} s")

    for name, p in (("uniform", None), ("probs", probs)):
        t = time.perf_counter()
        order, partner_of = matched_order(n, neighbours, seed=0, epoch=0, probs=p)
        dt = time.perf_counter() - t
        matched = float(np.mean(partner_of >= 0))
        print(f"matched_order {name:8s} n={n} k={k}: {dt:.3f} s, matched {matched:.2%}")

    labels = rng.integers(0, 6, size=64)
    t = time.perf_counter()
    for i in range(1000):
        assign_partners(labels, 2, partner_rng(0, 0, 64 * i))
    print(f"assign_partners    b=64 M=2: {(time.perf_counter() - t) * 1e3:.3f} ms per 1000 batches")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
