"""Writing a file so that no reader ever sees it half-written, nor a crash leaves it empty: into a
hidden temporary beside it, flushed to disk, then renamed over it (atomic on one filesystem); a
failure, Ctrl-C included, removes the temporary. And a path's real location (real_path)."""
from __future__ import annotations

import errno
import json
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
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None and err.errno is not None:
            err.filename = str(path)  # write() and fsync() name no file: a full disk read "writing the output: ..."
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


# Errors only writing raises: one of them without a file name happened writing the output.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}

# What to do about the OSErrors a command meets writing its outputs, by errno.
_OS_ERROR_HINTS = {errno.ENOSPC: "free space on that disk and run the command again",
                   errno.EDQUOT: "free space in your quota and run the command again",
                   errno.EROFS: "a read-only file system: choose another output path",
                   errno.EACCES: "check its permissions, or choose another path",
                   errno.EPERM: "check its permissions, or choose another path",
                   errno.EEXIST: "a file stands where a folder goes: move it",
                   errno.ENOTDIR: "a file stands where a folder goes in that path: move it",
                   errno.EISDIR: "a folder stands where a file goes: move it"}


def reserve_space(path: Path, what: str, folder: Path) -> None:
    """Give a sparse file (a fresh memory-mapped array) its disk blocks now: on a full disk, writing
    through the map kills the process with SIGBUS, without a word (a training run died so, caching its
    teacher targets: "Bus error", exit 135); here it is an OSError naming `what` and `folder` (the one
    the user knows, not a temporary one inside it). Any other error (a filesystem that cannot
    allocate ahead: EOPNOTSUPP from musl; glibc writes the blocks itself instead, slowly on NFS) leaves
    the file sparse, as before, and so does a platform without posix_fallocate."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OSError(err.errno, f"{err.strerror} for {what}", str(folder)) from None


def os_error_line(err: BaseException) -> str:
    """An error as one line for the user; an OSError as '<file>: <reason>; <what to do>', not Python's
    '[Errno 28] No space left on device', which names neither the file nor a fix."""
    if not isinstance(err, OSError) or err.errno is None or not err.strerror:
        return str(err)
    hint = _OS_ERROR_HINTS.get(err.errno)
    # A rename (os.replace) names the temporary file first and the file it replaces second: the one the
    # user knows, and the one refused, unless the temporary file itself is gone. Python names no file
    # for errors of read() and write() themselves (a full disk, a disk I/O error).
    second = err.filename2 is not None and err.errno != errno.ENOENT
    where = err.filename2 if second else err.filename if err.filename is not None else \
        "writing the output" if err.errno in _WRITE_ERRNOS else "a file the command read or wrote"
    return f"{where}: {err.strerror}" + (f"; {hint}" if hint else "")


def listed_outputs(listing: Path) -> set[str]:
    """The names in an output folder's list of what earlier runs wrote there; empty where there is none."""
    try:
        return {str(n) for n in json.loads(listing.read_text())}
    except (OSError, ValueError, TypeError):
        return set()
