"""End to end per dataset recipe: fixture layout -> build -> extract -> mine -> train 2 epochs.

Tiny fixtures (6 classes x 4 clips, 16x16 frames, 16-band spectrograms, 16-d features) so the
whole parametrized set stays well under two minutes on two cores. The training settings are
each module's RECIPE (the authors' optimiser, lr, lambda, warm-up), shortened to 2 epochs.
"""

from __future__ import annotations

import importlib
import json

import pytest
from midas_data.pipelines import fixtures, get_pipeline

from midas_data import build_dataset, open_dataset
from midas_data.features.extract import extract_features
from midas_data.mining.stage import mine_misaligned

AV = {"n_mels": 16, "audio_frames": 16, "num_frames": 2, "frame_size": 8, "val_fraction": 0.34}
# pipeline -> (module holding RECIPE, fixture generator and its arguments, reader options)
E2E = {
    "cremad": ("cremad", lambda r: fixtures.make_cremad(r, per_class=4, split_lists=True), AV),
    "kinetics_sounds": ("kinetics_sounds", lambda r: fixtures.make_kinetics_sounds(r, per_class=4), AV),
    "ucf101": ("ucf101", lambda r: fixtures.make_ucf101(r, train_per_class=3, frames=4),
               {"num_frames": 2, "flow_stack": 2, "frame_size": 8, "val_fraction": 0.34}),
    "food101": ("food101", lambda r: fixtures.make_food101(r, train_per_class=3),
                {"image_size": 8, "text_format": "bytes", "text_len": 32, "val_fraction": 0.34}),
    "cmu_mosi": ("cmu_mosi", lambda r: fixtures.make_cmu_mosi(r, per_split=(16, 6, 6)), {}),
    "mmimdb": ("mmimdb", lambda r: fixtures.make_mmimdb(r, per_split=(16, 6, 6)),
               {"image_size": 8, "text_format": "bytes", "text_len": 32}),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", sorted(E2E))
def test_recipe_runs_end_to_end(name, tmp_path):
    from midas_data.trainers.config import TrainConfig
    from midas_data.trainers.run import train

    module, make, opts = E2E[name]
    recipe = importlib.import_module(f"midas_data.pipelines.{module}").RECIPE
    src = get_pipeline(name)(make(tmp_path / "raw"), **opts)
    ds_dir = tmp_path / "ds"
    build_dataset(src["samples"], ds_dir, classes=src["classes"], modalities=src["modalities"],
                  source=src["source"], progress=False)
    ds = open_dataset(ds_dir)
    assert set(ds.splits) == {"train", "val", "test"}

    summary = extract_features(ds_dir, warmup_epochs=1, batch_size=8, lr=recipe["lr"],
                               feature_dim=16, device="cpu", progress=False,
                               optimizer=recipe["optimizer"], num_threads=1)
    assert set(summary["splits"]) == {"train", "val", "test"}

    mined = mine_misaligned(ds_dir, k=2, index="cpu", progress=False)
    assert mined["splits"]["train"] and list((ds_dir / "pairs" / "train").glob("part-*.arrow"))

    config = TrainConfig.from_dict({
        **recipe, "epochs": 2, "warmup_epochs": min(recipe["warmup_epochs"], 1), "step_size": 1,
        "batch_size": 8, "eval_batch_size": 64, "feature_dim": 16, "device": "cpu",
        "policy": "mined", "preset": name})
    results = train(ds_dir, tmp_path / "run", config, progress=False, plots=False)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(h["train"]["loss"] == h["train"]["loss"] for h in history)
    assert 0.0 <= results["test"]["accuracy"] <= 1.0
