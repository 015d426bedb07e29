"""Plumbing of the GPU check: imports from the checkout, JSON written as it goes, parts run
in child processes under hard time budgets, and a description of the machine.

The lent GPU machine has torch but not this project installed, so `use_checkout` puts the
repository root on sys.path and, when `midas_data.pipelines` / `midas_data.trainers` do not
resolve (they are the top-level pipelines/ and trainers/ folders, mapped by the editable
install), adds the root to `midas_data.__path__` so that they resolve to those folders.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "bench" / "gpu_check.py"


def use_checkout() -> None:
    """Import midas_data, its pipelines and its trainers from this checkout, installed or not."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import midas_data

    if importlib.util.find_spec("midas_data.trainers") is None:
        midas_data.__path__.append(str(REPO))  # midas_data.trainers -> REPO/trainers


def jsonable(v):
    """Plain JSON types: numpy scalars and arrays converted, non-finite floats as null."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating | float):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())
    return v


def write_json(path: Path, obj) -> None:
    """Atomically: a reader (or a kill) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(obj), indent=1) + "\n")
    os.replace(tmp, path)


class Report:
    """A part's results, rewritten to disk after every change, so that the parent keeps
    what was measured even when it has to kill the part at its budget."""

    def __init__(self, part: str, path: Path, budget: float, margin: float):
        self.part, self.path, self.t0 = part, path, time.monotonic()
        self.deadline = self.t0 + budget - margin
        self.data: dict = {"status": "running"}
        self.save()

    def left(self) -> float:
        """Seconds left before the part should have written its last number."""
        return self.deadline - time.monotonic()

    def phase(self, name: str) -> None:
        """What the part is doing now: a part killed at its budget reports it."""
        self.set("phase", name)

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 3)
        write_json(self.path, self.data)

    def log(self, msg: str) -> None:
        print(f"[{self.part} {time.monotonic() - self.t0:7.1f}s] {msg}", flush=True)

    def stop(self, msg: str) -> None:
        """Out of time: keep what was measured and say why the rest is missing."""
        self.log(f"STOPPED EARLY: {msg}")
        self.data.setdefault("stopped_early", []).append(msg)
        self.save()


def sync(device) -> None:
    """Wait for the GPU, so that a wall-clock time covers the work queued before it."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_part(part: str, argv: list[str], budget: float, work: Path, smoke: bool) -> dict:
    """Run one part (`gpu_check.py ARGV --_part PART`) in its own process group; kill the
    group at `budget` seconds. Returns the part's JSON with wall_s, budget_s and status."""
    result = work / f"part_{part}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(ENTRY), *argv, "--_part", part, "--_result", str(result),
           "--_budget", f"{budget:.1f}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if smoke:
        env["OMP_NUM_THREADS"] = "1"
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc, killed = proc.wait(timeout=budget), False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the part and its DataLoader workers
        proc.wait()
        rc, killed = proc.returncode, True
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything the part left in its group
    data = json.loads(result.read_text()) if result.exists() else {}
    data["wall_s"] = time.monotonic() - t0
    data["budget_s"] = budget
    if killed:
        data["status"] = "timeout"
        data["message"] = (f"killed at its {budget:.0f} s budget; the numbers above were measured "
                           "before that")
        print(f"[{part}] TIMEOUT: killed at its {budget:.0f} s budget", flush=True)
    elif rc != 0 and data.get("status") in (None, "running"):
        data["status"] = "error"
        data.setdefault("error", f"exit code {rc}")
    return data


def environment() -> dict:
    """Python, torch and CUDA, the GPU (name, memory, driver) and whether FAISS is there."""
    env: dict = {"python": sys.version.split()[0], "platform": platform.platform(),
                 "cpus": os.cpu_count()}
    import torch

    env["torch"] = torch.__version__
    env["torch_cuda"] = torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                      "multiprocessors": p.multi_processor_count,
                      "capability": f"{p.major}.{p.minor}"}
    try:
        import faiss

        env["faiss"] = faiss.__version__
    except ImportError:
        env["faiss"] = None  # not needed: the check runs the torch backend
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True)
        env["nvidia_smi"] = [line.strip() for line in r.stdout.splitlines() if line.strip()]
    return env
