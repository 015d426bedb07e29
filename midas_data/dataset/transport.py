"""Move a decoded batch from a DataLoader worker to the main process in one piece.

A DataLoader worker sends each torch tensor of a batch through shared memory: one new
shared-memory segment per tensor, and with the default `file_descriptor` sharing strategy
one socket connection (with an authentication handshake) per tensor to hand the
descriptor over. A batch of a dozen small tensors then costs the main process more to
receive than a worker spends decoding it, and more workers make the loader slower.

`pack_batch` (in the worker) copies every tensor of a batch into one aligned byte tensor
and leaves the rest (keys, lists, numbers) as it is; the DataLoader's default conversion
passes the packed object through untouched and the queue moves one shared-memory segment
per batch, whatever the number of tensors. `unpack_batch` (in the main process) rebuilds the same nested dict,
each tensor a view of one shared buffer: same dtypes, shapes and values.

`torch_batch` turns a `SplitReader.read_batch` result into the stream's batch layout
({'key', 'label', 'inputs'}) without copying the batch arrays again.
"""

from __future__ import annotations

import numpy as np
import torch

ALIGN = 64  # each tensor's bytes start at a multiple of this, so any dtype view is aligned


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

    __slots__ = ("dtype", "nbytes", "offset", "shape")

    def __init__(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]):
        self.offset, self.nbytes, self.dtype, self.shape = offset, nbytes, dtype, shape

    def __reduce__(self):
        return _Slot, (self.offset, self.nbytes, self.dtype, self.shape)


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
        slot = _Slot(end, t.numel() * t.element_size(), t.dtype, tuple(t.shape))
        end += -(-slot.nbytes // ALIGN) * ALIGN
        tensors.append(t)
        slots.append(slot)
        return slot

    tree = _map_leaves(batch, leaf)
    buf = torch.empty(end, dtype=torch.uint8)
    for t, slot in zip(tensors, slots):
        if slot.nbytes:
            buf[slot.offset:slot.offset + slot.nbytes] = t.reshape(-1).view(torch.uint8)
    return PackedBatch(buf, tree)


def unpack_batch(packed: object) -> object:
    """The batch `pack_batch` packed, its tensors views of one buffer; anything that is
    not a PackedBatch is returned as it is (batches made in the main process)."""
    if not isinstance(packed, PackedBatch):
        return packed
    flat = packed.buf if isinstance(packed.buf, torch.Tensor) else torch.from_numpy(packed.buf)

    def leaf(x: object) -> object:
        if not isinstance(x, _Slot):
            return x
        if x.nbytes == 0:
            return torch.empty(x.shape, dtype=x.dtype)
        return flat[x.offset:x.offset + x.nbytes].view(x.dtype).reshape(x.shape)

    return _map_leaves(packed.tree, leaf)


def _map_leaves(x: object, leaf) -> object:
    """`x` with every leaf replaced by `leaf(x)`, through dicts, lists and plain tuples
    (named tuples are leaves); pack and unpack walk a batch the same way."""
    if isinstance(x, dict):
        return {k: _map_leaves(v, leaf) for k, v in x.items()}
    if isinstance(x, list):
        return [_map_leaves(v, leaf) for v in x]
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(_map_leaves(v, leaf) for v in x)
    return leaf(x)


def torch_batch(read: dict) -> dict:
    """{'key': [str], 'label': int64 tensor [B], 'inputs': {m: tensor [B, ...] or list}} from
    `SplitReader.read_batch`'s result: its arrays become tensors without a copy (the layout
    `collate` gives for the same samples; text and ragged audio stay lists)."""
    inputs = {m: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
              for m, v in read["inputs"].items()}
    return {"key": read["key"], "label": torch.from_numpy(read["label"]), "inputs": inputs}
