"""Settings dataclasses as the one home of defaults, help, choices and ranges.

A stage's settings are a dataclass whose fields are made with `setting(default, help, ...)`;
the command line is generated from it (`click_options`) and read back into it
(`config_from_options`), and the dataclass checks its own values (`check_settings`, called
from `__post_init__`), so a default, a help string or an allowed range is written once:

    @dataclass
    class MineConfig:
        k: int = setting(16, "partners per anchor and modality", min=1)
        def __post_init__(self): check_settings(self)

    @main.command("mine-misaligned")
    @click_options(MineConfig)
    def mine_cmd(**options):
        mine_misaligned(dataset, config_from_options(MineConfig, options))

Every generated option defaults to None ("not given"), so the value comes from the
dataclass default (or from a preset the caller applies first), never from the command line.

Metadata a field may carry (all optional but `help`):
- `help`: the option's help; the dataclass default is appended as `[default: ...]`.
- `choices`: allowed values (a `click.Choice`; checked by `check_settings` too).
- `min`, `max`, `min_open`, `max_open`: an allowed range for int/float fields (a
  `click.IntRange` / `click.FloatRange`; checked by `check_settings` too).
- `flag`: the option's name when it is not the field name with '-' for '_'.
- `path`: "file" for an existing file (`click.Path(exists=True, dir_okay=False)`).
- `cli`: False keeps a field off the command line (set by the Python API or the command).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import click

from midas_data.errors import MidasDataError


class SettingError(MidasDataError, ValueError):
    """A setting outside its choices or range (a ValueError too, as dataclass checks raise)."""


def setting(default: Any, help: str, *, choices: Sequence[Any] | None = None,
            min: float | None = None, max: float | None = None, min_open: bool = False,
            max_open: bool = False, flag: str | None = None, path: str | None = None,
            cli: bool = True) -> Any:
    """A dataclass field whose metadata documents and bounds it (see the module docstring)."""
    meta: dict[str, Any] = {"help": help, "cli": cli}
    for name, value in (("choices", tuple(choices) if choices is not None else None),
                        ("min", min), ("max", max), ("flag", flag), ("path", path)):
        if value is not None:
            meta[name] = value
    if min_open:
        meta["min_open"] = True
    if max_open:
        meta["max_open"] = True
    if isinstance(default, (list, dict)):  # a fresh copy per instance
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---------------------------------------------------------------- parsing command-line text
def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _str_tuple(text: str) -> tuple[str, ...]:
    return tuple(_str_list(text))


def _mapping(text: str) -> dict[str, str]:
    """'fac=mlp,mor=mlp' -> {'fac': 'mlp', 'mor': 'mlp'}."""
    out = {}
    for item in _str_list(text):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise click.BadParameter(f"expected modality=encoder pairs like 'fac=mlp,mor=mlp', got {item!r}")
        out[key.strip()] = value.strip()
    return out


# annotation as written in the dataclass -> (click type, parser of the command-line text)
_TYPES: dict[str, tuple[Any, Callable[[str], Any] | None]] = {
    "int": (int, None), "float": (float, None), "str": (str, None), "bool": (bool, None),
    "list[int]": (str, _int_list), "list[str]": (str, _str_list),
    "tuple[str, ...]": (str, _str_tuple), "dict[str, str]": (str, _mapping),
}
_FORMATS = {"list[int]": " (comma-separated)", "list[str]": " (comma-separated)",
            "tuple[str, ...]": " (comma-separated)", "dict[str, str]": " (modality=name,...)"}


def _base_type(f: dataclasses.Field) -> str:
    """The annotation without an optional `| None` (fields may default to None)."""
    text = str(f.type).replace(" ", "").replace(",", ", ")
    for none in ("|None", "None|"):
        text = text.replace(none, "")
    if text not in _TYPES:
        raise TypeError(f"field {f.name!r}: no command-line type for annotation {f.type!r}; "
                        f"supported: {sorted(_TYPES)} (optionally '| None')")
    return text


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def cli_fields(cls: type, skip: Sequence[str] = ()) -> list[dataclasses.Field]:
    """The fields of `cls` that appear on the command line, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.name not in skip]


def _click_type(f: dataclasses.Field, base: str) -> Any:
    meta = f.metadata
    if "choices" in meta:
        return click.Choice([str(c) for c in meta["choices"]])
    if meta.get("path") == "file":
        return click.Path(exists=True, dir_okay=False)
    if base in ("int", "float") and ("min" in meta or "max" in meta):
        rng = click.IntRange if base == "int" else click.FloatRange
        return rng(meta.get("min"), meta.get("max"), min_open=meta.get("min_open", False),
                   max_open=meta.get("max_open", False))
    return _TYPES[base][0]


def click_options(cls: type, skip: Sequence[str] = ()) -> Callable[[Callable], Callable]:
    """A decorator adding one option per command-line field of dataclass `cls` (e.g.
    `--warmup-epochs`), each defaulting to None so the dataclass default applies."""

    def decorate(func: Callable) -> Callable:
        for f in reversed(cli_fields(cls, skip)):
            base = _base_type(f)
            flag = f.metadata.get("flag") or f.name.replace("_", "-")
            default = field_default(f)
            shown = default
            if isinstance(default, (list, tuple)):
                shown = ",".join(map(str, default)) or "(empty)"
            elif isinstance(default, dict):
                shown = ",".join(f"{k}={v}" for k, v in default.items()) or "(empty)"
            help_text = f.metadata.get("help", "") + _FORMATS.get(base, "")
            if default is not None:
                help_text += f" [default: {shown}]"
            if base == "bool":
                func = click.option(f"--{flag}/--no-{flag}", f.name, default=None, help=help_text)(func)
            else:
                func = click.option(f"--{flag}", f.name, type=_click_type(f, base), default=None,
                                    help=help_text)(func)
        return func

    return decorate


def parse_option(f: dataclasses.Field, value: Any) -> Any:
    """A field's value from command-line text ('128,64', 'fac=mlp') or an already typed value."""
    parse = _TYPES[_base_type(f)][1]
    return parse(value) if parse is not None and isinstance(value, str) else value


def options_to_values(cls: type, options: dict[str, Any], what: str,
                      skip: Sequence[str] = ()) -> dict[str, Any]:
    """The given (non-None) options as typed field values; unknown names are an error, so a
    typo never silently falls back to a default."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; known: {sorted(fields)}")
    return {name: parse_option(fields[name], v) for name, v in options.items() if v is not None}


def config_from_options(cls: type, options: dict[str, Any]) -> Any:
    """An instance of `cls` from parsed options: every non-None value, defaults for the rest."""
    return cls(**options_to_values(cls, options, cls.__name__))


# ---------------------------------------------------------------- validation
def check_settings(config: Any) -> None:
    """Check every field against its `choices` and `min`/`max` metadata; a SettingError names
    the class, the field, the value and what is allowed. None passes for None defaults."""
    cls = type(config).__name__
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if value is None and field_default(f) is None:
            continue
        if "choices" in meta and value not in meta["choices"]:
            raise SettingError(f"{cls}.{f.name}={value!r}; choose from {meta['choices']}")
        lo, hi = meta.get("min"), meta.get("max")
        if lo is None and hi is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingError(f"{cls}.{f.name} must be a number, got {value!r}")
        if lo is not None and (value <= lo if meta.get("min_open") else value < lo):
            raise SettingError(f"{cls}.{f.name} must be {'>' if meta.get('min_open') else '>='} "
                             f"{lo}, got {value}")
        if hi is not None and (value >= hi if meta.get("max_open") else value > hi):
            raise SettingError(f"{cls}.{f.name} must be {'<' if meta.get('max_open') else '<='} "
                             f"{hi}, got {value}")


def resolve_settings(cls: type, config: Any, settings: dict[str, Any]) -> Any:
    """The settings of a Python API call: `config` (an instance of `cls`, or None for the
    defaults) with the keyword arguments `settings` applied; an unknown name is a TypeError,
    as for any function."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise TypeError(f"unknown setting(s) {unknown}; {cls.__name__} has {sorted(names)}")
    if config is not None and not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    return dataclasses.replace(config, **settings) if config is not None else cls(**settings)


def settings_dict(config: Any) -> dict[str, Any]:
    """The dataclass as JSON-ready values (tuples as lists), for artifacts' metadata."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
