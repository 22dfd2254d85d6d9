"""An exclusive lock on a run directory while one process writes it.

The lock is an advisory ``flock`` on ``<directory>/.lock``, so the operating system drops it when
its process ends in any way (even ``kill -9``): a crashed fit never leaves a stale lock behind, and
``fit --resume`` can take over at once. Where ``fcntl`` does not exist (Windows), nothing is locked.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from ..errors import RunDirectoryBusyError

LOCK_FILE = ".lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None


@contextlib.contextmanager
def locked_run_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold the write lock of ``directory`` (created if needed) for the ``with`` block.

    Raises ``RunDirectoryBusyError`` naming the process that holds it when another one does.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield directory
        return
    path = directory / LOCK_FILE
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunDirectoryBusyError(
                f"{directory} is being written by {holder}; wait for it to finish, or give this run another "
                "--out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}")
        handle.flush()
        yield directory
    finally:
        handle.close()
