"""A trainer command line without --preset picks settings that fit the encoders it builds,
says which and why, and warns when the run was still improving at its end."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from midas_data.trainers.config import settings_for_encoders
from midas_data.trainers.run import main, still_improving

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_small_encoders_get_the_mfeat_protocol_and_resnets_the_authors_schedule():
    assert settings_for_encoders({"fac": "mlp", "mor": "mlp"})[0] == "mfeat"
    name, why = settings_for_encoders({"image": "small_cnn", "audio": "mlp"})
    assert name == "mfeat" and "image=small_cnn" in why and "Adam" in why
    name, why = settings_for_encoders({"frames": "resnet18", "audio": "mlp"})
    assert name == "cremad" and "frames=resnet18" in why and "SGD" in why


def _history(val: list[float], warmup: int = 0) -> list[dict]:
    return [{"epoch": e, "warmup": e < warmup, "val": {"accuracy": v}} for e, v in enumerate(val)]


def test_still_improving_flags_a_best_epoch_among_the_last_few():
    rising = [0.5 + 0.01 * e for e in range(30)]
    hint = still_improving(_history(rising))
    assert hint is not None and "epoch 29 of 30" in hint and "--epochs 60" in hint
    # saturated early: ties at the end are not improvement
    flat = [0.5, 0.8, 0.9] + [1.0] * 27
    assert still_improving(_history(flat)) is None
    # the peak just before the last window does not count
    peak = [0.5] * 26 + [0.9, 0.8, 0.8, 0.8]
    assert still_improving(_history(peak)) is None
    assert still_improving(_history([0.1, 0.2], warmup=2)) is None  # only warm-up epochs


def test_command_line_without_preset_says_what_it_chose(make_tiny_dataset, tmp_path):
    root = make_tiny_dataset()
    out = tmp_path / "run"
    res = CliRunner().invoke(main, [str(root), str(out), "--epochs", "3", "--warmup-epochs", "1",
                                    "--batch-size", "32", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "settings: --preset mfeat, because every modality has a small encoder (fac=mlp, mor=mlp)" in res.output
    config = json.loads((out / "results.json").read_text())["config"]
    assert (config["preset"], config["optimizer"], config["step_size"]) == ("mfeat", "adam", 0)
    assert config["warmup_epochs"] == 1 and config["batch_size"] == 32  # explicit options still win
    # two MIDAS epochs, both in the last-two window: whichever is best, the run is too short
    assert "warning: the best validation accuracy" in res.output and "--epochs 6" in res.output


def test_a_named_preset_is_kept(make_tiny_dataset, tmp_path):
    root = make_tiny_dataset()
    out = tmp_path / "run"
    res = CliRunner().invoke(main, [str(root), str(out), "--preset", "cremad", "--epochs", "2",
                                    "--warmup-epochs", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "settings:" not in res.output
    assert json.loads((out / "results.json").read_text())["config"]["optimizer"] == "sgd"
