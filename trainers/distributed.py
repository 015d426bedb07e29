"""torchrun plumbing: process group, device, and sums across ranks."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    device: torch.device
    initialised_here: bool  # we created the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", 1))
    created = False
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        created = True
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if cuda:
        # "auto"/"cuda": one GPU per process, picked by torchrun's LOCAL_RANK; "cuda:N" as given.
        local = int(os.environ.get("LOCAL_RANK", 0))
        dev = torch.device(f"cuda:{local}" if device in ("auto", "cuda") else device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu" if device == "auto" else device)
    return DistInfo(rank, world, dev, created)


def all_sum(values: list[float], info: DistInfo) -> list[float]:
    """Elementwise sum of `values` over ranks (float64; identity on one process)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)  # nccl needs CUDA tensors
    dist.all_reduce(t)
    return t.tolist()


def all_sum_named(values: Mapping[str, float | Sequence[float]],
                  info: DistInfo) -> dict[str, float | list[float]]:
    """Sum named scalars and vectors over ranks in one all_reduce; same names and shapes back.

    The values are packed in sorted-name order, so the layout depends only on the names and
    lengths, which every rank builds with the same code; a reader finds `out["loss"]`, not
    `s[1]`.
    """
    flat: list[float] = []
    spans: dict[str, tuple[int, int, bool]] = {}
    for name in sorted(values):
        v = values[name]
        scalar = isinstance(v, (int, float))
        items = [float(v)] if scalar else [float(x) for x in v]  # type: ignore[union-attr]
        spans[name] = (len(flat), len(flat) + len(items), scalar)
        flat += items
    total = all_sum(flat, info)
    return {name: total[lo] if scalar else total[lo:hi] for name, (lo, hi, scalar) in spans.items()}


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    if info.initialised_here and dist.is_initialized():
        dist.destroy_process_group()
