"""Writing a file so that no reader ever sees it half-written, nor a crash leaves it empty: into a
hidden temporary beside it, flushed to disk, then renamed over it (atomic on one filesystem); a
failure, Ctrl-C included, removes the temporary."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: str | Path, data: bytes | str, mode: int | None = None) -> None:
    """Write `data` (text as UTF-8) to `path` atomically; `mode`: its permission bits."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            tmp.chmod(mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
