"""Every path the tool reads or writes, resolved at call time, and the rules for them.

`SEMANTIC_HOME` relocates everything (data, cache, config) under one directory;
otherwise the platform's conventional directories are used (platformdirs).

Trust: semantic trusts its own user, not other local users. So every directory it
uses must belong to the user and be private: one that is ours but looser is
tightened to 0700 (through a descriptor, never by a path that could be a link);
one that belongs to someone else is refused (UnsafePathError, one line naming it,
exit code 10). The first use of any path in a process checks every directory that
already exists; each later call checks the directories on its own path. Nothing
is written through a symbolic link: files are created with O_NOFOLLOW, and
replaced by a unique temp file (O_CREAT | O_EXCL) renamed over them (`atomic_write`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

from .errors import UnsafePathError

APP = "semantic"
KINDS = ("data", "cache", "config", "runtime")
# The directories semantic creates inside each base directory (checked, when they exist, at first use).
SUBDIRS = {"data": ("locks", "history", "models", "bench"), "cache": ("blocks", "tails", "downloads"), "config": (), "runtime": ()}

_verified: set[tuple[str, ...]] = set()  # the roots whose existing directories this process has checked


def _home() -> Path | None:
    value = os.environ.get("SEMANTIC_HOME")
    return Path(value).expanduser() if value else None


def _roots() -> dict[str, Path]:
    home = _home()
    if home is not None:
        return {kind: home / kind for kind in KINDS}
    import warnings

    import platformdirs

    with warnings.catch_warnings():  # no XDG_RUNTIME_DIR: platformdirs warns, then uses /tmp/runtime-UID (checked private like any other)
        warnings.simplefilter("ignore")
        return {kind: Path(getattr(platformdirs, f"user_{kind}_dir")(APP)) for kind in KINDS}


# ---- directories ---------------------------------------------------------------
def _refuse_foreign(path: Path, st: os.stat_result) -> None:
    if st.st_uid != os.geteuid():
        raise UnsafePathError(
            f"directory {path} belongs to another user (uid {st.st_uid}); semantic only uses directories of its own user: "
            "move it away, or set SEMANTIC_HOME to a directory of yours"
        )


def check_dir(path: Path) -> None:
    """`path` (an existing directory) must be ours and not open to group or others:
    tightened to 0700 if it is ours, refused if it is not."""
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077:
        return  # the common case: three system calls fewer
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        _check_linked_dir(path)
        return
    try:
        st = os.fstat(fd)
        _refuse_foreign(path, st)
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _check_linked_dir(path: Path) -> None:
    """A symbolic link where a directory belongs: accepted only if it leads to a private
    directory of ours (the user may keep the cache on another disk); never chmod-ed."""
    if not path.is_symlink():
        raise UnsafePathError(f"{path} is not a directory; semantic needs a directory there: move it away")
    try:
        st = os.stat(path)
    except OSError:
        raise UnsafePathError(f"{path} is a symbolic link to nothing; semantic needs a directory there: remove the link") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{path} is a symbolic link to something that is not a directory: remove the link")
    _refuse_foreign(path, st)
    if st.st_mode & 0o077:
        raise UnsafePathError(
            f"{path} is a symbolic link to a directory that others may use (mode {stat.S_IMODE(st.st_mode):o}); "
            f"semantic does not chmod through links: run chmod 700 on its target, or replace the link"
        )


def _check_home(home: Path) -> None:
    """SEMANTIC_HOME itself: ours; write access for group or others removed (its read bits are the user's choice)."""
    try:
        fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)  # the home may be a link the user made
    except OSError as exc:
        raise UnsafePathError(f"SEMANTIC_HOME {home} is not a directory semantic can use ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        _refuse_foreign(home, st)
        if st.st_mode & 0o022:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o022)
    finally:
        os.close(fd)


def _verify_all(roots: dict[str, Path]) -> None:
    """At a process's first use: every directory semantic uses that already exists."""
    key = tuple(str(p) for p in roots.values())
    if key in _verified:
        return
    home = _home()
    if home is not None and os.path.lexists(home):
        _check_home(home)
    for kind, root in roots.items():
        if os.path.lexists(root):
            check_dir(root)
            for sub in SUBDIRS[kind]:
                if os.path.lexists(root / sub):
                    check_dir(root / sub)
    _verified.add(key)


def _private_dir(path: Path) -> Path:
    """Create `path` (0700) if missing, and check it: ours and private."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    check_dir(path)
    return path


def _base(kind: str, create: bool) -> Path:
    roots = _roots()
    home = _home()
    if create and home is not None and not os.path.lexists(home):
        home.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(home, 0o700)
    _verify_all(roots)
    path = roots[kind]
    if create:
        return _private_dir(path)
    if os.path.lexists(path):
        check_dir(path)
    return path


def data_dir(create: bool = True) -> Path:
    """Transcripts (SQLite), converted models, REPL history."""
    return _base("data", create)


# Set on the ranks after rank 0 of a run over several ranks (semantic_cli.distributed):
# their shard's blocks live apart, under cache/ranks/LAYOUT, even when they share a home.
rank_cache: str | None = None


def cache_dir(create: bool = True) -> Path:
    """KV blocks: derived data that may be deleted at any time."""
    base = _base("cache", create)
    if rank_cache is None:
        return base
    path = base / "ranks" / rank_cache
    return _private_dir(path) if create else path


def config_dir(create: bool = True) -> Path:
    return _base("config", create)


def config_file() -> Path:
    return config_dir(create=False) / "config.toml"


def db_file() -> Path:
    return data_dir() / "semantic.db"


def models_dir() -> Path:
    return _private_dir(data_dir() / "models")


def hf_dir() -> Path:
    """Hugging Face downloads (the hub's cache layout), so they too live under the data dir."""
    return _private_dir(models_dir() / "hf")


def blocks_dir(create: bool = True) -> Path:
    path = cache_dir(create) / "blocks"
    return _private_dir(path) if create else path


def runtime_dir(create: bool = True) -> Path:
    """The server's socket: the platform's per-user runtime directory (SEMANTIC_HOME/runtime)."""
    return _base("runtime", create)


def server_socket(create: bool = True) -> Path:
    """Where `semantic serve` listens by default. A Unix socket's path has a length limit
    (108 bytes on Linux), so a deep home puts it in a private directory under the system's
    temp dir instead, named after the runtime dir (so each home keeps its own)."""
    import hashlib

    path = runtime_dir(create) / "server.sock"
    if len(str(path)) <= 100:
        return path
    short = Path(tempfile.gettempdir()) / f"semantic-{os.geteuid()}"
    if create:
        _private_dir(short)
    return short / f"{hashlib.sha256(str(path).encode()).hexdigest()[:16]}.sock"


def locks_dir() -> Path:
    return _private_dir(data_dir() / "locks")


def history_dir() -> Path:
    return _private_dir(data_dir() / "history")


def downloads_dir() -> Path:
    return _private_dir(cache_dir() / "downloads")


# ---- files ---------------------------------------------------------------------
def _linked(path: Path, what: str) -> UnsafePathError:
    return UnsafePathError(f"{what} {path} is a symbolic link; semantic never writes through one: remove it (rm {path}) and retry")


def open_nofollow(path: Path, flags: int, what: str, mode: int = 0o600) -> int:
    """os.open with O_NOFOLLOW (and O_NONBLOCK: a FIFO must not hang us); the result
    must be a regular file of ours. A link gives UnsafePathError naming `what`."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(path):  # ELOOP on Linux and macOS, EMLINK on FreeBSD
            raise _linked(path, what) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{what} {path} is not a regular file: move it away and retry")
        if st.st_uid != os.geteuid():
            raise UnsafePathError(f"{what} {path} belongs to another user (uid {st.st_uid}): move it away and retry")
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_file(path: Path) -> Path:
    """Create `path` (if missing) readable by the user alone, before anyone writes it.
    SQLite gives its -wal and -shm files the database file's mode.

    An existing file is not opened for I/O: closing any descriptor of a file drops every
    POSIX lock this process holds on it, and an open SQLite connection's locks are what
    stop another process deleting the WAL from under it. An O_PATH descriptor is not an
    open file in that sense (Linux drops no lock when one closes), so an existing file
    whose mode is wrong is chmod-ed through one; a symbolic link is refused, never followed."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        _fix_existing(path)
        return path
    try:
        os.fchmod(fd, 0o600)  # the umask may have taken bits away; never adds any
    finally:
        os.close(fd)
    return path


def _fix_existing(path: Path) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise _linked(path, "database file")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"database file {path} is not a regular file: move it away and retry")
    if st.st_uid != os.geteuid():
        raise UnsafePathError(f"database file {path} belongs to another user (uid {st.st_uid}): move it away and retry")
    if stat.S_IMODE(st.st_mode) == 0o600:
        return
    o_path = getattr(os, "O_PATH", 0)
    if o_path and os.path.isdir("/proc/self/fd"):
        fd = os.open(path, o_path | os.O_NOFOLLOW)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _linked(path, "database file")
            os.chmod(f"/proc/self/fd/{fd}", 0o600)  # the descriptor's file: no path lookup that could meet a link
        finally:
            os.close(fd)
    elif os.chmod in os.supports_follow_symlinks:  # macOS: lchmod
        os.chmod(path, 0o600, follow_symlinks=False)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data`: a unique temp file in the same directory (mkstemp:
    O_CREAT | O_EXCL, so never an existing file or link), its mode set through the
    descriptor, fsync, rename over `path`, fsync the directory. A link at `path` is
    replaced, never followed (callers that must not replace one refuse it first)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as sink:
            os.fchmod(sink.fileno(), mode)
            sink.write(data)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def refuse_link(path: Path, what: str) -> None:
    """UnsafePathError if `path` is a symbolic link (a file we are about to replace)."""
    if path.is_symlink():
        raise _linked(path, what)
