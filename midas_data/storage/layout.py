"""The versioned layout of a dataset written to a remote root.

    <root>/manifest.json                  the current version: the dataset's manifest plus a
                                          "remote_layout" section (written last, one PUT)
    <root>/versions/<id>/manifest.json    the same record for every version, kept for GC
    <root>/versions/<id>/<path>           the files a version uploaded (shards/, index/, ...)

The section maps each dataset-relative path (`shards/train-000000.tar`, `index/train.arrow`,
`features/train.arrow`, `pairs/...`, any other file a stage wrote) to the version whose folder holds it, or to "" for a
file at the root itself (a flat dataset, e.g. one copied with `aws s3 sync`, which readers
still open unchanged). A stage that only adds features or pairs maps the shards to the
folder of the version that uploaded them, so nothing is uploaded twice.

A replace never touches what the current manifest names: readers keep seeing the previous
version until the new manifest.json lands, and a reader that opened the previous version
goes on reading its files. Old versions are deleted after a publish only when more than
`keep_versions` published versions are behind the new current one; files that a kept
version still maps are never deleted.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import time

from midas_data.dataset.manifest import SHARD_PATH_RE
from midas_data.errors import MidasDataError, UnsafeInputError, where

SECTION = "remote_layout"
VERSIONS = "versions"
LAYOUT_VERSION = 1
DEFAULT_KEEP_VERSIONS = 1
INDEX_PATH_RE = re.compile(r"^index/(train|val|test)\.arrow\Z")
_ID_RE = re.compile(r"^\d{8}T\d{12}Z-[0-9a-f]{8}\Z")  # \Z: "$" would let a trailing newline in
# A path a version may map: plain names (no "..", no hidden files), outside versions/.
_NAME = r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*"
FILE_RE = re.compile(rf"^(?!versions/|manifest\.json\Z){_NAME}(/{_NAME})*\Z")
# The derived tables a snapshot copies besides manifest and indexes.
EXTRA_RE = re.compile(r"^(features/[a-z]+\.arrow|pairs/[a-z]+/part-\d{5}-of-\d{5}\.arrow"
                      r"|pairs/[a-z]+/report\.json)\Z")


def new_version_id(after: str | None = None) -> str:
    """A fresh id: UTC time to the microsecond, then random hex; ids sort by time, and one
    made `after` another sorts after it even if the clock did not move."""
    ns = time.time_ns()
    if after is not None and _ID_RE.match(after):
        ns = max(ns, _id_ns(after) + 1000)
    secs, us = divmod(ns // 1000, 1_000_000)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(secs)) + f"{us:06d}"
    return f"{stamp}Z-{secrets.token_hex(4)}"


def _id_ns(vid: str) -> int:
    import calendar

    secs = calendar.timegm(time.strptime(vid[:15], "%Y%m%dT%H%M%S"))
    return (secs * 1_000_000 + int(vid[15:21])) * 1000


def location(rel: str, version: str) -> str:
    """Where a dataset-relative path lives, relative to the root."""
    return f"{VERSIONS}/{version}/{rel}" if version else rel


class Layout:
    """One version's record: its id, where each file lives, the published versions before it.

    A flat root (no section in its manifest) is a Layout with version "" whose files all
    live at the root; `files` is then None until the caller lists them."""

    def __init__(self, version: str, files: dict[str, str] | None,
                 previous: list[str] | None = None):
        self.version, self.files, self.previous = version, files, list(previous or [])

    @property
    def flat(self) -> bool:
        return not self.version

    def where(self, rel: str) -> str:
        """Path of `rel` relative to the root (the root itself for files the map lacks)."""
        v = self.files.get(rel, "") if self.files else ""
        return location(rel, v)

    def section(self) -> dict:
        return {"layout": LAYOUT_VERSION, "version": self.version, "files": dict(self.files or {}),
                "previous": list(self.previous)}

    def record(self, manifest: dict) -> bytes:
        """The bytes of manifest.json for this version: the dataset manifest plus the section."""
        body = {k: v for k, v in manifest.items() if k != SECTION}
        body[SECTION] = self.section()
        return (json.dumps(body, indent=2) + "\n").encode()


def split_manifest(manifest: dict, url: str) -> tuple[dict, Layout]:
    """(the dataset manifest without the section, its Layout) of a root's manifest.json; every
    value of the section is checked, so no map can point outside the root's own layout."""
    sec = manifest.get(SECTION)
    plain = {k: v for k, v in manifest.items() if k != SECTION}
    if sec is None:
        return plain, Layout("", None)

    def bad(field: str, what: str) -> UnsafeInputError:
        return UnsafeInputError(f"{where(url, field=f'{SECTION}.{field}')}: {what}; refused "
                                "(rewrite the dataset with midas-data)")

    if not isinstance(sec, dict) or sec.get("layout") != LAYOUT_VERSION:
        raise bad("layout", f"not layout version {LAYOUT_VERSION}")
    vid = sec.get("version")
    if not isinstance(vid, str) or not _ID_RE.match(vid):
        raise bad("version", f"{vid!r} is not a version id")
    files = sec.get("files")
    if not isinstance(files, dict):
        raise bad("files", "not a map of paths to versions")
    for rel, v in files.items():
        if not isinstance(rel, str) or not FILE_RE.match(rel):
            raise bad(f"files.{rel}", "not a dataset file path")
        if not isinstance(v, str) or (v and not _ID_RE.match(v)):
            raise bad(f"files.{rel}", f"{v!r} is not a version id")
    previous = sec.get("previous", [])
    if not isinstance(previous, list) or not all(isinstance(p, str) and _ID_RE.match(p)
                                                 for p in previous):
        raise bad("previous", "not a list of version ids")
    return plain, Layout(vid, dict(files), previous)


# -- reading and writing records through fsspec ------------------------------------------
def read_record(fs, path: str) -> dict | None:
    """The JSON at `path`, or None if there is none."""
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        out = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MidasDataError(f"{where(file=path)}: manifest is not valid JSON ({e})") from e
    if not isinstance(out, dict):
        raise MidasDataError(f"{where(file=path)}: manifest is not a JSON object")
    return out


def flat_files(fs, root: str, manifest: dict) -> dict[str, str]:
    """The files of a flat dataset at `root` (manifest's shards and indexes, the features
    and pairs tables found there), all mapped to the root itself."""
    # Only names a dataset of this format can hold: these files are deleted once the flat
    # version is collected, so a manifest must not be able to name anything else at the root.
    files = {s["path"]: "" for s in manifest.get("shards", []) if isinstance(s, dict)
             and isinstance(s.get("path"), str) and SHARD_PATH_RE.match(s["path"])}
    for meta in manifest.get("splits", {}).values():
        if isinstance(meta, dict) and isinstance(meta.get("index"), str) \
                and INDEX_PATH_RE.match(meta["index"]):
            files[meta["index"]] = ""
    for sub in ("features", "pairs"):
        try:
            found = fs.find(f"{root}/{sub}")
        except (FileNotFoundError, OSError, ValueError):
            found = []
        for full in found:
            rel = full[len(root) + 1:] if full.startswith(root + "/") else ""
            if EXTRA_RE.match(rel):
                files[rel] = ""
    return {k: v for k, v in files.items() if FILE_RE.match(k)}


def collect_garbage(fs, root: str, current: Layout, keep_versions: int = DEFAULT_KEEP_VERSIONS,
                    rm=None) -> list[str]:
    """Delete what only versions more than `keep_versions` behind `current` still map, and
    leftovers of interrupted uploads older than `current`; returns the paths deleted
    (relative to the root). Versions newer than `current` (a publish under way elsewhere)
    and every file a kept version maps are left alone; if a kept version's record cannot be
    read, nothing is deleted."""
    kept = [current.version, *current.previous[-keep_versions:]] if keep_versions else [
        current.version]
    referenced: set[str] = set()
    for vid in kept:
        if vid == current.version:
            lay = current
        else:
            rec = read_record(fs, f"{root}/{location('manifest.json', vid)}")
            if rec is None:
                return []  # be safe: without its map we cannot tell what it still reads
            _, lay = split_manifest(rec, f"{root}/{location('manifest.json', vid)}")
        referenced.update(lay.where(rel) for rel in lay.files or {})
        referenced.add(location("manifest.json", vid))
    try:
        found = fs.find(f"{root}/{VERSIONS}")
    except (FileNotFoundError, OSError, ValueError):
        found = []
    doomed: list[str] = []
    dropped: set[str] = set()
    for full in found:
        rel = full[len(root) + 1:] if full.startswith(root + "/") else None
        if rel is None:
            continue
        parts = rel.split("/")
        if len(parts) < 3 or not _ID_RE.match(parts[1]) or parts[1] in kept:
            continue
        if parts[1] > current.version:  # newer than what we published: someone else's upload
            continue
        dropped.add(parts[1])
        if rel not in referenced:
            doomed.append(rel)
    # Files at the root itself that a dropped (flat, converted) version mapped.
    for vid in sorted(dropped):
        rec_path = f"{root}/{location('manifest.json', vid)}"
        with contextlib.suppress(MidasDataError):
            rec = read_record(fs, rec_path)
            if rec is not None:
                _, lay = split_manifest(rec, rec_path)
                doomed.extend(rel for rel, v in (lay.files or {}).items()
                              if not v and rel not in referenced)
    doomed = sorted(set(doomed), key=lambda r: (r.endswith("manifest.json"), r))
    if doomed:
        (rm or fs.rm)([f"{root}/{r}" for r in doomed])
    return doomed

