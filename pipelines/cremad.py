"""CREMA-D (Cao et al. 2014): 7,442 acted clips, 6 emotions, audio + face video frames.

Expected on-disk layout (`root`):
```
root/AudioWAV/1001_DFA_ANG_XX.wav        one PCM wav per clip (the CREMA-D release)
root/Image-01-FPS/1001_DFA_ANG_XX/*.jpg  frames extracted per clip (e.g. 1 fps, as the
                                         OGM-GE / MIDAS preprocessing does); `frames_dir`
                                         names another folder (e.g. "visual/Image-01-FPS")
root/train.csv, root/test.csv [, val.csv] optional split lists, rows `clip[,label]`
```
The emotion is the 3rd field of the clip name (actor_sentence_EMOTION_level): ANG, DIS, FEA,
HAP, NEU, SAD. A single `split_csv` with rows `clip,split` may be given instead of the lists.
Without any list every clip is read and build-shards makes a seeded stratified 70/10/20
split; with lists, only listed clips are read, and when no list names a val split a
stratified `val_fraction` of train becomes val.

Modalities: `audio`, a float32 log-mel filterbank `[1, n_mels, audio_frames]` (25 ms
windows, 10 ms hop, cropped or padded with silence to a fixed size), and `visual`, uint8
frames `[num_frames, 3, frame_size, frame_size]` uniformly sampled over the clip.
"""

from __future__ import annotations

from pathlib import Path

from midas_data.dataset.shards import Sample
from midas_data.errors import SchemaError, where

from .common import (
    BadInput,
    PayloadStore,
    authors_recipe,
    carve_val,
    check_modalities,
    check_options,
    listed_clips,
    output,
    safe_key,
)
from .media import audio_visual_payloads

CLASSES = ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
MODALITIES = ("audio", "visual")
# The MIDAS authors' settings (docs/METHOD.md, "Authors' settings"), as TrainConfig fields.
RECIPE = authors_recipe(lr=1e-3, epochs=70, step_size=50,
                        warmup_epochs=10, lam=1.0)


def emotion_of(clip: str, file: object = None) -> str:
    """The emotion code of a CREMA-D clip name, checked against the six classes."""
    parts = clip.split("_")
    if len(parts) < 3 or parts[2] not in CLASSES:
        raise SchemaError(f"{where(file, clip, 'label')}: clip name does not carry one of the "
                          f"emotion codes {CLASSES} as its 3rd '_'-separated field")
    return parts[2]


def read_cremad(root: str | Path, modalities: list[str] | None = None, skip_bad: bool = False, *,
                n_mels: int = 128, audio_frames: int = 300, num_frames: int = 3,
                frame_size: int = 224, frames_dir: str = "Image-01-FPS", audio_dir: str = "AudioWAV",
                split_csv: str | Path | None = None, val_fraction: float = 0.1, seed: int = 0,
                allow_short: bool = False, frame_layout: str = "tchw",
                cache_dir: str | Path | None = None) -> dict:
    """CREMA-D clips as samples with `audio` and `visual` payloads (see the module docstring)."""
    options = {k: v for k, v in locals().items() if k not in ("root", "modalities", "skip_bad")}
    check_options("cremad", options)
    media_options = dict(n_mels=n_mels, audio_frames=audio_frames, num_frames=num_frames,
                         frame_size=frame_size, allow_short=allow_short, frame_layout=frame_layout)
    root = Path(root)
    mods = check_modalities(modalities, MODALITIES, "cremad")
    bad, store = BadInput(skip_bad), PayloadStore(cache_dir)
    audio_root, frame_root = root / audio_dir, root / frames_dir
    if "audio" in mods and not audio_root.is_dir():
        raise SchemaError(f"{where(audio_root, field='audio')}: folder missing; expected "
                          "AudioWAV/<clip>.wav (pass audio_dir=... for another name)")
    if "visual" in mods and not frame_root.is_dir():
        raise SchemaError(f"{where(frame_root, field='visual')}: folder missing; expected "
                          "<frames_dir>/<clip>/*.jpg (pass frames_dir=...)")
    listed = listed_clips(root, split_csv, bad)
    if listed:
        clips = sorted(listed)
    else:  # every clip that has either modality; a clip missing the other is reported below
        names = {p.stem for p in audio_root.glob("*.wav")} if "audio" in mods else set()
        if "visual" in mods:
            names |= {p.name for p in frame_root.iterdir() if p.is_dir()}
        clips = sorted(names)

    def one(clip: str) -> Sample:
        split, listed_label, list_file = listed.get(clip, (None, None, None))
        key = safe_key(clip)
        label = emotion_of(clip, list_file or audio_root / f"{clip}.wav")
        if listed_label is not None and listed_label not in (label, str(CLASSES.index(label))):
            raise SchemaError(f"{where(list_file, clip, 'label')}: list says {listed_label!r}, the "
                              f"clip name says {label!r}")
        wav = audio_root / f"{clip}.wav"
        payloads = audio_visual_payloads(
            store, key, clip, mods, wav, frame_root / clip,
            f"{where(list_file or wav, clip, 'audio')}: no audio file {wav} "
            "(modality missing, or the split list names an absent clip)", **media_options)
        return Sample(key=key, label=label, payloads=payloads, split=split,
                      source=str(list_file or root))

    samples = bad.run(clips, one)
    if listed and not any(s.split == "val" for s in samples):
        carve_val(samples, [CLASSES.index(str(s.label)) for s in samples], val_fraction, seed)
    return output("cremad", samples, CLASSES, mods, bad, options, root)
