"""Tiny synthetic datasets written in each real dataset's on-disk layout (tests, benchmarks).

Every generator writes under `root`, returns `root`, and is deterministic for `seed`. The
content depends on the class (a tone per class, a colour per class, class words in the
text, a mean shift in the features), so that a model can learn something in a few steps.
The layouts are those documented in each reader's module docstring.
"""

from __future__ import annotations

import io
import json
import wave
from pathlib import Path

import numpy as np

CREMAD_CLASSES = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
KS_CLASSES = ("playing drums", "playing bagpipes", "dog barking", "singing", "tapping guitar",
              "mowing lawn")
UCF_CLASSES = ("ApplyEyeMakeup", "Archery", "BabyCrawling", "Basketball", "Biking", "Bowling")
FOOD_CLASSES = ("apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "bibimbap", "churros")
IMDB_GENRES = ("Drama", "Comedy", "Romance", "Thriller", "Crime", "Action")


def write_wav(path: Path, x: np.ndarray, rate: int) -> Path:
    """A float waveform in [-1, 1] as a 16-bit mono PCM wav."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    path.write_bytes(buf.getvalue())
    return path


def write_jpg(path: Path, pixels: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path, format="JPEG", quality=90)
    return path


def tone(c: int, rate: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return 0.5 * np.sin(2 * np.pi * (300 + 150 * c) * t) + 0.05 * rng.standard_normal(len(t))


def picture(c: int, size: int, rng: np.random.Generator, gray: bool = False) -> np.ndarray:
    """A noisy image whose colour (or grey level) encodes the class."""
    base = np.array([(40 * c) % 256, (90 + 70 * c) % 256, (200 - 30 * c) % 256], np.float64)
    shape = (size, size) if gray else (size, size, 3)
    img = (base[0] if gray else base) + rng.normal(0, 20, shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def frame_folder(folder: Path, c: int, frames: int, size: int, rng: np.random.Generator,
                 name: str = "{:05d}.jpg", gray: bool = False) -> None:
    for i in range(frames):
        write_jpg(folder / name.format(i + 1), picture(c, size, rng, gray))


def make_cremad(root: str | Path, per_class: int = 2, frames: int = 3, size: int = 16,
                rate: int = 8000, seconds: float = 0.3, split_lists: bool = False,
                seed: int = 0) -> Path:
    """AudioWAV/<clip>.wav + Image-01-FPS/<clip>/NNNNN.jpg [+ train.csv/test.csv]."""
    root, rng = Path(root), np.random.default_rng(seed)
    rows: dict[str, list[str]] = {"train": [], "test": []}
    for c, emo in enumerate(CREMAD_CLASSES):
        for i in range(per_class):
            clip = f"{1001 + i}_DFA_{emo}_XX"
            write_wav(root / "AudioWAV" / f"{clip}.wav", tone(c, rate, seconds, rng), rate)
            frame_folder(root / "Image-01-FPS" / clip, c, frames, size, rng)
            rows["test" if i == per_class - 1 else "train"].append(f"{clip},{emo}")
    if split_lists:
        for sp, r in rows.items():
            (root / f"{sp}.csv").write_text("\n".join(r) + "\n")
    return root


def make_kinetics_sounds(root: str | Path, per_class: int = 3, frames: int = 3, size: int = 16,
                         rate: int = 8000, seconds: float = 0.3, seed: int = 0) -> Path:
    """audio/<clip>.wav + frames/<clip>/NNNNN.jpg + train.csv/test.csv + classes.txt."""
    root, rng = Path(root), np.random.default_rng(seed)
    rows: dict[str, list[str]] = {"train": [], "test": []}
    for c, name in enumerate(KS_CLASSES):
        for i in range(per_class):
            clip = f"yt{c:02d}x{i:03d}_000010_000020"
            write_wav(root / "audio" / f"{clip}.wav", tone(c, rate, seconds, rng), rate)
            frame_folder(root / "frames" / clip, c, frames, size, rng)
            rows["test" if i == per_class - 1 else "train"].append(f"{clip},{name}")
    for sp, r in rows.items():
        (root / f"{sp}.csv").write_text("\n".join(r) + "\n")
    (root / "classes.txt").write_text("\n".join(KS_CLASSES) + "\n")
    return root


def make_ucf101(root: str | Path, train_per_class: int = 3, test_per_class: int = 1,
                frames: int = 6, size: int = 16, seed: int = 0) -> Path:
    """ucfTrainTestlist/{classInd,trainlist01,testlist01}.txt + jpegs_256/ + tvl1_flow/{u,v}/."""
    root, rng = Path(root), np.random.default_rng(seed)
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(UCF_CLASSES)))
    train, test = [], []
    for c, name in enumerate(UCF_CLASSES):
        for g in range(train_per_class + test_per_class):
            clip = f"v_{name}_g{g + 1:02d}_c01"
            if g < train_per_class:
                train.append(f"{name}/{clip}.avi {c + 1}")
            else:
                test.append(f"{name}/{clip}.avi")
            frame_folder(root / "jpegs_256" / clip, c, frames, size, rng, "frame{:06d}.jpg")
            for axis in ("u", "v"):
                frame_folder(root / "tvl1_flow" / axis / clip, c, frames - 1, size, rng,
                             "frame{:06d}.jpg", gray=True)
    (lists / "trainlist01.txt").write_text("\n".join(train) + "\n")
    (lists / "testlist01.txt").write_text("\n".join(test) + "\n")
    return root


def make_food101(root: str | Path, train_per_class: int = 3, test_per_class: int = 1,
                 size: int = 16, seed: int = 0) -> Path:
    """images/{train,test}/<class>/<class>_<n>.jpg + texts/{train,test}_titles.csv."""
    root, rng = Path(root), np.random.default_rng(seed)
    (root / "texts").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        lines = ["image,text,label"]
        for c, name in enumerate(FOOD_CLASSES):
            for i in range(n):
                fname = f"{name}_{split}{i}.jpg"
                write_jpg(root / "images" / split / name / fname, picture(c, size, rng))
                words = " ".join(rng.choice(["easy", "best", "homemade", "quick"], 2))
                lines.append(f'{fname},"{words} {name.replace("_", " ")} recipe, serves {i + 2}",{name}')
        (root / "texts" / f"{split}_titles.csv").write_text("\n".join(lines) + "\n")
    return root


def make_cmu_mosi(root: str | Path, per_split: tuple[int, int, int] = (24, 6, 8),
                  dims: tuple[int, int, int] = (12, 6, 8), seq_len: int = 5, fmt: str = "npz",
                  seed: int = 0) -> Path:
    """{train,valid,test}.npz (fmt="npz") or {train,valid,test}/labels.csv + <modality>/<id>.npy."""
    root, rng = Path(root), np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "valid", "test"), per_split):
        score = np.round(rng.uniform(-3, 3, n), 1)
        score[np.abs(score) < 0.3] = 1.0  # no accidental zeros; tests add their own
        ids = np.array([f"seg{split}{i:03d}[{i % 3}]" for i in range(n)])
        feats = {}
        for m, d in zip(("text", "audio", "vision"), dims):
            x = rng.standard_normal((n, seq_len, d)).astype(np.float32) + np.sign(score)[:, None, None]
            x[:, : rng.integers(0, 2)] = 0.0  # leading zero padding, as in the aligned releases
            feats[m] = x
        if fmt == "npz":
            np.savez(root / f"{split}.npz", labels=score[:, None].astype(np.float32), ids=ids, **feats)
            continue
        folder = root / split
        for m, x in feats.items():
            (folder / m).mkdir(parents=True, exist_ok=True)
            for i, k in enumerate(ids):
                np.save(folder / m / f"{k}.npy", x[i])
        (folder / "labels.csv").write_text("id,score\n" + "".join(f"{k},{s}\n" for k, s in zip(ids, score)))
    return root


def make_mmimdb(root: str | Path, per_split: tuple[int, int, int] = (24, 6, 8), size: int = 16,
                seed: int = 0) -> Path:
    """dataset/<id>.jpeg + dataset/<id>.json + split.json; each movie has one of IMDB_GENRES
    and sometimes an extra genre outside them (e.g. "Music")."""
    root, rng = Path(root), np.random.default_rng(seed)
    split: dict[str, list[str]] = {}
    n = 0
    for sp, count in zip(("train", "dev", "test"), per_split):
        split[sp] = []
        for _ in range(count):
            mid, c = f"{n:07d}", n % len(IMDB_GENRES)
            n += 1
            genres = [IMDB_GENRES[c]] + (["Music"] if rng.random() < 0.3 else [])
            write_jpg(root / "dataset" / f"{mid}.jpeg", picture(c, size, rng))
            plot = f"A {IMDB_GENRES[c].lower()} story about {rng.choice(['a dog', 'two friends'])}."
            (root / "dataset" / f"{mid}.json").write_text(json.dumps({"plot": [plot], "genres": genres}))
            split[sp].append(mid)
    (root / "split.json").write_text(json.dumps(split))
    return root


def write_av_digits_manifest(root: str | Path, noise_std: float = 4.0, seed: int = 0) -> Path:
    """The bundled AV digits as a user would bring them: `image/<key>.png` (8x8 grayscale
    uint8; the images, noise included, mapped linearly from their overall min..max to
    0..255), `audio/<key>.npy` (the float32 MFCC summary) and `manifest.csv` with columns
    key,label,image,audio and no split column (build-shards then makes its stratified
    split). `noise_std` is `load_av_digits`'s noise on the 0..16 image scale (4: the noisy,
    weak image view). Rows are in the pipeline's sample order. Returns the manifest path."""
    from PIL import Image

    from .av_digits import load_av_digits

    root = Path(root)
    views, labels = load_av_digits(seed, noise_std)
    images = views["image"].reshape(-1, 8, 8).astype(np.float64)
    lo, hi = float(images.min()), float(images.max())
    pixels = np.rint((images - lo) * (255.0 / max(hi - lo, 1e-12))).clip(0, 255).astype(np.uint8)
    (root / "image").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    tag = "av-noisy" if noise_std > 0 else "av"
    lines = ["key,label,image,audio"]
    for i, y in enumerate(labels):
        key = f"{tag}-{i:05d}"
        Image.fromarray(pixels[i]).save(root / "image" / f"{key}.png", format="PNG")
        np.save(root / "audio" / f"{key}.npy", views["audio"][i])
        lines.append(f"{key},{int(y)},image/{key}.png,audio/{key}.npy")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
