"""The worker-queue transport: groups of batches packed into one shared buffer, and the
automatic group size (midas_data.dataset.transport)."""

from __future__ import annotations

import os
import pickle
import time
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers torch's reductions for the queue's pickler)

from midas_data.dataset.transport import (
    MAX_TRANSFER_GROUP,
    TRANSFER_BYTES,
    PackedBatch,
    pack_batch,
    pack_group,
    transfer_group_size,
    unpack_batch,
)


def _batch(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {"key": [f"k{i}a", f"k{i}b"], "label": torch.tensor([i, i + 1]),
            "inputs": {"x": torch.randn(2, 3, 5, generator=g)[:, :, ::2], "t": ["s1", "s2"],
                       "h": torch.randn(2, 4, generator=g).to(torch.bfloat16),
                       "u": torch.randint(0, 255, (2, 7), generator=g, dtype=torch.uint8)},
            "valid": torch.tensor([True, False]), "conf": torch.tensor([[float("nan"), 0.5]] * 2),
            "empty": torch.zeros(0, 3), "skipped": [], "stream_state": {"offset": 2 * i + 2}}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(torch.nan_to_num(a.float(), nan=-7.0), torch.nan_to_num(b.float(), nan=-7.0)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def test_a_group_of_batches_packs_into_one_shared_buffer_and_unpacks_to_equal_batches():
    group = [_batch(i) for i in range(3)]
    packed = pack_batch(group)
    assert isinstance(packed, PackedBatch)
    assert packed.buf.is_shared(), "the buffer must be made in shared memory, not copied into it"
    for via in (ForkingPickler.dumps, pickle.dumps):  # the worker queue's pickler, and plain pickle
        got = unpack_batch(pickle.loads(via(packed)))
        assert isinstance(got, list) and len(got) == 3
        assert all(_same(a, b) for a, b in zip(group, got))
        ptrs = {t.untyped_storage().data_ptr() for b in got
                for t in (b["label"], b["valid"], *(v for v in b["inputs"].values() if isinstance(v, torch.Tensor)))}
        assert len(ptrs) == 1, "every tensor of the group is a view of one buffer"
        for b in got:
            for t in (b["label"], b["conf"], b["inputs"]["x"], b["inputs"]["h"]):
                assert t.is_contiguous()
    got = unpack_batch(pickle.loads(ForkingPickler.dumps(packed)))
    got[0]["label"][0] = 99  # writable views, each over its own bytes
    assert got[0]["label"].tolist() == [99, 1] and got[1]["label"].tolist() == [1, 2]


def test_transfer_group_size_fills_the_byte_budget_and_keeps_workers_balanced():
    many = 10_000  # batches in a pass: balance does not bind
    assert transfer_group_size(TRANSFER_BYTES // 5, many, 2) == 5
    assert transfer_group_size(100, many, 2) == MAX_TRANSFER_GROUP
    assert transfer_group_size(TRANSFER_BYTES + 1, many, 2) == 1  # a large batch goes alone
    assert transfer_group_size(0, many, 2) == MAX_TRANSFER_GROUP
    assert transfer_group_size(100, 64, 2) == 4  # every worker gets at least eight groups
    assert transfer_group_size(100, 64, 0) == 8
    assert transfer_group_size(100, 3, 4) == 1


@pytest.mark.parametrize("n", [1, 2, 5])
def test_groups_cross_dataloader_workers_in_order(n):
    from torch.utils.data import DataLoader, IterableDataset

    class Groups(IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            for j in range(info.id, 6, info.num_workers):
                yield pack_batch([_batch(j * n + i) for i in range(n)])

    got = [b for item in DataLoader(Groups(), batch_size=None, num_workers=2) for b in unpack_batch(item)]
    assert [b["stream_state"]["offset"] for b in got] == [2 * i + 2 for i in range(6 * n)]
    assert all(_same(b, _batch(i)) for i, b in enumerate(got))


def test_packing_without_shared_memory_or_madvise_falls_back_to_equal_batches(monkeypatch):
    """Where pages cannot be faulted in at once (no madvise), or torch cannot make shared
    memory, packing still gives the same batches (a private buffer the queue shares itself)."""
    from midas_data.dataset import transport

    group = [_batch(i) for i in range(2)]
    monkeypatch.setattr(transport, "_madvise", False)
    packed = pack_batch(group)
    assert packed.buf.is_shared()
    assert all(_same(a, b) for a, b in zip(group, unpack_batch(pickle.loads(ForkingPickler.dumps(packed)))))

    def no_shm(n):
        raise RuntimeError("unable to open shared memory object")

    monkeypatch.setattr(torch.UntypedStorage, "_new_shared", no_shm)
    packed = pack_batch(group)
    assert not packed.buf.is_shared()
    assert all(_same(a, b) for a, b in zip(group, unpack_batch(pickle.loads(ForkingPickler.dumps(packed)))))


def test_a_pool_slot_crosses_the_queue_by_number_and_is_freed_only_once_no_view_is_left():
    """A group packed into a pool slot pickles as the slot's number (not its bytes), unpacks
    to equal batches viewing the main process's mapping of the slot, and the slot is free
    for its worker again only when no tensor views it any more."""
    from midas_data.dataset.transport import FREE, HELD, PACKED, RESERVED, SegmentPool

    pool = SegmentPool(1, 2, 1 << 16)
    assert pool._state.tolist() == [[RESERVED, RESERVED]], "no slot is usable before a generation"
    assert pool.new_generation()
    group = [_batch(i) for i in range(3)]
    packed = pack_group(iter(group), pool, 0)
    assert packed.slot is not None and pool._state.tolist() == [[PACKED, FREE]]
    wire = ForkingPickler.dumps(packed)
    assert len(wire) < 4096, "the slot's bytes crossed the queue"
    del packed  # the worker's own reference (another process in a DataLoader)
    got = unpack_batch(pickle.loads(wire))
    assert all(_same(a, b) for a, b in zip(group, got))
    slot_ptr = pool.buffers[0][0].data_ptr()
    assert got[2]["inputs"]["x"].untyped_storage().data_ptr() == slot_ptr
    assert pool._state.tolist() == [[HELD, FREE]]
    keep = got[1]["inputs"]["u"]
    del got
    pool.release()
    assert pool._state.tolist() == [[HELD, FREE]], "a slot was freed while a view of it lives"
    del keep
    pool.release()
    assert pool._state.tolist() == [[FREE, FREE]]
    a, b = pack_group(iter(group), pool, 0), pack_group(iter(group), pool, 0)
    assert a.slot[3] == 0 and b.slot[3] == 1
    full = pack_group(iter(group), pool, 0)  # every slot packed: a new segment, as without a pool
    assert full.slot is None and full.buf.is_shared()
    big = pack_group(iter([{"x": torch.zeros(1 << 17, dtype=torch.uint8)}]), pool, 0)
    assert big.slot is None, "a group larger than a slot must take a new segment"


def test_a_pool_serves_one_live_generation_and_stays_with_forked_workers():
    """While the DataLoader iterator of a generation lives, another cannot start (its
    workers might still write); slots sent by dead workers but never received are free in
    the next generation, held ones stay held; a pickled pool (a spawned worker) is None."""
    from midas_data.dataset.transport import FREE, HELD, PACKED, SegmentPool

    pool = SegmentPool(1, 3, 4096)
    assert pool.new_generation()

    class Iterator:
        pass

    it = Iterator()
    pool.own(it)
    pool._state[0] = [PACKED, HELD, FREE]
    assert pool.in_use() and not pool.new_generation()
    del it
    assert not pool.in_use() and pool.new_generation()
    assert pool._state.tolist() == [[FREE, HELD, FREE]]
    assert pickle.loads(pickle.dumps(pool)) is None


def test_forked_workers_pack_into_pool_slots_without_touching_batches_the_consumer_keeps():
    """Workers forked after the pool was made pack into its slots; the consumer keeps every
    third group and drops the others, and no kept group is overwritten by a later one."""
    from torch.utils.data import DataLoader, IterableDataset

    from midas_data.dataset.transport import SegmentPool

    pool = SegmentPool(2, 2, 1 << 16)

    class Groups(IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            for j in range(info.id, 24, info.num_workers):
                yield pack_group(iter([_batch(2 * j), _batch(2 * j + 1)]), pool, info.id)

    assert pool.new_generation()
    it = iter(DataLoader(Groups(), batch_size=None, num_workers=2, multiprocessing_context="fork"))
    pool.own(it)
    slots = {b.data_ptr() for row in pool.buffers for b in row}
    kept, from_slots = [], 0
    for j, item in enumerate(it):
        pool.release()
        from_slots += item.buf.data_ptr() in slots
        got = unpack_batch(item)
        if j % 3 == 0:
            kept.append((j, got))
    assert from_slots >= 4, "the workers did not pack into the pool's slots"
    for j, got in kept:
        assert all(_same(a, _batch(2 * j + i)) for i, a in enumerate(got)), f"group {j} was overwritten"


def test_pack_group_packs_batch_by_batch_and_gives_the_slot_back_when_it_cannot_use_it():
    """pack_group (each batch copied into the slot as soon as it is made) gives what
    pack_batch gives for the whole list; a group that outgrows its slot moves to a new
    segment with equal batches, and a batch that fails to build frees the slot it held."""
    from midas_data.dataset.transport import FREE, PACKED, SegmentPool

    group = [_batch(i) for i in range(3)]
    plain = unpack_batch(pack_batch(group))
    pool = SegmentPool(1, 1, 4096)
    assert pool.new_generation()
    packed = pack_group(iter(group), pool, 0)
    assert packed.slot is not None and pool._state.tolist() == [[PACKED]]
    got = unpack_batch(pickle.loads(ForkingPickler.dumps(packed)))
    assert all(_same(a, b) for a, b in zip(plain, got)) and len(got) == 3
    del packed, got
    pool.release()
    assert pool._state.tolist() == [[FREE]]
    big = [_batch(i) for i in range(40)]  # about 9 KiB: outgrows the 4 KiB slot halfway
    packed = pack_group(iter(big), pool, 0)
    assert packed.slot is None and pool._state.tolist() == [[FREE]], "the slot was not given back"
    assert all(_same(a, b) for a, b in zip(big, unpack_batch(packed)))

    def failing():
        yield _batch(0)
        raise OSError("damaged shard")

    with pytest.raises(OSError, match="damaged shard"):
        pack_group(failing(), pool, 0)
    assert pool._state.tolist() == [[FREE]], "a failed group kept its slot"
    assert all(_same(a, b) for a, b in zip(group, unpack_batch(pack_group(iter(group)))))


def _received(pool, group):
    wire = ForkingPickler.dumps(pack_group(iter(group), pool, 0))
    return unpack_batch(pickle.loads(wire))


def test_a_received_slot_has_a_storage_of_its_own_and_moving_it_keeps_views_valid():
    """The main process never hands out the pool's own storage: each received group gets a
    new one over the slot. A consumer that moves it to shared memory (`share_memory_`, what
    a torch.multiprocessing queue does) moves only that group's; a numpy view taken before
    the move still points at the slot, so the slot stays held until the view is gone."""
    from midas_data.dataset.transport import FREE, HELD, SegmentPool

    pool = SegmentPool(1, 1, 1 << 16)
    assert pool.new_generation()
    group = [_batch(i) for i in range(2)]
    got = _received(pool, group)
    own = pool.buffers[0][0].untyped_storage()
    label = got[1]["label"]
    assert label.untyped_storage()._cdata != own._cdata, "the pool's own storage was handed out"
    assert label.data_ptr() >= own.data_ptr() and pool._state.tolist() == [[HELD]]
    early = label.numpy()  # taken before the move: reads the slot's memory
    label.share_memory_()
    del got, label  # only the numpy view is left
    pool.release()
    assert pool._state.tolist() == [[HELD]], "a slot freed while a numpy view still read it"
    np.testing.assert_array_equal(early, group[1]["label"].numpy())
    del early
    pool.release()
    assert pool._state.tolist() == [[FREE]], "a slot nothing refers to stayed held"


def test_a_kept_storage_object_holds_its_slot():
    """Keeping only a batch tensor's storage object (`untyped_storage()`) keeps the slot."""
    from midas_data.dataset.transport import FREE, HELD, SegmentPool

    pool = SegmentPool(1, 1, 1 << 16)
    assert pool.new_generation()
    group = [_batch(i) for i in range(2)]
    got = _received(pool, group)
    storage = got[0]["inputs"]["x"].untyped_storage()
    del got
    pool.release()
    assert pool._state.tolist() == [[HELD]], "the slot was freed while its storage object lived"
    del storage
    pool.release()
    assert pool._state.tolist() == [[FREE]]


def test_a_pool_copied_by_fork_is_not_used_by_the_child():
    """A process forked after a pool was made neither polls its parent's workers (which
    only the parent may) nor unpacks a slot of the parent's pool."""
    import multiprocessing

    from midas_data.dataset.transport import SegmentPool, _from_slot

    pool = SegmentPool(1, 1, 4096)
    assert pool.new_generation()
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(5,))
    worker.start()
    try:
        pool._workers = [worker]
        assert pool.in_use()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            message = "ok"
            try:
                if pool.in_use():
                    message = "the child counted its parent's worker as its own"
                else:
                    try:
                        _from_slot((pool.token, pool.generation, 0, 0, 64), [])
                        message = "the child unpacked a slot of its parent's pool"
                    except RuntimeError:
                        pass
            except BaseException as e:  # noqa: BLE001 - everything is reported to the parent
                message = f"{type(e).__name__}: {e}"
            os.write(write, message.encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            reply = f.read().decode()
        os.waitpid(pid, 0)
        assert reply == "ok", reply
    finally:
        worker.kill()
        worker.join()
