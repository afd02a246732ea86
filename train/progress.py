"""Progress bars: live on a terminal; in a log (a container, a CI job, systemd) one update every
half minute instead of one per step, so a long training's log is not mostly progress bars."""
from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


def progress(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs), refreshed at most every LOG_INTERVAL_S where its stream is no terminal."""
    stream = kwargs.get("file") or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(iterable, **kwargs)
