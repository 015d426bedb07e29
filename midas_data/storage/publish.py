"""Writing a dataset to a remote root: upload a new version beside the current one, then
point the root's manifest.json at it.

Every publish uploads its files under a fresh `versions/<id>/` folder and writes the root's
manifest.json last, in one PUT, with a map from each dataset-relative path to the folder
that holds it (see `midas_data.storage.layout`). So during a replace, and after one that
was interrupted, readers see the previous version, complete; new readers see the new one as
soon as its manifest lands; a reader that opened the previous version goes on reading its
files (they are deleted only once more than `keep_versions` versions are behind the
current one). A stage that writes only features or pairs (`remote_stage`) uploads just
those and maps every other file to where it already is.

One writer at a time per root: a publish checks that the current version did not change
while it uploaded, but two publishes racing to the final PUT are not serialised.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from midas_data.dataset.manifest import MANIFEST
from midas_data.errors import MidasDataError, where
from midas_data.storage.fetch import RetryPolicy, _give_up, _retrying
from midas_data.storage.layout import (
    DEFAULT_KEEP_VERSIONS,
    FILE_RE,
    Layout,
    collect_garbage,
    flat_files,
    location,
    new_version_id,
    read_record,
    split_manifest,
)
from midas_data.storage.urls import filesystem, is_remote


class _Root:
    """A remote root opened for writing: its file system, retried puts and deletes."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None, retry: RetryPolicy):
        self.url, self.retry = str(url).rstrip("/"), retry
        self.fs, self.path = filesystem(self.url, storage_options, retry.timeout)

    def put_file(self, local: Path, rel: str) -> None:
        try:
            _retrying(self.retry)(self.fs.put_file, str(local), f"{self.path}/{rel}")
        except Exception as e:
            raise _give_up(f"{self.url}/{rel}", self.retry, e) from e

    def put_bytes(self, data: bytes, rel: str) -> None:
        try:
            _retrying(self.retry)(self.fs.pipe_file, f"{self.path}/{rel}", data)
        except Exception as e:
            raise _give_up(f"{self.url}/{rel}", self.retry, e) from e

    def rm(self, paths: list[str]) -> None:
        with contextlib.suppress(FileNotFoundError):
            _retrying(self.retry)(self.fs.rm, paths)

    def current(self) -> tuple[dict, Layout] | None:
        """(dataset manifest, layout) of the root's manifest.json, or None if it has none."""
        self.invalidate()
        rec = read_record(self.fs, f"{self.path}/{MANIFEST}")
        if rec is None:
            return None
        plain, lay = split_manifest(rec, f"{self.url}/{MANIFEST}")
        if lay.flat:
            lay.files = flat_files(self.fs, self.path, plain)
        return plain, lay

    def invalidate(self) -> None:
        with contextlib.suppress(AttributeError):
            self.fs.invalidate_cache()

    def commit(self, manifest: dict, new: Layout, opened: str | None,
               keep_versions: int) -> list[str]:
        """Write the new version's record, then the root manifest (unless the current version
        changed since the version `opened` was read: None for no dataset, "" for a flat one),
        then delete what no kept version maps."""
        now = self.current()
        if (None if now is None else now[1].version) != opened:
            raise MidasDataError(f"{self.url}: another writer published a version while this one "
                                 "uploaded; the root still holds theirs. Rerun.")
        record = new.record(manifest)
        self.put_bytes(record, location(MANIFEST, new.version))
        self.put_bytes(record, MANIFEST)  # readers switch here, in one PUT
        self.invalidate()
        try:
            deleted = collect_garbage(self.fs, self.path, new, keep_versions, rm=self.rm)
        except Exception as e:  # published all the same: the next publish collects again
            warnings.warn(f"{self.url}: version {new.version} is published, but deleting old "
                          f"versions failed ({type(e).__name__}: {e}); the next publish tries "
                          "again", stacklevel=3)
            deleted = []
        self.invalidate()
        return deleted


def _history(root: _Root, opened: tuple[dict, Layout] | None, new_id: str,
             keep_versions: int) -> list[str]:
    """The `previous` list of a version published over `opened`; a flat dataset there becomes
    a version of its own (its record uploaded, its files left where they are), so that its
    readers keep reading and GC later knows which root files were its."""
    if opened is None:
        return []
    manifest, lay = opened
    if lay.flat:
        flat = Layout(new_id[:-8] + "00000000", lay.files, [])  # sorts just before new_id
        root.put_bytes(flat.record(manifest), location(MANIFEST, flat.version))
        lay = flat
    return [*lay.previous, lay.version][-max(keep_versions, 1):]


def _local_files(local_dir: Path) -> list[str]:
    """Every file to upload (hidden ones, such as a cache's markers, are not)."""
    files = []
    for p in sorted(local_dir.rglob("*")):
        rel = p.relative_to(local_dir).as_posix()
        if not p.is_file() or rel == MANIFEST or any(x.startswith(".") for x in rel.split("/")):
            continue
        _check_name(p, rel)
        files.append(rel)
    return files


def _check_name(p: Path, rel: str) -> None:
    if not FILE_RE.match(rel):
        raise MidasDataError(f"{where(file=p)}: {rel!r} cannot be uploaded (names of letters, "
                             "digits, '_', '-' and '.' only, nothing under versions/); rename "
                             "or remove it")


def publish(local_dir: str | Path, url: str, storage_options: dict[str, Any] | None = None,
            overwrite: bool = False, retry: RetryPolicy | None = None,
            keep_versions: int = DEFAULT_KEEP_VERSIONS) -> str:
    """Upload a local dataset directory to `url` as a new version: every file under
    `versions/<id>/`, then its manifest as the root's manifest.json. Returns the id.

    overwrite: needed when `url` already holds a dataset (the previous version stays
    readable until the new manifest lands, and after, for `keep_versions` versions)."""
    local_dir, retry = Path(local_dir), retry or RetryPolicy()
    if keep_versions < 0:
        raise ValueError(f"keep_versions must be >= 0, got {keep_versions}")
    if not (local_dir / MANIFEST).is_file():
        raise MidasDataError(f"{where(file=local_dir)}: no dataset to upload")
    manifest = json.loads((local_dir / MANIFEST).read_text())
    root = _Root(url, storage_options, retry)
    opened = root.current()
    if opened is not None and not overwrite:
        raise MidasDataError(f"{url}: already holds a dataset; pass --overwrite to replace it "
                             "or choose another output URL")
    opened_version = None if opened is None else opened[1].version
    new_id = new_version_id(opened_version)
    files = _local_files(local_dir)
    for rel in files:
        root.put_file(local_dir / rel, location(rel, new_id))
    previous = _history(root, opened, new_id, keep_versions)
    root.commit(manifest, Layout(new_id, dict.fromkeys(files, new_id), previous),
                opened_version, keep_versions)
    return new_id


@contextlib.contextmanager
def staged(out: str | Path, storage_options: dict[str, Any] | None = None,
           overwrite: bool = False,
           keep_versions: int = DEFAULT_KEEP_VERSIONS) -> Iterator[Path]:
    """A local directory to build into; for a remote `out` it is a temporary one, published
    as a new version when the block succeeds and deleted either way."""
    if not is_remote(out):
        yield Path(out)
        return
    tmp = Path(tempfile.mkdtemp(prefix="midas-stage-"))
    try:
        yield tmp / "dataset"
        publish(tmp / "dataset", str(out), storage_options, overwrite,
                keep_versions=keep_versions)
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
                 retry: RetryPolicy | None = None,
                 keep_versions: int = DEFAULT_KEEP_VERSIONS) -> Iterator[Any]:
    """Run a stage that writes `outputs` (e.g. ("features",)) beside a dataset's manifest
    on a remote root: yields a dataset opened on a private copy of its snapshot (shards still
    read through the cache), then publishes a new version holding what the stage wrote or
    changed under `outputs` (uploaded) and every other file of the version it read (mapped
    where it is, not uploaded again); files it deleted there are left out of the new map.
    A local dataset is yielded as it is."""
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
        changed = sorted(r for r in after if before.get(r) != after[r])
        removed = set(before) - set(after)
        if not changed and not removed:
            return
        for rel in changed:
            _check_name(ds.root / rel, rel)
        root = _Root(str(dataset), storage_options, retry)
        opened_layout = ds.remote.layout
        new_id = new_version_id(opened_layout.version or None)
        for rel in changed:
            root.put_file(ds.root / rel, location(rel, new_id))
        files = {r: v for r, v in (opened_layout.files or {}).items() if r not in removed}
        files.update(dict.fromkeys(changed, new_id))
        previous = _history(root, (ds.manifest, opened_layout), new_id, keep_versions)
        root.commit(ds.manifest, Layout(new_id, files, previous), opened_layout.version,
                    keep_versions)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
