"""Stream contract: exactly once per epoch across ranks and workers, equal batch counts,
determinism, resume (also with other worker counts and world sizes), damaged shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from midas_data import CorruptShardError, MidasDataError, Sample, build_dataset
from midas_data.distributed import rank_and_world_size
from midas_data.stream.dataset import (
    MidasDataset,
    MidasLoader,
    collate,
    materialize_misaligned,
    misaligned_flat,
    partner_fields,
)
from midas_data.stream.partners import POLICIES, RESEARCH_POLICIES, resolve_modalities


def _dataset(root: Path, n: int = 61, shard: int = 7, classes: int = 5) -> Path:
    rng = np.random.default_rng(0)
    samples = [Sample(f"s{i:04d}", int(i % classes),
                      {"a": rng.normal(size=4).astype(np.float32),
                       "b": rng.normal(size=3).astype(np.float32)}, split="train")
               for i in range(n)]
    build_dataset(samples, root, shard_max_count=shard, progress=False)
    return root


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    # 61 samples in shards of 7: nine shards, the last holding 5
    return _dataset(tmp_path_factory.mktemp("stream") / "ds")


def _epoch_batches(root, world, workers, batch_size=4, epoch=0, policy="random", *,
                   per_transfer=None, **kw) -> list[list[dict]]:
    """Per rank, the batches of one epoch (per_transfer: MidasLoader's batches_per_transfer)."""
    out = []
    for rank in range(world):
        ds = MidasDataset(root, batch_size=batch_size, rank=rank, world_size=world, policy=policy, **kw)
        ds.set_epoch(epoch)
        out.append(list(MidasLoader(ds, num_workers=workers, batches_per_transfer=per_transfer)))
    return out


def real_keys(batch: dict) -> list[str]:
    """The keys of a batch's real rows (fill rows, `valid == False`, are repeats)."""
    return [k for k, v in zip(batch["key"], batch["valid"].tolist()) if v]


def _epoch_keys(root, world, workers, batch_size=4, epoch=0, policy="random", **kw) -> list[list[list[str]]]:
    """Per rank, the list of batches (lists of the real rows' keys) of one epoch."""
    return [[real_keys(b) for b in batches]
            for batches in _epoch_batches(root, world, workers, batch_size, epoch, policy, **kw)]


def assert_same_batch(a: dict, b: dict, what: str) -> None:
    """Every field of two stream batches is equal (tensors by value, NaN equal to NaN)."""
    assert a.keys() == b.keys(), what
    for name in a:
        x, y = a[name], b[name]
        if name == "inputs":
            for m in x:
                assert torch.equal(x[m], y[m]), f"{what}: inputs[{m}]"
        elif isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(torch.nan_to_num(x, nan=-7.0),
                                                      torch.nan_to_num(y, nan=-7.0)), f"{what}: {name}"
        else:
            assert x == y, f"{what}: {name}"


def assert_fill_rows_masked(batch: dict) -> None:
    """Fill rows: valid False, weight 0, no partner, lent to no real row; real rows weight 1."""
    valid, weight = batch["valid"], batch["weight"]
    assert valid.dtype == torch.bool and weight.dtype == torch.float32
    assert valid.shape == weight.shape == batch["label"].shape == batch["row"].shape
    assert len(batch["key"]) == len(valid)
    assert torch.equal(weight, valid.float()), "weight must be 1 on real rows and 0 on fill rows"
    if "partner" in batch:
        p = batch["partner"]
        assert torch.all(p[~valid] == -1), "a fill row got a misaligned partner"
        assert torch.all(valid[p[p >= 0]]), "a real row took a modality from a fill row"
        assert torch.all(batch["hard_weight"][~valid] == 0) and torch.all(batch["partner_weight"][~valid] == 0)


# 61 samples: B=4 leaves one item for W=1 (a batch of one) and W=3 (fewer items than ranks),
# B=10 one item for W=2 and W=3.
@pytest.mark.parametrize("batch_size", [4, 10])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_every_item_delivered_once_across_ranks_and_workers(uneven, world, workers, batch_size):
    per_rank = _epoch_batches(uneven, world, workers, batch_size=batch_size)
    keys = [k for batches in per_rank for b in batches for k in real_keys(b)]
    assert len(keys) == len(set(keys)), "Duplicate samples"
    assert set(keys) == {f"s{i:04d}" for i in range(61)}, "Missing samples"
    counts = {len(batches) for batches in per_rank}
    assert len(counts) == 1, f"unequal batch counts per rank: {[len(b) for b in per_rank]}"
    for batches in per_rank:
        for k, b in enumerate(batches):
            assert len(b["key"]) >= 2, f"a batch of {len(b['key'])} rows"
            assert_fill_rows_masked(b)
            if k < len(batches) - 1:
                assert bool(b["valid"].all()) and len(b["key"]) == batch_size
    last_real = [int(batches[-1]["valid"].sum()) for batches in per_rank]
    assert max(last_real) - min(last_real) <= 1, f"uneven last step {last_real}"


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("workers,per_transfer", [(1, 4), (2, 1), (2, 2), (2, 16), (3, 3)])
def test_batches_sent_in_groups_equal_the_in_process_batches(uneven, world, workers, per_transfer):
    """Workers that send groups of consecutive batches as one queue item deliver the same
    batches, field by field and in the same order, as in-process loading: exactly once,
    equal batch counts per rank, the same fill rows, partners and resume states."""
    ref = _epoch_batches(uneven, world, 0, batch_size=2, epoch=1)
    got = _epoch_batches(uneven, world, workers, batch_size=2, epoch=1, per_transfer=per_transfer)
    assert [len(b) for b in got] == [len(b) for b in ref], "unequal batch counts"
    for rank, (want, have) in enumerate(zip(ref, got)):
        for k, (a, b) in enumerate(zip(want, have)):
            assert_same_batch(a, b, f"rank {rank} batch {k}")


def test_loader_picks_the_transfer_group_from_the_decoded_batch_size(uneven, tmp_path):
    from midas_data.dataset.transport import transfer_group_size

    ds = MidasDataset(uneven, batch_size=2)
    assert ds.row_bytes() == 64 + 40 * 2 + 4 * 4 + 3 * 4  # per-row fields + float32 [4] and [3]
    assert MidasLoader(ds, num_workers=0).transfer_group() == 0  # in-process: nothing crosses
    assert MidasLoader(ds, num_workers=2, batches_per_transfer=5).transfer_group() == 5
    assert MidasLoader(ds, num_workers=2).transfer_group() == transfer_group_size(
        2 * ds.row_bytes(), len(ds), 2)
    text = tmp_path / "text"  # no fixed shape: the mean encoded sample size stands in
    build_dataset([Sample(f"t{i}", i % 2, {"t": "word " * (i + 1)}, split="train") for i in range(8)],
                  text, progress=False)
    tds = MidasDataset(text, batch_size=2)
    shards = [s for s in tds.ds.manifest["shards"] if s["split"] == "train"]
    mean = sum(s["bytes"] for s in shards) // sum(s["count"] for s in shards)
    assert tds.row_bytes() == 64 + 40 + mean
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="batches_per_transfer"):
            MidasLoader(ds, num_workers=2, batches_per_transfer=bad)


def test_order_does_not_depend_on_worker_count(uneven):
    ref = _epoch_keys(uneven, 2, 0)
    for workers in (1, 2, 3):
        assert _epoch_keys(uneven, 2, workers) == ref, "Incorrect sample order"


def test_epochs_are_deterministic_and_differ(uneven):
    a = _epoch_keys(uneven, 1, 0, epoch=0)
    assert a == _epoch_keys(uneven, 1, 0, epoch=0)
    assert a != _epoch_keys(uneven, 1, 0, epoch=1)
    assert a != _epoch_keys(uneven, 1, 0, epoch=0, seed=1)


def test_partners_have_different_labels_and_sit_in_the_batch(uneven):
    ds = MidasDataset(uneven, batch_size=8)
    for b in ds:
        p = b["partner"]
        valid = p >= 0
        assert valid.any()
        lab = b["label"]
        assert torch.all(lab[p.clamp(min=0)][valid] != lab.unsqueeze(1).expand_as(p)[valid])
        assert torch.all(b["partner_label"][valid] == lab[p.clamp(min=0)][valid])
        # the fused head's index of the batch, built with its partners (fill rows have none)
        assert torch.equal(b["misaligned_flat"], torch.from_numpy(misaligned_flat(p.numpy())))


def test_materialize_misaligned_swaps_exactly_one_modality(uneven):
    b = next(iter(MidasDataset(uneven, batch_size=8)))
    mis = materialize_misaligned(b)
    for n in range(len(mis["anchor"])):
        i, m = int(mis["anchor"][n]), int(mis["swapped"][n])
        j = int(b["partner"][i, m])
        for mi, name in enumerate(["a", "b"]):
            src = j if mi == m else i
            assert torch.equal(mis["inputs"][name][n], b["inputs"][name][src])


@pytest.mark.parametrize("old_world,new_world", [(1, 1), (2, 3), (3, 1), (2, 2)])
@pytest.mark.parametrize("new_workers", [0, 2])
def test_resume_gives_identical_remaining_sequence(uneven, old_world, new_world, new_workers):
    batch = 4
    full = _epoch_keys(uneven, 1, 0, batch_size=batch, epoch=3)
    full_seq = [k for b in full[0] for k in b]
    # consume 2 global steps with the old world size, then save the state of rank 0
    loaders = [MidasLoader(MidasDataset(uneven, batch_size=batch, rank=r, world_size=old_world))
               for r in range(old_world)]
    consumed = []
    for ld in loaders:
        ld.dataset.set_epoch(3)
    iters = [iter(ld) for ld in loaders]
    for _ in range(2):
        for it in iters:
            consumed.extend(real_keys(next(it)))
    state = loaders[0].state_dict()
    assert state["offset"] == 2 * batch * old_world
    # resume with another world size and worker count; read the remaining global order
    resumed = []
    for r in range(new_world):
        ds = MidasDataset(uneven, batch_size=batch, rank=r, world_size=new_world)
        ds.load_state_dict(json.loads(json.dumps(state)))
        resumed.append([real_keys(b) for b in MidasLoader(ds, num_workers=new_workers)])
    assert len({len(b) for b in resumed}) == 1, "unequal batch counts after resume"
    rest = [k for step in range(len(resumed[0])) for r in range(new_world) for k in resumed[r][step]]
    assert sorted(consumed) == sorted(full_seq[: len(consumed)])
    assert consumed + rest == full_seq, "Incorrect sample order after resume"


@pytest.mark.parametrize("new_world,new_workers,new_per_transfer", [(1, 0, None), (2, 3, 2), (3, 2, 16)])
def test_resume_from_inside_a_group_gives_identical_remaining_sequence(uneven, new_world, new_workers,
                                                                       new_per_transfer):
    """A state taken after a batch in the middle of a worker's group (the rest of the group
    already in the main process) resumes to the identical remaining sequence with another
    worker count, group size and world size."""
    full = [k for b in _epoch_keys(uneven, 1, 0, batch_size=2, epoch=2)[0] for k in b]
    loader = MidasLoader(MidasDataset(uneven, batch_size=2), num_workers=2, batches_per_transfer=4)
    loader.dataset.set_epoch(2)
    consumed = []
    for b in loader:  # groups of 1, 1, 2, 2, 4, 4: batch 7 is the second of worker 0's third group
        consumed.extend(real_keys(b))
        if len(consumed) == 14:
            break
    state = loader.state_dict()
    assert state["offset"] == 14
    resumed = []
    for r in range(new_world):
        ds = MidasDataset(uneven, batch_size=2, rank=r, world_size=new_world)
        ds.load_state_dict(json.loads(json.dumps(state)))
        resumed.append([real_keys(b) for b in MidasLoader(ds, num_workers=new_workers,
                                                          batches_per_transfer=new_per_transfer)])
    assert len({len(b) for b in resumed}) == 1, "unequal batch counts after resume"
    rest = [k for step in range(len(resumed[0])) for r in range(new_world) for k in resumed[r][step]]
    assert consumed + rest == full, "Incorrect sample order after resume"


def test_in_process_state_dict_tracks_consumed_items(uneven):
    ds = MidasDataset(uneven, batch_size=5)
    it = iter(ds)
    next(it)
    next(it)
    assert ds.state_dict()["offset"] == 10
    rest = [k for b in it for k in real_keys(b)]
    ds2 = MidasDataset(uneven, batch_size=5)
    ds2.load_state_dict({"seed": 0, "epoch": 0, "offset": 10, "num_samples": 61, "policy": "random"})
    assert [k for b in ds2 for k in real_keys(b)] == rest


def test_next_iteration_rolls_over_to_next_epoch(uneven):
    ds = MidasDataset(uneven, batch_size=8)
    first = [k for b in ds for k in real_keys(b)]
    second = [k for b in ds for k in real_keys(b)]
    assert ds.epoch == 1 and sorted(first) == sorted(second) and first != second


def test_last_step_modes(uneven):
    """61 samples, B=4, W=3: the final step holds one item. pad: [2, 2, 2] rows of which
    [1, 0, 0] real; uneven: the old [1, 0, 0]; drop (and its alias drop_last): left out."""
    def last_sizes(**kw) -> tuple[list[int], list[int], int]:
        per_rank = _epoch_batches(uneven, 3, 0, **kw)
        assert len({len(b) for b in per_rank}) == 1
        keys = [k for batches in per_rank for b in batches for k in real_keys(b)]
        assert len(keys) == len(set(keys))
        return ([len(b[-1]["key"]) for b in per_rank], [int(b[-1]["valid"].sum()) for b in per_rank],
                len(keys))

    assert last_sizes() == ([2, 2, 2], [1, 0, 0], 61)
    assert last_sizes(last_batch="pad") == ([2, 2, 2], [1, 0, 0], 61)
    assert last_sizes(last_batch="uneven") == ([1, 0, 0], [1, 0, 0], 61)
    assert last_sizes(last_batch="drop") == ([4, 4, 4], [4, 4, 4], 60)
    assert last_sizes(drop_last=True) == ([4, 4, 4], [4, 4, 4], 60)
    assert MidasDataset(uneven, batch_size=4, drop_last=True).last_batch == "drop"
    empty = _epoch_batches(uneven, 3, 0, last_batch="uneven")[2][-1]
    assert empty["inputs"]["a"].shape == (0, 4) and empty["valid"].shape == (0,)
    with pytest.raises(ValueError, match="last_batch must be one of"):
        MidasDataset(uneven, batch_size=4, last_batch="fill")
    with pytest.raises(ValueError, match="drop_last=True.*uneven"):
        MidasDataset(uneven, batch_size=4, last_batch="uneven", drop_last=True)


def test_fill_rows_repeat_real_samples_deterministically_and_get_no_partners(uneven):
    a = _epoch_batches(uneven, 3, 0, batch_size=4, epoch=2)
    b = _epoch_batches(uneven, 3, 2, batch_size=4, epoch=2)
    fills = [[k for k, v in zip(x[-1]["key"], x[-1]["valid"].tolist()) if not v] for x in a]
    assert fills == [[k for k, v in zip(x[-1]["key"], x[-1]["valid"].tolist()) if not v] for x in b]
    assert [len(f) for f in fills] == [1, 2, 2]
    everything = {k for batches in a for bt in batches for k in real_keys(bt)}
    assert set(sum(fills, [])) <= everything
    assert fills != [[k for k, v in zip(x[-1]["key"], x[-1]["valid"].tolist()) if not v]
                     for x in _epoch_batches(uneven, 3, 0, batch_size=4, epoch=3)]
    for batches in a:
        assert_fill_rows_masked(batches[-1])
        mis = materialize_misaligned(batches[-1])
        assert len(mis["anchor"]) == 0, "a single real row (or none) has no misaligned partner"


def test_materialize_misaligned_ignores_fill_rows(uneven):
    b = next(iter(MidasDataset(uneven, batch_size=8)))
    full = materialize_misaligned(b)
    valid = b["valid"].clone()
    valid[-3:] = False  # as if the last three rows were fill: no sample may use them
    masked = materialize_misaligned({**b, "valid": valid})
    rows = torch.stack([masked["anchor"], b["partner"][masked["anchor"], masked["swapped"]]])
    assert len(masked["anchor"]) < len(full["anchor"]) and bool(valid[rows].all())


@pytest.mark.parametrize("workers,per_transfer", [(0, None), (1, None), (2, None), (2, 3)])
def test_iterating_again_after_break_continues_from_the_consumed_batches(uneven, workers, per_transfer):
    """A pass left early (break) continues where it stopped, for every worker count (also
    when the break falls inside a worker's group of batches), as state_dict() says; a pass
    run to its end rolls over to the next epoch."""
    ref = _epoch_keys(uneven, 1, 0, batch_size=4, epoch=0)[0]
    loader = MidasLoader(MidasDataset(uneven, batch_size=4), num_workers=workers,
                         batches_per_transfer=per_transfer)
    first = []
    for b in loader:
        first.append(real_keys(b))
        if len(first) == 3:
            break
    assert loader.state_dict()["offset"] == 12 and loader.state_dict()["epoch"] == 0
    assert len(loader) == len(ref) - 3
    rest = [real_keys(b) for b in loader]
    assert first + rest == ref, "Incorrect sample order: the pass after break did not continue"
    assert loader.state_dict()["epoch"] == 0 and loader.state_dict()["offset"] == 61
    again = [real_keys(b) for b in loader]
    assert loader.dataset.epoch == 1 and again == _epoch_keys(uneven, 1, 0, epoch=1)[0]


def test_workers_use_a_new_segment_per_group_unless_asked_to_reuse(uneven):
    """By default each group crosses in a new shared-memory segment (no pool), and the
    batches equal in-process loading's either way."""
    ref = _epoch_batches(uneven, 1, 0)[0]
    for reuse in (False, True):
        loader = MidasLoader(MidasDataset(uneven, batch_size=4), num_workers=2,
                             batches_per_transfer=2, reuse_shared_memory=reuse)
        got = [_copy(b) for b in loader]
        assert (loader._pool is not None) == reuse
        assert len(got) == len(ref)
        for k, (a, b) in enumerate(zip(ref, got)):
            assert_same_batch(a, b, f"reuse={reuse} batch {k}")


def test_batches_kept_across_passes_stay_intact_while_workers_reuse_the_loaders_segments(uneven):
    """MidasLoader's workers pack their groups into the loader's shared segments, made once
    and reused by the fresh workers of every pass; batches the consumer keeps (some of each
    pass) are never overwritten, and every kept batch equals in-process loading's."""
    loader = MidasLoader(MidasDataset(uneven, batch_size=2), num_workers=2, batches_per_transfer=2,
                         reuse_shared_memory=True)
    kept, from_pool = [], 0
    for epoch in range(3):
        slots = {b.data_ptr() for row in loader._pool.buffers for b in row} if loader._pool else set()
        for k, b in enumerate(loader):
            from_pool += b["inputs"]["a"].untyped_storage().data_ptr() in slots
            if k % 5 == 0:
                kept.append((epoch, k, b))
    assert loader._pool is not None and loader._pool.generation == 3, "one pool, a generation per pass"
    assert from_pool > 0, "no batch came through the loader's segments"
    ref = [_epoch_batches(uneven, 1, 0, batch_size=2, epoch=e)[0] for e in range(3)]
    for epoch, k, b in kept:
        assert_same_batch(ref[epoch][k], b, f"epoch {epoch} batch {k}")


def test_persistent_workers_follow_the_loaders_epoch_offset_and_resume(uneven):
    """Workers kept across passes (no fork per pass) take each pass's epoch and offset from
    the loader: whole epochs, a pass left early and continued, set_epoch and
    load_state_dict all give what fresh in-process loading gives."""
    def keys(loader) -> list[list[str]]:
        return [real_keys(b) for b in loader]

    def epoch(e: int, state: dict | None = None) -> list[list[str]]:
        ds = MidasDataset(uneven, batch_size=2)
        ds.set_epoch(e)
        if state is not None:
            ds.load_state_dict(state)
        return keys(MidasLoader(ds, num_workers=0))

    loader = MidasLoader(MidasDataset(uneven, batch_size=2), num_workers=2, persistent_workers=True,
                         batches_per_transfer=3)
    assert [keys(loader) for _ in range(2)] == [epoch(0), epoch(1)]  # rolls over each pass
    first = []
    for b in loader:  # epoch 2, left inside a worker's group
        first.append(real_keys(b))
        if len(first) == 7:
            break
    assert loader.state_dict()["offset"] == 14
    assert first + keys(loader) == epoch(2), "the pass after break did not continue"
    loader.dataset.set_epoch(9)
    assert keys(loader) == epoch(9)
    state = {"seed": 0, "epoch": 4, "offset": 20, "num_samples": 61, "policy": "random"}
    loader.load_state_dict(state)
    assert keys(loader) == epoch(4, state)
    fresh = MidasLoader(MidasDataset(uneven, batch_size=2), num_workers=2)
    assert keys(fresh) == epoch(0) and fresh._pass_state is None  # workers forked afresh


def test_resume_state_from_other_dataset_is_refused(uneven, tmp_path):
    other = _dataset(tmp_path / "o", n=30)
    ds = MidasDataset(other, batch_size=4)
    with pytest.raises(MidasDataError, match="61 samples"):
        ds.load_state_dict({"seed": 0, "epoch": 0, "offset": 8, "num_samples": 61})


def _flip_payload_byte(root: Path, key: str) -> str:
    ds = MidasDataset(root, batch_size=4)
    r = ds.reader.row(key)
    off = int(ds.reader.member["a"][0][r])
    shard = ds.reader.shard_paths[ds.reader.shard[r]]
    data = bytearray(shard.read_bytes())
    data[off + 130] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard.name


def test_corrupt_shard_mid_epoch_names_shard_and_key(tmp_path):
    root = _dataset(tmp_path / "ds")
    shard = _flip_payload_byte(root, "s0030")
    with pytest.raises(CorruptShardError) as e:
        for _ in MidasLoader(MidasDataset(root, batch_size=4), num_workers=2):
            pass
    assert shard in str(e.value) and "s0030" in str(e.value) and "'a'" in str(e.value)


def test_corrupt_shard_inside_a_group_fails_at_the_groups_turn(tmp_path):
    """A damaged batch inside a worker's group of batches: the loader delivers every batch
    before that group, in order, then raises naming the key, and nothing after it, so the
    consumed position (and a resume from it) stays a prefix of the order."""
    root = _dataset(tmp_path / "ds")
    clean = [b["key"] for b in MidasLoader(MidasDataset(root, batch_size=2), num_workers=0)]
    # groups of 1, 1, 2, 2, 4, 4 batches: batch 8 is the third of worker 0's group 6..9
    _flip_payload_byte(root, clean[8][0])
    loader = MidasLoader(MidasDataset(root, batch_size=2), num_workers=2, batches_per_transfer=4)
    got = []
    with pytest.raises(CorruptShardError) as e:
        for b in loader:
            got.append(b["key"])
    assert got == clean[:6], "batches out of order, or after the damaged one, were delivered"
    assert loader.state_dict()["offset"] == 12
    assert clean[8][0] in str(e.value) and "'a'" in str(e.value)


@pytest.mark.parametrize("per_transfer", [None, 3])
def test_skip_mode_reports_what_it_skipped_and_keeps_the_rest(tmp_path, per_transfer):
    root = _dataset(tmp_path / "ds")
    _flip_payload_byte(root, "s0030")
    keys, skipped = [], []
    for b in MidasLoader(MidasDataset(root, batch_size=4, on_error="skip"), num_workers=2,
                         batches_per_transfer=per_transfer):
        keys.extend(real_keys(b))
        skipped.extend(b["skipped"])
    assert skipped == ["s0030"]
    assert sorted(keys) == sorted(f"s{i:04d}" for i in range(61) if i != 30)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_batch_that_loses_a_row_to_skip_gets_partners_of_the_rows_it_keeps(tmp_path, workers):
    """Partners are planned for several batches ahead; the batch that loses a damaged row
    gets the partners the policy gives its remaining rows, every other batch the planned
    ones (equal to the undamaged dataset's)."""
    from midas_data.stream.epoch_plan import assign_partners, partner_rng

    root = _dataset(tmp_path / "ds")
    clean = list(MidasLoader(MidasDataset(root, batch_size=4), num_workers=0))
    _flip_payload_byte(root, "s0030")
    got = list(MidasLoader(MidasDataset(root, batch_size=4, on_error="skip"), num_workers=workers,
                           batches_per_transfer=3 if workers else None))
    assert len(got) == len(clean)
    for k, (a, b) in enumerate(zip(clean, got)):
        if b["skipped"]:
            want = assign_partners(b["label"].numpy(), 2, partner_rng(0, 0, 4 * k))
            assert torch.equal(b["partner"], torch.from_numpy(want)), f"batch {k}"
            assert len(b["key"]) == len(a["key"]) - 1
        else:
            assert torch.equal(a["partner"], b["partner"]), f"batch {k}"


def test_truncated_shard_is_an_error_naming_the_shard(tmp_path):
    root = _dataset(tmp_path / "ds")
    last = sorted((root / "shards").glob("train-*.tar"))[-1]
    last.write_bytes(last.read_bytes()[:1024])
    with pytest.raises(CorruptShardError, match=last.name):
        for _ in MidasDataset(root, batch_size=4):
            pass


def test_mined_policy_without_pairs_is_a_clear_error(uneven):
    with pytest.raises(MidasDataError, match="extract"):
        MidasDataset(uneven, batch_size=4, policy="mined")


def test_collate_stacks_inputs():
    s = [{"__key__": "k", "label": 1, "a": np.zeros(3, np.float32)}] * 2
    b = collate(s, ["a"])
    assert b["inputs"]["a"].shape == (2, 3) and b["label"].tolist() == [1, 1]


DDP_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from midas_data.stream.dataset import MidasDataset, MidasLoader
dist.init_process_group("gloo")
ds = MidasDataset(sys.argv[1], batch_size=4)
keys = [[k for k, v in zip(b["key"], b["valid"].tolist()) if v] for b in MidasLoader(ds, num_workers=1)]
with open(os.path.join(sys.argv[2], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump({"world": dist.get_world_size(), "batches": keys}, f)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.ddp
def test_two_process_torchrun_delivers_each_item_once(uneven, tmp_path):
    script = tmp_path / "ddp_stream.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29533", str(script), str(uneven), str(tmp_path)]
    subprocess.run(cmd, check=True, env=env, timeout=120, capture_output=True)
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in runs)
    assert len(runs[0]["batches"]) == len(runs[1]["batches"])
    keys = [k for r in runs for b in r["batches"] for k in b]
    assert sorted(keys) == sorted(f"s{i:04d}" for i in range(61)) and len(set(keys)) == 61


@pytest.fixture(scope="module")
def mined(tmp_path_factory) -> Path:
    """A dataset with warm-up features and k=3 mined partners."""
    from midas_data.features.extract import extract_features
    from midas_data.mining.stage import mine_misaligned

    root = _dataset(tmp_path_factory.mktemp("mined") / "ds", n=80, shard=16, classes=4)
    extract_features(root, warmup_epochs=1, splits=("train",), progress=False, num_threads=1)
    mine_misaligned(root, splits=("train",), k=3, progress=False)
    return root


def _neighbour_sets(root: Path, modalities: list[str]) -> dict[int, set[int]]:
    from midas_data.mining.pairs import read_pairs

    t = read_pairs(root, "train")
    out: dict[int, set[int]] = {}
    for a, p, m in zip(t.column("anchor_row").to_pylist(), t.column("partner_row").to_pylist(),
                       t.column("modality").to_pylist()):
        if m in modalities:
            out.setdefault(a, set()).add(p)
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_mined_policy_pairs_mined_neighbours_in_the_same_batch_once(mined, workers):
    nbrs = _neighbour_sets(mined, ["a", "b"])
    ds = MidasDataset(mined, batch_size=8, policy="mined")
    keys, matched = [], 0
    for b in MidasLoader(ds, num_workers=workers):
        keys.extend(real_keys(b))
        rows = b["row"].tolist()
        for i, r in enumerate(rows):
            j = int(b["partner"][i, 0])
            if j >= 0 and (rows[j] in nbrs.get(r, set()) or r in nbrs.get(rows[j], set())):
                matched += 1
    assert sorted(keys) == sorted(ds.reader.keys), "Missing or duplicate samples"
    assert matched >= len(keys) // 2, f"only {matched} of {len(keys)} anchors got a mined partner"


@pytest.mark.parametrize("batch_size,world", [(26, 3), (6, 3), (38, 2)])
def test_mined_policy_pads_the_last_step_without_splitting_pairs(mined, batch_size, world):
    """80 anchors: B=26, W=3 leaves one pair for three ranks, B=6, W=3 eight items, B=38, W=2
    two pairs; matched pairs stay together, fill rows pad the short ranks and get no partner."""
    per_rank = _epoch_batches(mined, world, 0, batch_size=batch_size, policy="mined")
    ds = MidasDataset(mined, batch_size=batch_size, policy="mined")
    _, partner_of = ds.partners.order(ds.seed, 0)
    where = {}
    for r, batches in enumerate(per_rank):
        assert len(batches) == len(per_rank[0]), "unequal batch counts"
        for k, b in enumerate(batches):
            assert len(b["key"]) >= 2
            assert_fill_rows_masked(b)
            for row in b["row"][b["valid"]].tolist():
                assert row not in where, "Duplicate samples"
                where[row] = (r, k)
    assert sorted(where) == list(range(80)), "Missing samples"
    if batch_size == 26:  # the last pair goes to the last rank; the others are padded
        assert [int((~b[-1]["valid"]).sum()) for b in per_rank] == [2, 2, 0]
    paired = [(i, int(j)) for i, j in enumerate(partner_of) if j > i]
    assert paired and all(where[i] == where[j] for i, j in paired), "a mined pair was split"


def test_swap_modalities_limit_mined_partners_to_chosen_modality(mined):
    nbrs = _neighbour_sets(mined, ["b"])
    ds = MidasDataset(mined, batch_size=8, policy="mined", knn_modalities=["b"], swap_modalities=["b"])
    same = total = 0
    for b in ds:
        rows = b["row"].tolist()
        for i, r in enumerate(rows):
            jb = int(b["partner"][i, 1])
            ja = int(b["partner"][i, 0])
            if jb >= 0 and rows[jb] in nbrs.get(r, set()) | {x for x, s in nbrs.items() if r in s}:
                total += 1
                same += ja == jb
    assert total > 0
    assert same < total, "modality 'a' should get its own random partner, not the mined one"


def test_weak_and_strong_resolve_from_stored_confidences(mined):
    ds = MidasDataset(mined, batch_size=8, policy="mined", knn_modalities=["strong"],
                      swap_modalities=["weak"])
    conf = {m: float(np.mean(ds.features.confs[m])) for m in ("a", "b")}
    assert list(ds.options.knn_modalities) == [max(conf, key=conf.get)]
    assert list(ds.options.swap_modalities) == [min(conf, key=conf.get)]


def _batch_cosines(ds: MidasDataset, rows: list[int], m: str) -> np.ndarray:
    f = ds.features.feats[m][rows].astype(np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    return f @ f.T


def test_tempered_partners_have_another_label_and_follow_the_temperature(mined):
    """Cold: every anchor takes its most similar other-label row in the batch; hot: the
    pick is spread out (close to the uniform random partner)."""
    def mean_rank(temperature: float) -> tuple[float, int]:
        ds = MidasDataset(mined, batch_size=16, policy="tempered", similarity_temperature=temperature,
                          similarity_modalities=["a"], swap_modalities=["b"])
        ranks, n = [], 0
        for b in ds:
            rows, labels = b["row"].tolist(), b["label"].numpy()
            sim = _batch_cosines(ds, rows, "a")
            for i in range(len(rows)):
                j = int(b["partner"][i, 1])
                assert j >= 0 and labels[j] != labels[i]
                cand = np.flatnonzero(labels != labels[i])
                ranks.append(int((sim[i, cand] > sim[i, j]).sum()))  # 0 = the nearest
                n += 1
        return float(np.mean(ranks)), n

    cold, n = mean_rank(1e-4)
    hot, _ = mean_rank(100.0)
    assert n == 80
    assert cold == 0.0, "at a tiny temperature every partner must be the batch's nearest"
    assert hot > 3.0, f"at a high temperature partners should spread out, mean rank {hot}"


def test_tempered_keeps_other_modalities_random_and_is_worker_invariant(mined):
    def partners(workers: int) -> list[list[list[int]]]:
        ds = MidasDataset(mined, batch_size=16, policy="tempered", similarity_temperature=0.05,
                          similarity_modalities=["a"], swap_modalities=["b"])
        return [b["partner"].tolist() for b in MidasLoader(ds, num_workers=workers)]

    zero, two = partners(0), partners(2)
    assert zero == two, "tempered partners must not depend on the worker count"
    pairs = [row for batch in zero for row in batch]
    assert any(a != b for a, b in pairs), "modality 'a' should keep its own random partner"


def test_tempered_without_features_is_a_clear_error(uneven):
    with pytest.raises(MidasDataError, match="tempered.*extract"):
        MidasDataset(uneven, batch_size=8, policy="tempered")


def test_mixed_ramp_grows_the_mined_fraction_from_zero(mined):
    ds = MidasDataset(mined, batch_size=8, policy="mixed", mined_fraction=0.8, mined_ramp=(2, 6))
    assert [ds.partners.fraction_at(e) for e in (0, 2, 4, 6, 9)] == pytest.approx([0.0, 0.0, 0.4, 0.8, 0.8])
    nbrs = _neighbour_sets(mined, ["a", "b"])

    def matched(epoch: int) -> int:
        _, partner_of = ds.partners.order(ds.seed, epoch)
        return sum(int(p) in nbrs.get(i, set()) or i in nbrs.get(int(p), set())
                   for i, p in enumerate(partner_of) if p >= 0)

    assert matched(0) == 0, "before the ramp no anchor is paired on the mined graph"
    assert matched(6) > 0


@pytest.mark.parametrize("bad", [(3, 1), (-1, 2), (1,)])
def test_bad_mined_ramp_is_refused(mined, bad):
    with pytest.raises(ValueError, match="mined_ramp"):
        MidasDataset(mined, batch_size=8, policy="mixed", mined_ramp=bad)
    with pytest.raises(ValueError, match="mined_ramp.*'mixed'"):
        MidasDataset(mined, batch_size=8, policy="mined", mined_ramp=(0, 5))


def test_soft_partners_follow_the_knn_temperature(mined):
    """Cold: every matched pair is an anchor's most similar mined neighbour (the others'
    weights vanish); hot: the matching spreads over the k-NN list like `mined`."""
    def top_edge_share(temperature: float) -> float:
        ds = MidasDataset(mined, batch_size=8, policy="soft", knn_temperature=temperature,
                          knn_modalities=["a"])
        nb, sims = ds.partners.neighbours, ds.partners.similarities
        top = nb[np.arange(len(nb)), np.argmax(sims, axis=1)]
        shares = []
        for epoch in range(5):
            _, partner_of = ds.partners.order(ds.seed, epoch)
            pairs = [(i, int(j)) for i, j in enumerate(partner_of) if j > i]
            assert pairs and all(j in nb[i] or i in nb[j] for i, j in pairs), "pair off the graph"
            shares.append(np.mean([top[i] == j or top[j] == i for i, j in pairs]))
        return float(np.mean(shares))

    assert top_edge_share(1e-8) == 1.0, "at a vanishing temperature only top neighbours pair"
    assert top_edge_share(100.0) < 0.7, "at a high temperature the other neighbours pair too"


def test_partner_fields_weights_are_normalised_source_confidences():
    labels = np.array([0, 1, 2], np.int64)
    partner = np.array([[1, 2, -1], [0, 0, 0], [0, 1, 1]], np.int64)  # [b=3, M=3]
    conf = np.array([[0.2, 0.4, 0.6], [0.1, 0.3, 0.0], [0.0, 0.0, 0.0]], np.float32)
    f = partner_fields(partner, labels, conf, None)
    for b in range(3):
        for m in range(3):
            j = partner[b, m]
            if j < 0:
                assert f["anchor_weight"][b, m] == 0 and f["partner_weight"][b, m] == 0
                continue
            src = [conf[j, k] if k == m else conf[b, k] for k in range(3)]
            want = src[m] / sum(src) if sum(src) > 0 else 1 / 3  # zero row: uniform
            assert f["partner_weight"][b, m].item() == pytest.approx(want, abs=1e-7)
            assert f["anchor_weight"][b, m].item() == pytest.approx(1 - want, abs=1e-7)
    assert f["partner_label"].tolist() == [[1, 2, -1], [0, 0, 0], [0, 1, 1]]
    # without stored confidences anchor and partner split the label evenly
    f = partner_fields(partner, labels, None, None)
    valid = torch.from_numpy(partner >= 0)
    assert torch.all(f["anchor_weight"][valid] == 0.5) and torch.all(f["partner_weight"][valid] == 0.5)
    assert torch.isnan(f["conf"]).all() and torch.all(f["hard_weight"][valid] == 1.0)


def test_weak_and_strong_use_the_trainers_tie_rule(tmp_path):
    """Equal mean confidences: 'weak' is the first modality, 'strong' the next (never the same)."""
    feats = SimpleNamespace(confs={"a": np.full(4, 0.5, np.float32), "b": np.full(4, 0.5, np.float32)})
    assert resolve_modalities(["weak", "strong"], ["a", "b"], feats, tmp_path) == ("a", "b")
    assert resolve_modalities([], ["a", "b"], None, tmp_path) == ("a", "b")
    with pytest.raises(MidasDataError, match="extract"):
        resolve_modalities(["weak"], ["a", "b"], None, tmp_path)


def test_policy_registry_names_public_and_research_policies():
    assert set(POLICIES) == {"none", "random", *RESEARCH_POLICIES}
    assert set(POLICIES) - RESEARCH_POLICIES == {"none", "random"}
    assert all(cls.name == name for name, cls in POLICIES.items())
    assert {n for n, cls in POLICIES.items() if cls.paired} == {"mined", "mixed", "soft"}


@pytest.mark.parametrize("bad,match", [
    ({"policy": "tempered", "knn_modalities": ["a"]}, "knn_modalities applies to"),
    ({"policy": "mined", "similarity_modalities": ["a"]}, "similarity_modalities applies to"),
    ({"policy": "random", "swap_modalities": ["a"]}, "swap_modalities applies to"),
    ({"policy": "soft", "knn_temperature": 0.0}, "knn_temperature must be > 0"),
    ({"policy": "mixed", "mined_fraction": 1.5}, "mined_fraction must be in"),
    ({"policy": "mined", "batch_size": 7}, "even batch_size"),
])
def test_partner_options_are_checked_in_one_place_for_stream_and_trainer(uneven, bad, match):
    from midas_data.trainers.config import TrainConfig

    kwargs = {"batch_size": 8, **bad}
    with pytest.raises(ValueError, match=match) as stream_error:
        MidasDataset(uneven, **kwargs)
    with pytest.raises(ValueError, match=match) as config_error:
        TrainConfig(**kwargs)
    assert str(config_error.value) == f"TrainConfig.{stream_error.value}"


def test_rank_and_world_size_come_from_the_torchrun_environment(uneven, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_and_world_size() == (2, 4)
    ds = MidasDataset(uneven, batch_size=4)
    assert ds.rank_world() == (2, 4)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert rank_and_world_size() == (0, 1)


def test_use_features_false_reads_no_features_and_splits_weights_evenly(mined):
    ds = MidasDataset(mined, batch_size=8, use_features=False)
    assert ds.features is None
    b = next(iter(ds))
    valid = b["partner"] >= 0
    assert valid.any() and torch.isnan(b["conf"]).all()
    assert torch.all(b["anchor_weight"][valid] == 0.5) and torch.all(b["partner_weight"][valid] == 0.5)
    with pytest.raises(MidasDataError, match="extract"):
        MidasDataset(mined, batch_size=8, policy="mined", use_features=False)


def test_worker_batches_equal_in_process_batches_and_plain_dataloaders_get_dicts(uneven):
    """MidasLoader packs a worker's batch into one buffer and unpacks it: every field equals the
    in-process batch. A plain DataLoader (which knows nothing of packing) gets plain dicts."""
    from torch.utils.data import DataLoader

    ref = _epoch_batches(uneven, 1, 0, batch_size=10)[0]
    got = _epoch_batches(uneven, 1, 2, batch_size=10)[0]
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        assert a.keys() == b.keys() and a["key"] == b["key"]
        for name in ("label", "row", "valid", "weight", "partner", "hard_weight", "anchor_weight"):
            assert torch.equal(a[name], b[name]), name
        for m in a["inputs"]:
            assert torch.equal(a["inputs"][m], b["inputs"][m]), m
    plain = list(DataLoader(MidasDataset(uneven, batch_size=10), batch_size=None, num_workers=2))
    assert all(isinstance(b, dict) for b in plain)
    assert sorted(k for b in plain for k in real_keys(b)) == sorted(k for b in ref for k in real_keys(b))


def test_partner_fields_without_features_equal_the_general_path_on_missing_confidences():
    """The no-features fast path gives exactly what the general formulas give for stored
    confidences that are all missing (NaN): an even split, hard weight 1, NaN similarity."""
    from midas_data.stream.dataset import partner_fields

    partner = np.array([[1, 1], [0, -1], [-1, -1], [0, 0]], dtype=np.int64)
    labels = np.array([0, 1, 2, 1], dtype=np.int64)
    fast = partner_fields(partner, labels, None, None)
    general = partner_fields(partner, labels, np.full((4, 2), np.nan, np.float32), None)
    assert fast.keys() == general.keys()
    for name in fast:
        assert torch.equal(torch.nan_to_num(fast[name], nan=-7.0), torch.nan_to_num(general[name], nan=-7.0)), name
    assert fast["partner_weight"].tolist() == [[0.5, 0.5], [0.5, 0.0], [0.0, 0.0], [0.5, 0.5]]


def test_partner_fields_of_several_batches_equal_each_batchs_own():
    """Computed together (views of shared arrays), the fields of each batch equal those of
    the general formulas on missing confidences for that batch alone: empty batches and
    rows without a partner included."""
    from midas_data.stream.dataset import partner_fields_without_features

    partners = [np.array([[1, 1], [0, -1], [-1, -1], [0, 0]]), np.zeros((0, 2), np.int64),
                np.array([[2, 2], [2, -1], [0, 1]])]
    labels = [np.array([0, 1, 2, 1]), np.zeros(0, np.int64), np.array([5, 3, 4])]
    got = partner_fields_without_features(partners, labels)
    assert len(got) == 3
    for p, y, fields in zip(partners, labels, got):
        want = partner_fields(p, y, np.full(p.shape, np.nan, np.float32), None)
        assert fields.keys() == want.keys()
        for name in want:
            assert fields[name].dtype == want[name].dtype and fields[name].shape == want[name].shape, name
            assert torch.equal(torch.nan_to_num(fields[name], nan=-7.0), torch.nan_to_num(want[name], nan=-7.0)), name


def test_loader_hands_batches_on_as_built_and_keeps_a_users_collate_fn(uneven):
    """Without a collate_fn the loader yields the dataset's batches themselves (no
    default_convert walk); a collate_fn given by the user is still applied to each."""
    ds = MidasDataset(uneven, batch_size=4)
    built = list(ds)
    ds.set_epoch(0)
    ds.load_state_dict({"seed": 0, "epoch": 0, "offset": 0})
    for a, b in zip(built, MidasLoader(ds, num_workers=0)):
        assert_same_batch(a, b, "as built")
    for workers in (0, 2):  # with workers too: it gets batches, never a worker's packed group
        seen: list = []

        def tag(b, seen=seen):
            seen.append(type(b))
            return {**b, "tag": len(b["key"])}

        tagged = list(MidasLoader(MidasDataset(uneven, batch_size=4), num_workers=workers,
                                  batches_per_transfer=2 if workers else None, collate_fn=tag))
        assert seen and set(seen) == {dict}, f"{workers} workers: the collate_fn got {set(seen)}"
        assert [b["tag"] for b in tagged] == [len(b["key"]) for b in built], f"{workers} workers"
        for a, b in zip(built, tagged):
            assert_same_batch({**a, "tag": len(a["key"])}, b, f"{workers} workers, collated")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_collate_fn_that_raises_leaves_its_batch_unconsumed(uneven, workers):
    """The consumed position moves past a batch only once the collate_fn returned it: a
    resume after it raised starts at that batch."""
    built = [real_keys(b) for b in MidasDataset(uneven, batch_size=4)]

    def fail_third(b, calls=[0]):  # noqa: B006 - a counter across calls
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("collate failed")
        return b

    ds = MidasDataset(uneven, batch_size=4)
    loader = MidasLoader(ds, num_workers=workers, batches_per_transfer=2 if workers else None,
                         collate_fn=fail_third)
    got = []
    with pytest.raises(RuntimeError, match="collate failed"):
        for b in loader:
            got.append(real_keys(b))
    state = loader.state_dict()
    rest = MidasDataset(uneven, batch_size=4)
    rest.load_state_dict(state)
    assert got + [real_keys(b) for b in MidasLoader(rest, num_workers=workers)] == built


def _copy(batch: dict) -> dict:
    """A batch with every tensor cloned (nested dicts too), independent of its buffer."""
    return {k: _copy(v) if isinstance(v, dict) else v.clone() if isinstance(v, torch.Tensor)
            else list(v) if isinstance(v, list) else v for k, v in batch.items()}


@pytest.mark.parametrize("share", ["share_memory_", "queue"])
def test_batches_after_one_is_shared_with_another_process_stay_correct(uneven, share):
    """A consumer that moves a batch's tensor to shared memory (`share_memory_`, or a
    torch.multiprocessing queue, which does it in place) moves only that batch's memory:
    every later batch, of this pass and the next, still equals in-process loading's."""
    import torch.multiprocessing as mp

    ref = [_epoch_batches(uneven, 1, 0, epoch=e)[0] for e in range(2)]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    loader = MidasLoader(MidasDataset(uneven, batch_size=4), num_workers=2, batches_per_transfer=2,
                         reuse_shared_memory=True)
    try:
        for epoch in range(2):
            got = []
            for k, b in enumerate(loader):
                if k in (0, 3):
                    kept = b["label"]
                    if share == "share_memory_":
                        kept.share_memory_()
                    else:
                        queue.put(kept)  # pickled (and shared) by the queue's feeder thread
                        deadline = time.monotonic() + 30
                        while not kept.is_shared() and time.monotonic() < deadline:
                            time.sleep(0.01)
                    assert kept.is_shared()
                got.append(_copy(b))
            assert loader._pool is not None, "the loader's pool was not used"
            assert len(got) == len(ref[epoch])
            for k, (a, b) in enumerate(zip(ref[epoch], got)):
                assert_same_batch(a, b, f"epoch {epoch} batch {k} after sharing a batch's tensor")
            assert torch.equal(kept, ref[epoch][3]["label"]), "the shared tensor changed"
    finally:
        if share == "queue":
            while not queue.empty():
                queue.get()
        queue.close()


def test_a_process_forked_after_the_loaders_first_pass_makes_its_own_segments(uneven):
    """A process forked after the loader made its shared segments (its parent's workers
    write them) makes its own: parent and child each iterate their copy of the loader
    and get exactly in-process loading's batches, and neither polls the other's workers."""
    ref = [_epoch_batches(uneven, 1, 0, epoch=e)[0] for e in range(4)]
    loader = MidasLoader(MidasDataset(uneven, batch_size=4), num_workers=2, batches_per_transfer=2,
                         reuse_shared_memory=True)
    first = next(iter(loader))
    assert loader._pool is not None
    parent_pool = loader._pool
    del first
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what went wrong through the pipe, exit without cleanup
        os.close(read)
        try:
            message = ""
            for epoch in range(1, 4):
                loader.dataset.set_epoch(epoch)
                loader.dataset.load_state_dict({"seed": 0, "epoch": epoch, "offset": 0})
                for k, b in enumerate(loader):
                    assert_same_batch(ref[epoch][k], b, f"child epoch {epoch} batch {k}")
            if loader._pool is parent_pool or loader._pool.creator != os.getpid():
                message = "the child used its parent's segments"
        except BaseException as e:  # noqa: BLE001 - everything is reported to the parent
            message = f"{type(e).__name__}: {e}"
        os.write(write, message.encode() or b"ok")
        os._exit(0)
    os.close(write)
    try:
        for epoch in range(1, 4):
            loader.dataset.set_epoch(epoch)
            loader.dataset.load_state_dict({"seed": 0, "epoch": epoch, "offset": 0})
            for k, b in enumerate(loader):
                assert_same_batch(ref[epoch][k], b, f"parent epoch {epoch} batch {k}")
        assert loader._pool is parent_pool
    finally:
        with os.fdopen(read, "rb") as f:
            reply = f.read().decode()
        os.waitpid(pid, 0)
    assert reply == "ok", reply


def test_the_epoch_order_kept_for_the_workers_is_read_only(uneven):
    """The epoch's order (and matched partners) cached for every pass cannot be changed
    in place by a caller."""
    order, _ = MidasDataset(uneven, batch_size=4).epoch_order()
    assert not order.flags.writeable
    with pytest.raises(ValueError):
        order[0] = 1
