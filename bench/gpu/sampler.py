"""GPU utilisation sampled every 0.5 s by a separate process.

A process, not a thread: the training part's DataLoader forks its workers, and a sampling
thread in the forking process would be copied into each of them. The sampler writes its
source (`pynvml`, `nvidia-smi` or `none`) on the first line, then `unix_time util%` lines,
until it is terminated. Run alone: `python bench/gpu/sampler.py PATH`.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PERIOD_S = 0.5


class UtilSampler:
    """Start the sampler process on `path`; `close()` stops it and returns (source, points)."""

    def __init__(self, path: Path):
        self.path = path
        path.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, __file__, str(path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def close(self) -> tuple[str, list[tuple[float, float]]]:
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        if not self.path.exists():
            return "none", []
        lines = self.path.read_text().split("\n")
        pts = []
        for line in lines[1:]:
            parts = line.split()
            if len(parts) == 2:
                pts.append((float(parts[0]), float(parts[1])))
        return (lines[0].strip() or "none"), pts


def util_in(pts: list[tuple[float, float]], t0: float, t1: float) -> dict | None:
    """Mean and median utilisation of the samples taken in [t0, t1] (unix time)."""
    vals = [u for t, u in pts if t0 <= t <= t1]
    if not vals:
        return None
    return {"mean": float(np.mean(vals)), "median": float(np.median(vals)), "samples": len(vals)}


def _reader():
    """(source, read) where read() -> GPU 0's utilisation in percent; (none, None) if no way."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return "pynvml", lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:
        pass
    if shutil.which("nvidia-smi"):
        def read() -> float:
            r = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu",
                                "--format=csv,noheader,nounits", "-i", "0"],
                               capture_output=True, text=True, timeout=5)
            return float(r.stdout.split()[0])
        return "nvidia-smi", read
    return "none", None


def main(path: str) -> None:
    out = open(path, "w", buffering=1)  # noqa: SIM115 - lives until the process is killed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    source, read = _reader()
    out.write(source + "\n")
    if read is None:
        return
    while True:
        t = time.time()
        with contextlib.suppress(Exception):
            out.write(f"{t:.3f} {read():.1f}\n")
        time.sleep(max(0.0, PERIOD_S - (time.time() - t)))


if __name__ == "__main__":
    main(sys.argv[1])
