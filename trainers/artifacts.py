"""Run directory artifacts: checkpoints, metrics.jsonl, results.json, plots.

Every file is written atomically (midas_data.atomic), so a run killed at any moment leaves
the previous complete version. Checkpoints hold only tensors and plain containers (the
config as a dict, RNG states as tensors) so they load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import zipfile
from pathlib import Path

import torch

from midas_data.atomic import write_bytes_atomic
from midas_data.diskspace import disk_full_guard
from midas_data.errors import MidasDataError, StaleArtifactError, UnsafeInputError, where

# 2: checkpoints record the fingerprints of the dataset, features and pairs they trained on.
CHECKPOINT_VERSION = 2
# Settings that may change between a run and its resumption without changing the result.
RESUMABLE_CHANGES = {"device", "num_workers", "checkpoint_every", "eval_batch_size"}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict) -> None:
    """Serialise in memory first, so a full disk is our own OSError with the exact size
    (not a torch stream-writer failure), then write atomically."""
    buf = io.BytesIO()
    torch.save({"format_version": CHECKPOINT_VERSION, **payload}, buf)
    data = buf.getvalue()
    with disk_full_guard("train (checkpoint)", path, need=len(data)):
        write_bytes_atomic(path, data)


RESTART_HINT = ("rerun with --restart to start over (the file is replaced by the new run's "
                "first checkpoint), or point OUT elsewhere")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint written by this trainer; an empty, damaged or foreign file is a
    MidasDataError naming it (never torch's advice to load it unsafely)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise MidasDataError(f"{where(file=path)}: checkpoint cannot be read ({e.strerror})") from e
    if size == 0:
        raise MidasDataError(f"{where(file=path)}: checkpoint is empty (0 bytes); {RESTART_HINT}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False, which would run code from the file
        raise UnsafeInputError(f"{where(file=path)}: checkpoint holds objects other than tensors "
                               "and plain containers; refused, since loading them could run "
                               f"code ({type(e).__name__}); {RESTART_HINT}") from None
    except (RuntimeError, EOFError, ValueError, KeyError, TypeError, AttributeError,
            zipfile.BadZipFile, UnicodeDecodeError, OSError, ImportError, IndexError) as e:
        raise MidasDataError(f"{where(file=path)}: not a readable checkpoint of this trainer "
                             f"({size} bytes, damaged or not a checkpoint: "
                             f"{type(e).__name__}); {RESTART_HINT}") from None
    except Exception as e:  # noqa: BLE001 - whatever else a hostile file makes the loader raise
        raise MidasDataError(f"{where(file=path)}: not a readable checkpoint of this trainer "
                             f"({size} bytes, {type(e).__name__}); {RESTART_HINT}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != CHECKPOINT_VERSION:
        version = ckpt.get("format_version") if isinstance(ckpt, dict) else None
        raise MidasDataError(f"{where(file=path, field='format_version')}: checkpoint format "
                             f"{version}, this trainer reads {CHECKPOINT_VERSION}; {RESTART_HINT}")
    return ckpt


def check_inputs(saved: dict, current: dict, path: Path) -> None:
    """Refuse to resume on other data: the dataset, features and pairs fingerprints the
    checkpoint trained on must be the ones the run would read now."""
    for name in sorted(set(saved) | set(current)):
        if saved.get(name) != current.get(name):
            was, now = saved.get(name) or "(none)", current.get(name) or "(none)"
            raise StaleArtifactError(
                f"{where(file=path, field='inputs.' + name)}: the checkpoint trained on {name} "
                f"{was[:12]}, but this run reads {name} {now[:12]}; resume with the data it "
                f"started on, or {RESTART_HINT}")


def check_resumable(saved: dict, current: dict, path: Path) -> None:
    """Refuse to resume with settings that would change the run."""
    diff = sorted(k for k in set(saved) | set(current)
                  if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff)
        raise ValueError(f"file {path}: cannot resume with a different config ({detail}); use the "
                         "saved settings or a new output directory")


def _clean(x):
    """JSON-safe: NaN/inf become None (JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _write_text(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    with disk_full_guard("train", path, need=len(data)):
        write_bytes_atomic(path, data)


def write_json(path: Path, obj: dict) -> None:
    _write_text(path, json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n")


def write_metrics(path: Path, history: list[dict]) -> None:
    """metrics.jsonl, one line per finished epoch; rewritten whole so that a resumed run
    never duplicates or loses a line."""
    _write_text(path, "".join(json.dumps(_clean(h), sort_keys=True) + "\n" for h in history))


def plot_history(out_dir: Path, history: list[dict], modalities: list[str]) -> list[Path]:
    """curves.png (loss and accuracy), alpha.png, confidence.png; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    paths = []

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ep, [h["train"]["loss"] for h in history], label="train total")
    ax1.plot(ep, [h["train"]["loss_misaligned"] for h in history], label="train misaligned")
    ax1.plot(ep, [h["val"]["loss"] for h in history], label="val CE")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("loss"), ax1.legend()
    ax2.plot(ep, [h["train"]["acc"] for h in history], label="train")
    ax2.plot(ep, [h["val"]["accuracy"] for h in history], label="val")
    ax2.plot(ep, [h["val"]["misaligned_acc"]["mean"] for h in history], label="val misaligned")
    for m in modalities:
        ax2.plot(ep, [h["val"]["only_acc"][m] for h in history], "--", label=f"val {m} only")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("accuracy"), ax2.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "curves.png"))

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(ep, [h["alpha"] for h in history], marker=".")
    ax.set_xlabel("epoch"), ax.set_ylabel("alpha (weak-modality weight)")
    paths.append(_save(fig, out_dir / "alpha.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in modalities:
        line, = ax.plot(ep, [h["val"]["mis_conf"][m] for h in history],
                        label=f"fused p~ {m} (misaligned)")
        ax.plot(ep, [h["val"]["uni_conf"][m] for h in history], "--", color=line.get_color(),
                label=f"unimodal c~ {m} (aligned)")
    ax.set_xlabel("epoch"), ax.set_ylabel("normalised confidence (val)")
    ax.set_ylim(0, 1), ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "confidence.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with disk_full_guard("train (plot)", path, need=len(buf.getvalue())):
        write_bytes_atomic(path, buf.getvalue())
    return path
