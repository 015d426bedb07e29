"""Writing a dataset to a remote root: build it locally, then upload it, manifest last.

A reader opens a dataset by its manifest, so until the new manifest is uploaded a reader sees
either the previous complete dataset or none; it never takes a half-uploaded one for
complete. Replacing an existing remote dataset first removes its manifest (readers then see
no dataset, instead of a manifest whose shards change under it); a reader that had opened the
previous version earlier fails with a sha256 mismatch naming the URL, never reads new bytes
as old ones.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from midas_data.dataset.manifest import MANIFEST
from midas_data.errors import MidasDataError, where
from midas_data.storage.fetch import RetryPolicy, _give_up, _retrying
from midas_data.storage.urls import filesystem, is_remote


def publish(local_dir: str | Path, url: str, storage_options: dict[str, Any] | None = None,
            overwrite: bool = False, retry: RetryPolicy | None = None) -> None:
    """Upload a local dataset directory to `url`: every file, then manifest.json."""
    local_dir, retry = Path(local_dir), retry or RetryPolicy()
    if not (local_dir / MANIFEST).is_file():
        raise MidasDataError(f"{where(file=local_dir)}: no dataset to upload")
    fs, root = filesystem(url, storage_options, retry.timeout)
    target = f"{root}/{MANIFEST}"
    if fs.exists(target):
        if not overwrite:
            raise MidasDataError(f"{url}: already holds a dataset; pass --overwrite to replace it "
                                 "or choose another output URL")
        fs.rm_file(target)  # from here on readers see no dataset, never a mixed one
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    for p in [*files, local_dir / MANIFEST]:
        rel = p.relative_to(local_dir).as_posix()
        dest = f"{root}/{rel}"
        try:
            _retrying(retry)(fs.put_file, str(p), dest)
        except Exception as e:
            raise _give_up(f"{url}/{rel}", retry, e) from e
    with contextlib.suppress(AttributeError):
        fs.invalidate_cache()


@contextlib.contextmanager
def staged(out: str | Path, storage_options: dict[str, Any] | None = None,
           overwrite: bool = False) -> Iterator[Path]:
    """A local directory to build into; for a remote `out` it is a temporary one, uploaded
    (manifest last) when the block succeeds and deleted either way."""
    if not is_remote(out):
        yield Path(out)
        return
    tmp = Path(tempfile.mkdtemp(prefix="midas-stage-"))
    try:
        yield tmp / "dataset"
        publish(tmp / "dataset", str(out), storage_options, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _files(root: Path, subdirs: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    out = {}
    for sub in subdirs:
        for p in (root / sub).rglob("*") if (root / sub).is_dir() else ():
            if p.is_file() and not p.name.startswith("."):
                st = p.stat()
                out[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


@contextlib.contextmanager
def remote_stage(dataset: str | Path, outputs: tuple[str, ...],
                 storage_options: dict[str, Any] | None = None,
                 retry: RetryPolicy | None = None) -> Iterator[Any]:
    """Run a stage that writes `outputs` (e.g. ("features",)) beside a dataset's manifest
    on a remote root: yields a dataset opened on a private copy of its snapshot (shards still
    read through the cache), then uploads what the stage wrote or changed under `outputs` and
    removes remote files it deleted there. A local dataset is yielded as it is."""
    if not is_remote(dataset):
        yield dataset
        return
    from midas_data.storage.remote import RemoteDataset

    retry = retry or RetryPolicy()
    tmp = Path(tempfile.mkdtemp(prefix="midas-stage-"))
    try:
        ds = RemoteDataset(str(dataset), storage_options=storage_options, retry=retry,
                           workdir=tmp / "dataset")
        before = _files(ds.root, outputs)
        yield ds
        after = _files(ds.root, outputs)
        fs, root = filesystem(str(dataset), storage_options, retry.timeout)
        for rel in sorted(r for r in after if before.get(r) != after[r]):
            try:
                _retrying(retry)(fs.put_file, str(ds.root / rel), f"{root}/{rel}")
            except Exception as e:
                raise _give_up(f"{dataset}/{rel}", retry, e) from e
        for rel in sorted(set(before) - set(after)):
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(f"{root}/{rel}")
        with contextlib.suppress(AttributeError):
            fs.invalidate_cache()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
