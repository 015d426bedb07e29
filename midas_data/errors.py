"""Exception types. Every message names the file, key and field involved and says what to do."""

from __future__ import annotations


class MidasDataError(Exception):
    """Base class for every error midas-data raises on bad input or state."""


class SchemaError(MidasDataError):
    """Payloads disagree with the dataset schema (shape, dtype, kind, missing modality)."""


class CorruptShardError(MidasDataError):
    """A shard is truncated, has a bad checksum, or a member cannot be decoded."""


class StaleArtifactError(MidasDataError):
    """An artifact was produced from inputs that no longer match (fingerprint mismatch)."""


class UnsafeInputError(MidasDataError):
    """Input that could execute code or escape the output directory (pickle, '..', links)."""


def where(file: object = None, key: object = None, field: object = None) -> str:
    """Format the location part of an error message: 'file F, key K, field X'."""
    parts = []
    if file is not None:
        parts.append(f"file {file}")
    if key is not None:
        parts.append(f"key {key!r}")
    if field is not None:
        parts.append(f"field {field!r}")
    return ", ".join(parts)


class DiskFullError(MidasDataError):
    """A write ran out of space (ENOSPC or a quota); the message says where and how much."""


# What the command line reports as `error: ...` (exit 2) instead of a traceback: our own
# errors, and the OS and value errors a stage raises on bad input or a broken file system.
USER_ERRORS = (MidasDataError, OSError, ValueError)
