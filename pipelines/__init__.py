"""Dataset readers: each turns a source (bundled data, a standard on-disk layout, a user
manifest) into `midas_data.Sample` records for `midas-data build-shards`."""

from .registry import PIPELINES, get_pipeline, register_pipeline

__all__ = ["PIPELINES", "get_pipeline", "register_pipeline"]
