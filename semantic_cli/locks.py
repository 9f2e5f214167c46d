"""One process per agent: an advisory lock on a file holding the owner's pid; and
`pid_alive`, which tells whether the process that left a pid-tagged file is gone.

The lock is an open-file-description lock (Linux `F_OFD_SETLK`; `flock` elsewhere):
the kernel drops it when its process dies (SIGKILL included), so a crashed run never
leaves an agent locked, and closing another descriptor of the file (as `holder` does)
never drops it. `holder` tests the lock without taking it (`F_OFD_GETLK`), so asking
who holds an agent can never make a starting chat fail as busy.

A lock file is opened with O_NOFOLLOW: a symbolic link in its place is refused with
one line (UnsafePathError, exit code 10), never written through.

A /retry also holds the agent's retry lock (`retry_lock`) until it ends.

Rooms take their agents' locks in one global order (sorted names): two processes
waiting for the same agents can never each hold one the other waits for.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import paths
from .errors import BusyError

_OFD = hasattr(fcntl, "F_OFD_SETLK") and hasattr(fcntl, "F_OFD_GETLK")
# How long a chat process waits, even without --wait, for an agent's lock that may be freed
# in a moment: `semantic serve` holds it just after a reply, while it writes the turn's cache.
GRACE_S = 0.5


def _flock_struct(lock_type: int) -> bytes:
    """A struct flock for the whole file (l_start = l_len = 0, l_pid = 0)."""
    if sys.platform.startswith("linux"):  # short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
        return struct.pack("hhqqi4x", lock_type, os.SEEK_SET, 0, 0, 0)
    return struct.pack("qqihh", 0, 0, 0, lock_type, os.SEEK_SET)  # BSD and macOS: l_start, l_len, l_pid, l_type, l_whence


def _flock_type(answer: bytes) -> int:
    if sys.platform.startswith("linux"):
        return int(struct.unpack("hhqqi4x", answer)[0])
    return int(struct.unpack("qqihh", answer)[3])


def lock_path(name: str) -> Path:
    return paths.locks_dir() / f"{name}.lock"


def retry_lock(name: str) -> AgentLock:
    """Held by the process that retries the agent's last reply, from its cut until its end:
    while it is, the retry's journal (takeback.py) is that process's own, and nothing
    recovers it, even where the agent's own lock is free (a REPL whose turns a server runs).
    NAME.retry.lock: no agent's lock file has a dot in its name."""
    return AgentLock(name, paths.locks_dir() / f"{name}.retry.lock")


_RETRYING: set[str] = set()  # this process's own retries (a process need not see its own lock: flock on macOS)


@contextmanager
def retrying(name: str) -> Iterator[None]:
    """Hold the agent's retry lock (busy: BusyError) while the body retries its last reply."""
    lock = retry_lock(name).acquire(hint="another REPL is retrying its last reply; wait for it to finish")
    _RETRYING.add(name)
    try:
        yield
    finally:
        _RETRYING.discard(name)
        lock.release()


def retry_running(name: str) -> bool:
    """Whether a live process (this one included) holds the agent's retry lock."""
    return name in _RETRYING or holder(name, retry_lock(name).path) is not None


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock without waiting; False if another open file holds it."""
    try:
        if _OFD:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock_struct(fcntl.F_WRLCK))
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def _is_locked(fd: int) -> bool:
    """Whether another open file holds the lock: a test that takes nothing."""
    command = fcntl.F_OFD_GETLK if _OFD else fcntl.F_GETLK  # BSD and macOS: flock and fcntl locks share one list
    return _flock_type(fcntl.fcntl(fd, command, _flock_struct(fcntl.F_WRLCK))) != fcntl.F_UNLCK


class AgentLock:
    """An agent's lock (`path` given: another one-process-only thing, such as the server)."""

    def __init__(self, name: str, path: Path | None = None) -> None:
        self.name = name
        self.path: Path = path if path is not None else lock_path(name)
        self._fd: int | None = None

    def acquire(
        self, wait: bool = False, timeout: float | None = None, hint: str = "wait for it to finish, then try again", grace: float = 0.0
    ) -> AgentLock:
        """Lock the agent; busy (still, after `grace` seconds) -> BusyError (ending with `hint`:
        what the command can do about it, naming only options it has), or with `wait` poll
        until it is free (for at most `timeout` seconds when one is given, then BusyError)."""
        fd = paths.open_nofollow(self.path, os.O_RDWR | os.O_CREAT, "lock file")
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        grace_until = now + grace
        try:
            while not _try_lock(fd):
                if not wait and time.monotonic() < grace_until:
                    time.sleep(0.02)
                    continue
                if not wait or (deadline is not None and time.monotonic() >= deadline):
                    owner = _read_pid(fd)
                    who = f" (pid {owner})" if owner else ""
                    if wait:
                        raise BusyError(f"{self.what} is still busy{who}: the wait timed out; try again later")
                    raise BusyError(f"{self.what} is busy{who}; {hint}")
                time.sleep(0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic())))
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    @property
    def what(self) -> str:
        return f"agent {self.name!r}"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor of the open file drops its lock
            self._fd = None

    def __enter__(self) -> AgentLock:
        return self.acquire()

    def __exit__(self, *_: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def holder(name: str, path: Path | None = None) -> int | None:
    """The pid holding an agent's lock (or the lock at `path`): 0 if it is held and the holder
    has not written its pid yet, None if it is free. Reads the file and tests the lock; takes nothing."""
    path = path if path is not None else lock_path(name)
    try:
        fd = paths.open_nofollow(path, os.O_RDONLY, "lock file")
    except FileNotFoundError:
        return None
    try:
        if not _is_locked(fd):
            return None
        return _read_pid(fd) or 0
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
