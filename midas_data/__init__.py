"""midas-data: MIDAS misaligned-sample augmentation against modality imbalance, as a data pipeline."""

from .errors import (
    CorruptShardError,
    MidasDataError,
    SchemaError,
    StaleArtifactError,
    UnsafeInputError,
)
from .reader import Dataset, SplitReader, open_dataset
from .shards import Sample, build_dataset
from .tables import Features, read_features, write_features

__version__ = "0.1.0"

__all__ = [
    "CorruptShardError",
    "Dataset",
    "Features",
    "MidasDataError",
    "Sample",
    "SchemaError",
    "SplitReader",
    "StaleArtifactError",
    "UnsafeInputError",
    "build_dataset",
    "open_dataset",
    "read_features",
    "write_features",
]
