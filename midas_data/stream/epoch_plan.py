"""Epoch plans: which anchors form which batch, on which rank and worker, with which partners.

Every function here is a pure function of its arguments (no global RNG, no I/O), in the
spirit of MosaicML Streaming's shuffles: the plan of an epoch is recomputed identically
by every rank and DataLoader worker from ``(seed, epoch)``.

Vocabulary. An *anchor* is an aligned sample, named by its row ``0..n-1`` in the split.
The *order* is a permutation of the rows. A *global step* takes ``world_size * batch_size``
consecutive items of the order; rank ``r`` gets items ``[r*B, (r+1)*B)`` of the step. The
final step with fewer items is split as evenly as possible (real sizes differ by at most
one), so every rank sees the same number of batches ``K = ceil(R / (W*B))`` and no item is
lost or duplicated; ``drop_last`` drops it. A rank whose share of the final step is below
``min(MIN_ROWS, B)`` rows (0 or 1 item: an empty batch gives a NaN mean loss, a batch of one
breaks BatchNorm) is padded with *fill rows*, repeats of items from the start of the order
(:func:`fill_positions`), which the stream marks invalid; whether to pad is the stream's
``last_batch`` mode (:data:`LAST_BATCH_MODES`).

Resume state: ``(seed, epoch, offset)``, ``offset`` = items of the order already consumed
(a whole number of global steps of the world size that consumed them). Any world size or
worker count continues with ``order[offset:]``, re-split into steps from ``offset``.

Partner randomness of a batch comes from :func:`partner_rng` seeded by the global position
of the batch's first item, so the same global batch gets the same partners on any world
size or worker count.

What the stream (`midas_data.stream.dataset`) calls on every pass: its partner policy's
order (:func:`epoch_order`, or :func:`matched_order` for the paired policies), then
:func:`batch_spans` for its rank (and :func:`fill_positions` for the rows that pad its
final batch), :func:`worker_groups` for its DataLoader worker (groups of consecutive
batches that cross the worker queue as one item), :func:`offset_after_step`
for the resume state saved with each batch, and per batch
:func:`partner_rng` and :func:`assign_partners`. :func:`num_batches` is its ``len``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")

_ORDER_TAG = 0x0D3E
_PARTNER_TAG = 0xBA7C
_MATCH_TAG = 0x3A7C

# How the final, partial global step is delivered (the stream's ``last_batch`` option):
# "pad" (spread evenly, fill rows top every batch up to MIN_ROWS), "drop" (left out) or
# "uneven" (spread evenly, unpadded: batches of one, or empty, are possible).
LAST_BATCH_MODES = ("pad", "drop", "uneven")
MIN_ROWS = 2  # the smallest padded batch: BatchNorm in training mode needs two rows


def _check_nonneg(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Global order of the epoch: a uniform random permutation of ``0..n-1``, int64 [n].

    Deterministic for ``(seed, epoch)``; a different permutation per epoch and per seed.
    A plain global permutation is used because readers have random access by byte offset,
    so shuffle quality does not degrade when the split lives in few shards.
    """
    _check_nonneg(n=n, seed=seed, epoch=epoch)
    rng = np.random.default_rng([int(seed), int(epoch), _ORDER_TAG])
    return rng.permutation(int(n)).astype(np.int64)


def num_batches(remaining: int, batch_size: int, world_size: int, drop_last: bool = False) -> int:
    """Batches every rank gets for ``remaining`` items: ``ceil`` (or ``floor`` with drop_last)
    of ``remaining / (world_size * batch_size)``."""
    _check_nonneg(remaining=remaining)
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size}, {world_size}")
    step = batch_size * world_size
    return remaining // step if drop_last else -(-remaining // step)


def batch_spans(
    n: int,
    offset: int,
    batch_size: int,
    world_size: int,
    rank: int,
    drop_last: bool = False,
    *,
    pair_aligned: bool = False,
) -> np.ndarray:
    """Global ``[start, stop)`` positions in the order of ``rank``'s batches, int64 [K, 2].

    Real items only; the final span may be short or empty (see :func:`fill_positions`).
    ``pair_aligned=True`` splits the final partial step in units of two items (sizes then
    differ by at most two; the last ranks take the extra units) so that adjacent pairs at
    even positions, as laid out by :func:`matched_order`, are never split when
    ``batch_size`` and ``offset`` are even.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    full, bounds = _final_step(n, offset, batch_size, world_size, pair_aligned)
    starts = offset + np.arange(full, dtype=np.int64) * batch_size * world_size + rank * batch_size
    spans = np.stack([starts, starts + batch_size], axis=1).reshape(-1, 2)
    if bounds is not None and not drop_last:
        spans = np.concatenate([spans, bounds[None, rank : rank + 2]])
    return spans


def _final_step(n: int, offset: int, batch_size: int, world_size: int,
                pair_aligned: bool) -> tuple[int, np.ndarray | None]:
    """Full global steps of ``order[offset:]``, and the final partial step's rank bounds
    (int64 [W + 1]: rank r gets ``[bounds[r], bounds[r+1])``), None when there is none."""
    _check_nonneg(n=n, offset=offset)
    if offset > n:
        raise ValueError(f"offset {offset} is past the end of the order (n={n})")
    remaining = n - offset
    full = num_batches(remaining, batch_size, world_size, drop_last=True)
    rest = remaining - full * batch_size * world_size
    if not rest:
        return full, None
    grain = 2 if pair_aligned else 1
    per, extra = divmod(-(-rest // grain), world_size)
    ranks = np.arange(world_size)
    # The first `extra` ranks take one unit more; in units of two the last ranks do, so the
    # rank that ends with an odd leftover (a unit of one) is one that took the extra unit.
    more = ranks >= world_size - extra if pair_aligned else ranks < extra
    units = np.concatenate([[0], np.cumsum(per + more)])
    return full, np.minimum(offset + full * batch_size * world_size + grain * units, n)


def fill_positions(
    n: int,
    offset: int,
    batch_size: int,
    world_size: int,
    rank: int,
    *,
    pair_aligned: bool = False,
    min_rows: int = MIN_ROWS,
) -> np.ndarray:
    """Positions in the order of the fill rows that pad ``rank``'s final batch, int64 [f].

    The final partial step (see :func:`batch_spans`) gives rank r ``real_r`` items; its
    batch is padded with ``max(0, min(min_rows, batch_size) - real_r)`` fill rows, so no
    rank gets an empty batch or (for ``batch_size >= 2``) a batch of one, and the ranks'
    padded sizes still differ by at most one (two with ``pair_aligned``). Fill rows repeat
    items from the start of the epoch's order: counting the fill slots of all ranks in
    rank order, slot g is position ``g % n``, so they are real samples of the split,
    deterministic for (seed, epoch), and distinct from the final step's items unless the
    split is tiny. Empty when there is no partial final step.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if min_rows < 1:
        raise ValueError(f"min_rows must be >= 1, got {min_rows}")
    _, bounds = _final_step(n, offset, batch_size, world_size, pair_aligned)
    if bounds is None:
        return np.empty(0, dtype=np.int64)
    fills = np.maximum(min(int(min_rows), int(batch_size)) - np.diff(bounds), 0)
    first = int(fills[:rank].sum())
    return (first + np.arange(int(fills[rank]), dtype=np.int64)) % int(n)


def offset_after_step(n: int, offset: int, batch_size: int, world_size: int, step: int) -> int:
    """Items of the order consumed once every rank has finished global step ``step``
    (0-based) of a pass that started at ``offset``: the resume offset saved with that
    step's batches (DDP runs the ranks in lockstep). The final step ends at ``n``."""
    _check_nonneg(n=n, offset=offset, step=step)
    return min(int(offset) + (int(step) + 1) * int(batch_size) * int(world_size), int(n))


def worker_batches(batches: Sequence[T], worker_id: int, num_workers: int,
                   group_size: int = 1) -> list[T]:
    """Batches of one DataLoader worker, in the order it builds them: the concatenation of
    its :func:`worker_groups` (with ``group_size=1``: batch k goes to worker
    ``k % num_workers``).

    The stream passes ``range(K)`` (the indices of its rank's :func:`batch_spans`) and
    builds batch k from ``spans[k]``.
    ``num_workers=0`` (in-process loading) counts as one worker. torch's DataLoader polls
    workers round-robin, so the rank's output order equals ``batches`` for any count.
    """
    return [batches[k] for group in worker_groups(len(batches), worker_id, num_workers, group_size)
            for k in group]


def group_bounds(num_batches_: int, num_workers: int, group_size: int) -> np.ndarray:
    """Where the transfer groups of a rank's ``num_batches_`` batches start and end, int64
    [G + 1]: group j holds batches ``[bounds[j], bounds[j+1])`` and goes to worker
    ``j % num_workers``, which sends it across the worker queue as one item.

    Groups of round r (groups ``r*workers ... (r+1)*workers - 1``) hold
    ``min(group_size, 2**r)`` batches: the first batch of every worker comes alone, so the
    first batch is not held back while a worker builds a whole group, and the groups grow
    to ``group_size``. Consecutive groups cover consecutive batches, so polling the workers
    in turn yields the batches in order."""
    _check_nonneg(num_batches=num_batches_)
    workers, size = max(int(num_workers), 1), int(group_size)
    if size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    sizes: list[int] = []
    total = 0
    while total < num_batches_:
        sizes.append(min(size, 1 << min(len(sizes) // workers, 30)))
        total += sizes[-1]
    ends = np.minimum(np.cumsum(sizes, dtype=np.int64), num_batches_)
    return np.concatenate([np.zeros(1, np.int64), ends])


def worker_groups(num_batches_: int, worker_id: int, num_workers: int,
                  group_size: int = 1) -> list[range]:
    """The groups of batch indices (``0..num_batches_-1``) that one DataLoader worker
    builds and sends, one queue item per group (:func:`group_bounds`)."""
    workers = max(int(num_workers), 1)
    if not 0 <= worker_id < workers:
        raise ValueError(f"worker_id must be in [0, {workers}), got {worker_id}")
    bounds = group_bounds(num_batches_, workers, group_size)
    return [range(int(bounds[j]), int(bounds[j + 1])) for j in range(worker_id, len(bounds) - 1, workers)]


def partner_rng(seed: int, epoch: int, first_item_offset: int) -> np.random.Generator:
    """RNG of the batch whose first item sits at global position ``first_item_offset`` of
    the epoch's order: independent of world size, rank and worker count."""
    _check_nonneg(seed=seed, epoch=epoch, first_item_offset=first_item_offset)
    return np.random.default_rng([int(seed), int(epoch), int(first_item_offset), _PARTNER_TAG])


def assign_partners(
    labels: np.ndarray, num_modalities: int, rng: np.random.Generator
) -> np.ndarray:
    """In-batch partner of every row for every swapped modality, int64 [b, M].

    ``labels``: int64 [b], the batch's labels. ``out[i, m]`` is another row of the batch
    whose label differs from row i's; modality m of that row replaces row i's modality m.
    One permutation-like choice serves every modality (the paper's A = (x1_i, x2_j),
    B = (x1_j, x2_i)): rows are grouped by label (random class order, random order within a
    class) and each row is matched to the row a random shift ``s`` further on (cyclically),
    with ``maxc <= s <= b - maxc`` (``maxc`` = largest class count). When no class holds more
    than half the batch this is a permutation with every label different; otherwise rows of
    the majority class that hit their own class fall back to a uniform different-label row.
    Rows with no different-label row in the batch (one class, or b == 1) get ``-1`` and thus
    no misaligned sample; count them with ``(out[:, 0] < 0).sum()``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    b = labels.size
    out = np.full((b, int(num_modalities)), -1, dtype=np.int64)
    if b < 2:
        return out
    inv, counts = _classes(labels)
    maxc = int(counts.max())
    if maxc == b:
        return out
    perm = rng.permutation(b)
    class_rank = rng.permutation(counts.size)
    grouped = perm[np.argsort(class_rank[inv[perm]], kind="stable")]
    shift = int(rng.integers(maxc, b - maxc + 1)) if 2 * maxc <= b else maxc
    partner = np.empty(b, dtype=np.int64)
    partner[grouped] = np.concatenate((grouped[shift:], grouped[:shift]))  # np.roll(-shift), 0 < shift < b
    rows = np.flatnonzero(labels[partner] == labels)
    if rows.size:  # uniform pick among the b - count[c] rows of other classes
        by_class = np.argsort(inv, kind="stable")
        start = np.cumsum(counts) - counts
        c = inv[rows]
        pick = rng.integers(0, b - counts[c])
        partner[rows] = by_class[np.where(pick < start[c], pick, pick + counts[c])]
    out[:] = partner[:, None]
    return out


def assign_partners_many(labels: Sequence[np.ndarray], num_modalities: int,
                         rngs: Sequence[np.random.Generator]) -> list[np.ndarray]:
    """:func:`assign_partners` of several batches at once, bit for bit:
    ``out[j] == assign_partners(labels[j], num_modalities, rngs[j])``.

    The random draws are made batch by batch, the same calls on the same generator in the
    same order; the rest (classes, grouping by class, the shift) is vectorised across the
    batches. A batch where one class holds more than half the rows (whose fallback draws
    depend on the shifted result) is assigned on its own.
    """
    m = int(num_modalities)
    labels = [np.asarray(y, dtype=np.int64).reshape(-1) for y in labels]
    sizes = np.array([y.size for y in labels], dtype=np.int64)
    n = len(labels)
    every = np.concatenate(labels) if n else np.empty(0, np.int64)
    if not every.size or int(every.min()) < 0 or (int(every.max()) + 1) * n > _BINCOUNT_LABELS:
        return [assign_partners(y, m, rng) for y, rng in zip(labels, rngs)]
    width = int(every.max()) + 1
    batch_of_row = np.repeat(np.arange(n), sizes)
    counts = np.bincount(batch_of_row * width + every, minlength=n * width).reshape(n, width)
    present = counts > 0
    inv = (np.cumsum(present, axis=1) - 1)[batch_of_row, every]  # class index within the batch
    num_classes, maxc = present.sum(axis=1), counts.max(axis=1)
    out: list[np.ndarray | None] = [None] * n
    perms, ranks, shifts, simple = [], [], [], []
    for j, rng in enumerate(rngs):
        b, top = int(sizes[j]), int(maxc[j])
        if b < 2 or top == b:
            out[j] = np.full((b, m), -1, dtype=np.int64)
        elif 2 * top > b:  # a majority class: its fallback draws follow the shifted rows
            out[j] = assign_partners(labels[j], m, rng)
        else:
            perms.append(rng.permutation(b))
            ranks.append(rng.permutation(int(num_classes[j])))
            shifts.append(int(rng.integers(top, b - top + 1)))
            simple.append(j)
    if simple:
        idx = np.array(simple)
        b = sizes[idx]
        first_row = (np.cumsum(sizes) - sizes)[idx]  # of each simple batch in `every`
        seg_start = np.cumsum(b) - b  # of each simple batch among the simple batches' rows
        seg = np.repeat(np.arange(idx.size), b)
        perm = np.concatenate(perms) + np.repeat(first_row, b)  # rows of `every`, batch by batch
        rank_start = np.cumsum(num_classes[idx]) - num_classes[idx]
        key = np.concatenate(ranks)[rank_start[seg] + inv[perm]]  # each row's class rank
        grouped = perm[np.lexsort((key, seg))]  # stable: equal ranks keep the permutation's order
        local = np.arange(seg.size) - seg_start[seg]
        partner = np.empty(every.size, dtype=np.int64)
        partner[grouped] = grouped[seg_start[seg] + (local + np.array(shifts)[seg]) % b[seg]]
        for t, j in enumerate(simple):
            lo = int(first_row[t])
            rows = partner[lo:lo + int(b[t])] - lo
            out[j] = np.repeat(rows[:, None], m, axis=1)
    return out  # type: ignore[return-value]


# Labels below this use a bincount to find the batch's classes (a table of this many
# counts at most); larger or negative labels take np.unique, which gives the same classes.
_BINCOUNT_LABELS = 1 << 16


def _classes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(labels, return_inverse=True, return_counts=True)[1:]`` for a non-empty
    int64 vector: each row's class index (classes in increasing label order) and each
    class's row count, by a bincount when the labels are small non-negative integers (the
    class indices of a dataset; a fraction of np.unique's cost per batch)."""
    if int(labels.min()) >= 0 and int(labels.max()) < _BINCOUNT_LABELS:
        full = np.bincount(labels)
        present = full > 0
        return (np.cumsum(present) - 1)[labels], full[present]
    _, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return inv.reshape(-1), counts


def matched_order(
    n: int,
    neighbours: np.ndarray,
    seed: int,
    epoch: int,
    probs: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Epoch order that puts mined partners next to each other: a random greedy matching.

    ``neighbours``: int64 [n, k] row indices of each anchor's mined partners, ``-1`` = none
    (self-loops are ignored). ``probs``: float [n, k] or None, sampling weights of the
    neighbours (renormalised over the still-free ones, in float32 relative to the row's
    largest weight; weight 0 = never chosen; None = uniform). Returns ``order`` int64 [n], a permutation of ``0..n-1``, and ``partner_of``
    int64 [n], symmetric (``partner_of[partner_of[i]] == i``), ``-1`` for unmatched anchors
    (they get an in-batch random partner instead). Each pair has one member in the other's
    neighbour list.

    Matching: anchors are shuffled into a walk order (their priority). In rounds, every
    unmatched anchor with a free neighbour proposes one, sampled by ``probs``; an edge is
    accepted when it is the earliest-walk proposal touching both its endpoints (so the
    earliest proposal always wins and every round makes progress). Rounds repeat until no
    unmatched anchor has a free neighbour, so the matching is maximal.

    Layout: pairs and leftover anchors (grouped two by two) form units of two items, the
    units are shuffled, and an odd leftover goes last. So every pair starts at an even
    position and never straddles a batch boundary when the batch size and resume offset
    are even (use ``pair_aligned=True`` in :func:`batch_spans` for the final step).
    """
    _check_nonneg(n=n, seed=seed, epoch=epoch)
    nb = np.asarray(neighbours, dtype=np.int64)
    if nb.ndim != 2 or nb.shape[0] != n:
        raise ValueError(f"neighbours must have shape [n={n}, k], got {nb.shape}")
    if nb.size and (nb.min() < -1 or nb.max() >= n):
        raise ValueError(f"neighbours must hold rows in [0, {n}) or -1")
    valid = (nb >= 0) & (nb != np.arange(n, dtype=np.int64)[:, None])
    weight = None  # uniform
    if probs is not None:
        p = np.asarray(probs, dtype=np.float64)
        if p.shape != nb.shape:
            raise ValueError(f"probs must have the shape of neighbours {nb.shape}, got {p.shape}")
        if not np.all(np.isfinite(p)) or np.any(p < 0):
            raise ValueError("probs must be finite and >= 0")
        weight = (p / np.maximum(p.max(axis=1, keepdims=True), 1e-300)).astype(np.float32)
        valid &= weight > 0
    # int32 rows with sentinel n for "no neighbour": taken[n] is always True
    idx = np.where(valid, nb, n).astype(np.int32 if n < 2**31 - 1 else np.int64)
    taken = np.zeros(n + 1, dtype=bool)
    taken[n] = True
    partner_of = np.full(n, -1, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(epoch), _MATCH_TAG])
    walk = rng.permutation(n)  # candidates stay in walk order: earlier = higher priority
    cand = walk[valid.any(axis=1)[walk]]
    del valid
    while cand.size:
        nbc = idx[cand]
        free = ~taken[nbc]
        if weight is None:
            cum = np.cumsum(free, axis=1, dtype=np.int32)
            total = cum[:, -1]
            u = np.floor(rng.random(cand.size) * total).astype(np.int32)
        else:
            cum = np.cumsum(np.where(free, weight[cand], 0), axis=1, dtype=np.float32)
            total = cum[:, -1]
            u = (rng.random(cand.size, dtype=np.float32) * total).astype(np.float32)
            u = np.minimum(u, np.nextafter(total, np.float32(0)))
        keep = total > 0
        cand, nbc, cum, u = cand[keep], nbc[keep], cum[keep], u[keep]
        if not cand.size:
            break
        target = nbc[np.arange(cand.size), np.argmax(cum > u[:, None], axis=1)].astype(np.int64)
        _accept(cand, target, partner_of, taken)
        cand = cand[~taken[cand]]
    return _pair_layout(partner_of, rng), partner_of


def _accept(src: np.ndarray, dst: np.ndarray, partner_of: np.ndarray, taken: np.ndarray) -> None:
    """Accept proposals ``src[e] -> dst[e]`` (listed earliest proposer first) whose edge is
    the earliest one touching both endpoints; writes ``partner_of`` and ``taken`` in place."""
    edges = np.arange(src.size)
    best = np.full(partner_of.size, src.size, dtype=np.int64)
    np.minimum.at(best, dst, edges)  # earliest proposal received by each vertex
    best[src] = np.minimum(best[src], edges)  # ... or its own proposal, if earlier
    bs, bd = best[src], best[dst]
    other_s = np.where(src[bs] == src, dst[bs], src[bs])  # other end of src's best edge
    other_d = np.where(src[bd] == dst, dst[bd], src[bd])
    ok = (other_s == dst) & (other_d == src)  # a mutual proposal may pass twice: same pair
    partner_of[src[ok]] = dst[ok]
    partner_of[dst[ok]] = src[ok]
    taken[src[ok]] = True
    taken[dst[ok]] = True


def _pair_layout(partner_of: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Order made of shuffled two-item units (pairs, then leftovers two by two); an odd
    leftover goes last. int64 [n]."""
    n = partner_of.size
    first = np.flatnonzero(partner_of > np.arange(n))
    second = partner_of[first]
    flip = rng.random(first.size) < 0.5
    first, second = np.where(flip, second, first), np.where(flip, first, second)
    single = rng.permutation(np.flatnonzero(partner_of < 0))
    even = single.size - single.size % 2
    units = np.concatenate([np.stack([first, second], axis=1), single[:even].reshape(-1, 2)])
    units = units[rng.permutation(units.shape[0])]
    return np.concatenate([units.reshape(-1), single[even:]]).astype(np.int64)
