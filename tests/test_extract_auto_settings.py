"""`extract` without --optimizer/--lr warms each modality up with settings that converge for
its encoder (Adam lr 1e-3 for mlp/small_cnn, the authors' SGD lr 1e-3 for ResNet-18 and
other encoders), says which and why in one line, and lets explicit options win."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from midas_data.cli import main
from midas_data.features import encoders as encoder_registry
from midas_data.features.config import ExtractConfig, warmup_settings
from midas_data.features.extract import extract_features, warmup_plan
from midas_data.features.tables import read_table, table_metadata

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_small_encoders_get_adam_and_resnets_the_authors_sgd():
    chosen, why = warmup_settings({"image": "small_cnn", "audio": "mlp"})
    assert chosen == {"image": ("adam", 1e-3), "audio": ("adam", 1e-3)}
    assert why.count("\n") == 0 and "Adam lr 0.001 for image=small_cnn, audio=mlp" in why
    chosen, why = warmup_settings({"frames": "resnet18", "audio": "mlp"})
    assert chosen == {"frames": ("sgd", 1e-3), "audio": ("adam", 1e-3)}
    assert "SGD lr 0.001 (momentum 0.9, weight decay 1e-4) for frames=resnet18" in why
    assert "authors'" in why and "Adam lr 0.001 for audio=mlp" in why


def test_explicit_optimizer_and_lr_win():
    encoders = {"frames": "resnet18", "audio": "mlp"}
    chosen, why = warmup_settings(encoders, optimizer="adam")
    assert chosen == {"frames": ("adam", 1e-3), "audio": ("adam", 1e-3)}
    assert "--optimizer adam as given" in why and "Name --lr to choose" in why
    chosen, why = warmup_settings(encoders, lr=0.01)
    assert chosen == {"frames": ("sgd", 0.01), "audio": ("adam", 0.01)}
    assert "Name --optimizer to choose" in why
    chosen, why = ExtractConfig(optimizer="sgd", lr=0.05).warmup_settings(encoders)
    assert chosen == {"frames": ("sgd", 0.05), "audio": ("sgd", 0.05)} and why == ""


def test_plan_follows_the_encoders_the_dataset_gets(tiny_dataset):
    plan, why = warmup_plan(tiny_dataset)
    assert plan == {"fac": {"encoder": "mlp", "optimizer": "adam", "lr": 1e-3},
                    "mor": {"encoder": "mlp", "optimizer": "adam", "lr": 1e-3}}
    plan, _ = warmup_plan(tiny_dataset, encoders={"fac": "resnet18"})
    assert plan["fac"] == {"encoder": "resnet18", "optimizer": "sgd", "lr": 1e-3}
    assert plan["mor"]["optimizer"] == "adam"


def test_command_line_says_what_it_chose_and_records_it(tiny_dataset):
    args = ["extract", str(tiny_dataset), "--warmup-epochs", "1", "--splits", "train", "--quiet"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    first = r.output.splitlines()[0]
    assert first.startswith("warm-up settings: Adam lr 0.001 for fac=mlp, mor=mlp, which converges")
    assert first.endswith("Name --optimizer and --lr to choose.")
    cfg = json.loads(table_metadata(read_table(tiny_dataset / "features" / "train.arrow"))["config"])
    assert cfg["optimizer"] == {"fac": "adam", "mor": "adam"} and cfg["lr"] == {"fac": 1e-3, "mor": 1e-3}
    assert cfg["encoders"]["fac"]["optimizer"] == "adam" and cfg["warmup_choice"] == first
    assert (cfg["settings"]["optimizer"], cfg["settings"]["lr"]) == (None, None)  # as given

    r = CliRunner().invoke(main, [*args, "--optimizer", "sgd", "--lr", "0.01"])
    assert r.exit_code == 0, r.output
    assert "warm-up settings" not in r.output  # nothing was chosen
    cfg = json.loads(table_metadata(read_table(tiny_dataset / "features" / "train.arrow"))["config"])
    assert cfg["optimizer"] == {"fac": "sgd", "mor": "sgd"} and cfg["lr"] == {"fac": 0.01, "mor": 0.01}


def test_a_large_encoder_is_warmed_up_with_sgd(tiny_dataset, monkeypatch):
    # any encoder outside mlp/small_cnn counts as large (as ResNet-18); an mlp under another
    # name keeps the test fast on vectors
    monkeypatch.setitem(encoder_registry._REGISTRY, "test_large_mlp", encoder_registry._mlp)
    calls = {}
    import midas_data.features.extract as extract_module

    real = extract_module.train_unimodal

    def record(x, y, model, epochs, batch_size, lr, seed, optimizer, *rest):
        calls[rest[1]] = (optimizer, lr)
        return real(x, y, model, epochs, batch_size, lr, seed, optimizer, *rest)

    monkeypatch.setattr(extract_module, "train_unimodal", record)
    summary = extract_features(tiny_dataset, encoders={"fac": "test_large_mlp"}, warmup_epochs=1,
                               splits=("train",), progress=False)
    assert calls == {"warm-up fac": ("sgd", 1e-3), "warm-up mor": ("adam", 1e-3)}
    assert summary["config"]["encoders"]["fac"]["optimizer"] == "sgd"
    assert "authors'" in summary["config"]["warmup_choice"]
