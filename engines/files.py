"""Writing a file so that no reader ever sees it half-written, nor a crash leaves it empty: into a
hidden temporary beside it, flushed to disk, then renamed over it (atomic on one filesystem); a
failure, Ctrl-C included, removes the temporary. And a path's real location (real_path)."""
from __future__ import annotations

import errno
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


def real_path(path: str | Path) -> Path:
    """The absolute path with symbolic links followed (Path.resolve), where a loop of links is an
    OSError naming the path: Python before 3.13 raises RuntimeError there, which would reach the user
    as a traceback, and 3.13 returns a path that no file can ever be made at."""
    loop = OSError(f"{path}: a loop of symbolic links; point the link at a real folder or file, or remove it")
    try:
        real = Path(path).resolve()
        os.stat(real)
    except RuntimeError:
        raise loop from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise loop from None
    return real
