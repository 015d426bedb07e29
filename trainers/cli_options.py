"""Command-line options generated from `TrainConfig`, so defaults and help live only there.

    @main.command("train")
    @click.argument("dataset"); @click.argument("out")
    @train_options
    def train_cmd(dataset, out, **options):
        train(dataset, out, config_from_options(options))

Every option defaults to None ("not given"): the value then comes from `--preset` if one
is named, else from the dataclass default. The generator is `midas_data.options`, shared
with `extract` and `mine-misaligned`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from midas_data.options import click_options, options_to_values

from .config import PAPER_PRESETS, TrainConfig

_SKIP = ("preset",)  # recorded from --preset, not an option of its own


def train_options(func: Callable) -> Callable:
    """Add `--preset` and one option per TrainConfig field (e.g. `--warmup-epochs`)."""
    func = click_options(TrainConfig, skip=_SKIP)(func)
    return click.option("--preset", type=click.Choice(sorted(PAPER_PRESETS)), default=None,
                        help="Start from a dataset's recorded settings (its pipeline's RECIPE: "
                             "the authors' for the paper's datasets, the mfeat protocol for "
                             "mfeat); options given explicitly override it.")(func)


def config_from_options(options: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from parsed options: `preset` (optional), then every non-None field.

    Values may be the command-line text ('128,64', 'fac=mlp') or already typed values.
    Unknown keys are an error, so a typo never silently falls back to a default.
    """
    options = dict(options)
    preset = options.pop("preset", None)
    values = options_to_values(TrainConfig, options, "training", skip=_SKIP)
    if preset:
        return TrainConfig.from_preset(preset, **values)
    return TrainConfig(**values)
