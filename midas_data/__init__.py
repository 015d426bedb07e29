"""midas-data: MIDAS misaligned-sample augmentation against modality imbalance, as a data pipeline."""

from midas_data.dataset.index_shards import index_shards
from midas_data.dataset.reader import Dataset, SplitReader, open_dataset
from midas_data.dataset.shards import Sample, build_dataset
from midas_data.dataset.verify import verify_dataset
from midas_data.errors import (
    CorruptShardError,
    DiskFullError,
    MidasDataError,
    SchemaError,
    StaleArtifactError,
    UnsafeInputError,
)
from midas_data.features.config import ExtractConfig, warmup_settings
from midas_data.features.encoders import (
    UnimodalModel,
    available_encoders,
    build_encoder,
    default_encoder_for,
    register_encoder,
)
from midas_data.features.extract import extract_features, warmup_plan
from midas_data.features.probe import crossfit_confidences
from midas_data.features.tables import Features, read_features, write_features
from midas_data.locking import OutputLockedError
from midas_data.loss import (  # the alpha step of the authors and the stream-batch helpers
    AlphaStats,
    DirectionSums,
    accumulate,
    aligned_loss,
    authors_alpha_step,
    authors_alpha_update,
    authors_batch_ratios,
    batch_alpha_stats,
    batch_misaligned_loss,
    direction_sums,
    hard_sample_weight,
    midas_total_loss,
    misaligned_loss,
    misaligned_targets,
    misaligned_top2_correct,
    modality_weights,
    normalised_confidences,
    source_rows,
    unimodal_confidence,
    update_alpha,
    weak_and_strong,
    weak_modality,
)
from midas_data.mining.config import MineConfig
from midas_data.mining.knn import DifferentLabelIndex, search_different_label
from midas_data.mining.pairs import read_pairs
from midas_data.mining.stage import mine_misaligned
from midas_data.objective import MidasObjective
from midas_data.options import SettingError
from midas_data.storage import FetchError, RetryPolicy, ShardCache
from midas_data.stream.dataset import MidasDataset, MidasLoader, collate, materialize_misaligned
from midas_data.stream.partners import POLICIES, RESEARCH_POLICIES, PartnerOptions

__version__ = "0.2.0"

__all__ = [
    # stage settings, verification, encoders and k-NN search
    "DifferentLabelIndex",
    "ExtractConfig",
    "MineConfig",
    "SettingError",
    "available_encoders",
    "build_encoder",
    "search_different_label",
    "verify_dataset",
    # stages, stream and loss
    "UnimodalModel",
    "crossfit_confidences",
    "default_encoder_for",
    "extract_features",
    "warmup_plan",
    "warmup_settings",
    "mine_misaligned",
    "read_pairs",
    "register_encoder",
    "AlphaStats",
    "DirectionSums",
    "authors_alpha_step",
    "authors_alpha_update",
    "authors_batch_ratios",
    "direction_sums",
    "MidasDataset",
    "MidasLoader",
    "MidasObjective",
    "accumulate",
    "aligned_loss",
    "batch_alpha_stats",
    "batch_misaligned_loss",
    "collate",
    "hard_sample_weight",
    "materialize_misaligned",
    "midas_total_loss",
    "misaligned_loss",
    "misaligned_targets",
    "misaligned_top2_correct",
    "modality_weights",
    "normalised_confidences",
    "source_rows",
    "unimodal_confidence",
    "update_alpha",
    "weak_and_strong",
    "weak_modality",
    "POLICIES",
    "RESEARCH_POLICIES",
    "PartnerOptions",
    "CorruptShardError",
    "DiskFullError",
    "OutputLockedError",
    "Dataset",
    "Features",
    "MidasDataError",
    "Sample",
    "SchemaError",
    "SplitReader",
    "StaleArtifactError",
    "UnsafeInputError",
    "build_dataset",
    "index_shards",
    "FetchError",
    "RetryPolicy",
    "ShardCache",
    "open_dataset",
    "read_features",
    "write_features",
]
