"""A user's own files (PNG images, .npy audio features, a CSV manifest without a split
column, made from the bundled AV digits with the noisy image) go through build-shards,
extract and train with no settings named, and get settings that fit their encoders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from midas_data.pipelines.av_digits import load_av_digits
from midas_data.pipelines.fixtures import write_av_digits_manifest
from PIL import Image

from midas_data.cli import main
from midas_data.features.tables import read_table, table_metadata

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_manifest_files_hold_the_av_digits(tmp_path):
    manifest = write_av_digits_manifest(tmp_path / "files", noise_std=4.0)
    lines = manifest.read_text().splitlines()
    assert lines[0] == "key,label,image,audio"  # no split column: build-shards splits
    views, labels = load_av_digits(0, 4.0)
    assert len(lines) - 1 == len(labels)
    key, label, image, audio = lines[7].split(",")
    assert int(label) == labels[6]
    with Image.open(tmp_path / "files" / image) as im:
        assert (im.mode, im.size) == ("L", (8, 8))
        pixels = np.asarray(im).astype(np.float64)
    np.testing.assert_array_equal(np.load(tmp_path / "files" / audio), views["audio"][6])
    # the noisy image, linearly rescaled: same pixel order, correlation ~1 up to rounding
    assert np.corrcoef(pixels.ravel(), views["image"][6])[0, 1] > 0.999


def test_user_files_train_with_the_automatic_settings(tmp_path):
    manifest = write_av_digits_manifest(tmp_path / "files", noise_std=4.0)
    ds, out = tmp_path / "ds", tmp_path / "run"
    runner = CliRunner()
    r = runner.invoke(main, ["build-shards", "--manifest", str(manifest), "--out", str(ds), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "train=1258, val=179, test=360" in r.output

    r = runner.invoke(main, ["extract", str(ds), "--warmup-epochs", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("warm-up settings: Adam lr 0.001 for image=small_cnn, audio=mlp, "
                               "which converges for small encoders")
    cfg = json.loads(table_metadata(read_table(ds / "features" / "train.arrow"))["config"])
    assert cfg["optimizer"] == {"image": "adam", "audio": "adam"}
    assert cfg["encoders"]["image"]["name"] == "small_cnn" and cfg["encoders"]["audio"]["name"] == "mlp"

    r = runner.invoke(main, ["train", str(ds), str(out), "--epochs", "2", "--warmup-epochs", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert ("settings: --preset mfeat, because every modality has a small encoder "
            "(audio=mlp, image=small_cnn)") in r.output
    res = json.loads((out / "results.json").read_text())
    assert (res["config"]["preset"], res["config"]["optimizer"], res["config"]["step_size"]) == ("mfeat", "adam", 0)
    assert (res["config"]["epochs"], res["epochs_run"]) == (2, 2)  # explicit options still win
    assert res["encoders"] == {"image": "small_cnn", "audio": "mlp"}
