"""Shared fixtures: small real datasets built into tmp_path, and payload-file writers.

- `mfeat_source`: the bundled mfeat pipeline output (all 6 views), read once per session.
- `make_tiny_dataset(out=None, *, per_class=10, modalities=("fac", "mor"), ...)`: builds a
  small stratified subset of mfeat into `out` (default tmp_path/"tiny") and returns its path.
- `select_tiny_samples(source, per_class, modalities)`: those samples as a list.
- `tiny_dataset`: `make_tiny_dataset()` with defaults (100 samples, 10 classes, fac+mor,
  70/10/20 per class, shards of at most 16 samples so every split has several shards).
- `payload_files`: writes .npy/.png/.wav/.txt payload files under tmp_path/"payloads".
- `assert_no_partial_output(out_dir)`: out_dir is absent and no temp sibling is left.
- `one_torch_thread`, `one_faiss_thread`: one intra-op thread for a whole test module
  (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): tiny models and searches
  run faster so, and are immune to other processes on the box.
"""

from __future__ import annotations

import io
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from midas_data import Sample, build_dataset


@pytest.fixture(scope="module")
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_faiss_thread():
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="session")
def mfeat_source() -> dict:
    """`get_pipeline("mfeat")` with all six views. Shared by the session: do not mutate."""
    from midas_data.pipelines import get_pipeline
    from midas_data.pipelines.mfeat import VIEWS

    return get_pipeline("mfeat")(modalities=list(VIEWS))


def tiny_samples(source: dict, per_class: int = 10, modalities=("fac", "mor")) -> list[Sample]:
    """The first `per_class` samples of each class, restricted to `modalities`."""
    taken: dict[int, int] = {}
    out = []
    for s in source["samples"]:
        if taken.get(s.label, 0) < per_class:
            taken[s.label] = taken.get(s.label, 0) + 1
            out.append(Sample(s.key, s.label, {m: s.payloads[m] for m in modalities},
                              s.split, s.source))
    return out


@pytest.fixture(scope="session")
def select_tiny_samples() -> Callable[..., list[Sample]]:
    """`tiny_samples(source, per_class, modalities)` as a fixture, for tests that build by hand."""
    return tiny_samples


@pytest.fixture
def make_tiny_dataset(tmp_path, mfeat_source) -> Callable[..., Path]:
    def make(out: str | Path | None = None, *, per_class: int = 10,
             modalities: tuple[str, ...] | list[str] = ("fac", "mor"), shard_max_count: int = 16,
             split_seed: int = 0, **kwargs) -> Path:
        out = Path(out) if out is not None else tmp_path / "tiny"
        build_dataset(tiny_samples(mfeat_source, per_class, modalities), out,
                      classes=mfeat_source["classes"], modalities=list(modalities),
                      shard_max_count=shard_max_count, split_seed=split_seed,
                      source={"pipeline": "mfeat", "subset": per_class}, progress=False, **kwargs)
        return out

    return make


@pytest.fixture
def tiny_dataset(make_tiny_dataset) -> Path:
    return make_tiny_dataset()


class PayloadFiles:
    """Writes payload files of every supported kind and returns their paths."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def npy(self, name: str, arr: np.ndarray, allow_pickle: bool = False) -> Path:
        p = self._path(name)
        np.save(p, arr, allow_pickle=allow_pickle)
        return p

    def png(self, name: str, pixels: np.ndarray) -> Path:
        """uint8 pixels, HxW (grayscale) or HxWx3 (RGB)."""
        from PIL import Image

        p = self._path(name)
        Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(p, format="PNG")
        return p

    def wav(self, name: str, samples: np.ndarray, rate: int = 8000) -> Path:
        """int16 samples, [t] (mono) or [channels, t], written with the stdlib `wave`."""
        p = self._path(name)
        p.write_bytes(wav_bytes(samples, rate))
        return p

    def txt(self, name: str, text: str) -> Path:
        p = self._path(name)
        p.write_bytes(text.encode("utf-8"))
        return p


def wav_bytes(samples: np.ndarray, rate: int = 8000) -> bytes:
    x = np.asarray(samples, dtype=np.int16)
    x = x[None, :] if x.ndim == 1 else x
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(x.shape[0])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.ascontiguousarray(x.T).astype("<i2").tobytes())
    return buf.getvalue()


@pytest.fixture
def payload_files(tmp_path) -> PayloadFiles:
    return PayloadFiles(tmp_path / "payloads")


@pytest.fixture
def assert_no_partial_output() -> Callable[[Path], None]:
    def check(out_dir: Path) -> None:
        out_dir = Path(out_dir)
        assert not out_dir.exists(), f"{out_dir} was (partly) written"
        leftovers = sorted(p.name for p in out_dir.parent.glob(f".{out_dir.name}.*"))
        assert not leftovers, f"temp files left beside {out_dir}: {leftovers}"

    return check
