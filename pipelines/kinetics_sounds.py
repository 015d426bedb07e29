"""Kinetics-Sounds: the Kinetics-400 classes that can be heard (31 in the OGM-GE / MIDAS
version), audio + video frames.

Expected on-disk layout (`root`):
```
root/audio/<clip>.wav                   one PCM wav per clip (`audio_dir`)
root/frames/<clip>/*.jpg                frames extracted per clip (`frames_dir`)
root/train.csv, root/test.csv [, val.csv]   split lists, rows `clip,class name`
                                        (.txt with whitespace-separated fields also works)
root/classes.txt                        optional: the class names, one per line, in index order
```
A single `split_csv` with rows `clip,split,class name` may replace the per-split lists.
Labels come from the lists; a name outside `classes.txt` (or the `classes` option) is an
error. Without `classes.txt` the classes are the sorted names found in the lists. When no
list names a val split, a stratified `val_fraction` of train becomes val.

Modalities as CREMA-D (midas_data.pipelines.cremad): `audio` float32 `[1, n_mels, audio_frames]`
log-mel, `visual` uint8 `[num_frames, 3, frame_size, frame_size]`.
"""

from __future__ import annotations

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
    listed_clips,
    output,
    read_rows,
    safe_key,
)
from .media import audio_visual_payloads

MODALITIES = ("audio", "visual")
RECIPE = authors_recipe(lr=1e-3, epochs=70, step_size=50,
                        warmup_epochs=10, lam=5.0)


def read_kinetics_sounds(root: str | Path, modalities: list[str] | None = None,
                         skip_bad: bool = False, *, n_mels: int = 128, audio_frames: int = 1000,
                         num_frames: int = 3, frame_size: int = 224, audio_dir: str = "audio",
                         frames_dir: str = "frames", split_csv: str | Path | None = None,
                         classes: list[str] | str | Path | None = None, val_fraction: float = 0.1,
                         seed: int = 0, allow_short: bool = False, frame_layout: str = "tchw",
                         cache_dir: str | Path | None = None) -> dict:
    """Kinetics-Sounds clips as samples with `audio` and `visual` payloads (module docstring)."""
    options = {k: v for k, v in locals().items() if k not in ("root", "modalities", "skip_bad")}
    check_options("kinetics_sounds", options)
    media_options = dict(n_mels=n_mels, audio_frames=audio_frames, num_frames=num_frames,
                         frame_size=frame_size, allow_short=allow_short, frame_layout=frame_layout)
    root = Path(root)
    mods = check_modalities(modalities, MODALITIES, "kinetics_sounds")
    bad, store = BadInput(skip_bad), PayloadStore(cache_dir)
    listed = listed_clips(root, split_csv, bad)
    if not listed:
        raise MidasDataError(f"{where(file=root)}: no split lists; Kinetics-Sounds labels come from "
                             "root/{train,test}.csv (rows `clip,class`) or split_csv=...")
    class_names = _classes(root, classes, listed)
    audio_root, frame_root = root / audio_dir, root / frames_dir

    def one(clip: str) -> Sample:
        split, label, list_file = listed[clip]
        key = safe_key(clip)
        if label is None:
            raise SchemaError(f"{where(list_file, clip, 'label')}: no class name in the list row")
        if label not in class_names:
            raise SchemaError(f"{where(list_file, clip, 'label')}: unknown class {label!r}; "
                              f"known: {class_names[:8]}{'...' if len(class_names) > 8 else ''}")
        wav = audio_root / f"{clip}.wav"
        payloads = audio_visual_payloads(
            store, key, clip, mods, wav, frame_root / clip,
            f"{where(wav, clip, 'audio')}: named in {list_file} but the audio "
            "file does not exist (modality missing)", **media_options)
        return Sample(key=key, label=label, payloads=payloads, split=split, source=str(list_file))

    samples = bad.run(sorted(listed), one)
    if not any(s.split == "val" for s in samples):
        carve_val(samples, [class_names.index(str(s.label)) for s in samples], val_fraction, seed)
    return output("kinetics_sounds", samples, class_names, mods, bad, options, root)


def _classes(root: Path, classes: list[str] | str | Path | None, listed: dict) -> list[str]:
    if isinstance(classes, list | tuple):
        return [str(c) for c in classes]
    path = Path(classes) if classes is not None else root / "classes.txt"
    if path.is_file():
        return [" ".join(r) for r in read_rows(path)]
    if classes is not None:
        raise MidasDataError(f"{where(file=path, field='classes')}: class list file does not exist")
    return sorted({lab for _, lab, _ in listed.values() if lab is not None})
