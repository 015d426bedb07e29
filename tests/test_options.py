"""Settings dataclasses are the one home of defaults, help, choices and ranges: the command
line is generated from them (midas_data.options) and the dataclasses check their values."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner
from midas_data.pipelines.registry import recipes
from midas_data.trainers.config import PAPER_PRESETS, TrainConfig

from midas_data.cli import main
from midas_data.features.config import ExtractConfig
from midas_data.mining.config import MineConfig
from midas_data.mining.knn import INDEX_CHOICES
from midas_data.options import (
    SettingError,
    check_settings,
    cli_fields,
    click_options,
    config_from_options,
    field_default,
    resolve_settings,
    setting,
)


@dataclass
class Toy:
    n: int = setting(3, "a count", min=1, max=10)
    rate: float = setting(0.5, "a rate", min=0, min_open=True)
    mode: str = setting("a", "a mode", choices=("a", "b"))
    names: tuple[str, ...] = setting(("x", "y"), "names")
    hidden: list[int] = setting([4], "sizes")
    cap: int | None = setting(None, "optional cap", min=0)
    on: bool = setting(False, "a switch")
    secret: str = setting("s", "not on the command line", cli=False)
    path_to: str | None = setting(None, "a file", flag="file", path="file")

    def __post_init__(self) -> None:
        check_settings(self)


def _toy_command() -> click.Command:
    @click.command()
    @click_options(Toy)
    def cmd(**options):
        click.echo(repr(config_from_options(Toy, options)))

    return cmd


def test_generated_options_parse_into_the_dataclass_with_its_defaults():
    r = CliRunner().invoke(_toy_command(), [])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == repr(Toy())
    r = CliRunner().invoke(_toy_command(), ["--n", "7", "--names", "p,q,r", "--hidden", "8,2",
                                            "--mode", "b", "--on", "--cap", "0"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == repr(Toy(n=7, names=("p", "q", "r"), hidden=[8, 2], mode="b",
                                        on=True, cap=0))


@pytest.mark.parametrize("args, needle", [
    (["--n", "0"], "0 is not in the range 1<=x<=10"),
    (["--n", "11"], "11 is not in the range 1<=x<=10"),
    (["--rate", "0"], "0.0 is not in the range x>0"),
    (["--mode", "c"], "'c' is not one of 'a', 'b'"),
    (["--secret", "t"], "No such option '--secret'"),
    (["--file", "/nonexistent/f.npz"], "does not exist"),
])
def test_generated_options_refuse_values_outside_the_metadata(args, needle):
    r = CliRunner().invoke(_toy_command(), args)
    assert r.exit_code == 2 and needle in r.output, r.output


@pytest.mark.parametrize("kwargs, needle", [
    ({"n": 0}, "Toy.n must be >= 1, got 0"), ({"n": 11}, "Toy.n must be <= 10, got 11"),
    ({"rate": 0.0}, "Toy.rate must be > 0, got 0.0"), ({"mode": "c"}, "Toy.mode='c'; choose from"),
    ({"cap": -1}, "Toy.cap must be >= 0, got -1"), ({"n": "3"}, "Toy.n must be a number"),
])
def test_the_dataclass_checks_the_same_ranges_and_choices(kwargs, needle):
    with pytest.raises(SettingError, match=re.escape(needle)):
        Toy(**kwargs)
    assert issubclass(SettingError, ValueError)
    Toy(cap=None)  # None is allowed where None is the default


def test_unknown_options_and_settings_are_errors_not_defaults():
    with pytest.raises(ValueError, match="unknown Toy option"):
        config_from_options(Toy, {"nn": 3})
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['nn'\]"):
        resolve_settings(Toy, None, {"nn": 3})
    assert resolve_settings(Toy, Toy(n=4), {"mode": "b"}) == Toy(n=4, mode="b")


@pytest.mark.parametrize("command, cls, skip", [("extract", ExtractConfig, ()),
                                                ("mine-misaligned", MineConfig, ()),
                                                ("train", TrainConfig, ("preset",))])
def test_every_command_documents_exactly_its_dataclass_defaults(command, cls, skip):
    ctx = click.Context(main)
    cmd = main.get_command(ctx, command)
    params = {p.name: p for p in cmd.params if isinstance(p, click.Option)}
    for f in cli_fields(cls, skip):
        p = params.pop(f.name)
        assert p.default is None, f"--{f.name} must default to None so {cls.__name__} decides"
        default = field_default(f)
        if default is not None and not isinstance(default, (list, tuple, dict)):
            assert f"[default: {default}]" in p.help, (f.name, p.help)
    assert set(params) <= {"quiet", "resume", "restart", "preset"}, f"options not from {cls.__name__}: {params}"


def test_threads_default_is_one_in_the_cli_and_the_python_api():
    assert ExtractConfig().num_threads == 1
    assert ExtractConfig(num_threads=None).num_threads == 0  # the former "leave torch's setting"
    cmd = main.get_command(click.Context(main), "extract")
    assert "--threads" in {o for p in cmd.params for o in p.opts}


def test_mine_index_choices_are_the_knn_constant():
    f = {f.name: f for f in dataclasses.fields(MineConfig)}["index"]
    assert f.metadata["choices"] == INDEX_CHOICES
    cmd = main.get_command(click.Context(main), "mine-misaligned")
    index = next(p for p in cmd.params if p.name == "index")
    assert tuple(index.type.choices) == INDEX_CHOICES
    with pytest.raises(SettingError, match="MineConfig.index='tpu'"):
        MineConfig(index="tpu")


def test_config_keeps_tuples_and_sequences_normalised():
    assert MineConfig(splits=["train", "val"]).splits == ("train", "val")
    assert MineConfig(splits="val").splits == ("val",)
    assert ExtractConfig(splits=["train"]).to_dict()["splits"] == ["train"]


def test_train_presets_are_the_pipelines_recipes():
    assert recipes() == PAPER_PRESETS
    assert {"cremad", "kinetics_sounds", "ucf101", "food101", "mfeat"} <= set(PAPER_PRESETS)
    from midas_data.pipelines import cremad, mfeat

    assert PAPER_PRESETS["cremad"] == cremad.RECIPE and PAPER_PRESETS["mfeat"] == mfeat.RECIPE
    PAPER_PRESETS["cremad"]["lr"] = 99.0  # the presets are copies: a module's RECIPE stays
    try:
        assert cremad.RECIPE["lr"] == 1e-3
    finally:
        PAPER_PRESETS["cremad"]["lr"] = cremad.RECIPE["lr"]
    cfg = TrainConfig.from_preset("cremad")
    assert all(getattr(cfg, k) == v for k, v in cremad.RECIPE.items())
