"""Command-line options generated from `TrainConfig`, so defaults and help live only there.

    @main.command("train")
    @click.argument("dataset"); @click.argument("out")
    @train_options
    def train_cmd(dataset, out, **options):
        train(dataset, out, config_from_options(options))

Every option defaults to None ("not given"): the value then comes from `--preset` if one
is named, else from the dataclass default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import click

from .config import PAPER_PRESETS, TrainConfig


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _mapping(text: str) -> dict[str, str]:
    """'fac=mlp,mor=mlp' -> {'fac': 'mlp', 'mor': 'mlp'}."""
    out = {}
    for item in _str_list(text):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise click.BadParameter(f"expected modality=encoder pairs like 'fac=mlp,mor=mlp', got {item!r}")
        out[key.strip()] = value.strip()
    return out


# annotation (as written in config.py) -> (click type, parser of the command-line text)
_TYPES: dict[str, tuple[Any, Callable[[Any], Any] | None]] = {
    "int": (int, None), "float": (float, None), "str": (str, None), "bool": (bool, None),
    "list[int]": (str, _int_list), "list[str]": (str, _str_list), "dict[str, str]": (str, _mapping),
}
_FORMATS = {"list[int]": " (comma-separated)", "list[str]": " (comma-separated)",
            "dict[str, str]": " (modality=name,...)"}


def _fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if f.name != "preset"]


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def train_options(func: Callable) -> Callable:
    """Add `--preset` and one option per TrainConfig field (e.g. `--warmup-epochs`)."""
    for f in reversed(_fields()):
        ctype, _ = _TYPES[str(f.type)]
        flag = f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')}{_FORMATS.get(str(f.type), '')} [default: {_default(f)}]"
        if ctype is bool:
            func = click.option(f"--{flag}/--no-{flag}", f.name, default=None, help=help_text)(func)
        else:
            func = click.option(f"--{flag}", f.name, type=ctype, default=None, help=help_text)(func)
    return click.option("--preset", type=click.Choice(sorted(PAPER_PRESETS)), default=None,
                        help="Start from the authors' settings for a dataset (or the mfeat protocol); "
                             "options given explicitly override it.")(func)


def config_from_options(options: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from parsed options: `preset` (optional), then every non-None field.

    Values may be the command-line text ('128,64', 'fac=mlp') or already typed values.
    Unknown keys are an error, so a typo never silently falls back to a default.
    """
    options = dict(options)
    preset = options.pop("preset", None)
    fields = {f.name: f for f in _fields()}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(fields)}")
    values: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        _, parse = _TYPES[str(fields[name].type)]
        values[name] = parse(value) if parse is not None and isinstance(value, str) else value
    if preset:
        return TrainConfig.from_preset(preset, **values)
    return TrainConfig(**values)
