"""UPMC Food-101 (Wang et al. 2015): about 90,000 recipe web pages, 101 foods, image + text.

Expected on-disk layout (`root`, the UPMC Food-101 release):
```
root/images/train/<class>/<file>.jpg
root/images/test/<class>/<file>.jpg
root/texts/train_titles.csv      rows `<file>.jpg,<text>[,<class>]` (a header row is allowed)
root/texts/test_titles.csv
```
`text_csv` changes the CSV name pattern (default "{split}_titles.csv"). Classes are the folder
names under images/train. The images' train/test split is kept and a stratified
`val_fraction` of train becomes val.

Modalities: `image`, uint8 `[3, image_size, image_size]` (resized, channels first); `text`,
a UTF-8 `.txt` payload (`text_format="txt"`), or uint8 UTF-8 bytes `[text_len]`, zero-padded
(`text_format="bytes"`: a tensor that any tensor encoder, and `tiny_text_transformer`,
consumes; the built-in warm-up does not train on `.txt` text).
Text encoders: `midas_data.pipelines.text_encoder` (`tiny_text_transformer`, or your pretrained model).
"""

from __future__ import annotations

import csv
from pathlib import Path

from midas_data.dataset.shards import Sample
from midas_data.errors import MidasDataError, SchemaError, where

from .common import (
    BadInput,
    PayloadStore,
    authors_recipe,
    carve_val,
    check_modalities,
    check_options,
    output,
    safe_key,
)
from .media import FRAME_EXTS, image_chw
from .text_encoder import text_to_bytes

MODALITIES = ("image", "text")
TEXT_FORMATS = ("txt", "bytes")
RECIPE = authors_recipe(lr=1e-3, epochs=30, step_size=15,
                        warmup_epochs=2, lam=1.0)


def read_text_csv(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, row) of a CSV whose first cell names an image; a header row is dropped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [(i + 1, r) for i, r in enumerate(csv.reader(f)) if r]
    except FileNotFoundError as e:
        raise MidasDataError(f"{where(file=path)}: text CSV does not exist") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SchemaError(f"{where(file=path)}: unreadable text CSV ({e})") from e
    if rows and Path(rows[0][1][0]).suffix.lower() not in FRAME_EXTS:
        rows = rows[1:]
    return rows


def text_payload(store: PayloadStore, key: str, text: str, text_format: str, text_len: int):
    if text_format == "bytes":
        return store.put(key, "text", text_to_bytes([text], text_len)[0])
    return store.put_text(key, "text", text)


def read_food101(root: str | Path, modalities: list[str] | None = None, skip_bad: bool = False, *,
                 image_size: int = 224, text_format: str = "txt", text_len: int = 256,
                 text_csv: str = "{split}_titles.csv", val_fraction: float = 0.1, seed: int = 0,
                 cache_dir: str | Path | None = None) -> dict:
    """UPMC Food-101 pages as samples with `image` and `text` payloads (module docstring)."""
    options = {k: v for k, v in locals().items() if k not in ("root", "modalities", "skip_bad")}
    check_options("food101", options)
    root = Path(root)
    mods = check_modalities(modalities, MODALITIES, "food101")
    if text_format not in TEXT_FORMATS:
        raise ValueError(f"text_format must be one of {TEXT_FORMATS}, got {text_format!r}")
    bad, store = BadInput(skip_bad), PayloadStore(cache_dir)
    train_dir = root / "images" / "train"
    if not train_dir.is_dir():
        raise SchemaError(f"{where(train_dir, field='image')}: folder missing; expected "
                          "images/{train,test}/<class>/<file>.jpg")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    items: list[tuple[str, Path, str, str, Path]] = []  # split, image, class, text, text file
    for split in ("train", "test"):
        img_dir = root / "images" / split
        if not img_dir.is_dir():
            continue
        images = {p.name: p for p in img_dir.glob("*/*") if p.suffix.lower() in FRAME_EXTS}
        texts: dict[str, tuple[str, Path]] = {}
        if "text" in mods:
            tpath = root / "texts" / text_csv.format(split=split)
            for line, r in read_text_csv(tpath):
                name = Path(r[0]).name
                if len(r) < 2:
                    bad.fail(tpath, name, "text", f"line {line}: no text column")
                elif name not in images:
                    bad.fail(tpath, name, "image", f"line {line}: the CSV names an image that "
                             f"does not exist under {img_dir}")
                elif len(r) > 2 and r[2] and r[2] != images[name].parent.name:
                    bad.fail(tpath, name, "label", f"line {line}: class {r[2]!r} disagrees with "
                             f"the image folder {images[name].parent.name!r}")
                else:
                    texts[name] = (r[1], tpath)
        for name in sorted(images):
            t = texts.get(name, (None, root / "texts" / text_csv.format(split=split)))
            items.append((split, images[name], images[name].parent.name, *t))

    def one(item: tuple) -> Sample:
        split, img, cls, text, tfile = item
        key = safe_key(img.stem)
        if cls not in classes:
            raise SchemaError(f"{where(img, key, 'label')}: unknown class {cls!r} (not a folder "
                              "under images/train)")
        payloads = {}
        if "image" in mods:
            payloads["image"] = store.put(key, "image", image_chw(img, image_size, key, "image"))
        if "text" in mods:
            if text is None:
                raise SchemaError(f"{where(tfile, key, 'text')}: no text row for image {img.name} "
                                  "(modality missing)")
            payloads["text"] = text_payload(store, key, text, text_format, text_len)
        return Sample(key=key, label=cls, payloads=payloads, split=split, source=str(img))

    samples = bad.run(items, one, key_of=lambda it: it[1].stem)
    carve_val(samples, [classes.index(str(s.label)) for s in samples], val_fraction, seed)
    out = output("food101", samples, classes, mods, bad, options, root)
    out["source"]["text_spill_dir"] = store.spilled
    return out
