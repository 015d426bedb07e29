"""What one batch costs to cross a DataLoader worker queue, as is and packed.

A child process puts `--batches` fresh copies of one MidasDataset batch (batch 64, random
partners: a dozen tensors plus keys) on a torch.multiprocessing queue; the parent times
getting them. Compared, in the same run, best of `--rounds`:

- as is: what a DataLoader worker sends today. Each tensor goes to shared memory and its
  descriptor is handed over through its own socket connection (with an authentication
  handshake), so the cost grows with the number of tensors, not their size.
- packed: `midas_data.dataset.transport.pack_batch` in the child, `unpack_batch` in the
  parent: one byte array pickled by value through the pipe.
- packed by value: the same byte array as a numpy array, which the queue pickles by value
  (no shared memory, one copy through the pipe).
- packed groups: `--group` batches packed into one new shared-memory buffer per queue item
  (the cost per item spread over the group).
- pool groups: the same groups packed batch by batch into the slots of a `SegmentPool`
  made before the fork, as MidasLoader's workers send them (the slot's number crosses).
- one tensor: a single tensor of the batch's total size, for scale.

Run: python bench/worker_queue.py [--batches 160] [--rounds 3] [--group 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from midas_data import Sample, build_dataset
from midas_data.dataset.transport import (
    PackedBatch,
    SegmentPool,
    pack_batch,
    pack_group,
    unpack_batch,
)
from midas_data.stream.dataset import MidasDataset


def fresh(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: fresh(v) for k, v in x.items()}
    return x


def producer(q, done, sent_cpu, pool, root: str, mode: str, n: int, group: int) -> None:
    batch = next(iter(MidasDataset(root, batch_size=64, policy="random")))
    size = sum(v.numel() * v.element_size() for v in (*batch["inputs"].values(),
                                                      *(t for t in batch.values() if isinstance(t, torch.Tensor))))
    q.put(pack_batch(batch))  # the first one pays for the child's start
    c = time.process_time()
    for _ in range(n // group if mode in ("packed groups", "pool groups") else n):
        if mode == "packed groups":
            q.put(pack_batch([fresh(batch) for _ in range(group)]))
        elif mode == "pool groups":
            q.put(pack_group((fresh(batch) for _ in range(group)), pool, 0))
        elif mode == "as is":
            q.put(fresh(batch))
        elif mode == "packed":
            q.put(pack_batch(batch))
        elif mode == "packed by value":
            packed = pack_batch(batch)
            q.put(PackedBatch(packed.buf.numpy(), packed.tree))
        else:
            q.put(torch.zeros(size, dtype=torch.uint8))
    sent_cpu.value = time.process_time() - c
    q.put(None)
    done.wait()  # shared-memory handles live until the parent has taken them


def per_batch(ctx, root: str, mode: str, n: int, group: int) -> tuple[float, float, float]:
    """Wall time, receiver CPU and sender CPU per batch."""
    q, done, sent_cpu = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    pool = None
    if mode == "pool groups":  # made before the fork, as MidasLoader makes it
        pool = SegmentPool(1, 4, group * 400_000)
        pool.new_generation()
    p = ctx.Process(target=producer, args=(q, done, sent_cpu, pool, root, mode, n, group))
    p.start()
    unpack_batch(q.get())  # the first one pays for the child's start
    t, c, k = time.perf_counter(), time.process_time(), 0
    while (item := q.get()) is not None:
        if pool is not None:
            pool.release()
        got = unpack_batch(item)
        k += len(got) if isinstance(got, list) else 1
    elapsed, cpu = time.perf_counter() - t, time.process_time() - c
    done.set()
    p.join()
    return elapsed / k, cpu / k, sent_cpu.value / k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=160)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((256, 1024), np.float32), rng.standard_normal((256, 256), np.float32)
        build_dataset([Sample(f"k{i:04d}", i % 10, {"a": a[i], "b": b[i]}, split="train")
                       for i in range(256)], root, progress=False)
        modes = ("as is", "packed", "packed by value", "packed groups", "pool groups", "one tensor")
        best = {m: float("inf") for m in modes}
        cpu = {m: float("inf") for m in modes}
        sent = {m: float("inf") for m in modes}
        for _ in range(args.rounds):
            for mode in modes:
                t, c, s = per_batch(ctx, str(root), mode, args.batches, args.group)
                best[mode], cpu[mode], sent[mode] = min(best[mode], t), min(cpu[mode], c), min(sent[mode], s)
    print(f"one batch of 64 (random partners) through a worker queue, best of {args.rounds}:")
    print(f"  {'':<16} {'wall us/batch':>14} {'receiver CPU us/batch':>22} {'sender CPU us/batch':>20}")
    for mode in modes:
        print(f"  {mode:<16} {best[mode] * 1e6:14.0f} {cpu[mode] * 1e6:22.0f} {sent[mode] * 1e6:20.0f}")
    print(f"  as is / packed = {best['as is'] / best['packed']:.1f}x, packed / packed groups of "
          f"{args.group} = {best['packed'] / best['packed groups']:.1f}x (receiver CPU "
          f"{cpu['packed'] / cpu['packed groups']:.1f}x); packed groups / pool groups: sender CPU "
          f"{sent['packed groups'] / sent['pool groups']:.2f}x, receiver CPU "
          f"{cpu['packed groups'] / cpu['pool groups']:.2f}x")


if __name__ == "__main__":
    main()
