"""AV digits: 8x8 handwritten digit images paired by class with spoken-digit MFCC summaries.

Both sources are real and independent (see data/README.md), so a pair shares only its
label, as in AV-MNIST. Pairing is seeded: within each class, images and recordings are
shuffled and zipped, giving min(#images, #recordings) samples per class. `noise_std`
adds Gaussian noise to the image (0..16 scale), the AV-noisy variant of docs/REFERENCE_RESULTS.md.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from midas_data.dataset.shards import Sample


def load_av_digits(seed: int = 0, noise_std: float = 0.0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    path = resources.files(__package__) / "data" / "av_digits.npz"
    with resources.as_file(path) as p, np.load(p, allow_pickle=False) as z:
        img, yi, aud, ya = z["image"], z["image_label"], z["audio"], z["audio_label"]
    rng = np.random.default_rng([seed, 0xA7])
    image_rows, audio_rows, labels = [], [], []
    for c in range(10):
        ii = rng.permutation(np.flatnonzero(yi == c))
        aa = rng.permutation(np.flatnonzero(ya == c))
        n = min(len(ii), len(aa))
        image_rows.append(ii[:n])
        audio_rows.append(aa[:n])
        labels.append(np.full(n, c))
    ir, ar, y = (np.concatenate(v) for v in (image_rows, audio_rows, labels))
    images = img[ir].astype(np.float32)
    if noise_std > 0:
        images = images + rng.normal(0.0, noise_std, images.shape).astype(np.float32)
    return {"image": images.reshape(-1, 64), "audio": aud[ar].astype(np.float32)}, y.astype(np.int64)


def read_av_digits(modalities=None, seed: int = 0, noise_std: float = 0.0) -> dict:
    views, labels = load_av_digits(seed, noise_std)
    mods = list(modalities or ("image", "audio"))
    tag = "av-noisy" if noise_std > 0 else "av"
    samples = [Sample(key=f"{tag}-{i:05d}", label=int(labels[i]),
                      payloads={m: views[m][i] for m in mods}, source="pipelines/data/av_digits.npz")
               for i in range(len(labels))]
    return {"samples": samples, "classes": [str(c) for c in range(10)], "modalities": mods,
            "source": {"pipeline": "av_digits", "seed": seed, "noise_std": noise_std}}
