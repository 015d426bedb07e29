"""Remote dataset roots: s3://, gs://, http(s):// and any fsspec URL, read through a local cache.

- `urls`: which roots are remote, and the fsspec file system (with `storage_options`).
- `fetch`: one file downloaded whole, with bounded retries, size and sha256 checks.
- `cache`: the bounded, node-wide shard cache (atomic placement, locks, LRU eviction, pins).
- `prefetch`: fetching the shards of a reader's next batches in background threads.
- `remote`: `RemoteDataset` and `RemoteSplitReader`, what `open_dataset(url)` returns.
- `layout`: the versioned layout of a remote root (manifest.json last, versions/<id>/).
- `publish`: writing a remote root as a new version; collecting old versions.
"""

from midas_data.storage.cache import ShardCache, default_cache_dir
from midas_data.storage.fetch import FetchError, RetryPolicy
from midas_data.storage.urls import is_remote

__all__ = ["FetchError", "RetryPolicy", "ShardCache", "default_cache_dir", "is_remote"]
