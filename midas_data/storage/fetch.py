"""Download one remote file whole: bounded retries with backoff and jitter, size and sha256
checked while the bytes arrive, never a partial file left behind.

Transient failures (timeouts, dropped connections, 5xx and 429 answers, a body shorter than
the manifest says) are retried with exponential backoff and full jitter (tenacity), up to
`RetryPolicy.attempts` in all; a permanent one (not found, access denied) is not. A body
whose sha256 differs from the manifest's is fetched again once (a byte flipped in transit),
then reported: the file at that URL is not the one the manifest describes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tenacity

from midas_data.errors import CorruptShardError

CHUNK = 4 << 20


class FetchError(CorruptShardError):
    """A remote file could not be fetched, or arrived different from the manifest.

    A CorruptShardError, so a stream with on_error="skip" skips the samples it holds and
    reports their keys, as it does for a damaged local shard."""

    def __init__(self, message: str, url: str):
        super().__init__(message)
        self.url = url

    def for_key(self, key: str) -> FetchError:
        """The same error, naming the sample whose read needed the file."""
        if f"key {key!r}" in str(self):
            return self
        err = type(self)(f"{self} (while reading key {key!r})", self.url)
        err.__cause__ = self.__cause__
        return err


class ChecksumMismatch(FetchError):
    """The bytes at the URL do not hash to the manifest's sha256."""


class ShortBody(OSError):
    """The server closed the body before the size the manifest records (transient)."""


@dataclass(frozen=True)
class RetryPolicy:
    """attempts: tries in all per file (>= 1); backoff: first wait in seconds, doubled each
    try up to max_backoff, each wait drawn uniformly below that bound (full jitter);
    timeout: seconds a connect or read may stall before it counts as a failed try."""

    attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 20.0
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff < 0 or self.max_backoff < 0 or self.timeout <= 0:
            raise ValueError(f"invalid retry policy {self}")


def _status(e: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        v = getattr(e, attr, None)
        if isinstance(v, int) and 100 <= v < 600:
            return v
    resp = getattr(e, "response", None)  # botocore ClientError
    if isinstance(resp, dict):
        v = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(v, int):
            return v
    return None


def is_transient(e: BaseException) -> bool:
    """Worth another try: timeouts, connection resets, a short body, 5xx, 408 and 429."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                      FetchError)):
        return False
    status = _status(e)
    if status is not None:
        return status >= 500 or status in (408, 429)
    if isinstance(e, (OSError, TimeoutError, ConnectionError, asyncio.TimeoutError, EOFError)):
        return True
    # Client-library errors that carry no status (aiohttp payload errors, botocore
    # connection and streaming errors) are network failures.
    mod = type(e).__module__.split(".")[0]
    return mod in ("aiohttp", "botocore", "aiobotocore", "urllib3", "requests", "http")


def _open(fs, path: str):
    if "http" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return fs.open(path, "rb", block_size=0)  # one streamed GET, not range blocks
    return fs.open(path, "rb", block_size=CHUNK, cache_type="none")


def download_once(fs, path: str, url: str, tmp_dir: Path, size: int | None,
                  sha256: str | None) -> Path:
    """One try: stream `path` into a temp file in tmp_dir, hashing as it arrives. Returns the
    temp file only if size and digest match; a failed try leaves nothing behind."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fetch-", suffix=".download", dir=tmp_dir)
    try:
        h, got = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, _open(fs, path) as src:
            while True:
                chunk = src.read(CHUNK)
                if not chunk:
                    break
                got += len(chunk)
                if size is not None and got > size:
                    raise ChecksumMismatch(f"{url}: the server sent more than the manifest's "
                                           f"{size} bytes; it is not the file the dataset was "
                                           "built with (rebuild or re-upload the dataset)", url)
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if size is not None and got != size:
            raise ShortBody(f"{url}: body ended after {got} of {size} bytes")
        if sha256 is not None and h.hexdigest() != sha256:
            raise ChecksumMismatch(f"{url}: sha256 {h.hexdigest()[:16]}... does not match the "
                                   f"manifest's {sha256[:16]}... (bytes damaged in storage or in "
                                   "transit, or the file was replaced); re-upload the dataset", url)
        os.chmod(tmp, 0o644)
        return Path(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _retrying(policy: RetryPolicy, sleep: Callable[[float], None] | None = None) -> tenacity.Retrying:
    """Bounded tries on transient errors, exponential backoff with full jitter."""
    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts),
        wait=tenacity.wait_random_exponential(multiplier=policy.backoff, max=policy.max_backoff),
        retry=tenacity.retry_if_exception(is_transient),
        reraise=True,
        **({"sleep": sleep} if sleep is not None else {}))


def _give_up(url: str, policy: RetryPolicy, e: Exception) -> FetchError:
    what = f"still failing after {policy.attempts} tries" if is_transient(e) else "a permanent error"
    err = FetchError(f"{url}: cannot fetch ({what}: {type(e).__name__}: {e}); check the URL, the "
                     "network and the credentials, then rerun", url)
    err.__cause__ = e
    return err


def read_ranges(fs, path: str, url: str, starts: list[int], ends: list[int],
                policy: RetryPolicy) -> list[bytes]:
    """Byte ranges [start, end) of one remote file, fetched concurrently where the file
    system can (HTTP Range / S3 ranged GET), with the same bounded retries; a short answer
    counts as a transient failure. The caller checks the bytes (tar headers and CRC32)."""
    def once() -> list[bytes]:
        out = fs.cat_ranges([path] * len(starts), list(starts), list(ends), on_error="return")
        for b, a, z in zip(out, starts, ends):
            if isinstance(b, BaseException):
                raise b
            if len(b) != z - a:
                raise ShortBody(f"{url}: range {a}-{z} answered with {len(b)} bytes")
        return out

    try:
        return _retrying(policy)(once)
    except Exception as e:
        raise _give_up(url, policy, e) from e


def download(fs, path: str, url: str, tmp_dir: Path, size: int | None, sha256: str | None,
             policy: RetryPolicy, sleep: Callable[[float], None] | None = None) -> Path:
    """download_once with bounded retries on transient errors and one refetch on a digest
    mismatch; a FetchError naming the URL once they are spent."""
    retrying = _retrying(policy, sleep)
    for mismatch_try in range(2):
        try:
            return retrying(download_once, fs, path, url, tmp_dir, size, sha256)
        except ChecksumMismatch:
            if mismatch_try:
                raise
        except FetchError:
            raise
        except Exception as e:
            raise _give_up(url, policy, e) from e
    raise AssertionError("unreachable")
