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


class _LogBar(tqdm):
    """A bar for a log file: a new postfix or description waits for the next due redraw
    instead of forcing one (tqdm redraws on every `set_postfix` by default)."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):  # noqa: ARG002
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_description(self, desc=None, refresh=True):  # noqa: ARG002
        super().set_description(desc, refresh=False)


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:
    """A tqdm bar; on a non-terminal stream it redraws at most every LOG_INTERVAL_S seconds
    (plus its first and last line)."""
    stream = kwargs.get("file") or sys.stderr
    if _is_terminal(stream):
        return tqdm(*args, **kwargs)
    kwargs["mininterval"] = max(kwargs.get("mininterval", 0.1), LOG_INTERVAL_S)
    kwargs["maxinterval"] = max(kwargs.get("maxinterval", 10.0), LOG_INTERVAL_S)
    return _LogBar(*args, **kwargs)
