"""A small string-keyed registry of pipelines (no folder scanning at import time)."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable

# name -> "module:function"; imported on first use so optional readers cost nothing.
PIPELINES: dict[str, str] = {
    "mfeat": "midas_data.pipelines.mfeat:read_mfeat",
    "av_digits": "midas_data.pipelines.av_digits:read_av_digits",
    "manifest": "midas_data.pipelines.user_manifest:read_manifest_file",
    # Real datasets from their standard on-disk layouts:
    # reader(root, modalities=None, skip_bad=False, **options).
    "cremad": "midas_data.pipelines.cremad:read_cremad",
    "kinetics_sounds": "midas_data.pipelines.kinetics_sounds:read_kinetics_sounds",
    "ucf101": "midas_data.pipelines.ucf101:read_ucf101",
    "food101": "midas_data.pipelines.food101:read_food101",
    "cmu_mosi": "midas_data.pipelines.cmu_mosi:read_cmu_mosi",
    "cmu_mosei": "midas_data.pipelines.cmu_mosi:read_cmu_mosei",
    "mmimdb": "midas_data.pipelines.mmimdb:read_mmimdb",
}


def register_pipeline(name: str, target: str | Callable) -> None:
    """Add a reader: a callable returning a `PipelineOutput`, or its 'module:function' path."""
    PIPELINES[name] = target  # type: ignore[assignment]


def get_pipeline(name: str) -> Callable:
    if name not in PIPELINES:
        raise KeyError(f"unknown pipeline {name!r}; available: {sorted(PIPELINES)}")
    target = PIPELINES[name]
    if callable(target):
        return target
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def recipes() -> dict[str, dict]:
    """Each built-in pipeline's RECIPE (TrainConfig fields: the training settings that go with
    its data), keyed by pipeline name; the reference trainer's presets are these. A copy, so
    a caller editing one changes no module's RECIPE."""
    out = {}
    for name, target in PIPELINES.items():
        if isinstance(target, str):
            recipe = getattr(importlib.import_module(target.split(":")[0]), "RECIPE", None)
            if recipe is not None:
                out[name] = copy.deepcopy(recipe)
    return out
