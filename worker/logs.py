"""Log lines of the worker: one line per event (start, Redis lost/back, dead letters by reason,
a periodic summary), plain text or one JSON object per line. Event fields travel as `extra=`."""
from __future__ import annotations

import json
import logging
import sys
import threading
import time

# attributes every LogRecord has; anything else on a record came from `extra=`
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test runner may swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: str = "INFO", as_json: bool = False) -> None:
    """Log to stderr; replaces a handler installed by an earlier call, leaves others alone."""
    handler = _Stderr()
    handler.setFormatter(JsonFormatter() if as_json else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("ustudents").setLevel(level)


class Throttled:
    """Warnings of one kind at most once per `interval` seconds; the next line says how many were
    held back. For events that can repeat per frame (dead letters, failing frames)."""

    def __init__(self, logger: logging.Logger, interval: float):
        self.logger, self.interval = logger, interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args, **extra) -> None:
        now = time.monotonic()
        with self._lock:
            if key in self._last and now - self._last[key] < self.interval:
                self._held[key] = self._held.get(key, 0) + 1
                return
            held = self._held.pop(key, 0)
            self._last[key] = now
        if held:
            msg += f" (and {held} more since the last such line)"
        self.logger.warning(msg, *args, extra=dict(extra, held_back=held))
