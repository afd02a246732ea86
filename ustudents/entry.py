"""The console scripts. Each imports its command (PyTorch, OpenCV: a second or more) inside a guard,
so that Ctrl-C during that import exits 130 with one line, as Ctrl-C does once the command runs,
instead of a traceback from deep inside an import."""
from __future__ import annotations

import sys


def _interrupted_while_loading() -> None:
    print("\ninterrupted while loading; nothing was done", file=sys.stderr)
    raise SystemExit(130)


def ustudents() -> None:
    try:
        from ustudents.cli import main
    except KeyboardInterrupt:
        _interrupted_while_loading()
    main()


def ustudents_train() -> None:
    try:
        from ustudents.train.cli import train_main
    except KeyboardInterrupt:
        _interrupted_while_loading()
    train_main()


def ustudents_worker() -> None:
    try:
        from ustudents.worker.cli import worker_main
    except KeyboardInterrupt:
        _interrupted_while_loading()
    worker_main()
