"""Disk-full errors that say which stage, which path and how much space it needed.

    with disk_full_guard("extract", out_dir, need=lambda: total_bytes):
        write_features(...)

turns an ENOSPC (or quota) OSError raised inside the block into a DiskFullError; anything
else passes through unchanged. Writes are atomic (midas_data.atomic), so the previous
artifact is still in place when this is raised, and the message says so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from midas_data.errors import DiskFullError, where

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space of the file system holding `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def dir_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files under `path` (0 if it is gone)."""
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in FULL_ERRNOS


@contextlib.contextmanager
def disk_full_guard(stage: str, path: str | os.PathLike,
                    need: int | Callable[[], int | None] | None = None) -> Iterator[None]:
    """Re-raise a disk-full OSError of the block as a DiskFullError naming `stage`, the file
    (the error's own file name, else `path`), the space needed and the space free."""
    try:
        yield
    except OSError as e:
        if not is_disk_full(e) or isinstance(e, DiskFullError):
            raise
        file = e.filename or path
        try:
            needed = need() if callable(need) else need
        except Exception:  # noqa: BLE001 - an estimate must never hide the real error
            needed = None
        free = free_bytes(file)
        amount = f"needs about {human_bytes(needed)}" if needed else "needs more space"
        if free is not None:
            amount += f", {human_bytes(free)} free"
        raise DiskFullError(f"{stage}: {where(file=file)}: no space left on the device "
                            f"({os.strerror(e.errno)}); the write {amount}. Free some space or "
                            "write elsewhere and rerun; the previous files are unchanged") from e
