"""A CREMA-D-sized dataset for the training and extract parts, built once and reused.

Arrays, not wav and jpg files (decoding 7,442 clips would eat the budget): per clip the
cremad reader's payloads, `audio` a float32 log-mel-shaped array [1, n_mels, audio_frames]
and `visual` uint8 frames [frames, 3, S, S], 6 classes (pipelines/cremad.py), a seeded
stratified 70/10/20 split as build-shards makes without split lists. A class-dependent
mel band and a class colour (as pipelines/fixtures.py paints its pictures) keep it
learnable. The manifest records the parameters; a fixture with the same ones is reused.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np


def build_fixture(root: Path, clips: int, frames: int, frame_size: int, n_mels: int,
                  audio_frames: int, seed: int, log=print) -> dict:
    """Write (or reuse) the fixture at `root`; return its parameters."""
    from midas_data.pipelines.cremad import CLASSES

    from midas_data import Sample, build_dataset

    params = {"clips": clips, "frames": frames, "frame_size": frame_size, "n_mels": n_mels,
              "audio_frames": audio_frames, "seed": seed}
    manifest = root / "manifest.json"
    if manifest.exists():
        with contextlib.suppress(ValueError, KeyError, OSError):
            if json.loads(manifest.read_text())["source"].get("params") == params:
                log(f"fixture reused: {root}")
                return params
    rng = np.random.default_rng(seed)
    labels = np.arange(clips) % len(CLASSES)
    band = max(1, n_mels // len(CLASSES))
    colours = np.array([[(40 * c) % 256, (90 + 70 * c) % 256, (200 - 30 * c) % 256]
                        for c in range(len(CLASSES))], np.int16)

    def samples():  # a generator: the clips are never all in memory at once
        for i, c in enumerate(labels):
            audio = rng.standard_normal((1, n_mels, audio_frames), dtype=np.float32)
            audio[0, c * band:(c + 1) * band] += 0.5
            noise = rng.integers(-40, 40, (frames, 3, frame_size, frame_size), dtype=np.int16)
            visual = np.clip(colours[c][None, :, None, None] + noise, 0, 255).astype(np.uint8)
            yield Sample(key=f"{1001 + i // 100}_{i:05d}_{CLASSES[c]}_XX", label=CLASSES[c],
                         payloads={"audio": audio, "visual": visual})

    build_dataset(samples(), root, classes=list(CLASSES), modalities=["audio", "visual"],
                  overwrite=True, progress=False,
                  source={"pipeline": "gpu_check cremad-like fixture", "params": params})
    return params
