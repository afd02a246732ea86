"""The console scripts. Each imports its command (PyTorch, OpenCV: a second or more) inside a guard,
so that Ctrl-C during that import exits 130 with one line, as Ctrl-C does once the command runs,
instead of a traceback from deep inside an import."""
from __future__ import annotations

import os
import signal
import sys


def _interrupted_while_loading() -> None:
    print("\ninterrupted while loading; nothing was done", file=sys.stderr)
    raise SystemExit(130)


def _run(main) -> None:
    """main() (a Click command in standalone mode: it always ends in SystemExit), then a Ctrl-C while
    the interpreter exits (PyTorch's and ONNX Runtime's exit callbacks, a second or more after a
    build) ends the process at once with the command's own exit status. It printed a traceback
    ("Exception ignored in atexit callback ... KeyboardInterrupt") where nothing was left to stop."""
    code = 1
    try:
        main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
        raise
    finally:
        def exit_now(signum, frame):
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # noqa: BLE001 (a closed pipe: nothing more to say)
                    pass
            os._exit(code)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # ignored (a script's background job): left so
            signal.signal(signal.SIGINT, exit_now)


def ustudents() -> None:
    try:
        from ustudents.cli import main
    except KeyboardInterrupt:
        _interrupted_while_loading()
    _run(main)


def ustudents_train() -> None:
    try:
        from ustudents.train.cli import train_main
    except KeyboardInterrupt:
        _interrupted_while_loading()
    _run(train_main)


def ustudents_worker() -> None:
    try:
        from ustudents.worker.cli import worker_main
    except KeyboardInterrupt:
        _interrupted_while_loading()
    _run(worker_main)
