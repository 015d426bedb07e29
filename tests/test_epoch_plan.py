"""Property tests for midas_data.stream.epoch_plan: exactly-once delivery, resume, partners."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from midas_data.stream.epoch_plan import (
    MIN_ROWS,
    assign_partners,
    assign_partners_many,
    batch_spans,
    epoch_order,
    fill_positions,
    group_bounds,
    matched_order,
    num_batches,
    offset_after_step,
    partner_rng,
    worker_batches,
    worker_groups,
)

N_VALUES = (0, 1, 2, 5, 17, 100, 101)
# Sizes whose final step leaves fewer items than ranks (13, 14, 25, 26 with B=4, W=3; 15 with
# B=7, W=2) or a rank a batch of one (17 with B=4, W=3; 9 with B=4, W=2; 29 with B=7, W=2),
# besides those of N_VALUES; `test_last_step_cases_cover_the_traps` checks the coverage.
LAST_STEP_N = (*N_VALUES, 9, 13, 14, 15, 25, 26, 29)
BATCH_SIZES = (1, 4, 7)
WORLD_SIZES = (1, 2, 3)
WORKER_COUNTS = (0, 1, 2, 3)
GROUP_SIZES = (1, 2, 3, 16)  # batches per worker-queue item (MidasLoader's batches_per_transfer)
FAST = settings(max_examples=60, deadline=None)


# The layouts the stream builds from `batch_spans` (its rank's batches) and `worker_batches`
# (its worker's share), written out for the properties below.
def rank_batches(order: np.ndarray, offset: int, batch_size: int, world_size: int, rank: int,
                 drop_last: bool = False, *, pair_aligned: bool = False) -> list[np.ndarray]:
    """``rank``'s batches of ``order[offset:]`` (K arrays; the last may be short or empty)."""
    spans = batch_spans(len(order), offset, batch_size, world_size, rank, drop_last,
                        pair_aligned=pair_aligned)
    return [order[lo:hi] for lo, hi in spans]


def global_batches(order: np.ndarray, offset: int, batch_size: int, world_size: int,
                   drop_last: bool = False, *, pair_aligned: bool = False) -> list[np.ndarray]:
    """All ranks' batches in global order, step-major and rank-minor (K * world_size)."""
    per_rank = [rank_batches(order, offset, batch_size, world_size, r, drop_last,
                             pair_aligned=pair_aligned) for r in range(world_size)]
    return [batches[k] for k in range(len(per_rank[0])) for batches in per_rank]


def remaining_items(order: np.ndarray, offset: int, batch_size: int, world_size: int,
                    drop_last: bool = False, *, pair_aligned: bool = False) -> np.ndarray:
    """Concatenation of :func:`global_batches`: equals ``order[offset:]`` unless drop_last."""
    batches = global_batches(order, offset, batch_size, world_size, drop_last, pair_aligned=pair_aligned)
    return np.concatenate(batches).astype(np.int64) if batches else np.empty(0, np.int64)


def assert_exactly_once(items: np.ndarray, expected: np.ndarray, what: str) -> None:
    items = np.asarray(items, dtype=np.int64)
    uniq, counts = np.unique(items, return_counts=True)
    assert not np.any(counts > 1), f"Duplicate samples ({what}): {uniq[counts > 1][:10]}"
    missing = np.setdiff1d(expected, items)
    assert missing.size == 0, f"Missing samples ({what}): {missing[:10]}"
    extra = np.setdiff1d(items, expected)
    assert extra.size == 0, f"Unexpected samples ({what}): {extra[:10]}"


def round_robin(per_worker: list[list[np.ndarray]]) -> list[np.ndarray]:
    """What torch's DataLoader yields: poll workers in turn, skipping exhausted ones."""
    out = []
    for k in range(max((len(w) for w in per_worker), default=0)):
        out.extend(w[k] for w in per_worker if k < len(w))
    return out


def read_rank(order, offset, b, world, rank, workers, group: int = 1) -> list[np.ndarray]:
    """``rank``'s batches as a DataLoader delivers them when each worker sends groups of
    ``group`` batches as one queue item: it polls the workers' items in turn."""
    batches = rank_batches(order, offset, b, world, rank)
    per_worker = [[[batches[k] for k in g] for g in worker_groups(len(batches), w, workers, group)]
                  for w in range(max(workers, 1))]
    return [x for item in round_robin(per_worker) for x in item]


def padded_rank_batches(order: np.ndarray, offset: int, batch_size: int, world_size: int,
                        rank: int, *, pair_aligned: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """``rank``'s batches as the stream builds them with ``last_batch="pad"``: (rows, valid),
    the final batch's real items followed by its fill rows."""
    n = len(order)
    spans = batch_spans(n, offset, batch_size, world_size, rank, pair_aligned=pair_aligned)
    fill = fill_positions(n, offset, batch_size, world_size, rank, pair_aligned=pair_aligned)
    out = []
    for k, (lo, hi) in enumerate(spans):
        extra = fill if k == len(spans) - 1 else fill[:0]
        rows = np.concatenate([order[lo:hi], order[extra]]).astype(np.int64)
        out.append((rows, np.arange(len(rows)) < hi - lo))
    return out


def read_padded_rank(order, offset, b, world, rank, workers, *, pair_aligned=False):
    batches = padded_rank_batches(order, offset, b, world, rank, pair_aligned=pair_aligned)
    return round_robin([worker_batches(batches, w, workers) for w in range(max(workers, 1))])


def check_padded_epoch(order: np.ndarray, offset: int, b: int, world: int, workers: int,
                       case: str, *, pair_aligned: bool = False) -> list[list[tuple]]:
    """The last-step contract of ``last_batch="pad"`` for one (offset, B, W, workers): every
    real item of ``order[offset:]`` exactly once and in order, equal batch counts, no batch
    empty or (for B >= 2) of one row, fill rows only in the final batch, after its real rows,
    and only repeats of the split's items; the final step's real sizes (and padded sizes)
    differ by at most one (two in units of pairs). Returns the ranks' batches."""
    per_rank = [read_padded_rank(order, offset, b, world, r, workers, pair_aligned=pair_aligned)
                for r in range(world)]
    counts = [len(x) for x in per_rank]
    assert len(set(counts)) == 1 and counts[0] == num_batches(len(order) - offset, b, world), (
        f"Unequal batch counts {counts} ({case})")
    smallest = min(MIN_ROWS, b)
    real = []
    for k in range(counts[0]):
        for r in range(world):
            rows, valid = per_rank[r][k]
            assert len(rows) >= smallest, f"Batch of {len(rows)} rows on rank {r} ({case})"
            assert len(rows) <= max(b, smallest), f"Oversized batch ({case})"
            nv = int(valid.sum())
            assert np.all(valid[:nv]) and not np.any(valid[nv:]), f"Fill rows before real rows ({case})"
            if k < counts[0] - 1:
                assert nv == len(rows) == b, f"Fill or short batch before the end ({case})"
            assert np.all(np.isin(rows[~valid], order)), f"Fill row outside the split ({case})"
            real.append(rows[valid])
    got = np.concatenate(real) if real else np.empty(0, np.int64)
    assert_exactly_once(got, order[offset:], case)
    assert np.array_equal(got, order[offset:]), f"Incorrect sample order ({case})"
    if counts[0]:
        last = [per_rank[r][-1] for r in range(world)]
        spread = 2 if pair_aligned else 1
        reals = [int(v.sum()) for _, v in last]
        sizes = [len(rows) for rows, _ in last]
        assert max(reals) - min(reals) <= spread, f"Uneven final step {reals} ({case})"
        assert max(sizes) - min(sizes) <= spread, f"Uneven padded final step {sizes} ({case})"
    return per_rank


# ---------------------------------------------------------------- epoch_order


@FAST
@given(st.integers(0, 3000), st.integers(0, 2**32), st.integers(0, 1000))
def test_epoch_order_is_permutation(n: int, seed: int, epoch: int) -> None:
    order = epoch_order(n, seed, epoch)
    assert order.dtype == np.int64 and order.shape == (n,)
    assert_exactly_once(order, np.arange(n), "epoch_order")


@FAST
@given(st.integers(2, 500), st.integers(0, 2**32), st.integers(0, 1000))
def test_epoch_order_is_deterministic(n: int, seed: int, epoch: int) -> None:
    assert np.array_equal(epoch_order(n, seed, epoch), epoch_order(n, seed, epoch)), (
        "Incorrect sample order: same (seed, epoch) gave two orders"
    )


def test_epoch_order_differs_across_epochs_and_seeds() -> None:
    orders = {(s, e): epoch_order(100, s, e) for s in range(3) for e in range(5)}
    for (a, oa), (b, ob) in itertools.combinations(orders.items(), 2):
        assert not np.array_equal(oa, ob), f"Same order for (seed, epoch) {a} and {b}"
    # a shuffle, not a rotation: few fixed relative positions between epochs
    assert np.mean(orders[0, 0] == orders[0, 1]) < 0.1


def test_epoch_order_rejects_negative_arguments() -> None:
    with pytest.raises(ValueError):
        epoch_order(10, -1, 0)


# ---------------------------------------------------------------- batching across ranks


def test_exactly_once_and_equal_batch_counts() -> None:
    for n, b, world, workers in itertools.product(
        N_VALUES, BATCH_SIZES, WORLD_SIZES, WORKER_COUNTS
    ):
        case = f"n={n} B={b} W={world} workers={workers}"
        order = epoch_order(n, 7, 3)
        expected_k = num_batches(n, b, world)
        assert expected_k == -(-n // (b * world))
        seen, counts, final_sizes = [], [], []
        for rank in range(world):
            batches = rank_batches(order, 0, b, world, rank)
            counts.append(len(batches))
            assert all(len(x) <= b for x in batches), f"Oversized batch ({case})"
            assert all(len(x) == b for x in batches[:-1]), f"Short batch before the end ({case})"
            final_sizes.extend(len(x) for x in batches[-1:])
            for w in range(max(workers, 1)):
                for x in worker_batches(batches, w, workers):
                    seen.extend(x.tolist())
        assert len(set(counts)) == 1 and counts[0] == expected_k, (
            f"Unequal batch counts {counts} ({case})"
        )
        assert_exactly_once(np.array(seen, dtype=np.int64), np.arange(n), case)
        if final_sizes:
            assert max(final_sizes) - min(final_sizes) <= 1, (
                f"Uneven final step {final_sizes} ({case})"
            )


def test_drop_last_drops_only_the_partial_step() -> None:
    for n, b, world in itertools.product(N_VALUES, BATCH_SIZES, WORLD_SIZES):
        order = epoch_order(n, 1, 1)
        kept = (n // (b * world)) * b * world
        counts = {len(rank_batches(order, 0, b, world, r, drop_last=True)) for r in range(world)}
        assert counts == {n // (b * world)}, f"Unequal batch counts {counts}"
        got = remaining_items(order, 0, b, world, drop_last=True)
        assert np.array_equal(got, order[:kept]), "Incorrect sample order with drop_last"


def test_last_step_cases_cover_the_traps() -> None:
    """The sizes below include, for every world size, a final step with fewer items than
    ranks and one that leaves a rank a single item (the empty batch and the batch of one)."""
    fewer, single = set(), set()
    for n, b, world in itertools.product(LAST_STEP_N, BATCH_SIZES, WORLD_SIZES):
        rest = n % (b * world)
        if 0 < rest < world:
            fewer.add(world)
        finals = [batch_spans(n, 0, b, world, r)[-1:] for r in range(world)]
        if b >= 2 and rest and any(int(f[0, 1] - f[0, 0]) == 1 for f in finals):
            single.add(world)
    assert fewer == {2, 3} and single == {1, 2, 3}, (fewer, single)


def test_padded_last_step_delivers_every_item_once_without_empty_or_single_batches() -> None:
    for n, b, world, workers in itertools.product(LAST_STEP_N, BATCH_SIZES, WORLD_SIZES,
                                                  WORKER_COUNTS):
        order = epoch_order(n, 7, 3)
        check_padded_epoch(order, 0, b, world, workers, f"n={n} B={b} W={world} workers={workers}")


def test_padded_last_step_of_the_bundled_split_size() -> None:
    """1,400 samples, B=233: three ranks get final real items [1, 1, 0], two ranks [1, 1]."""
    order = epoch_order(1400, 0, 0)
    for world, reals in ((3, [1, 1, 0]), (2, [1, 1])):
        per_rank = check_padded_epoch(order, 0, 233, world, 0, f"n=1400 W={world}")
        assert [int(v.sum()) for _, v in (r[-1] for r in per_rank)] == reals
        assert [len(rows) for rows, _ in (r[-1] for r in per_rank)] == [2] * world


def test_fill_rows_are_deterministic_distinct_repeats_from_the_order() -> None:
    order = epoch_order(1399, 3, 5)
    a = [fill_positions(1399, 0, 233, 3, r) for r in range(3)]
    assert [x.tolist() for x in a] == [[0], [1, 2], [3, 4]], "fill slots count over ranks in order"
    assert [x.tolist() for x in a] == [fill_positions(1399, 0, 233, 3, r).tolist() for r in range(3)]
    rows = order[np.concatenate(a)]
    assert len(set(rows.tolist())) == 5 and not np.isin(rows, order[-1:]).any(), (
        "fill rows should repeat other samples than the final step's")
    assert fill_positions(1398, 0, 233, 3, 0).size == 0, "a full final step needs no fill"
    assert fill_positions(1, 0, 4, 2, 1).tolist() == [0, 0], "a one-sample split repeats it"
    assert fill_positions(5, 0, 1, 3, 2).tolist() == [0], "B=1: pad empty batches to one row"
    with pytest.raises(ValueError):
        fill_positions(10, 0, 4, 2, 2)


def test_padded_resume_with_any_world_size_and_workers_continues_the_order() -> None:
    for n, b, world in itertools.product(LAST_STEP_N, BATCH_SIZES, WORLD_SIZES):
        order = epoch_order(n, 11, 4)
        k = num_batches(n, b, world)
        for steps in sorted({0, 1, k // 2, k - 1, k} & set(range(k + 1))):  # start, middle, end
            offset = min(steps * b * world, n)  # whole steps of the old world size
            for new_world, workers in itertools.product(WORLD_SIZES, WORKER_COUNTS):
                check_padded_epoch(order, offset, b, new_world, workers,
                                   f"n={n} B={b} W={world}->{new_world} offset={offset}")


def test_full_steps_give_each_rank_consecutive_slices() -> None:
    order = epoch_order(50, 0, 0)
    for rank in range(3):
        batches = rank_batches(order, 0, 4, 3, rank)
        for step, batch in enumerate(batches[:-1]):
            start = step * 12 + rank * 4
            assert np.array_equal(batch, order[start : start + 4]), "Incorrect sample order"


def test_batch_spans_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        batch_spans(10, 11, 2, 1, 0)
    with pytest.raises(ValueError):
        batch_spans(10, 0, 2, 2, 2)
    with pytest.raises(ValueError):
        batch_spans(10, 0, 0, 2, 0)
    with pytest.raises(ValueError):
        worker_batches([1, 2], 2, 2)


# ---------------------------------------------------------------- workers


def test_worker_round_robin_reproduces_rank_order() -> None:
    for n, b, world, workers, group in itertools.product(
        N_VALUES, BATCH_SIZES, WORLD_SIZES, WORKER_COUNTS, GROUP_SIZES
    ):
        order = epoch_order(n, 3, 0)
        for rank in range(world):
            expected = rank_batches(order, 0, b, world, rank)
            got = read_rank(order, 0, b, world, rank, workers, group)
            assert len(got) == len(expected), "Missing samples: batch count differs"
            for x, y in zip(got, expected):
                assert np.array_equal(x, y), (
                    f"Incorrect sample order with {workers} workers, groups of {group}")


def test_transfer_groups_cover_the_batches_in_order_and_grow_to_the_group_size() -> None:
    """Groups are consecutive runs of batches, each batch in exactly one, dealt to the
    workers in turn; a worker's first group holds one batch, round r holds min(G, 2**r)."""
    for k, workers, group in itertools.product((0, 1, 2, 7, 40, 101), (0, 1, 2, 3), GROUP_SIZES):
        bounds = group_bounds(k, workers, group)
        case = f"K={k} workers={workers} G={group}"
        assert bounds[0] == 0 and bounds[-1] == k and np.all(np.diff(bounds) >= 1), case
        sizes = np.diff(bounds)
        w = max(workers, 1)
        want = np.minimum(group, 2 ** np.minimum(np.arange(len(sizes)) // w, 30))
        assert np.array_equal(sizes[:-1], want[:-1]), case
        assert not k or 1 <= sizes[-1] <= want[-1], case  # the last group may be short
        per_worker = [worker_groups(k, i, workers, group) for i in range(w)]
        dealt = [g for j in range(len(sizes)) for g in [per_worker[j % w][j // w]]]
        assert [list(g) for g in dealt] == [list(range(lo, hi)) for lo, hi in zip(bounds, bounds[1:])], case
        assert sorted(i for groups in per_worker for g in groups for i in g) == list(range(k)), case
        for i in range(w):
            assert worker_batches(list(range(k)), i, workers, group) == [
                x for g in per_worker[i] for x in g], case
    with pytest.raises(ValueError, match="group_size"):
        group_bounds(5, 2, 0)
    with pytest.raises(ValueError, match="worker_id"):
        worker_groups(5, 2, 2, 3)


# ---------------------------------------------------------------- resume


def test_resume_with_any_world_size_and_workers_continues_the_order() -> None:
    for n, b, world in itertools.product(N_VALUES, BATCH_SIZES, WORLD_SIZES):
        order = epoch_order(n, 11, 4)
        for steps in range(num_batches(n, b, world) + 1):
            offset = min(steps * b * world, n)  # whole steps of the old world size
            done = np.concatenate([order[:0]] + global_batches(order, 0, b, world)[: steps * world])
            assert np.array_equal(done, order[:offset]), "Incorrect sample order before resume"
            for new_world, workers, group in itertools.product(WORLD_SIZES, WORKER_COUNTS, (1, 3)):
                per_rank = [
                    read_rank(order, offset, b, new_world, r, workers, group) for r in range(new_world)
                ]
                assert len({len(x) for x in per_rank}) == 1, "Unequal batch counts after resume"
                rest = [x for k in range(len(per_rank[0])) for x in (r[k] for r in per_rank)]
                got = np.concatenate([order[:0], *rest])
                case = (f"n={n} B={b} W={world}->{new_world} offset={offset} workers={workers} "
                        f"G={group}")
                assert_exactly_once(got, order[offset:], case)
                assert np.array_equal(got, order[offset:]), f"Incorrect sample order ({case})"


def test_resume_with_same_world_size_gives_the_same_batches() -> None:
    order = epoch_order(101, 5, 2)
    full = global_batches(order, 0, 4, 3)
    for steps in range(len(full) // 3 + 1):
        resumed = global_batches(order, min(steps * 12, 101), 4, 3)
        assert len(resumed) == len(full) - 3 * steps, "Missing samples: wrong batch count"
        for x, y in zip(resumed, full[3 * steps :]):
            assert np.array_equal(x, y), "Incorrect sample order after resume"


def test_offset_after_step_counts_the_items_of_every_rank_up_to_that_step() -> None:
    """The resume offset saved with step k's batches: offset + all ranks' items of steps
    0..k (so a resume from it continues with step k + 1), ``n`` after the final step."""
    for n, b, world in itertools.product(N_VALUES, BATCH_SIZES, WORLD_SIZES):
        order = epoch_order(n, 2, 1)
        for offset in sorted({0, min(b * world, n), n}):
            batches = global_batches(order, offset, b, world)
            steps = len(batches) // world
            for k in range(steps):
                consumed = sum(len(x) for x in batches[: (k + 1) * world])
                assert offset_after_step(n, offset, b, world, k) == offset + consumed, (
                    f"n={n} B={b} W={world} offset={offset} step={k}")
            if steps:
                assert offset_after_step(n, offset, b, world, steps - 1) == n


# ---------------------------------------------------------------- partners


@FAST
@given(
    st.lists(st.integers(0, 5), min_size=0, max_size=70), st.integers(1, 3), st.integers(0, 2**32)
)
def test_partners_have_a_different_label_in_the_same_batch(labels, m, seed) -> None:
    labels = np.array(labels, dtype=np.int64)
    out = assign_partners(labels, m, np.random.default_rng(seed))
    b = labels.size
    assert out.shape == (b, m) and out.dtype == np.int64
    assert np.all((out >= -1) & (out < b)), "Partner outside the batch"
    assert np.all(out == out[:, :1]), "Modalities should share the batch's permutation"
    p = out[:, 0]
    has_other = np.array([np.any(labels != y) for y in labels], dtype=bool)
    assert np.array_equal(p >= 0, has_other), "-1 partner although a different label exists"
    ok = p >= 0
    assert np.all(labels[p[ok]] != labels[ok]), "Partner has the same label"
    if b and np.bincount(labels).max() * 2 <= b:  # feasible: a label-respecting permutation
        assert_exactly_once(p, np.arange(b), "partners should form a permutation")


def test_partners_are_deterministic_and_vary_by_batch() -> None:
    labels = np.arange(64) % 5
    a = assign_partners(labels, 2, partner_rng(1, 2, 640))
    assert np.array_equal(a, assign_partners(labels, 2, partner_rng(1, 2, 640)))
    assert not np.array_equal(a, assign_partners(labels, 2, partner_rng(1, 2, 704)))
    assert not np.array_equal(a, assign_partners(labels, 2, partner_rng(1, 3, 640)))


def test_partners_do_not_depend_on_world_size_or_workers() -> None:
    n, b, seed, epoch = 300, 8, 9, 1
    labels = np.random.default_rng(0).integers(0, 4, n)
    order = epoch_order(n, seed, epoch)
    plans = {}
    for world, workers in itertools.product(WORLD_SIZES, WORKER_COUNTS):
        for rank in range(world):
            spans = batch_spans(n, 0, b, world, rank)
            full = [(lo, hi) for lo, hi in spans if hi - lo == b]  # full steps: same batches
            for w in range(max(workers, 1)):
                for lo, hi in worker_batches(full, w, workers):
                    batch = order[lo:hi]
                    partners = assign_partners(labels[batch], 2, partner_rng(seed, epoch, int(lo)))
                    got = batch[partners[:, 0]]  # partner rows in split numbering
                    key = tuple(batch.tolist())
                    assert np.array_equal(plans.setdefault(key, got), got), (
                        f"Partners depend on world size {world} / workers {workers}"
                    )
    assert len(plans) == n // b


def _partners_by_unique(labels: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """The partner construction written plainly (np.unique for the classes, np.roll for the
    shift): the reference the vectorised assign_partners must equal bit for bit."""
    b = labels.size
    out = np.full((b, m), -1, dtype=np.int64)
    if b < 2:
        return out
    _, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    maxc = int(counts.max())
    if maxc == b:
        return out
    perm = rng.permutation(b)
    grouped = perm[np.argsort(rng.permutation(counts.size)[inv[perm]], kind="stable")]
    shift = int(rng.integers(maxc, b - maxc + 1)) if 2 * maxc <= b else maxc
    partner = np.empty(b, dtype=np.int64)
    partner[grouped] = np.roll(grouped, -shift)
    rows = np.flatnonzero(labels[partner] == labels)
    if rows.size:
        by_class, start, c = np.argsort(inv, kind="stable"), np.cumsum(counts) - counts, inv[rows]
        pick = rng.integers(0, b - counts[c])
        partner[rows] = by_class[np.where(pick < start[c], pick, pick + counts[c])]
    out[:] = partner[:, None]
    return out


@FAST
@given(st.lists(st.sampled_from([0, 1, 2, 3, 7, 9, -4, 70_000, 10**12]), min_size=0, max_size=70),
       st.integers(1, 3), st.integers(0, 2**32))
def test_partners_equal_the_plain_construction_bit_for_bit(labels, m, seed) -> None:
    """Same partners as before the speed-up (partners depend only on seed, epoch and
    position, so a resumed or re-run epoch must not change), for small class indices
    (counted by a bincount) and negative or huge labels (np.unique)."""
    labels = np.array(labels, dtype=np.int64)
    want = _partners_by_unique(labels, m, np.random.default_rng(seed))
    assert np.array_equal(assign_partners(labels, m, np.random.default_rng(seed)), want)


@FAST
@given(st.lists(st.lists(st.sampled_from([0, 1, 2, 5, 9, -1, 70_000]), min_size=0, max_size=40),
                min_size=0, max_size=8),
       st.integers(1, 3), st.integers(0, 2**32))
def test_partners_of_several_batches_at_once_equal_batch_by_batch(batches, m, seed) -> None:
    """assign_partners_many (vectorised across batches, each batch's draws from its own
    generator) gives every batch what assign_partners gives it alone, bit for bit: balanced
    batches, majority classes, single classes, empty batches, negative and huge labels."""
    batches = [np.array(y, dtype=np.int64) for y in batches]
    got = assign_partners_many(batches, m, [partner_rng(seed, 1, 8 * j) for j in range(len(batches))])
    assert len(got) == len(batches)
    for j, y in enumerate(batches):
        want = assign_partners(y, m, partner_rng(seed, 1, 8 * j))
        assert got[j].dtype == want.dtype and np.array_equal(got[j], want), f"batch {j}"


def test_single_class_batch_gets_no_partner() -> None:
    assert np.all(assign_partners(np.full(5, 3), 2, np.random.default_rng(0)) == -1)
    assert np.all(assign_partners(np.array([1]), 2, np.random.default_rng(0)) == -1)
    out = assign_partners(np.array([0, 0, 0, 0, 1]), 1, np.random.default_rng(0))[:, 0]
    assert np.all(out[:4] == 4) and out[4] in range(4), "Majority rows must fall back to row 4"


# ---------------------------------------------------------------- matched_order


def knn_graph(n: int, k: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random neighbour lists of different-label rows (like mined partners), some -1."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    nb = rng.integers(0, n, (n, k))
    nb[labels[nb] == labels[:, None]] = -1
    nb[rng.random((n, k)) < 0.2] = -1
    return nb, labels


def check_matching(n: int, nb: np.ndarray, order: np.ndarray, partner_of: np.ndarray) -> None:
    assert_exactly_once(order, np.arange(n), "matched_order")
    m = np.flatnonzero(partner_of >= 0)
    assert np.all(partner_of[partner_of[m]] == m), "Partner pairs are not symmetric"
    listed = (nb[m] == partner_of[m][:, None]).any(1) | (nb[partner_of[m]] == m[:, None]).any(1)
    assert np.all(listed), "Partner is in neither neighbour list"
    assert np.all(partner_of[m] != m), "Anchor matched to itself"
    free = np.flatnonzero(partner_of < 0)  # maximal: no edge between two unmatched anchors
    cand = nb[free]
    assert not np.any((cand >= 0) & (partner_of[np.maximum(cand, 0)] < 0) & (cand != free[:, None]))


@FAST
@given(st.integers(0, 400), st.integers(1, 8), st.integers(2, 6), st.integers(0, 10**6))
def test_matched_order_is_a_symmetric_matching_on_the_graph(n, k, classes, seed) -> None:
    nb, labels = knn_graph(n, k, classes, seed)
    order, partner_of = matched_order(n, nb, seed, 3)
    check_matching(n, nb, order, partner_of)
    m = partner_of >= 0
    assert np.all(labels[partner_of[m]] != labels[m]), "Matched partners share a label"


@FAST
@given(
    st.integers(0, 400), st.integers(1, 6), st.sampled_from([2, 4, 6, 8, 64]), st.integers(0, 10**6)
)
def test_matched_pairs_never_straddle_batches(n, k, b, seed) -> None:
    nb, _ = knn_graph(n, k, 3, seed)
    order, partner_of = matched_order(n, nb, seed, 0)
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    m = np.flatnonzero(partner_of >= 0)
    assert np.all(np.abs(pos[m] - pos[partner_of[m]]) == 1), "Partners are not adjacent"
    assert np.all(np.minimum(pos[m], pos[partner_of[m]]) % 2 == 0), "Pair at an odd position"
    for world in WORLD_SIZES:
        for steps in (0, 1):  # fresh start and a resume one step in
            offset = min(steps * b * world, n)
            where = np.full(n, -1)
            for i, batch in enumerate(global_batches(order, offset, b, world, pair_aligned=True)):
                where[batch] = i
            both = m[(pos[m] >= offset) & (pos[partner_of[m]] >= offset)]
            assert np.all(where[both] == where[partner_of[both]]), "Pair straddles a batch"
            assert np.array_equal(
                remaining_items(order, offset, b, world, pair_aligned=True), order[offset:]
            ), "Incorrect sample order with pair_aligned"
            padded = check_padded_epoch(order, offset, b, world, 0, f"paired n={n} B={b} W={world}",
                                        pair_aligned=True)
            where = np.full(n, -1)
            for i, (rows, valid) in enumerate(x for r in padded for x in r):
                where[rows[valid]] = i
            assert np.all(where[both] == where[partner_of[both]]), "Pair straddles a padded batch"


def test_matched_order_is_deterministic_and_varies_by_epoch() -> None:
    nb, _ = knn_graph(500, 8, 4, 0)
    a = matched_order(500, nb, 1, 2)
    b = matched_order(500, nb, 1, 2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), "Not deterministic"
    c = matched_order(500, nb, 1, 3)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_matched_order_follows_probs() -> None:
    n, k = 200, 6
    rng = np.random.default_rng(0)
    nb = rng.integers(0, n, (n, k))
    mate = np.arange(n) ^ 1  # a perfect matching hidden in slot 3
    nb[:, 3] = mate
    probs = np.zeros((n, k))
    probs[:, 3] = 1.0
    _, partner_of = matched_order(n, nb, 4, 0, probs=probs)
    assert np.array_equal(partner_of, mate), "Concentrated probs did not pick their neighbour"
    _, uniform = matched_order(n, nb, 4, 0)
    assert np.mean(uniform == mate) < 0.5, "Uniform sampling should rarely find the hidden matching"


def test_matched_order_ignores_missing_self_and_zero_prob_neighbours() -> None:
    nb = np.array([[0, -1], [2, 0], [1, 3], [-1, -1]])
    probs = np.array([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    order, partner_of = matched_order(4, nb, 0, 0, probs=probs)
    check_matching(4, np.where(probs > 0, nb, -1), order, partner_of)
    # row 1 may only take 0 (2 has prob 0 for 1) or be taken by 2 (2 lists 1 with prob 1)
    assert partner_of[3] == -1 and partner_of[0] in (-1, 1)
    with pytest.raises(ValueError):
        matched_order(4, nb, 0, 0, probs=-probs)
    with pytest.raises(ValueError):
        matched_order(4, np.array([[4], [0], [0], [0]]), 0, 0)
    assert matched_order(0, np.zeros((0, 3), np.int64), 0, 0)[0].shape == (0,)
