"""Move a decoded batch from a DataLoader worker to the main process in one piece.

A DataLoader worker sends each torch tensor of a batch through shared memory: one new
shared-memory segment per tensor, and with the default `file_descriptor` sharing strategy
one socket connection (with an authentication handshake) per tensor to hand the
descriptor over. A batch of a dozen small tensors then costs the main process more to
receive than a worker spends decoding it, and more workers make the loader slower.

`pack_batch` (in the worker) copies every tensor of a batch (or of a list of batches) into
one aligned byte tensor, allocated in shared memory so that the queue does not copy it
again, and leaves the rest (keys, lists, numbers) as it is; the DataLoader's default conversion
passes the packed object through untouched and the queue moves one shared-memory segment
per batch, whatever the number of tensors. `unpack_batch` (in the main process) rebuilds the same nested dict,
each tensor a view of one shared buffer: same dtypes, shapes and values.

Making that segment still costs the worker a page fault per page, and handing it over
costs both processes a file-descriptor exchange per queue item. A `SegmentPool`, made by
the main process before it forks the workers, gives each worker reusable slots that both
processes already map: `pack_group(batches, pool, worker)` packs into a free slot and the
queue carries the slot's number; the main process gives a slot back once nothing refers
to its batches any more (`SegmentPool.release`). MidasLoader uses a pool only when asked
(`reuse_shared_memory=True`).

`torch_batch` turns a `SplitReader.read_batch` result into the stream's batch layout
({'key', 'label', 'inputs'}) without copying the batch arrays again.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import weakref
from collections.abc import Iterable

import numpy as np
import torch

ALIGN = 64  # each tensor's bytes start at a multiple of this, so any dtype view is aligned
# A worker queue item costs the receiving process about a millisecond whatever its size
# (a pipe read, unpickling, a shared-memory handover), more than decoding a batch of small
# tensors: a worker sends groups of batches of about TRANSFER_BYTES together, at most
# MAX_TRANSFER_GROUP batches. The memory in flight stays within the DataLoader's
# prefetch_factor * num_workers groups.
TRANSFER_BYTES = 4 << 20
MAX_TRANSFER_GROUP = 16


class PackedBatch:
    """A batch whose tensors sit in one byte array; see `pack_batch`. `slot` is set on a
    batch packed into a `SegmentPool` slot: it then crosses the queue as the slot's place
    (pool, worker, slot number, bytes used), not as a buffer."""

    __slots__ = ("buf", "slot", "tree")

    def __init__(self, buf: torch.Tensor | np.ndarray, tree: object,
                 slot: tuple[int, int, int, int, int] | None = None):
        self.buf, self.tree, self.slot = buf, tree, slot

    def __reduce__(self):
        if self.slot is not None:
            return _from_slot, (self.slot, self.tree)
        return PackedBatch, (self.buf, self.tree)

    def pin_memory(self, *args) -> PackedBatch:
        """What a DataLoader with pin_memory=True calls: pins the one buffer, so every
        tensor `unpack_batch` returns is pinned."""
        return PackedBatch(self.buf.pin_memory(*args), self.tree)


class _Slot:
    """Where one tensor lies in the packed buffer."""

    __slots__ = ("dtype", "nbytes", "offset", "shape", "stride")

    def __init__(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...],
                 stride: tuple[int, ...]):
        self.offset, self.nbytes, self.dtype, self.shape = offset, nbytes, dtype, shape
        self.stride = stride  # contiguous strides, worked out in the worker, not the main process

    def __reduce__(self):
        return _Slot, (self.offset, self.nbytes, self.dtype, self.shape, self.stride)


def pack_batch(batch: object) -> PackedBatch:
    """Pack the tensors of a (nested dict / list / tuple) batch into one byte array, a new
    shared-memory segment (`pack_group` packs a group into a `SegmentPool` slot)."""
    sources, offsets, tree, end = _layout(batch, 0)
    buf = _shared_bytes(end)
    _copy_into(buf.numpy(), sources, offsets)
    return PackedBatch(buf, tree)


def pack_group(batches: Iterable[object], pool: SegmentPool | None = None,
               worker: int = 0) -> PackedBatch:
    """`pack_batch(list(batches))`, or into a free slot of `pool` (the DataLoader worker
    `worker`'s own), packing each batch as soon as it is made: in a slot, a batch is copied
    into it before the next one is built, so
    a worker holds one decoded batch at a time instead of the whole group (its memory is
    reused batch after batch, not grown and returned to the system every group). A group
    that outgrows the slot, or without a free slot, goes to a new segment at the end."""
    slot = pool.take(worker) if pool is not None else None
    flat = pool.buffers[worker][slot].numpy() if slot is not None else None
    trees: list = []
    pending: list[tuple[list[np.ndarray], list[int]]] = []  # copied once the group's size is known
    end = 0
    try:
        for batch in batches:
            sources, offsets, tree, stop = _layout(batch, end)
            trees.append(tree)
            if flat is not None and stop > flat.size:  # too large for the slot: give it back
                pending.append(([flat[:end].copy()], [0]))
                pool.give_back(worker, slot)
                slot = flat = None
            if flat is not None:
                pool.map(worker, slot, stop)
                _copy_into(flat, sources, offsets)
            else:
                pending.append((sources, offsets))
            end = stop
    except BaseException:
        if slot is not None:
            pool.give_back(worker, slot)
        raise
    if slot is not None:
        return PackedBatch(pool.buffers[worker][slot], trees, (pool.token, pool.generation, worker, slot, end))
    buf = _shared_bytes(end)
    for sources, offsets in pending:
        _copy_into(buf.numpy(), sources, offsets)
    return PackedBatch(buf, trees)


def _layout(batch: object, start: int) -> tuple[list[np.ndarray], list[int], object, int]:
    """Where `batch`'s tensors go from byte `start` on: their bytes (flat uint8 arrays), their
    offsets, the batch with each tensor replaced by its `_Slot`, and the end offset."""
    sources: list[np.ndarray] = []
    offsets: list[int] = []
    end = start

    def leaf(x: object) -> object:
        nonlocal end
        if not isinstance(x, torch.Tensor):
            return x
        if x.device.type != "cpu":
            raise ValueError("pack_batch moves CPU tensors; this one is on " + str(x.device))
        shape = tuple(x.shape)
        try:  # numpy's view of a tensor costs a fraction of torch's reshape and view, per tensor
            a = x.numpy()
        except (RuntimeError, TypeError):  # needs grad, a dtype numpy lacks (bfloat16), ...
            a = x.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        else:
            if not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)
            a = a.reshape(-1).view(np.uint8)
        slot = _Slot(end, a.size, x.dtype, shape, _contiguous_strides(shape))
        if a.size:
            sources.append(a)
            offsets.append(end)
        end += -(-a.size // ALIGN) * ALIGN
        return slot

    tree = _map_leaves(batch, leaf)
    return sources, offsets, tree, end


def _copy_into(flat: np.ndarray, sources: list[np.ndarray], offsets: list[int]) -> None:
    for a, at in zip(sources, offsets):  # numpy slicing costs a fraction of torch indexing
        flat[at:at + a.size] = a


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides torch gives a contiguous tensor of `shape` (a size-0 dimension counts
    as 1), worked out in the worker so that the main process only makes views."""
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= d if d > 1 else 1
    return tuple(reversed(strides))


def _shared_bytes(n: int) -> torch.Tensor:
    """`n` uninitialised bytes, in shared memory when torch can make it: the worker queue then
    hands the segment over as it is, where a private buffer would be copied into a new
    segment first (one more copy of every batch, and its page faults)."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is not None and n > 0:
        try:
            buf = torch.empty(0, dtype=torch.uint8).set_(new_shared(n))
        except RuntimeError:  # no shared memory here (e.g. /dev/shm full): a private buffer
            return torch.empty(n, dtype=torch.uint8)
        _populate(buf.data_ptr(), n)
        return buf
    return torch.empty(n, dtype=torch.uint8)


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault a whole range in, writable, in one call
_madvise = None


def _populate(ptr: int, n: int) -> None:
    """Fault the pages of a new shared-memory segment in with one system call: filling it
    page fault by page fault costs several times the copy itself (measured 6.1 against 2.8 ms
    per 4 MiB in a VM). Where the call is missing or refused, the copy faults them in."""
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                libc.madvise.restype = ctypes.c_int
                _madvise = libc.madvise
            except (OSError, AttributeError):
                pass
    if _madvise:
        start = ptr - ptr % mmap.PAGESIZE
        _madvise(start, n + (ptr - start), _MADV_POPULATE_WRITE)  # an error (old kernel) is harmless


# Slot states in a SegmentPool's `state` table (shared between the main process and its workers).
FREE, PACKED, HELD, RESERVED = 0, 1, 2, 3
_POOLS: dict[int, weakref.ref] = {}  # the pools of this process by token, for unpickling slots


class SegmentPool:
    """Shared-memory segments that a loader's DataLoader workers pack their groups into,
    made once in the main process and inherited by every worker it forks.

    A new segment per group costs the worker its creation (torch allocates every page at
    once) and the main process a file-descriptor handover through the worker's resource
    sharer; a slot of the pool (an anonymous shared mapping, made before the workers are
    forked) crosses the queue as its number only, and its pages stay allocated across
    passes and mapped in the main process. Each worker has its own `slots` slots of `slot_bytes`; `state` (shared,
    int64 [workers, slots]) says who may touch each: FREE (the worker may fill it),
    PACKED (filled and sent), HELD (received by the main process), RESERVED (not in use
    this generation). The main process hands out each received group as a new tensor over
    the slot (`receive`: a storage of its own, never the pool's) and frees the HELD slot
    (`release`) once nothing Python can see refers to it: the storage's use count and the
    references to its storage object are back to what `receive` recorded. A batch kept by
    the consumer, or moved to shared memory while a view of it lives, is never
    overwritten; a worker with no free slot packs into a new segment, as without a pool.
    One generation (one DataLoader iterator, whose workers hold this `state`) uses the pool
    at a time.
    """

    def __init__(self, num_workers: int, slots: int, slot_bytes: int):
        page = mmap.PAGESIZE
        self.slot_bytes = -(-int(slot_bytes) // page) * page
        self.token = int.from_bytes(os.urandom(8), "little") >> 1
        # anonymous shared mappings: inherited by forked workers, no file to leak, pages
        # allocated where first touched (by the worker that packs into the slot)
        self._maps = [[mmap.mmap(-1, self.slot_bytes) for _ in range(slots)] for _ in range(num_workers)]
        self.buffers = [[torch.frombuffer(m, dtype=torch.uint8) for m in row] for row in self._maps]
        # In the main process, per HELD slot: [the tensor made over the slot by `receive` (its
        # own storage, never the pool's), that storage, its use count, its references].
        self._held: dict[tuple[int, int], list] = {}
        self.generation = 0
        self.state = torch.full((num_workers, slots), RESERVED, dtype=torch.int64).share_memory_()
        self._state = self.state.numpy()
        self._owner: weakref.ref | None = None  # the DataLoader iterator of this generation
        self._workers: list = []  # and its worker processes (multiprocessing.Process)
        self._mapped: dict[tuple[int, int], int] = {}  # bytes of each slot faulted in here
        self._pid = os.getpid()
        self.creator = os.getpid()  # a process forked later shares the slots: it makes its own pool
        _POOLS[self.token] = weakref.ref(self)

    def __reduce__(self):
        # Only forked workers share the pool (its slots are inherited mappings); a worker
        # started by "spawn" gets none and packs into new segments.
        return _no_pool, ()

    def in_use(self) -> bool:
        """Whether this generation's iterator, or one of its workers, may still be running."""
        if self._owner is not None and self._owner() is not None:
            return True
        # A process forked after this pool was made sees its parent's worker handles (which
        # only the parent may poll); they are not its workers.
        pid = os.getpid()
        self._workers = [w for w in self._workers if getattr(w, "_parent_pid", pid) == pid and w.is_alive()]
        return bool(self._workers)

    def new_generation(self) -> bool:
        """Start a generation for workers about to be forked (they inherit `state`); False,
        leaving every slot reserved for it, while the last generation's iterator lives.
        Slots sent by dead workers but never received become free; slots whose views the
        consumer still holds stay HELD until `release`."""
        if self.in_use():
            return False
        state = self._state
        held = state == HELD
        fresh = torch.full(state.shape, FREE, dtype=torch.int64).share_memory_()
        fresh.numpy()[held] = HELD
        self.state, self._state, self._owner = fresh, fresh.numpy(), None
        self.generation += 1
        return True

    def own(self, iterator: object) -> None:
        """The DataLoader iterator whose workers use this generation."""
        self._owner = weakref.ref(iterator)
        self._workers = list(getattr(iterator, "_workers", ()))  # its worker processes

    def take(self, worker: int) -> int | None:
        """In a worker: a free slot of its own, now PACKED; None if none (`map` faults in
        the part a group fills)."""
        if worker >= len(self.buffers):
            return None
        row = self._state[worker]
        free = np.flatnonzero(row == FREE)
        if not free.size:
            return None
        slot = int(free[0])
        row[slot] = PACKED
        return slot

    def map(self, worker: int, slot: int, nbytes: int) -> None:
        """Fault the first `nbytes` of a slot into this process at once, where not done yet
        (a forked worker inherits the mapping, not its page table entries): one system
        call for the part a group is about to fill, not a fault per page, and never the
        part of the slot that small groups leave unused."""
        if os.getpid() != self._pid:  # a forked worker: nothing of the slots is mapped yet
            self._mapped, self._pid = {}, os.getpid()
        done = self._mapped.get((worker, slot), 0)
        if nbytes > done:
            ptr = self.buffers[worker][slot].data_ptr()
            _populate(ptr + done, min(nbytes, self.slot_bytes) - done)
            self._mapped[(worker, slot)] = min(nbytes, self.slot_bytes)

    def give_back(self, worker: int, slot: int) -> None:
        """In a worker: a slot it took but did not send is free again."""
        self._state[worker, slot] = FREE

    def receive(self, generation: int, worker: int, slot: int, nbytes: int) -> torch.Tensor:
        """In the main process: the first `nbytes` of a slot a worker sent, now HELD, as a
        new tensor over the slot's mapping with a storage of its own. The pool's own
        storage is never handed out, so a consumer that moves a batch's storage to a new
        segment (`share_memory_`, a torch.multiprocessing queue) moves only that group's."""
        base = torch.frombuffer(self._maps[worker][slot], dtype=torch.uint8, count=nbytes) if nbytes \
            else torch.empty(0, dtype=torch.uint8)
        if generation != self.generation or not nbytes:
            return base[:]
        # `base` stays in the entry: it keeps torch's own reference to the storage object
        # that the recorded count includes
        entry = [base, base.untyped_storage(), 0, 0]
        entry[2] = _use_count(entry[1]._cdata)
        entry[3] = _storage_refs(entry)  # measured the same way as in release()
        view = base[:]  # a view: the batch counts as a use until it is unpacked
        # the view and its bookkeeping exist before the slot is HELD: a release() running
        # meanwhile (the pin_memory thread unpickles) never frees a slot still being handed out
        self._held[(worker, slot)] = entry
        self._state[worker, slot] = HELD
        return view

    def release(self) -> None:
        """In the main process: free the HELD slots that nothing refers to any more: the
        storage's use count (tensors, numpy and DLPack views hold a tensor) and the Python
        references to its storage object are back to what `receive` recorded. A storage the
        consumer moved to shared memory keeps its slot until its tensors are gone too, so
        views taken before the move stay valid."""
        for w, s in zip(*np.nonzero(self._state == HELD)):
            held = self._held.get((int(w), int(s)))
            if held is None:
                continue
            if _use_count(held[1]._cdata) <= held[2] and _storage_refs(held) <= held[3]:
                del self._held[(int(w), int(s))]
                self._state[w, s] = FREE


def _no_pool() -> None:
    return None


def _storage_refs(entry: list) -> int:
    """References to a held entry's storage object, counted by the same code wherever it is
    asked (so the interpreter's own temporary references are the same on both sides)."""
    return sys.getrefcount(entry[1])


def _use_count(storage_cdata: int) -> int:
    return torch._C._storage_Use_Count(storage_cdata)


def _from_slot(slot: tuple[int, int, int, int, int], tree: object) -> PackedBatch:
    """Unpickle a batch packed into a pool slot: the main process's view of that slot."""
    token, generation, worker, index, nbytes = slot
    ref = _POOLS.get(token)
    pool = ref() if ref is not None else None
    if pool is not None and pool.creator != os.getpid():  # a forked copy of another process's pool
        _POOLS.pop(token, None)
        pool = None
    if pool is None:
        raise RuntimeError("a batch packed into a shared-memory pool reached a process without "
                           "that pool (pools work across forked DataLoader workers only)")
    return PackedBatch(pool.receive(generation, worker, index, nbytes), tree)


def unpack_batch(packed: object) -> object:
    """The batch `pack_batch` packed, its tensors views of one buffer; anything that is
    not a PackedBatch is returned as it is (batches made in the main process)."""
    if not isinstance(packed, PackedBatch):
        return packed
    flat = packed.buf if isinstance(packed.buf, torch.Tensor) else torch.from_numpy(packed.buf)
    views: dict[torch.dtype, torch.Tensor] = {}  # the buffer seen as each dtype, made once

    def leaf(x: object) -> object:
        if not isinstance(x, _Slot):
            return x
        if x.nbytes == 0:
            return torch.empty(x.shape, dtype=x.dtype)
        view = views.get(x.dtype)
        if view is None:  # the buffer's length is a multiple of ALIGN, so any dtype divides it
            view = views[x.dtype] = flat.view(x.dtype)
        # one as_strided per tensor: a third of what slicing, viewing and reshaping cost
        return view.as_strided(x.shape, x.stride, x.offset // view.element_size())

    return _map_leaves(packed.tree, leaf)


_STR = frozenset({str})


def _map_leaves(x: object, leaf) -> object:
    """`x` with every leaf replaced by `leaf(x)`, through dicts, lists and plain tuples
    (named tuples are leaves); pack and unpack walk a batch the same way."""
    if isinstance(x, dict):
        return {k: _map_leaves(v, leaf) for k, v in x.items()}
    if isinstance(x, list):
        if set(map(type, x)) <= _STR:  # keys, text: nothing to pack, and walked per batch
            return x
        return [_map_leaves(v, leaf) for v in x]
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(_map_leaves(v, leaf) for v in x)
    return leaf(x)


def transfer_group_size(batch_bytes: int, num_batches: int, num_workers: int) -> int:
    """Batches per worker-queue item: as many as fit in `TRANSFER_BYTES` (at least 1, at
    most `MAX_TRANSFER_GROUP`), and few enough that every worker sends at least eight
    groups of the `num_batches` of a pass, so the workers' shares stay balanced."""
    by_bytes = TRANSFER_BYTES // max(int(batch_bytes), 1)
    by_balance = int(num_batches) // (8 * max(int(num_workers), 1))
    return max(1, min(MAX_TRANSFER_GROUP, by_bytes, by_balance))


def torch_batch(read: dict) -> dict:
    """{'key': [str], 'label': int64 tensor [B], 'inputs': {m: tensor [B, ...] or list}} from
    `SplitReader.read_batch`'s result: its arrays become tensors without a copy (the layout
    `collate` gives for the same samples; text and ragged audio stay lists)."""
    inputs = {m: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
              for m, v in read["inputs"].items()}
    return {"key": read["key"], "label": torch.from_numpy(read["label"]), "inputs": inputs}
