"""Dataset roots given as URLs: which are remote, and the fsspec file system that reads them.

A root is remote when it has a URL scheme other than `file` (s3://, gs://, http(s)://, any
protocol fsspec knows). Credentials and endpoints come from where the file system looks
for them (environment, profiles, instance metadata) or from `storage_options`, which are
passed to fsspec unchanged; the library never reads them from its own files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from midas_data.errors import MidasDataError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")
# Installing these extras provides the protocol; the message says which one to install.
_EXTRA = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}


def scheme(root: str | os.PathLike) -> str | None:
    """The URL scheme of `root` in lower case, or None for a plain path."""
    if isinstance(root, Path):
        return None
    m = _SCHEME.match(os.fspath(root))
    return m.group(1).lower() if m else None


def is_remote(root: str | os.PathLike) -> bool:
    """True for URLs read through fsspec (s3://, gs://, https://, ...), False for local paths
    and file:// URLs."""
    s = scheme(root)
    return s is not None and s not in ("file", "local")


def local_path(root: str | os.PathLike) -> Path:
    """A local path or file:// URL as a Path."""
    text = os.fspath(root)
    return Path(text[len("file://"):]) if text.startswith("file://") else Path(text)


def join(root: str, *parts: str) -> str:
    """`root/part/...` for a URL root (no normalisation: parts are the manifest's own)."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def with_timeouts(protocol: str, storage_options: dict[str, Any] | None,
                  timeout: float) -> dict[str, Any]:
    """storage_options plus connect/read timeouts for the protocols whose defaults wait for
    minutes on a server that hangs; a value the caller gave always wins."""
    opts = dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        cfg = dict(opts.get("config_kwargs") or {})
        cfg.setdefault("connect_timeout", timeout)
        cfg.setdefault("read_timeout", timeout)
        # The cache's own bounded retry (with backoff and jitter) decides; botocore's
        # retries inside each attempt would multiply the bound.
        cfg.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
        opts["config_kwargs"] = cfg
    elif protocol in ("http", "https"):
        try:
            import aiohttp
        except ImportError:  # filesystem() below reports the missing extra
            return opts
        client = dict(opts.get("client_kwargs") or {})
        client.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                                           sock_read=timeout))
        opts["client_kwargs"] = client
    return opts


def filesystem(url: str, storage_options: dict[str, Any] | None = None, timeout: float = 30.0):
    """(fsspec file system, root path inside it) for a remote root URL."""
    try:
        import fsspec
        from fsspec.core import url_to_fs
    except ImportError as e:  # pragma: no cover - fsspec is a dependency
        raise MidasDataError(f"{url}: remote roots need fsspec ({e})") from e
    proto = scheme(url) or "file"
    try:
        fsspec.get_filesystem_class(proto)
        opts = with_timeouts(proto, storage_options, timeout)
        # A fresh instance: fsspec's instance cache would hand back one made for an endpoint
        # taken from the environment at that time (AWS_ENDPOINT_URL may have changed since).
        opts.setdefault("skip_instance_cache", True)
        fs, path = url_to_fs(url, **opts)
    except (ImportError, ValueError) as e:
        extra = _EXTRA.get(proto)
        hint = (f"pip install 'midas-data[{extra}]'" if extra
                else f"install the fsspec implementation of {proto}://")
        raise MidasDataError(f"{url}: cannot open {proto}:// roots ({e}); {hint}") from e
    return fs, path.rstrip("/")
