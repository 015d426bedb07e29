"""midas_data.pipelines.media: the torch log-mel filterbank against a float64 numpy reference, frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from midas_data.pipelines import media
from midas_data.pipelines.fixtures import write_jpg, write_wav

from midas_data.errors import SchemaError


def reference_log_mel(x: np.ndarray, sr: int, n_mels: int, win: int, hop: int,
                      eps: float = 1e-6) -> np.ndarray:
    """Written from the definitions, in float64 and with loops: no shared code with media."""
    pad = win // 2
    xp = np.pad(x.astype(np.float64), pad, mode="reflect")
    n_frames = 1 + (len(xp) - win) // hop
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)  # periodic Hann
    frames = np.stack([xp[t * hop: t * hop + win] * window for t in range(n_frames)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # [T, F]
    freqs = np.linspace(0, sr / 2, win // 2 + 1)
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    inv = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    pts = inv(np.linspace(mel(0.0), mel(sr / 2), n_mels + 2))
    fb = np.zeros((len(freqs), n_mels))
    for m in range(n_mels):
        lo, c, hi = pts[m], pts[m + 1], pts[m + 2]
        for k, f in enumerate(freqs):
            fb[k, m] = max(0.0, min((f - lo) / (c - lo), (hi - f) / (hi - c)))
    return np.log(power @ fb + eps).T  # [n_mels, T]


@pytest.fixture(scope="module")
def sine() -> tuple[np.ndarray, int]:
    sr = 16000
    t = np.arange(int(0.5 * sr)) / sr
    return 0.8 * np.sin(2 * np.pi * 440.0 * t), sr


def test_log_mel_matches_float64_reference_on_a_sine(sine):
    x, sr = sine
    ref = reference_log_mel(x, sr, n_mels=40, win=400, hop=160)
    got64 = media.log_mel(x, sr, n_mels=40, dtype=torch.float64).numpy()
    assert got64.shape == ref.shape == (40, 1 + len(x) // 160)
    np.testing.assert_allclose(got64, ref, atol=1e-7, rtol=0)
    got32 = media.log_mel(x.astype(np.float32), sr, n_mels=40).numpy()
    assert got32.dtype == np.float32
    loud = ref > ref.max() - np.log(1e6)  # within 60 dB of the peak
    np.testing.assert_allclose(got32[loud], ref[loud], atol=2e-3, rtol=0)
    # the loudest band holds 440 Hz
    centers = media.mel_to_hz(np.linspace(0, media.hz_to_mel(sr / 2), 42))[1:-1]
    band = int(np.argmax(got32[:, 10:-10].mean(axis=1)))
    assert abs(centers[band] - 440.0) < (centers[band + 1] - centers[band - 1])


def test_mel_matrix_triangles_cover_the_band():
    fb = media.mel_matrix(257, 16000, 64).numpy()
    assert fb.shape == (257, 64) and fb.min() >= 0 and fb.max() <= 1 + 1e-6
    assert (fb.sum(axis=0) > 0).all()  # every filter sees at least one bin
    assert np.all(np.diff(np.argmax(fb, axis=0)) >= 0)  # centres increase
    with pytest.raises(ValueError, match="f_min"):
        media.mel_matrix(257, 16000, 64, f_min=9000)


def test_wav_log_mel_is_fixed_size_and_rate_invariant(tmp_path, sine):
    x, sr = sine
    a = media.wav_log_mel(write_wav(tmp_path / "a.wav", x, sr), "k", "audio", 32, 30)
    b = media.wav_log_mel(write_wav(tmp_path / "b.wav", x[: sr // 10], sr), "k", "audio", 32, 30)
    c = media.wav_log_mel(write_wav(tmp_path / "c.wav", x[::2], sr // 2), "k", "audio", 32, 30)
    assert a.shape == b.shape == c.shape == (1, 32, 30) and a.dtype == np.float32
    assert np.all(b[..., 12:] == np.float32(np.log(1e-6)))  # 0.1 s = 11 frames, then silence
    a4, c4 = (media.wav_log_mel(tmp_path / f, "k", "audio", 32, 30, f_max=4000) for f in ("a.wav", "c.wav"))
    assert np.argmax(a4[0, :, 5]) == np.argmax(c4[0, :, 5])  # same band at 16 kHz and 8 kHz
    with pytest.raises(SchemaError, match="f_max"):
        media.wav_log_mel(tmp_path / "c.wav", "k", "audio", 32, 30, f_max=6000)


def test_fix_length_and_uniform_indices():
    s = np.arange(12, dtype=np.float32).reshape(2, 6)
    assert media.fix_length(s, 4, -1).tolist() == [[0, 1, 2, 3], [6, 7, 8, 9]]
    assert media.fix_length(s, 8, -1)[0, 6:].tolist() == [-1, -1]
    assert media.uniform_indices(10, 3).tolist() == [0, 4, 9]  # 4.5 rounds to even
    assert media.uniform_indices(2, 4).tolist() == [0, 0, 1, 1]


def test_frames_are_sorted_naturally_and_channels_first(tmp_path):
    folder = tmp_path / "clip"
    for i, v in [(1, 10), (2, 20), (10, 100), (9, 90)]:
        write_jpg(folder / f"img_{i}.jpg", np.full((6, 6, 3), v, np.uint8))
    names = [p.name for p in media.frame_files(folder, "k", "visual")]
    assert names == ["img_1.jpg", "img_2.jpg", "img_9.jpg", "img_10.jpg"]
    x = media.load_frames(folder, 2, 4, "k", "visual")
    assert x.shape == (2, 3, 4, 4) and x.dtype == np.uint8
    assert abs(int(x[0].mean()) - 10) <= 3 and abs(int(x[1].mean()) - 100) <= 3
    assert media.load_frames(folder, 2, 4, "k", "visual", layout="thwc").shape == (2, 4, 4, 3)
    with pytest.raises(SchemaError, match=r"file .*clip, key 'k', field 'visual'.*4 frame\(s\)"):
        media.load_frames(folder, 5, 4, "k", "visual")
    assert media.load_frames(folder, 5, 4, "k", "visual", allow_short=True).shape[0] == 5


def test_unreadable_media_name_file_key_and_field(tmp_path):
    bad = tmp_path / "x.wav"
    bad.write_bytes(b"RIFF not really")
    with pytest.raises(SchemaError, match=r"x\.wav, key 'c1', field 'audio'.*unreadable wav"):
        media.read_wav(bad, "c1", "audio")
    img = tmp_path / "f.jpg"
    img.write_bytes(b"\xff\xd8 broken")
    with pytest.raises(SchemaError, match=r"f\.jpg, key 'c1', field 'image'.*unreadable image"):
        media.image_chw(img, 4, "c1", "image")
