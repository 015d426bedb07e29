"""Check a `device` setting before any work: a name torch knows, and hardware that exists."""

from __future__ import annotations

import re

from midas_data.options import SettingError

DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")


def check_device_name(device: str, field: str) -> None:
    """The spelling only (auto, cpu, mps, cuda, cuda:N): usable in a dataclass check, where
    the settings may be written on one machine for another."""
    if not isinstance(device, str) or not DEVICE_RE.match(device):
        raise SettingError(f"{field}={device!r} is not a device; use auto, cpu, cuda or cuda:N")


def check_device_available(device: str, field: str) -> None:
    """The device exists on this machine; a SettingError that says what to use otherwise."""
    import torch

    check_device_name(device, field)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise SettingError(f"{field}={device!r}: CUDA is not available on this machine "
                               f"(torch {torch.__version__}, {build}); use --device cpu or auto")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise SettingError(f"{field}={device!r}: this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s); use cuda:0.."
                               f"{torch.cuda.device_count() - 1} or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None)
                                and torch.backends.mps.is_available()):
        raise SettingError(f"{field}='mps': Apple MPS is not available here; use cpu or auto")
