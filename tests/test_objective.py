"""MidasObjective (the user's own loop) against float64 references written from the method:
aligned CE + lam * mean_n h_n sum_m a_m c~_nm CE(z_n, y_nm), alpha by the pooled rule once
per epoch or by the authors' rule per batch, exact resume through state_dict."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from midas_data import MidasObjective, Sample, build_dataset
from midas_data.features.extract import extract_features
from midas_data.stream.dataset import MidasDataset, materialize_misaligned

pytestmark = pytest.mark.usefixtures("one_torch_thread")
C = 3


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    rng = np.random.default_rng(2)
    root = tmp_path_factory.mktemp("obj") / "ds"
    samples = [Sample(f"s{i:03d}", i % C, {"a": rng.normal(size=5).astype(np.float32) + i % C,
                                           "b": rng.normal(size=2).astype(np.float32) + 0.3 * (i % C)},
                      split="train") for i in range(48)]
    build_dataset(samples, root, progress=False)
    extract_features(root, warmup_epochs=1, splits=("train",), progress=False, num_threads=1)
    return root


@pytest.fixture(scope="module")
def batches(dataset_root):
    return list(MidasDataset(dataset_root, batch_size=16, seed=0))


@pytest.fixture(scope="module")
def batches_of_8(dataset_root):
    return list(MidasDataset(dataset_root, batch_size=8, seed=0))


def _logits(batch: dict, seed: int, bias_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logits for the aligned and the misaligned rows; `bias_to` raises the logit of
    the label of that modality's source, so the fused head follows that modality."""
    gen = torch.Generator().manual_seed(seed)
    mis = materialize_misaligned(batch)
    z = torch.randn(len(batch["label"]), C, generator=gen, dtype=torch.float64)
    zm = torch.randn(len(mis["anchor"]), C, generator=gen, dtype=torch.float64)
    if bias_to is not None:
        for n, (b, m) in enumerate(zip(mis["anchor"].tolist(), mis["swapped"].tolist())):
            src = batch["partner"][b, m] if m == bias_to else b
            zm[n, int(batch["label"][src])] += 3.0
    return z, zm


def _sources(batch: dict, b: int, m: int) -> list[int]:
    j = int(batch["partner"][b, m])
    return [j if k == m else b for k in range(batch["partner"].shape[1])]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _reference_loss(z: np.ndarray, zm: np.ndarray, batch: dict, lam: float, alpha: float, weak: int) -> float:
    label, conf = batch["label"].numpy(), batch["conf"].numpy().astype(np.float64)
    sim = batch["similarity"].numpy().astype(np.float64)
    ce = np.mean([-np.log(_softmax(z[i])[label[i]]) for i in range(len(label))])
    total, n = 0.0, 0
    for b in range(batch["partner"].shape[0]):
        for m in range(batch["partner"].shape[1]):
            if batch["partner"][b, m] < 0:
                continue
            src = _sources(batch, b, m)
            c = [conf[src[k], k] for k in range(len(src))]
            p = _softmax(zm[n])
            loss = sum((alpha if k == weak else 1.0) * c[k] / sum(c) * -np.log(p[label[src[k]]])
                       for k in range(len(src)))
            total += (1.0 + (sim[b, m] + 1.0) / 2.0) * loss
            n += 1
    return ce + lam * total / n


def _rows(batch: dict, zm: np.ndarray):
    """(fused softmax, source labels [M], source confidences [M], swapped modality) per row."""
    label, conf = batch["label"].numpy(), batch["conf"].numpy().astype(np.float64)
    n = 0
    for b in range(batch["partner"].shape[0]):
        for m in range(batch["partner"].shape[1]):
            if batch["partner"][b, m] < 0:
                continue
            src = _sources(batch, b, m)
            yield _softmax(zm[n]), [label[s] for s in src], [conf[s, k] for k, s in enumerate(src)], m
            n += 1


def test_loss_matches_float64_reference(batches):
    batch = batches[0]
    weak = int(np.argmin(batch["conf"].numpy().mean(0)))
    obj = MidasObjective(lam=0.7, alpha=1.6)
    mis = materialize_misaligned(batch)
    z, zm = _logits(batch, 0)
    got = obj(z, zm, batch, mis)
    assert obj.weak == weak
    assert math.isclose(float(got), _reference_loss(z.numpy(), zm.numpy(), batch, 0.7, 1.6, weak), rel_tol=1e-6)


@pytest.mark.parametrize("bias_to", [0, 1, None])
def test_end_epoch_takes_the_pooled_step_over_the_epoch(batches, bias_to):
    obj = MidasObjective(alpha=1.5)
    ps = pw = cs = cw = 0.0
    for i, batch in enumerate(batches):
        z, zm = _logits(batch, i, bias_to)
        obj(z, zm, batch, materialize_misaligned(batch))
        weak, strong = obj.weak, obj.strong
        for p, y, c, _ in _rows(batch, zm.numpy()):
            if y[strong] != y[weak]:
                ps, pw, cs, cw = ps + p[y[strong]], pw + p[y[weak]], cs + c[strong], cw + c[weak]
    assert obj.alpha == 1.5  # nothing moves within the epoch
    expected = 1.55 if ps / pw > cs / cw else 1.45
    assert obj.end_epoch() == pytest.approx(expected)
    if bias_to is not None:  # the fused head follows the strong (weak) modality: up (down)
        strong_index = int(np.argmax(np.mean([b["conf"].numpy().mean(0) for b in batches], 0)))
        assert (expected > 1.5) == (bias_to == strong_index)


def test_batch_mode_takes_the_authors_step_after_every_batch(batches):
    obj = MidasObjective(alpha=1.5, alpha_update="batch")
    alpha = 1.5
    for i, batch in enumerate(batches):
        z, zm = _logits(batch, 10 + i, bias_to=i % 2)
        obj(z, zm, batch, materialize_misaligned(batch))
        conf = batch["conf"].numpy().astype(np.float64)
        u = conf[:, 0].mean() / conf[:, 1].mean()
        r = {m: [(p[y[0]], p[y[1]]) for p, y, _, sw in _rows(batch, zm.numpy()) if sw == m] for m in (0, 1)}
        r_a = np.mean([a for a, _ in r[1]]) / np.mean([b for _, b in r[1]])
        r_b = np.mean([a for a, _ in r[0]]) / np.mean([b for _, b in r[0]])
        mm = (r_a + r_b) / 2
        up = mm > u if u > 1 else mm < u
        alpha = max(1.0, alpha + 0.05 if up else alpha - 0.05)
        assert obj.alpha == pytest.approx(alpha)
    assert obj.end_epoch() == pytest.approx(alpha)  # batch mode: no extra epoch step


def test_state_dict_resumes_mid_epoch_exactly(batches):
    a = MidasObjective(alpha=1.2)
    losses_a, losses_b = [], []
    for epoch in range(2):
        for i, batch in enumerate(batches):
            z, zm = _logits(batch, 100 * epoch + i, bias_to=0)
            losses_a.append(float(a(z, zm, batch, materialize_misaligned(batch))))
            if epoch == 1 and i == 1:
                b = MidasObjective(lam=5.0)  # different settings, all replaced by the state
                b.load_state_dict(json.loads(json.dumps(a.state_dict())))
            elif epoch == 1 and i > 1:
                losses_b.append(float(b(z, zm, batch, materialize_misaligned(batch))))
        a.end_epoch()
    b.end_epoch()
    assert losses_b == losses_a[-len(losses_b):]
    assert b.alpha == a.alpha and b.weak == a.weak and a.alpha != 1.2


def test_gradient_reaches_both_logits(batches):
    batch = batches[0]
    mis = materialize_misaligned(batch)
    z, zm = (t.float().requires_grad_() for t in _logits(batch, 0))
    MidasObjective()(z, zm, batch, mis).backward()
    assert z.grad.abs().sum() > 0 and zm.grad.abs().sum() > 0


def test_bad_input_says_what_to_do(batches):
    batch = dict(batches[0])
    mis = materialize_misaligned(batch)
    z, zm = _logits(batch, 0)
    with pytest.raises(ValueError, match="rows but the batch has"):
        MidasObjective()(z, zm[:-1], batch, mis)
    batch["conf"] = torch.full_like(batch["conf"], float("nan"))
    with pytest.raises(ValueError, match="midas-data extract"):
        MidasObjective()(z, zm, batch, mis)
    # alpha fixed: no confidences needed (the stream's 0.5 / 0.5 weights)
    assert torch.isfinite(MidasObjective(alpha_update="fixed", weak=1)(z, zm, batch, mis))
    with pytest.raises(ValueError, match="alpha_update"):
        MidasObjective(alpha_update="sometimes")


DDP_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from midas_data import MidasObjective, materialize_misaligned

dist.init_process_group("gloo")
rank = dist.get_rank()
batches, logits = torch.load(sys.argv[1], weights_only=False)
out = {}
for mode in ("epoch", "batch"):
    obj = MidasObjective(alpha=1.5, alpha_update=mode)
    alphas, weaks = [], []
    for epoch in range(2):
        for k in range(rank, len(batches), 2):  # rank r takes batches r, r + 2, ...
            z, zm = logits[epoch][k]
            obj(z, zm, batches[k], materialize_misaligned(batches[k]))
            alphas.append(obj.alpha)
        weaks.append(obj.weak)
        alphas.append(obj.end_epoch())
    out[mode] = {"alphas": alphas, "weaks": weaks}
json.dump(out, open(f"{sys.argv[2]}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


@pytest.mark.ddp
def test_two_ranks_hold_the_alpha_of_their_summed_statistics(tmp_path, batches_of_8):
    import os
    import subprocess
    import sys

    from midas_data.loss import (
        AlphaStats,
        DirectionSums,
        authors_alpha_update,
        batch_alpha_stats,
        direction_sums,
        misaligned_targets,
        update_alpha,
    )

    batches = batches_of_8[:len(batches_of_8) // 2 * 2]
    logits = [[_logits(b, 1000 * e + k, bias_to=(k + e) % 2) for k, b in enumerate(batches)] for e in range(2)]
    torch.save((batches, logits), tmp_path / "data.pt")
    (tmp_path / "ddp_objective.py").write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           str(tmp_path / "ddp_objective.py"), str(tmp_path / "data.pt"), str(tmp_path)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=180, capture_output=True)
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert runs[0] == runs[1]  # every rank holds the same alpha and weak modality

    # batch mode: each step is the authors' step on the two ranks' batches together
    alpha, want = 1.5, []
    for e in range(2):
        for k in range(0, len(batches), 2):
            sums = DirectionSums()
            for b in (k, k + 1):
                mis = materialize_misaligned(batches[b])
                src_labels, _ = misaligned_targets(batches[b], mis)
                sums = sums + direction_sums(logits[e][b][1], src_labels, mis["swapped"], batches[b]["conf"])
            alpha = authors_alpha_update(alpha, sums)
            want.append(alpha)
        want.append(alpha)
    assert runs[0]["batch"]["alphas"] == pytest.approx(want)

    # epoch mode: one pooled step per epoch from every rank's rows
    alpha, want = 1.5, []
    for e, weak in enumerate(runs[0]["epoch"]["weaks"]):
        stats = AlphaStats()
        for b, batch in enumerate(batches):
            stats = batch_alpha_stats(stats, logits[e][b][1], batch, materialize_misaligned(batch), weak, 1 - weak)
        want += [alpha] * (len(batches) // 2)
        alpha = update_alpha(alpha, stats)
        want.append(alpha)
    assert runs[0]["epoch"]["alphas"] == pytest.approx(want)
    assert want[-1] != 1.5 or want[len(batches) // 2] != 1.5  # the test sees alpha move

