"""Rank and world size of this process, for the stages that split work across processes."""

from __future__ import annotations

import os

import torch


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when it is initialised, else from the
    torchrun environment (RANK, WORLD_SIZE), else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
