"""One process per agent: an advisory lock file holding the owner's pid; and
`pid_alive`, which tells whether the process that left a pid-tagged file is gone.

The kernel drops an flock when its process dies (SIGKILL included), so a
crashed run never leaves an agent locked.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from . import paths
from .errors import BusyError


class AgentLock:
    def __init__(self, name: str) -> None:
        self.name = name
        self.path: Path = paths.locks_dir() / f"{name}.lock"
        self._fd: int | None = None

    def acquire(self, wait: bool = False, timeout: float | None = None) -> AgentLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait or (deadline is not None and time.monotonic() > deadline):
                    owner = _read_pid(fd)
                    os.close(fd)
                    who = f" (pid {owner})" if owner else ""
                    raise BusyError(f"agent {self.name!r} is busy{who}; wait for it to finish or pass --wait") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> AgentLock:
        return self.acquire()

    def __exit__(self, *_: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def holder(name: str) -> int | None:
    """The pid holding an agent's lock, or None if it is free."""
    path = paths.locks_dir() / f"{name}.lock"
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _read_pid(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one owned by another user counts).

    Temp files and directories named after their writer's pid are swept once
    this is False: the writer was killed before it could clean up.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True
