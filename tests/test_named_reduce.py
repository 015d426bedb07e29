"""The trainer's epoch summary is reduced over ranks by name, not by position."""

from __future__ import annotations

import math

import pytest
import torch
from midas_data.trainers import distributed
from midas_data.trainers.distributed import DistInfo, all_sum_named
from midas_data.trainers.loop import EpochTracker, finish_epoch

from midas_data.loss import AlphaStats


def _two_ranks(monkeypatch, other: dict[str, float | list[float]]) -> None:
    """Stand-in for a 2-rank all_reduce: add `other` (the second rank's named values, packed
    by the same all_sum_named) to this rank's flat vector."""
    other_flat: list[float] = []
    for name in sorted(other):
        v = other[name]
        other_flat += [float(v)] if isinstance(v, (int, float)) else [float(x) for x in v]
    monkeypatch.setattr(distributed, "all_sum",
                        lambda flat, info: [a + b for a, b in zip(flat, other_flat, strict=True)])


def test_all_sum_named_returns_each_name_with_its_shape(monkeypatch):
    info = DistInfo(0, 2, torch.device("cpu"), False)
    mine = {"z": 1.0, "a": [1.0, 2.0, 3.0], "m": 5, "empty": []}
    _two_ranks(monkeypatch, {"z": 10.0, "a": [10.0, 20.0, 30.0], "m": 50, "empty": []})
    out = all_sum_named(mine, info)
    assert out == {"a": [11.0, 22.0, 33.0], "empty": [], "m": 55.0, "z": 11.0}


def test_all_sum_named_is_the_identity_on_one_process():
    info = DistInfo(0, 1, torch.device("cpu"), False)
    assert all_sum_named({"b": [0.5, 0.25], "a": 3.0}, info) == {"a": 3.0, "b": [0.5, 0.25]}


def _tracker(steps: int, scale: float) -> EpochTracker:
    t = EpochTracker(epoch=3, num_modalities=2, steps=steps, n=10 * scale, loss=20 * scale,
                     fused=4 * scale, uni=6 * scale, mis=8 * scale, n_fused=5 * scale,
                     correct_fused=3 * scale, correct_uni=[7 * scale, 2 * scale],
                     conf=[9 * scale, 1 * scale])
    t.alpha_stats = AlphaStats(1.5 * scale, 0.5 * scale, 2.5 * scale, 0.25 * scale, int(4 * scale))
    return t


def test_finish_epoch_sums_every_named_field_over_ranks(monkeypatch):
    rank0, rank1 = _tracker(steps=7, scale=1.0), _tracker(steps=7, scale=2.0)
    # what rank 1 contributes, in finish_epoch's own names
    other = {"n": 20.0, "loss": 40.0, "fused": 8.0, "uni": 12.0, "mis": 16.0, "n_fused": 10.0,
             "correct_fused": 6.0, "correct_uni": [14.0, 4.0], "conf": [18.0, 2.0],
             "batches": [0.0, 7.0], "alpha.fused_strong": 3.0, "alpha.fused_weak": 1.0,
             "alpha.uni_strong": 5.0, "alpha.uni_weak": 0.5, "alpha.count": 8}
    assert rank1.n == other["n"]
    _two_ranks(monkeypatch, other)
    s = finish_epoch(rank0, DistInfo(0, 2, torch.device("cpu"), False))
    assert s["samples"] == 30
    assert math.isclose(s["loss"], 60 / 30) and math.isclose(s["loss_fused"], 12 / 30)
    assert math.isclose(s["loss_unimodal"], 18 / 30) and math.isclose(s["loss_misaligned"], 24 / 30)
    assert math.isclose(s["acc"], 9 / 15)
    assert s["unimodal_acc"] == pytest.approx([21 / 30, 6 / 30])
    assert s["mean_conf"] == pytest.approx([27 / 30, 3 / 30])
    assert s["alpha_stats"] == AlphaStats(4.5, 1.5, 7.5, 0.75, 12)
    assert isinstance(s["alpha_stats"].count, int)
    assert s["batches_per_rank"] == [7, 7]


def test_finish_epoch_without_fused_rows_reports_nan_accuracy():
    t = _tracker(steps=2, scale=1.0)
    t.n_fused, t.correct_fused = 0.0, 0.0
    s = finish_epoch(t, DistInfo(0, 1, torch.device("cpu"), False))
    assert math.isnan(s["acc"]) and s["samples"] == 10 and s["batches_per_rank"] == [2]
