"""Memory the machine refuses: told apart from damaged files and bugs, in one line.

An allocation that fails (host memory or a GPU's) while a command works, or while it reads weights,
is a setting too large for this machine, not a damaged bundle: loaders re-raise it, and the commands
print `out_of_memory_line`.
"""
from __future__ import annotations

import re


def out_of_memory_line(err: BaseException) -> str | None:
    """One line for an allocation the machine refused (host memory, or a GPU's), None for any other
    error: settings too large for this machine (a --batch, an input size), not a bug."""
    text = str(err)
    gpu = "CUDA out of memory" in text or type(err).__name__ == "OutOfMemoryError"
    if not (isinstance(err, MemoryError) or gpu or "can't allocate memory" in text):
        return None
    # PyTorch's CPU allocator, ONNX Runtime's arena
    found = re.search(r"tried to allocate (\d+) bytes", text) or re.search(r"requested buffer of size (\d+)", text)
    size = f" of {int(found.group(1)) / 2 ** 30:.1f} GiB" if found else \
        (f" of {m.group(1)}" if (m := re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", text)) else "")
    return (f"out of memory: an allocation{size} failed{' on the GPU' if gpu else ''}; lower the options that size "
            "the work (--batch, image or input sizes), or free memory")
