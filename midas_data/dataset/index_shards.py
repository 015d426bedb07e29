"""`index_shards`: a midas-data dataset (manifest + Arrow offset index) over WebDataset tars a
user already has, without rewriting them.

Each tar is read once, sequentially: its sha256 is computed as the bytes go by, every
member's header offset, data offset, size and CRC32 are recorded, the label comes from the
sample's `.cls` member or a field of its `.json` member, and each modality from the member
with the extension given (`{"image": "jpg"}` takes `<key>.jpg`). The manifest records that
member suffix per modality (`"member": "jpg"`), so readers check every payload's tar header
against the right name. Local tars are hard-linked (else symlinked) into `out/shards/` under
the names the format uses; remote tars (any fsspec URL) are copied there as they are read.

Samples that lack a modality or a label, whose key is not letters, digits, '_' and '-',
whose key repeats, or whose payload disagrees with the schema fixed by the first sample
(an image of another size, say) are skipped, counted and listed by key in the manifest's
`source.skipped` (or refused with strict=True).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from midas_data.atomic import atomic_dir
from midas_data.dataset.formats import KINDS, MAX_IMAGE_PIXELS, npy_header
from midas_data.dataset.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MODALITY_NAME_RE,
    RESERVED_NAMES,
    dataset_fingerprint,
    file_sha256,
    write_manifest,
)
from midas_data.dataset.split import SPLITS
from midas_data.errors import MidasDataError, SchemaError, where
from midas_data.features.tables import write_table

KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
MAX_LABEL_BYTES = 1 << 20
MAX_SKIPPED_LISTED = 10_000


def expand(patterns: list[str] | str) -> list[str]:
    """Brace patterns (`data-{000000..000009}.tar`) expanded, in order, duplicates refused."""
    from braceexpand import braceexpand

    out: list[str] = []
    for p in [patterns] if isinstance(patterns, str) else patterns:
        out.extend(braceexpand(p))
    dup = sorted({x for x in out if out.count(x) > 1})
    if dup:
        raise MidasDataError(f"{where(file=dup[0])}: listed twice in the shard patterns")
    return out


@dataclass
class _Sample:
    key: str
    offset: int = -1
    end: int = 0
    members: dict[str, tuple[int, int, int, bytes | None]] = field(default_factory=dict)


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes what passes and optionally copies it elsewhere."""

    def __init__(self, src, copy_to=None):
        self.src, self.copy_to, self.h, self.pos = src, copy_to, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.src.read(len(b))
        n = len(data)
        b[:n] = data
        self.h.update(data)
        if self.copy_to is not None:
            self.copy_to.write(data)
        self.pos += n
        return n

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _label_of(sample: _Sample, label: str, src: str) -> object:
    """The raw label (int or str) of a sample, or raise SchemaError."""
    if label == "cls":
        m = sample.members.get("cls")
        if m is None:
            raise SchemaError(f"{where(src, sample.key, 'cls')}: no .cls member")
        text = (m[3] or b"").decode("utf-8", "replace").strip()
        if not re.fullmatch(r"-?[0-9]+", text):
            raise SchemaError(f"{where(src, sample.key, 'cls')}: {text[:20]!r} is not an integer")
        return int(text)
    path = label.split(":", 1)[1].split(".")
    m = sample.members.get("json")
    if m is None:
        raise SchemaError(f"{where(src, sample.key, 'json')}: no .json member")
    try:
        value = json.loads(m[3] or b"")
        for part in path:
            value = value[part]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError) as e:
        raise SchemaError(f"{where(src, sample.key, 'json:' + '.'.join(path))}: no such field "
                          f"({type(e).__name__})") from e
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise SchemaError(f"{where(src, sample.key, 'json:' + '.'.join(path))}: label "
                          f"{value!r} is not an integer or a string")
    return value


def _facts(kind: str, ext: str, data: bytes) -> tuple[str | None, list | None]:
    """(dtype, shape) of a payload as a reader will decode it, from its header only."""
    if kind == "text":
        data.decode("utf-8")
        return None, None
    if kind == "tensor":
        shape, _, dtype, _ = npy_header(data[:4096])
        return dtype.name, list(shape)
    if kind == "image":
        from PIL import Image

        from midas_data.dataset.formats import IMAGE_FORMATS
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS[ext]) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ValueError("image exceeds the pixel limit")
            return "uint8", [im.height, im.width, 1 if im.mode == "L" else 3]
    import wave
    with wave.open(io.BytesIO(data), "rb") as w:
        return "float32", [w.getnchannels(), None]


def _walk(stream: _HashingReader, wanted: set[str], keep_data: set[str], src: str
          ) -> Iterator[_Sample]:
    """Samples of a tar in order: member offsets, sizes, CRC32 of the wanted members."""
    cur: _Sample | None = None
    with tarfile.open(fileobj=stream, mode="r|") as tf:
        for ti in tf:
            if not ti.isreg():
                continue  # directories and links are not payloads; never followed
            base = ti.name.rsplit("/", 1)[-1]
            prefix = ti.name[: len(ti.name) - len(base)]
            if "." not in base:
                continue
            key, suffix = prefix + base.split(".", 1)[0], base.split(".", 1)[1]
            if cur is None or key != cur.key:
                if cur is not None:
                    yield cur
                cur = _Sample(key, offset=ti.offset)
            padded = ti.offset_data + -(-ti.size // 512) * 512
            cur.end = max(cur.end, padded)
            if suffix in wanted:
                f = tf.extractfile(ti)
                data = f.read() if f is not None else b""
                keep = data if suffix in keep_data else None
                cur.members[suffix] = (ti.offset_data, ti.size, zlib.crc32(data), keep)
    if cur is not None:
        yield cur


def index_shards(patterns: list[str] | str, out_dir: str | Path, *,
                 modalities: dict[str, str], label: str = "cls",
                 split_patterns: dict[str, str] | None = None,
                 split_fractions: dict[str, float] | None = None, split_seed: int = 0,
                 classes: list[str] | None = None, strict: bool = False,
                 storage_options: dict | None = None, overwrite: bool = False) -> dict:
    """Index existing WebDataset tars into a dataset at out_dir; return the manifest.

    modalities: {name: member extension}, e.g. {"image": "jpg"}. label: "cls" or
    "json:<field>[.<field>...]". Splits, per whole tar: split_patterns {split: glob on the
    tar's file name} (tars matching none are refused), or split_fractions {"val": 0.1,
    "test": 0.2} (tars shuffled with split_seed, the rest train), else all train.
    """
    out_dir = Path(out_dir)
    urls = expand(patterns)
    if not urls:
        raise MidasDataError("no shards: the patterns expand to nothing")
    if not modalities:
        raise MidasDataError("give at least one modality, e.g. image=jpg")
    kinds = {}
    for m, ext in modalities.items():
        if not MODALITY_NAME_RE.match(m) or m in RESERVED_NAMES:
            raise SchemaError(f"{where(field=m)}: modality names must match [a-z][a-z0-9_]* and "
                              f"not be one of {sorted(RESERVED_NAMES)}")
        kind = next((k for k, exts in KINDS.items() if ext in exts), None)
        if kind is None:
            raise SchemaError(f"{where(field=m)}: member extension {ext!r} is not one of "
                              f"{sorted(e for exts in KINDS.values() for e in exts)}")
        kinds[m] = kind
    if label != "cls" and not re.fullmatch(r"json:[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", label):
        raise MidasDataError(f"label {label!r}: use 'cls' or 'json:<field>'")
    assignment = _assign_splits(urls, split_patterns, split_fractions, split_seed)
    label_member = "cls" if label == "cls" else "json"
    wanted = set(modalities.values()) | {label_member}

    schema: dict[str, dict] = {}
    seen: set[str] = set()
    skipped: dict[str, list[str]] = {}
    raw_labels: list[object] = []
    shards: list[dict] = []
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "shards").mkdir()
        (tmp / "index").mkdir()
        counters = {sp: 0 for sp in SPLITS}
        per_split_rows: dict[str, list[dict]] = {sp: [] for sp in SPLITS}
        for url, sp in zip(urls, assignment):
            rel = f"shards/{sp}-{counters[sp]:06d}.tar"
            counters[sp] += 1
            shard_no = counters[sp] - 1
            info = {"path": rel, "split": sp, "count": 0, "bytes": 0, "sha256": "", "source": url}
            dest = tmp / rel
            for s in _read_tar(url, dest, wanted, wanted, storage_options, info):
                reason = None
                if not KEY_RE.match(s.key):
                    reason = "key is not letters, digits, '_' and '-'"
                elif s.key in seen:
                    reason = "duplicate key"
                else:
                    missing = [m for m, ext in modalities.items() if ext not in s.members]
                    reason = f"modality {missing[0]!r} missing" if missing else None
                if reason is None:
                    try:
                        raw = _label_of(s, label, url)
                        for m, ext in modalities.items():
                            _check_payload(schema, m, kinds[m], ext, s, url)
                    except (SchemaError, ValueError, OSError, UnicodeDecodeError) as e:
                        reason = str(e)
                if reason is not None:
                    if strict:
                        raise SchemaError(f"{where(url, s.key)}: {reason} (strict: refused; "
                                          "without --strict it is skipped and listed)")
                    skipped.setdefault(reason.split(":")[-1].strip() if reason else "?", []).append(s.key)
                    continue
                seen.add(s.key)
                raw_labels.append(raw)
                row = {"key": s.key, "split": sp, "shard": shard_no, "offset": s.offset,
                       "size": s.end - s.offset, "raw": raw}
                for m, ext in modalities.items():
                    off, size, crc, _ = s.members[ext]
                    row[m] = (off, size, crc)
                per_split_rows[sp].append(row)
                info["count"] += 1
            shards.append(info)
        if not raw_labels:
            raise MidasDataError(f"no sample of {len(urls)} shard(s) could be indexed; skipped: "
                                 f"{ {k: len(v) for k, v in skipped.items()} }")
        class_names, label_of = _labels(raw_labels, classes)
        split_meta = {}
        order = list(modalities)
        manifest_shards = []
        for sp in SPLITS:
            own = [s for s in shards if s["split"] == sp]
            if not own:
                continue
            rs = per_split_rows[sp]
            labels = np.array([label_of(r["raw"]) for r in rs], np.int64)
            keep = labels >= 0
            if strict and not keep.all():
                raise SchemaError(f"{where(key=rs[int(np.argmin(keep))]['key'], field='label')}: "
                                  f"not one of the classes {class_names[:20]} (strict: refused)")
            if not keep.all():
                skipped.setdefault("label not in the class list", []).extend(
                    r["key"] for r, k in zip(rs, keep) if not k)
                for r, k in zip(rs, keep):
                    if not k:
                        next(s for s in own if s["path"].endswith(f"-{r['shard']:06d}.tar"))["count"] -= 1
                rs, labels = [r for r, k in zip(rs, keep) if k], labels[keep]
            cols = {"key": pa.array([r["key"] for r in rs], pa.string()),
                    "label": pa.array(labels, pa.int64()),
                    "shard": pa.array([r["shard"] for r in rs], pa.int32()),
                    "offset": pa.array([r["offset"] for r in rs], pa.int64()),
                    "size": pa.array([r["size"] for r in rs], pa.int64())}
            for m in order:
                cols[f"{m}.offset"] = pa.array([r[m][0] for r in rs], pa.int64())
                cols[f"{m}.size"] = pa.array([r[m][1] for r in rs], pa.int64())
                cols[f"{m}.crc32"] = pa.array([r[m][2] for r in rs], pa.uint32())
            write_table(tmp / "index" / f"{sp}.arrow", pa.table(cols))
            split_meta[sp] = {"count": len(rs), "index": f"index/{sp}.arrow",
                              "index_sha256": file_sha256(tmp / "index" / f"{sp}.arrow"),
                              "shards": [s["path"] for s in own]}
            manifest_shards.extend({k: s[k] for k in ("path", "split", "count", "bytes", "sha256")}
                                   for s in own)
        mods = {m: {**schema[m], "member": modalities[m]} for m in order}
        n_skipped = sum(len(v) for v in skipped.values())
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "modalities": mods, "modality_order": order, "classes": class_names,
            "splits": split_meta, "shards": manifest_shards,
            "fingerprint": dataset_fingerprint(mods, class_names, manifest_shards, split_meta),
            "source": {"indexed_from": [s["source"] for s in shards], "label": label,
                       "skipped_count": n_skipped,
                       "skipped": {k: v[:MAX_SKIPPED_LISTED] for k, v in skipped.items()}},
        }
        write_manifest(tmp, manifest)
    return manifest


def _read_tar(url: str, dest: Path, wanted: set[str], keep: set[str], storage_options,
              info: dict) -> Iterator[_Sample]:
    """Samples of one tar; links (local) or copies (remote) it to dest; fills bytes/sha256."""
    from midas_data.storage.urls import filesystem, is_remote, local_path

    if is_remote(url):
        fs, path = filesystem(url, storage_options)
        with fs.open(path, "rb") as src, open(dest, "wb") as copy:
            stream = _HashingReader(src, copy)
            yield from _walk(stream, wanted, keep, url)
            stream.drain()
    else:
        p = local_path(url).resolve()
        if not p.is_file():
            raise MidasDataError(f"{where(file=p)}: shard not found")
        try:
            os.link(p, dest)
        except OSError:
            os.symlink(p, dest)
        with open(p, "rb") as src:
            stream = _HashingReader(src)
            yield from _walk(stream, wanted, keep, url)
            stream.drain()
    info["bytes"], info["sha256"] = stream.pos, stream.h.hexdigest()


def _check_payload(schema: dict, m: str, kind: str, ext: str, s: _Sample, url: str) -> None:
    dtype, shape = _facts(kind, ext, s.members[ext][3] or b"")
    facts = {"kind": kind, "ext": ext, "dtype": dtype, "shape": shape}
    if m not in schema:
        schema[m] = facts
    elif schema[m] != facts:
        raise SchemaError(f"{where(url, s.key, m)}: {facts['dtype']} {facts['shape']} disagrees "
                          f"with {schema[m]['dtype']} {schema[m]['shape']} of earlier samples")


def _labels(raw: list[object], classes: list[str] | None):
    """(class names, raw label -> class index or -1). Without `classes`: integer labels
    0..max, or the sorted names of string labels."""
    if classes is None:
        if all(isinstance(v, int) for v in raw):
            ints = [int(v) for v in raw]  # type: ignore[call-overload]
            if min(ints) < 0:
                raise SchemaError(f"label {min(ints)} is negative; give the class list")
            classes = [str(c) for c in range(max(ints) + 1)]
        else:
            classes = sorted({str(v) for v in raw})
    names = [str(c) for c in classes]
    lookup = {c: i for i, c in enumerate(names)}

    def label_of(v: object) -> int:
        if isinstance(v, int):
            return v if 0 <= v < len(names) else -1
        return lookup.get(str(v), -1)

    return names, label_of


def _assign_splits(urls: list[str], patterns: dict[str, str] | None,
                   fractions: dict[str, float] | None, seed: int) -> list[str]:
    if patterns and fractions:
        raise MidasDataError("give split patterns or split fractions, not both")
    for sp in (patterns or {}) | (fractions or {}):
        if sp not in SPLITS:
            raise MidasDataError(f"unknown split {sp!r}; splits are {list(SPLITS)}")
    if patterns:
        out = []
        for u in urls:
            name = u.rstrip("/").rsplit("/", 1)[-1]
            hit = [sp for sp, pat in patterns.items() if fnmatch.fnmatch(name, pat)]
            if len(hit) != 1:
                raise MidasDataError(f"{where(file=u)}: matches {'no' if not hit else 'several'} "
                                     f"split pattern(s) of {patterns}")
            out.append(hit[0])
        return out
    out = ["train"] * len(urls)
    if fractions:
        if sum(fractions.values()) >= 1 or min(fractions.values()) < 0:
            raise MidasDataError(f"split fractions {fractions} must be >= 0 and sum below 1")
        perm = np.random.default_rng(seed).permutation(len(urls))
        at = 0
        for sp in ("val", "test"):
            n = int(round(fractions.get(sp, 0.0) * len(urls)))
            for i in perm[at: at + n]:
                out[int(i)] = sp
            at += n
        if "train" not in out:
            raise MidasDataError(f"split fractions {fractions} leave no shard for train")
    return out


def _pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    import click

    out = {}
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"{v!r} is not NAME=VALUE", param_hint=option)
        k, val = v.split("=", 1)
        out[k.strip()] = val.strip()
    return out


def _command():
    import click

    @click.command("index-shards")
    @click.argument("patterns", nargs=-1, required=True)
    @click.option("--out", "out_dir", required=True,
                  help="Dataset directory to write (manifest, index, shards/ links or copies), "
                       "or a URL: built locally, then uploaded with the manifest last.")
    @click.option("--modality", "modality", multiple=True, required=True, metavar="NAME=EXT",
                  help="A modality and the member extension holding it, e.g. image=jpg; repeatable.")
    @click.option("--label", default="cls", show_default=True,
                  help="Where the label is: cls (the .cls member) or json:<field> of the .json member.")
    @click.option("--split", "split_patterns", multiple=True, metavar="SPLIT=GLOB",
                  help="Tars whose file name matches GLOB go to SPLIT (train/val/test); repeatable.")
    @click.option("--split-fraction", "split_fractions", multiple=True, metavar="SPLIT=FRACTION",
                  help="Send this fraction of the tars (seeded) to val or test; the rest is train.")
    @click.option("--split-seed", default=0, show_default=True)
    @click.option("--classes", help="Comma-separated class names, in index order (default: inferred).")
    @click.option("--strict", is_flag=True, help="Refuse a sample missing a modality or label.")
    @click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out.")
    def index_shards_cmd(patterns, out_dir, modality, label, split_patterns, split_fractions,
                         split_seed, classes, strict, overwrite) -> None:
        """Index existing WebDataset tars (local or URLs, brace patterns) without rewriting them."""
        from midas_data.storage.publish import staged

        try:
            fractions = {k: float(v) for k, v in _pairs(split_fractions, "--split-fraction").items()}
            with staged(out_dir, overwrite=overwrite) as dest:  # a URL: built here, uploaded
                m = index_shards(list(patterns), dest, modalities=_pairs(modality, "--modality"),
                                 label=label,
                                 split_patterns=_pairs(split_patterns, "--split") or None,
                                 split_fractions=fractions or None, split_seed=split_seed,
                                 classes=classes.split(",") if classes else None, strict=strict,
                                 overwrite=overwrite)
        except (MidasDataError, ValueError) as e:
            click.echo(f"error: {e}", err=True)
            raise SystemExit(2) from e
        counts = ", ".join(f"{k}={v['count']}" for k, v in m["splits"].items())
        skipped = m["source"]["skipped"]
        click.echo(f"indexed {len(m['shards'])} tar(s) into {out_dir}: {counts}; skipped "
                   f"{m['source']['skipped_count']}" + (f" ({', '.join(f'{k}: {len(v)}' for k, v in skipped.items())})"
                                                        if skipped else ""))

    return index_shards_cmd


index_shards_cmd = _command()
