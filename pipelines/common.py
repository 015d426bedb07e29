"""Plumbing shared by the dataset readers: bad-input policy, keys, split lists, payload storage.

Every reader follows one convention, `reader(root, modalities=None, skip_bad=False, **options)`
returning `{"samples", "classes", "modalities", "source"}` for `midas_data.build_dataset`.
With `skip_bad=False` the first bad clip raises a `SchemaError` naming file, key and field;
with `skip_bad=True` bad clips are left out, counted, and listed in `source["skipped"]`
(written into the dataset manifest's `source` by build-shards).
"""

from __future__ import annotations

import csv
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import numpy as np

from midas_data.dataset.formats import EXT_TO_KIND, UNSAFE_EXTS
from midas_data.dataset.shards import Sample
from midas_data.errors import MidasDataError, SchemaError, where

T = TypeVar("T")
MAX_LISTED = 1000  # skipped items listed in the manifest; the count is always exact
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "dev": "val", "test": "test", "testing": "test"}
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]+")


class BadInput:
    """Raise located errors, or (skip_bad) record them and carry on."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = bool(skip_bad)
        self.items: list[dict] = []
        self.count = 0

    def record(self, err: MidasDataError, key: object = None) -> None:
        if not self.skip_bad:
            raise err
        self.count += 1
        if len(self.items) < MAX_LISTED:
            self.items.append({"key": None if key is None else str(key), "error": str(err)})

    def fail(self, file: object, key: object, field: object, msg: str) -> None:
        """A bad item found outside `run`: raise, or record it."""
        self.record(SchemaError(f"{where(file, key, field)}: {msg}"), key)

    def run(self, items: Iterable[T], fn: Callable[[T], Sample | None],
            key_of: Callable[[T], object] = str) -> list[Sample]:
        """`fn(item)` for each item; a MidasDataError skips the item (skip_bad) or propagates."""
        out = []
        for item in items:
            try:
                s = fn(item)
            except MidasDataError as e:
                self.record(e, key_of_name(key_of(item)))
                continue
            if s is not None:
                out.append(s)
        return out

    def summary(self) -> dict:
        return {"skip_bad": self.skip_bad, "skipped_count": self.count, "skipped": self.items}


def authors_recipe(*, lr: float, epochs: int, step_size: int, warmup_epochs: int,
                   lam: float) -> dict:
    """The MIDAS authors' training settings for one dataset (docs/METHOD.md, "Authors'
    settings"): SGD with momentum 0.9, weight decay 1e-4, batch 64, StepLR gamma 0.1; only
    the learning rate, schedule, warm-up and lambda vary per dataset."""
    return {"optimizer": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64,
            "epochs": epochs, "step_size": step_size, "gamma": 0.1,
            "warmup_epochs": warmup_epochs, "lam": lam}


def safe_key(name: str) -> str:
    """A WebDataset-safe key (letters, digits, '_', '-') from a clip or file name."""
    key = _BAD_KEY_CHARS.sub("-", name).strip("-")
    if not key:
        raise SchemaError(f"{where(key=name, field='key')}: cannot form a sample key from this name")
    return key


def key_of_name(name: object) -> str:
    """The sample key a name maps to, or the name itself when it maps to none (for reports)."""
    try:
        return safe_key(str(name))
    except SchemaError:
        return str(name)


def split_name(value: str, file: object, key: object = None) -> str:
    s = SPLIT_ALIASES.get(str(value).strip().lower())
    if s is None:
        raise SchemaError(f"{where(file, key, 'split')}: unknown split {value!r}; use train/val/test")
    return s


def check_modalities(requested: Iterable[str] | None, available: Iterable[str], name: str,
                     at_least: int = 2) -> list[str]:
    """The requested modalities (default: all available), validated."""
    avail = list(available)
    if isinstance(requested, str):
        requested = [m for m in requested.split(",") if m]
    mods = list(requested or avail)
    unknown = [m for m in mods if m not in avail]
    if unknown:
        raise ValueError(f"{name}: unknown modality {unknown[0]!r}; choose from {avail}")
    if len(set(mods)) != len(mods) or len(mods) < at_least:
        raise ValueError(f"{name}: MIDAS needs at least {at_least} distinct modalities, got {mods}")
    return mods


POSITIVE = ("n_mels", "audio_frames", "num_frames", "frame_size", "flow_stack", "image_size",
            "text_len", "max_len")


def check_options(name: str, options: dict) -> None:
    """Reject sizes below 1 and unknown frame layouts before any file is read."""
    for k in POSITIVE:
        v = options.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name}: {k} must be a positive integer, got {v!r}")
    if options.get("frame_layout", "tchw") not in ("tchw", "thwc"):
        raise ValueError(f"{name}: frame_layout must be 'tchw' or 'thwc', got {options['frame_layout']!r}")


def read_rows(path: Path, min_fields: int = 1, max_fields: int = 0) -> list[list[str]]:
    """Rows of a CSV or whitespace-separated list file; blank lines and '#' comments skipped.

    A whitespace-separated line splits into at most `max_fields` fields (0: no limit), so a
    last field such as a class name may hold spaces.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError as e:
        raise MidasDataError(f"{where(file=path)}: list file does not exist") from e
    except (OSError, UnicodeDecodeError) as e:
        raise SchemaError(f"{where(file=path)}: unreadable list file ({e})") from e
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if lines and "," in lines[0]:
        rows = [[c.strip() for c in r] for r in csv.reader(lines)]
    else:
        rows = [ln.split(None, max_fields - 1) if max_fields else ln.split() for ln in lines]
    for i, r in enumerate(rows):
        if len(r) < min_fields:
            raise SchemaError(f"{where(path, f'line {i + 1}')}: expected at least {min_fields} "
                              f"field(s), got {r}")
    return rows


def drop_header(rows: list[list[str]], names: Iterable[str]) -> list[list[str]]:
    """Rows without a leading header line whose first cell is one of `names`."""
    heads = {n.lower() for n in names}
    return rows[1:] if rows and rows[0] and rows[0][0].strip().lower() in heads else rows


def read_split_lists(root: Path, split_csv: str | Path | None, ext: tuple[str, ...] = (".csv", ".txt")
                     ) -> list[tuple[str, str, str | None, Path]] | None:
    """(clip, split, label or None, list file) for every listed clip, or None without lists.

    `split_csv`: one file with rows `clip,split[,label]` (a header row is allowed). Without it,
    `root/{train,val,valid,test}{.csv,.txt}` are read if present, each row `clip[,label]`
    (the OGM-GE / MIDAS style), the split taken from the file name.
    """
    out = []
    if split_csv is not None:
        path = Path(split_csv)
        for r in drop_header(read_rows(path, 2, 3), ("clip", "key", "name", "id", "file")):
            out.append((r[0], split_name(r[1], path, r[0]), r[2] if len(r) > 2 else None, path))
        return out
    found = False
    for stem in ("train", "val", "valid", "test"):
        for e in ext:
            path = Path(root) / f"{stem}{e}"
            if path.is_file():
                found = True
                for r in drop_header(read_rows(path, 1, 2), ("clip", "key", "name", "id", "file")):
                    out.append((r[0], split_name(stem, path), r[1] if len(r) > 1 else None, path))
    return out if found else None


def listed_clips(root: Path, split_csv: str | Path | None, bad: BadInput
                 ) -> dict[str, tuple[str, str | None, Path]]:
    """clip -> (split, listed label or None, list file) from the split lists; {} without lists."""
    out: dict = {}
    for clip, split, label, path in read_split_lists(root, split_csv) or []:
        if clip in out:
            bad.fail(path, clip, "split", f"listed twice (also in {out[clip][2]})")
            continue
        out[clip] = (split, label, path)
    return out


def carve_val(samples: list[Sample], labels: list[int], fraction: float, seed: int) -> None:
    """Move a seeded, per-class `fraction` of the train samples to split `val` (in place)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return
    rng = np.random.default_rng([seed, 0x7A1])
    train = np.array([i for i, s in enumerate(samples) if s.split == "train"], dtype=np.int64)
    y = np.asarray(labels, dtype=np.int64)[train]
    for c in np.unique(y):
        idx = train[y == c]
        for i in rng.permutation(idx)[: int(round(fraction * len(idx)))]:
            samples[int(i)].split = "val"


class PayloadStore:
    """Arrays kept in memory (cache_dir None) or written as `.npy` files under `cache_dir`.

    A full-size dataset does not fit in memory; pass `cache_dir` (any scratch folder) and the
    samples carry file paths that build-shards reads one at a time.
    """

    def __init__(self, cache_dir: str | Path | None):
        self.dir = Path(cache_dir) if cache_dir is not None else None
        self.spilled: str | None = None  # temp folder of texts that could not stay inline
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, field: str, value: np.ndarray) -> np.ndarray | Path:
        if self.dir is None:
            return value
        path = self.dir / f"{key}.{field}.npy"
        np.save(path, value, allow_pickle=False)
        return path

    def put_text(self, key: str, field: str, text: str) -> str | Path:
        """Text inline, or as a `.txt` file when `cache_dir` is set or when build-shards would
        misread the string as a file path or a JSON vector (e.g. a title ending in '.jpg')."""
        suffix = Path(text).suffix.lower().lstrip(".")
        ambiguous = suffix in EXT_TO_KIND or suffix in UNSAFE_EXTS or text.strip().startswith("[")
        if self.dir is None and not ambiguous:
            return text
        if self.dir is None and self.spilled is None:
            self.spilled = tempfile.mkdtemp(prefix="midas-text-")
        path = Path(self.dir or self.spilled) / f"{key}.{field}.txt"
        path.write_bytes(text.encode("utf-8"))
        return path


def output(name: str, samples: list[Sample], classes: list[str], modalities: list[str],
           bad: BadInput, options: dict, root: Path) -> dict:
    """The reader result; an empty result is an error that says why."""
    if not samples:
        hint = f" ({bad.count} skipped as bad)" if bad.count else ""
        raise MidasDataError(f"{where(file=root)}: {name} found no usable clips{hint}; check the "
                             "root folder against the layout in the pipeline's docstring")
    src = {"pipeline": name, "root": str(Path(root).resolve()), "modalities": modalities,
           "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
           **bad.summary()}
    return {"samples": samples, "classes": classes, "modalities": modalities, "source": src}
