"""One trainer per run directory: an exclusive lock that the operating system releases when the
process holding it ends, however it ends, so a crash never leaves a run locked."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from olmoe.errors import UsageError

LOCK_NAME = ".lock"
# How long to wait for a lock whose holder has died. A program that the holder was starting
# when it died (ninja and the compiler, building the CPU kernels) holds a copy of the lock
# between its fork and its exec: for milliseconds, but a resume started at once would meet it.
DEAD_HOLDER_WAIT_S = 1.0


class RunLock:
    """Held from `acquire()` until `release()` or the process's end; the lock file names the
    holder's pid for the message a second trainer gets."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self._handle = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open as long as the lock
        deadline = time.monotonic() + DEAD_HOLDER_WAIT_S
        while not _lock(handle):
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            if _running(holder) or time.monotonic() > deadline:
                handle.close()
                raise UsageError(
                    f"{self.path.parent} is being trained by process {holder}: a run directory "
                    "belongs to one trainer at a time; wait for it to end (or stop it), or "
                    "train into another run_dir"
                )
            time.sleep(0.01)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def _lock(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _running(holder: str) -> bool:
    """Whether the process named in the lock file runs (True when the file names none)."""
    if not holder.isdigit():
        return True
    try:
        os.kill(int(holder), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
