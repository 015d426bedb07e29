"""One writer per dataset: a lock file beside the target, and owner records of temp dirs.

`output_lock(target, stage)` holds an OS file lock (the `filelock` package) while a stage
writes `target`, so two runs of build-shards, extract or mine-misaligned on one dataset
never interleave. The lock file lives in the system's temp dir (`midas-data-locks/`, named
after the target's real path), so it guards processes of one machine. The lock dies with its process (kill -9
included), so a crashed run never blocks the next one. A second run waits up to
`MIDAS_DATA_LOCK_WAIT` seconds (default 10) and then refuses, naming the run that holds it.

Temp directories record their owner (`write_owner`), and `owner_is_gone` tells the cleanup
which ones a dead process left behind; one whose owner still runs is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock

from midas_data.errors import MidasDataError, where

LOCK_WAIT_ENV = "MIDAS_DATA_LOCK_WAIT"
DEFAULT_LOCK_WAIT_S = 10.0
OWNER_FILE = ".midas-owner.json"
LOCK_FOLDER = "midas-data-locks"


class OutputLockedError(MidasDataError):
    """Another run is writing the same output."""


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of `target`, in a folder of the system's temp dir named after the
    target's real path: nothing is added beside the user's files, and a rebuild that swaps
    the target directory keeps the same lock."""
    real = os.path.realpath(os.fspath(target))
    folder = Path(tempfile.gettempdir()) / LOCK_FOLDER
    if not folder.is_dir():
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
            os.chmod(folder, 0o1777)  # shared by every user, like /tmp itself
    digest = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return folder / f"{Path(real).name[:64]}-{digest}.lock"


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}


def _lock_wait() -> float:
    text = os.environ.get(LOCK_WAIT_ENV)
    if text is None:
        return DEFAULT_LOCK_WAIT_S
    try:
        return max(0.0, float(text))
    except ValueError:
        raise MidasDataError(f"environment variable {LOCK_WAIT_ENV}={text!r} is not a number of "
                             "seconds; unset it or give e.g. 30") from None


@contextlib.contextmanager
def output_lock(target: str | os.PathLike | Any, stage: str, wait: float | None = None) -> Iterator[None]:
    """Hold the lock of `target` (a path, or an open dataset: its local root) for the block;
    wait up to `wait` seconds (None: the environment's or the default), then raise
    OutputLockedError naming the holder."""
    if not isinstance(target, (str, os.PathLike)):  # an open dataset (not a Path: Path.root is "/")
        target = target.root
    path = lock_path(target)
    wait = _lock_wait() if wait is None else wait
    lock = filelock.FileLock(str(path), timeout=wait, mode=0o666)
    info = path.with_name(path.name + ".owner")
    try:
        lock.acquire()
    except filelock.Timeout:
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            h = json.loads(info.read_text())
            holder = f" ({h.get('stage', '?')}, pid {h.get('pid')} on {h.get('host')})"
        raise OutputLockedError(
            f"{where(file=target)}: another midas-data run{holder} is writing here; waited "
            f"{wait:g} s for it. Let it finish, or set {LOCK_WAIT_ENV} to wait longer") from None
    try:
        with contextlib.suppress(OSError):
            info.write_text(json.dumps({**_me(), "stage": stage}))
        yield
    finally:
        lock.release()


def write_owner(tmp_dir: Path) -> None:
    """Record this process as the owner of a temp directory it is filling."""
    (Path(tmp_dir) / OWNER_FILE).write_text(json.dumps(_me()))


def clear_owner(tmp_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (Path(tmp_dir) / OWNER_FILE).unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM  # exists, owned by someone else
    return True


def owner_is_gone(tmp_dir: Path) -> bool:
    """True when the process that made `tmp_dir` no longer runs on this host. One made on
    another host is never judged gone (its liveness is unknown here). A dir without an owner
    record is gone: writers record themselves right after creating it, and the caller holds
    the output lock, so no live writer can be filling it (a kill between the two steps, or
    the old directory a swap moved aside, leaves one)."""
    try:
        owner = json.loads((Path(tmp_dir) / OWNER_FILE).read_text())
        pid, host = int(owner["pid"]), str(owner["host"])
    except FileNotFoundError:
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False  # unreadable record: leave it alone
    if host != socket.gethostname():
        return False
    return pid != os.getpid() and not _alive(pid)
