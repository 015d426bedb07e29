"""Progress bars that suit a terminal and a log file alike.

`progress_bar(...)` is `tqdm` with one change: when the bar's stream (stderr) is not a
terminal, it redraws at most every `LOG_INTERVAL_S` seconds (tqdm's own advice for
non-interactive output is a large `mininterval`), so a log of a long run holds a few
progress lines, not one per update.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 60.0


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:
    """A tqdm bar; on a non-terminal stream it updates at most every LOG_INTERVAL_S seconds."""
    stream = kwargs.get("file") or sys.stderr
    if not _is_terminal(stream):
        kwargs["mininterval"] = max(kwargs.get("mininterval", 0.1), LOG_INTERVAL_S)
        kwargs["maxinterval"] = max(kwargs.get("maxinterval", 10.0), LOG_INTERVAL_S)
        kwargs.setdefault("dynamic_ncols", False)
    return tqdm(*args, **kwargs)
