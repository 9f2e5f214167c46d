"""Every path the tool reads or writes, resolved at call time.

`SEMANTIC_HOME` relocates everything (data, cache, config) under one directory;
otherwise the platform's conventional directories are used (platformdirs).
"""

from __future__ import annotations

import os
from pathlib import Path

APP = "semantic"


def _home() -> Path | None:
    value = os.environ.get("SEMANTIC_HOME")
    return Path(value).expanduser() if value else None


def _private_dir(path: Path) -> Path:
    # Everything we write is the user's alone: directories 0700.
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _base(kind: str, create: bool) -> Path:
    home = _home()
    if home is not None:
        path = home / kind
    else:
        import platformdirs

        path = Path(getattr(platformdirs, f"user_{kind}_dir")(APP))
    return _private_dir(path) if create else path


def data_dir(create: bool = True) -> Path:
    """Transcripts (SQLite), converted models, REPL history."""
    return _base("data", create)


def cache_dir(create: bool = True) -> Path:
    """KV blocks: derived data that may be deleted at any time."""
    return _base("cache", create)


def config_dir(create: bool = True) -> Path:
    return _base("config", create)


def config_file() -> Path:
    return config_dir(create=False) / "config.toml"


def db_file() -> Path:
    return data_dir() / "semantic.db"


def models_dir() -> Path:
    return _private_dir(data_dir() / "models")


def blocks_dir(create: bool = True) -> Path:
    path = cache_dir(create) / "blocks"
    return _private_dir(path) if create else path


def locks_dir() -> Path:
    return _private_dir(data_dir() / "locks")


def history_dir() -> Path:
    return _private_dir(data_dir() / "history")


def downloads_dir() -> Path:
    return _private_dir(cache_dir() / "downloads")


def private_file(path: Path) -> Path:
    """Create `path` (if missing) readable by the user alone, before anyone writes it.
    SQLite gives its -wal and -shm files the database file's mode.
    An existing file is not opened: closing any descriptor of a file drops every
    POSIX lock this process holds on it, and an open SQLite connection's locks
    are what stop another process deleting the WAL from under it."""
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    os.chmod(path, 0o600)
    return path
