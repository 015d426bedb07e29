"""The epoch's last step in a training loop: the README's own-model loop under torchrun, and
the reference trainer, on splits whose final step leaves a rank one real sample or none.
Fill rows must keep every loss and weight finite and must count nowhere."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_samples

from midas_data import Sample, build_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The README's "Your own model on the stream" loop, with a BatchNorm model wrapped in DDP.
README_LOOP = """
import json, math, os, sys
import torch
import torch.distributed as dist
from torch import nn
from midas_data import (MidasDataset, MidasLoader, aligned_loss, batch_misaligned_loss,
                        materialize_misaligned)

class MyFusionModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, inputs):
        return self.net(torch.cat([inputs["a"], inputs["b"]], dim=1))

torch.set_num_threads(1)
dist.init_process_group("gloo")
torch.manual_seed(0)
ds = MidasDataset(sys.argv[1], "train", batch_size=int(sys.argv[3]), policy="random", seed=0)
loader = MidasLoader(ds, num_workers=1)
model = nn.parallel.DistributedDataParallel(MyFusionModel())
opt = torch.optim.Adam(model.parameters(), 1e-2)
log = {"losses": [], "batches": [], "last": []}
for epoch in range(2):
    ds.set_epoch(epoch)
    keys = []
    for batch in loader:
        mis = materialize_misaligned(batch)
        loss = aligned_loss(model(batch["inputs"]), batch) \\
             + batch_misaligned_loss(model(mis["inputs"]), batch, mis, alpha=1.5)
        opt.zero_grad(); loss.backward(); opt.step()
        log["losses"].append(float(loss))
        keys.append([k for k, v in zip(batch["key"], batch["valid"].tolist()) if v])
    log["batches"].append(keys)
    log["last"].append([len(batch["key"]), int(batch["valid"].sum())])
log["weights"] = [p.detach().flatten().tolist() for p in model.module.state_dict().values()
                  if p.is_floating_point()]
with open(os.path.join(sys.argv[2], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(log, f)
dist.barrier()
dist.destroy_process_group()
"""


def test_readme_loop_is_the_one_tested():
    """The loss and step lines of the README's loop are those the torchrun test runs."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Your own model on the stream"):]
    code = section[section.index("```python") + 9: section.index("```", section.index("```python") + 9)]
    body = code[code.index("for batch in loader:"): code.index("opt.step()") + len("opt.step()")]
    lines = [line.split("#")[0].strip() for line in body.splitlines()]
    assert len(lines) == 5
    tested = [line.strip() for line in README_LOOP.splitlines()]
    for line in lines:
        assert line in tested, f"README line not tested: {line}"


@pytest.fixture(scope="module")
def odd_split(tmp_path_factory) -> Path:
    """1,399 train samples, four classes: with two ranks and B=233 the final step holds one."""
    rng = np.random.default_rng(0)
    samples = [Sample(f"s{i:04d}", int(i % 4),
                      {"a": (rng.normal(size=4) + i % 4).astype(np.float32),
                       "b": rng.normal(size=2).astype(np.float32)}, split="train")
               for i in range(1399)]
    root = tmp_path_factory.mktemp("odd") / "ds"
    build_dataset(samples, root, shard_max_count=500, progress=False)
    return root


@pytest.mark.ddp
def test_readme_loop_on_two_ranks_stays_finite_at_the_last_step(odd_split, tmp_path):
    script = tmp_path / "readme_loop.py"
    script.write_text(README_LOOP)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(odd_split), str(tmp_path), "233"]
    proc = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 1,399 = 3 * (2 * 233) + 1: rank 0 ends with one real row, rank 1 with none
    assert [r["last"] for r in runs] == [[[2, 1]] * 2, [[2, 0]] * 2]
    for r in runs:
        assert all(math.isfinite(x) for x in r["losses"]), "a non-finite loss"
        assert all(math.isfinite(x) for w in r["weights"] for x in w), "a non-finite weight"
    assert runs[0]["weights"] == runs[1]["weights"], "DDP ranks diverged"
    for epoch in range(2):
        per_rank = [r["batches"][epoch] for r in runs]
        assert len(per_rank[0]) == len(per_rank[1]) == 4
        keys = [k for batches in per_rank for b in batches for k in b]
        assert len(keys) == len(set(keys)) == 1399, "each real sample once per epoch"


@pytest.mark.parametrize("method", ["midas", "joint"])
def test_trainer_counts_each_real_sample_once(mfeat_source, tmp_path, method):
    """210 train samples in batches of 11 and 30 validation samples in batches of 29 end
    with one real row padded by a fill row; the counts and means leave the fill rows out."""
    from midas_data.trainers import TrainConfig
    from midas_data.trainers.run import train

    root = tmp_path / "ds"
    build_dataset(tiny_samples(mfeat_source, 30), root, classes=mfeat_source["classes"],
                  modalities=["fac", "mor"], progress=False)
    config = TrainConfig.from_preset("mfeat", epochs=2, warmup_epochs=1, batch_size=11,
                                     eval_batch_size=29, method=method)
    out = tmp_path / "run"
    res = train(root, out, config, progress=False, plots=False)
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for h in history:
        assert h["train"]["samples"] == 210 and h["train"]["batches_per_rank"] == [20]
        assert h["val"]["samples"] == 30
        assert all(math.isfinite(h["train"][k]) for k in ("loss", "loss_fused", "loss_unimodal"))
    assert res["test"]["samples"] == 60
