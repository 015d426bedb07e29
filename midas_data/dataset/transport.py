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

`torch_batch` turns a `SplitReader.read_batch` result into the stream's batch layout
({'key', 'label', 'inputs'}) without copying the batch arrays again.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

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
    """A batch whose tensors sit in one byte array; see `pack_batch`."""

    __slots__ = ("buf", "tree")

    def __init__(self, buf: torch.Tensor | np.ndarray, tree: object):
        self.buf, self.tree = buf, tree

    def __reduce__(self):
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
    """Pack the tensors of a (nested dict / list / tuple) batch into one byte array."""
    tensors: list[torch.Tensor] = []
    slots: list[_Slot] = []
    end = 0

    def leaf(x: object) -> object:
        nonlocal end
        if not isinstance(x, torch.Tensor):
            return x
        t = x.detach()
        if t.device.type != "cpu":
            raise ValueError("pack_batch moves CPU tensors; this one is on " + str(t.device))
        t = t.contiguous()
        slot = _Slot(end, t.numel() * t.element_size(), t.dtype, tuple(t.shape), t.stride())
        end += -(-slot.nbytes // ALIGN) * ALIGN
        tensors.append(t)
        slots.append(slot)
        return slot

    tree = _map_leaves(batch, leaf)
    buf = _shared_bytes(end)
    flat = buf.numpy()  # numpy slicing costs a fraction of torch indexing, per tensor
    for t, slot in zip(tensors, slots):
        if slot.nbytes:
            flat[slot.offset:slot.offset + slot.nbytes] = t.reshape(-1).view(torch.uint8).numpy()
    return PackedBatch(buf, tree)


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


def _map_leaves(x: object, leaf) -> object:
    """`x` with every leaf replaced by `leaf(x)`, through dicts, lists and plain tuples
    (named tuples are leaves); pack and unpack walk a batch the same way."""
    if isinstance(x, dict):
        return {k: _map_leaves(v, leaf) for k, v in x.items()}
    if isinstance(x, list):
        if all(type(v) is str for v in x):  # keys, text: nothing to pack, and walked per batch
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
