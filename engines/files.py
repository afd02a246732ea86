"""Writing a file so that no reader ever sees it half-written: into a hidden temporary beside it,
renamed over it (atomic on one filesystem); a failure, Ctrl-C included, removes the temporary."""
from __future__ import annotations

import os
from pathlib import Path


def partial_path(path: Path) -> Path:
    """The temporary a file is written to before it is renamed into place."""
    return path.with_name(f".{path.name}.partial")


def write_atomically(path: str | Path, data: bytes | str, mode: int | None = None) -> None:
    """Write `data` (text as UTF-8) to `path` atomically; `mode`: its permission bits."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        if mode is not None:
            tmp.chmod(mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
