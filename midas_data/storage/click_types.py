"""The command line's dataset argument: an existing local directory or a remote URL."""

from __future__ import annotations

from pathlib import Path

import click

from midas_data.storage.urls import is_remote, local_path


def dataset_root(value: str | Path) -> str | Path:
    """A URL stays a string (fsspec reads it); anything else is a local Path."""
    return str(value) if is_remote(value) else local_path(value)


class DatasetRoot(click.ParamType):
    """A dataset directory that exists, or an s3://, gs://, http(s):// ... URL (read with
    credentials from the environment; cache in $MIDAS_DATA_CACHE_DIR or ~/.cache/midas-data)."""

    name = "dataset"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and is_remote(value):
            return value
        return click.Path(exists=True, file_okay=False).convert(str(local_path(value)), param, ctx)


DATASET_ROOT = DatasetRoot()
