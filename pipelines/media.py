"""Media helpers shared by the dataset readers: log-mel filterbanks in torch, frames, images.

- Audio: PCM .wav read with the stdlib `wave` module (8/16/32-bit, any rate, mixed to mono),
  turned into a log-mel filterbank `[n_mels, T]`: `torch.stft` (periodic Hann window,
  centred frames, reflect padding) -> power spectrum -> HTK-scale triangular mel matrix ->
  `log(mel + eps)`. Windows and hops are given in milliseconds, so files of any sample rate
  give the same number of frames per second. No torchaudio.
- Frames: a per-clip folder of .jpg/.jpeg/.png files, sorted by name (numbers compared as
  numbers), `num_frames` of them picked at uniformly spaced positions, resized to
  `size x size` and returned as uint8 `[T, C, H, W]` (channels first, the layout of the
  `midas_data.features.encoders` conv encoders) or `[T, H, W, C]` with `layout="thwc"`.
- Images: one file resized to uint8 `[3, H, W]`.

Every failure is a `SchemaError` that names the file, the sample key and the field.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from midas_data.dataset.formats import MAX_IMAGE_PIXELS, decode
from midas_data.errors import SchemaError, where

FRAME_EXTS = (".jpg", ".jpeg", ".png")
LAYOUTS = ("tchw", "thwc")


# ---------------------------------------------------------------- audio
def hz_to_mel(f: np.ndarray | float) -> np.ndarray | float:
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray | float:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_matrix(n_freqs: int, sample_rate: int, n_mels: int, f_min: float = 0.0,
               f_max: float | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triangular mel filters `[n_freqs, n_mels]` over the rfft bins 0..sample_rate/2."""
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate/2, got {f_min}, {f_max}, {sample_rate}")
    bins = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)
    edges = torch.from_numpy(mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)))
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    up = (bins[:, None] - lo[None, :]) / (mid - lo)[None, :]
    down = (hi[None, :] - bins[:, None]) / (hi - mid)[None, :]
    return torch.clamp(torch.minimum(up, down), min=0.0).to(dtype)


def log_mel(wave: np.ndarray | torch.Tensor, sample_rate: int, n_mels: int = 128,
            win_ms: float = 25.0, hop_ms: float = 10.0, n_fft: int | None = None,
            f_min: float = 0.0, f_max: float | None = None, eps: float = 1e-6,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Log-mel filterbank `[n_mels, T]` of a mono waveform `[N]` (T = 1 + N // hop)."""
    x = torch.as_tensor(np.asarray(wave), dtype=dtype).reshape(-1)
    win = max(2, int(round(sample_rate * win_ms / 1000)))
    hop = max(1, int(round(sample_rate * hop_ms / 1000)))
    n_fft = n_fft or win
    if n_fft < win:
        raise ValueError(f"n_fft={n_fft} is shorter than the {win}-sample window")
    if x.numel() <= n_fft // 2:  # reflect padding needs more samples than half a window
        x = torch.nn.functional.pad(x, (0, n_fft // 2 + 1 - x.numel()))
    spec = torch.stft(x, n_fft=n_fft, hop_length=hop, win_length=win,
                      window=torch.hann_window(win, dtype=dtype), center=True,
                      pad_mode="reflect", return_complex=True)
    power = spec.real ** 2 + spec.imag ** 2  # [n_fft // 2 + 1, T]
    mel = mel_matrix(n_fft // 2 + 1, sample_rate, n_mels, f_min, f_max, dtype).T @ power
    return torch.log(mel + eps)


def fix_length(spec: torch.Tensor | np.ndarray, frames: int, pad_value: float) -> np.ndarray:
    """Crop or pad (with `pad_value`) the last axis of `spec` to exactly `frames`."""
    s = np.asarray(spec, dtype=np.float32)[..., :frames]
    if s.shape[-1] < frames:
        pad = np.full(s.shape[:-1] + (frames - s.shape[-1],), pad_value, np.float32)
        s = np.concatenate([s, pad], axis=-1)
    return np.ascontiguousarray(s)


def read_wav(path: Path, key: str, field: str) -> tuple[np.ndarray, int]:
    """A PCM wav file as a mono float32 waveform in [-1, 1] and its sample rate."""
    import io
    import wave

    try:
        data = Path(path).read_bytes()
        with wave.open(io.BytesIO(data), "rb") as w:
            rate = w.getframerate()
    except FileNotFoundError as e:
        raise SchemaError(f"{where(path, key, field)}: audio file does not exist") from e
    except (OSError, EOFError, wave.Error) as e:
        raise SchemaError(f"{where(path, key, field)}: unreadable wav ({type(e).__name__}: {e}); "
                          "expected 8/16/32-bit PCM") from e
    x = decode("audio", "wav", data, file=path, key=key, field=field)
    if x.shape[-1] == 0:
        raise SchemaError(f"{where(path, key, field)}: wav file holds no samples")
    return x.mean(axis=0).astype(np.float32), rate


def wav_log_mel(path: Path, key: str, field: str, n_mels: int, frames: int,
                win_ms: float = 25.0, hop_ms: float = 10.0, f_max: float | None = None,
                eps: float = 1e-6) -> np.ndarray:
    """A wav file as a fixed-size float32 log-mel spectrogram `[1, n_mels, frames]`.

    Frames are `hop_ms` apart at any sample rate; give `f_max` (<= half the lowest rate) for
    mel bands that also agree across files of different rates (default: rate / 2).
    """
    x, rate = read_wav(path, key, field)
    if f_max is not None and f_max > rate / 2:
        raise SchemaError(f"{where(path, key, field)}: f_max={f_max} Hz exceeds half the "
                          f"sample rate ({rate} Hz); lower f_max")
    spec = log_mel(x, rate, n_mels, win_ms, hop_ms, f_max=f_max, eps=eps)
    return fix_length(spec, frames, math.log(eps))[None]


# ---------------------------------------------------------------- frames and images
def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def frame_files(folder: Path, key: str, field: str) -> list[Path]:
    """The frame images of a clip folder in temporal order; a missing folder is an error."""
    if not folder.is_dir():
        raise SchemaError(f"{where(folder, key, field)}: frame folder does not exist "
                          "(modality missing for this clip)")
    files = [p for p in folder.iterdir() if p.suffix.lower() in FRAME_EXTS and p.is_file()]
    return sorted(files, key=lambda p: _natural(p.name))


def uniform_indices(available: int, wanted: int) -> np.ndarray:
    """`wanted` uniformly spaced positions in 0..available-1 (repeats when available < wanted)."""
    if available < 1 or wanted < 1:
        raise ValueError("need at least one frame available and wanted")
    return np.linspace(0, available - 1, wanted).round().astype(np.int64)


def load_image(path: Path, size: int, key: str, field: str, gray: bool = False) -> np.ndarray:
    """An image resized to `size x size`: uint8 `[H, W, 3]`, or `[H, W]` with `gray=True`."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as im:
            im = im.convert("L" if gray else "RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError as e:
        raise SchemaError(f"{where(path, key, field)}: image file does not exist") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise SchemaError(f"{where(path, key, field)}: unreadable image "
                          f"({type(e).__name__}: {e})") from e


def image_chw(path: Path, size: int, key: str, field: str) -> np.ndarray:
    """An RGB image as uint8 `[3, size, size]`."""
    return np.ascontiguousarray(load_image(path, size, key, field).transpose(2, 0, 1))


def pick_frames(files: list[Path], num_frames: int, folder: Path, key: str, field: str,
                allow_short: bool, span: int = 1) -> np.ndarray:
    """Start positions of `num_frames` uniformly spaced windows of `span` frames."""
    usable = len(files) - span + 1
    if usable < 1 or (usable < num_frames and not allow_short):
        raise SchemaError(f"{where(folder, key, field)}: {len(files)} frame(s), but {num_frames} "
                          f"{'stacks of ' + str(span) + ' ' if span > 1 else ''}frame(s) are needed; "
                          "lower num_frames, pass allow_short=True to repeat frames, or skip_bad=True")
    return uniform_indices(usable, num_frames)


def load_frames(folder: Path, num_frames: int, size: int, key: str, field: str,
                allow_short: bool = False, layout: str = "tchw") -> np.ndarray:
    """`num_frames` uniformly sampled RGB frames of a clip folder as uint8 `[T, 3, H, W]`."""
    if layout not in LAYOUTS:
        raise ValueError(f"frame layout must be one of {LAYOUTS}, got {layout!r}")
    files = frame_files(folder, key, field)
    idx = pick_frames(files, num_frames, folder, key, field, allow_short)
    frames = np.stack([load_image(files[i], size, key, field) for i in idx])  # [T, H, W, 3]
    return np.ascontiguousarray(frames.transpose(0, 3, 1, 2) if layout == "tchw" else frames)


def load_flow(x_folder: Path, y_folder: Path, num_frames: int, stack: int, size: int, key: str,
              field: str, allow_short: bool = False, layout: str = "tchw") -> np.ndarray:
    """Stacked optical flow: `num_frames` windows of `stack` x/y frame pairs, uint8 `[T, 2L, H, W]`.

    Channels alternate x_t, y_t, x_{t+1}, y_{t+1}, ... (the two-stream convention).
    """
    xs, ys = frame_files(x_folder, key, field), frame_files(y_folder, key, field)
    if len(xs) != len(ys):
        raise SchemaError(f"{where(y_folder, key, field)}: {len(ys)} y-flow frames but "
                          f"{len(xs)} x-flow frames in {x_folder}")
    starts = pick_frames(xs, num_frames, x_folder, key, field, allow_short, span=stack)
    out = np.empty((num_frames, 2 * stack, size, size), np.uint8)
    for t, s in enumerate(starts):
        for j in range(stack):
            out[t, 2 * j] = load_image(xs[s + j], size, key, field, gray=True)
            out[t, 2 * j + 1] = load_image(ys[s + j], size, key, field, gray=True)
    return out if layout == "tchw" else np.ascontiguousarray(out.transpose(0, 2, 3, 1))


def audio_visual_payloads(store, key: str, clip: str, mods: list[str], wav: Path, frames: Path,
                          missing_audio: str, *, n_mels: int, audio_frames: int, num_frames: int,
                          frame_size: int, allow_short: bool, frame_layout: str) -> dict:
    """The `audio` (log-mel of `wav`) and `visual` (frames under `frames`) payloads of one
    clip, for the modalities in `mods`, put into `store` (a `PayloadStore`). A missing wav
    raises SchemaError(`missing_audio`): each reader says where the clip was listed."""
    payloads = {}
    if "audio" in mods:
        if not wav.is_file():
            raise SchemaError(missing_audio)
        payloads["audio"] = store.put(key, "audio", wav_log_mel(wav, clip, "audio", n_mels, audio_frames))
    if "visual" in mods:
        payloads["visual"] = store.put(key, "visual", load_frames(
            frames, num_frames, frame_size, clip, "visual", allow_short, frame_layout))
    return payloads
