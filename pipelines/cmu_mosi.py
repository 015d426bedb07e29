"""CMU-MOSI / CMU-MOSEI from pre-extracted features: text, audio, video (M = 3 modalities).

The usual distributions (pickles, .csd/h5 files) cannot be read without running code or
extra libraries, so the reader accepts two plain formats; convert once with your own tools.

Format A, one .npz per split (`np.load(allow_pickle=False)`):
```
root/train.npz, root/valid.npz (or val.npz / dev.npz), root/test.npz
    text, audio, video (or vision/visual): float [N, L, D] sequences or [N, D] vectors
    labels: float [N], [N, 1] or [N, K] (column `label_column`: the sentiment score)
    ids (optional): str [N], the segment ids (keys; default `<split>-<row>`)
```
Format B, per-split folders of .npy arrays:
```
root/{train,valid,test}/labels.csv           rows `id,score` (a header row is allowed)
root/{train,valid,test}/{text,audio,video}/<id>.npy   float [L, D] or [D]
```
Labels are binary as in the MIDAS / MulT protocol: score > 0 -> `positive`, < 0 ->
`negative`; score == 0 is dropped (`zero="drop"`, counted in `source["zero_dropped"]`) or
assigned (`zero="positive"` / `"negative"`). Sequences become `[D]` by averaging the
non-padding time steps (`sequence="mean"`; rows that are all zero count as padding) or are
cropped / zero-padded to `[max_len, D]` (`sequence="pad"`). Payloads are float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from midas_data.dataset.shards import Sample
from midas_data.errors import MidasDataError, SchemaError, where

from .common import (
    BadInput,
    authors_recipe,
    check_modalities,
    check_options,
    drop_header,
    output,
    read_rows,
    safe_key,
)

CLASSES = ["negative", "positive"]
MODALITIES = ("text", "audio", "video")
ALIASES = {"text": ("text", "language"), "audio": ("audio", "acoustic"),
           "video": ("video", "vision", "visual")}
SPLIT_FILES = {"train": ("train",), "val": ("valid", "val", "dev"), "test": ("test",)}
# The paper reports no MOSI/MOSEI run: the authors' SGD settings (docs/METHOD.md, "Authors'
# settings") with the Food-101 schedule, a starting point to tune.
RECIPE = authors_recipe(lr=1e-3, epochs=30, step_size=15,
                        warmup_epochs=2, lam=1.0)


def summarize(x: np.ndarray, sequence: str, max_len: int, file: object, key: str, field: str) -> np.ndarray:
    """A `[L, D]` sequence or `[D]` vector as float32 `[D]` (mean) or `[max_len, D]` (pad)."""
    x = np.asarray(x)
    if x.dtype.kind not in "fiu" or x.ndim not in (1, 2) or x.size == 0:
        raise SchemaError(f"{where(file, key, field)}: expected a non-empty numeric [L, D] or [D] "
                          f"array, got {x.dtype} {x.shape}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise SchemaError(f"{where(file, key, field)}: NaN or inf in the features")
    if x.ndim == 1:
        x = x[None]
    if sequence == "mean":
        valid = np.abs(x).sum(axis=1) > 0
        return x[valid].mean(axis=0) if valid.any() else np.zeros(x.shape[1], np.float32)
    out = np.zeros((max_len, x.shape[1]), np.float32)
    out[: min(max_len, len(x))] = x[:max_len]
    return out


def _find(root: Path, split: str, make) -> Path | None:
    for name in SPLIT_FILES[split]:
        if (p := make(name)).exists():
            return p
    return None


def _npz_split(path: Path, split: str, mods: list[str], label_column: int):
    """(keys, labels, {modality: per-row arrays}, file) of one .npz split."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:
        raise SchemaError(f"{where(file=path)}: cannot load without pickle ({e}); store plain "
                          "numeric arrays and ids as a str array") from e
    except (OSError, EOFError) as e:
        raise SchemaError(f"{where(file=path)}: unreadable .npz ({e})") from e
    if "labels" not in arrays:
        raise SchemaError(f"{where(path, field='labels')}: array missing; found {sorted(arrays)}")
    y = arrays["labels"].reshape(len(arrays["labels"]), -1)[:, label_column].astype(np.float64)
    n = len(y)
    keys = ([str(k) for k in arrays["ids"].tolist()] if "ids" in arrays
            else [f"{split}-{i:06d}" for i in range(n)])
    feats = {}
    for m in mods:
        name = next((a for a in ALIASES[m] if a in arrays), None)
        if name is None:
            raise SchemaError(f"{where(path, field=m)}: modality array missing (tried "
                              f"{list(ALIASES[m])}); found {sorted(arrays)}")
        if len(arrays[name]) != n or len(keys) != n:
            raise SchemaError(f"{where(path, field=name)}: {len(arrays[name])} rows, labels have {n}")
        feats[m] = arrays[name]
    return keys, y, feats, path


def _folder_split(folder: Path, mods: list[str]):
    """(keys, labels, {modality: per-row paths}, file) of one folder split."""
    lab = folder / "labels.csv"
    rows = drop_header(read_rows(lab, 2), ("id", "key", "segment", "clip"))
    keys, y = [r[0] for r in rows], []
    for r in rows:
        try:
            y.append(float(r[1]))
        except ValueError as e:
            raise SchemaError(f"{where(lab, r[0], 'label')}: score {r[1]!r} is not a number") from e
    feats = {m: [next((folder / a / f"{k}.npy" for a in ALIASES[m] if (folder / a / f"{k}.npy").exists()),
                      folder / m / f"{k}.npy") for k in keys] for m in mods}
    return keys, np.asarray(y, np.float64), feats, lab


def _sample(name: str, score: float, split: str, values: dict, src: Path, zero: str,
            sequence: str, max_len: int, dims: dict[str, int]) -> Sample:
    """One segment; `values` holds per-modality arrays or .npy paths."""
    key = safe_key(name)
    if not np.isfinite(score):
        raise SchemaError(f"{where(src, key, 'label')}: score is NaN or inf")
    label = "positive" if score > 0 or (score == 0 and zero == "positive") else "negative"
    payloads = {}
    for m, v in values.items():
        f = src
        if isinstance(v, Path):
            f = v
            if not v.is_file():
                raise SchemaError(f"{where(v, key, m)}: feature file missing (modality missing)")
            try:
                v = np.load(v, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise SchemaError(f"{where(f, key, m)}: unreadable .npy ({e})") from e
        x = summarize(v, sequence, max_len, f, key, m)
        if dims.setdefault(m, x.shape[-1]) != x.shape[-1]:
            raise SchemaError(f"{where(f, key, m)}: feature dimension {x.shape[-1]} differs "
                              f"from {dims[m]} of earlier samples")
        payloads[m] = x
    return Sample(key=key, label=label, payloads=payloads, split=split, source=str(src))


def read_cmu_mosi(root: str | Path, modalities: list[str] | None = None, skip_bad: bool = False, *,
                  sequence: str = "mean", max_len: int = 50, zero: str = "drop",
                  label_column: int = 0, name: str = "cmu_mosi") -> dict:
    """CMU-MOSI (or MOSEI: same formats) feature files as binary-sentiment samples."""
    options = {k: v for k, v in locals().items() if k not in ("root", "modalities", "skip_bad")}
    check_options(name, options)
    root = Path(root)
    mods = check_modalities(modalities, MODALITIES, name)
    if sequence not in ("mean", "pad") or zero not in ("drop", "positive", "negative"):
        raise ValueError("sequence must be 'mean' or 'pad'; zero 'drop', 'positive' or 'negative'")
    bad, dims, dropped, samples = BadInput(skip_bad), {}, 0, []
    for split in SPLIT_FILES:
        npz = _find(root, split, lambda n: root / f"{n}.npz")
        folder = _find(root, split, lambda n: root / n / "labels.csv")
        if npz is None and folder is None:
            continue
        keys, y, feats, src = (_npz_split(npz, split, mods, label_column) if npz is not None
                               else _folder_split(folder.parent, mods))

        def one(i: int, split=split, keys=keys, y=y, feats=feats, src=src) -> Sample | None:
            nonlocal dropped
            if y[i] == 0 and zero == "drop":
                dropped += 1
                return None
            return _sample(keys[i], y[i], split, {m: feats[m][i] for m in mods}, src, zero,
                           sequence, max_len, dims)

        samples += bad.run(range(len(keys)), one, key_of=lambda i, keys=keys: keys[i])
    if not samples and not bad.count and not dropped:
        raise MidasDataError(f"{where(file=root)}: no split found; expected train.npz/valid.npz/"
                             "test.npz or train/labels.csv etc. (see midas_data.pipelines.cmu_mosi)")
    out = output(name, samples, CLASSES, mods, bad, options, root)
    out["source"]["zero_dropped"] = dropped
    return out


def read_cmu_mosei(root: str | Path, modalities: list[str] | None = None, skip_bad: bool = False,
                   **options) -> dict:
    """CMU-MOSEI: the MOSI reader under another name (labels column 0 is the sentiment)."""
    return read_cmu_mosi(root, modalities, skip_bad, **{**options, "name": "cmu_mosei"})
