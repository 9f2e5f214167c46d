"""SQLite connections for the transcript store and the KV index: WAL, private files,
explicit transactions (autocommit otherwise), and versioned schemas.

Each database carries its schema version in `PRAGMA user_version` and its owner
passes the ordered list of migrations that build it: migration i takes the
schema from version i to i + 1. Version 1 is the schema every release before
versioning wrote (with `CREATE ... IF NOT EXISTS`, so an unversioned database
upgrades in place without losing a row). A database newer than this code is
refused before anything writes to it, its WAL included: the file and its -wal
are left byte for byte as they were (StoreVersionError, exit code 9).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import paths
from .errors import StoreDamagedError, StoreVersionError

Migration = Sequence[str]  # the SQL statements of one schema step, run in one transaction


def statements(script: str) -> tuple[str, ...]:
    """A migration from an SQL script: its statements (none may contain ';' in a literal)."""
    return tuple(s.strip() for s in script.split(";") if s.strip())


def connect(path: Path, synchronous: str, migrations: Sequence[Migration], what: str) -> sqlite3.Connection:
    """Open (creating if needed) and migrate the database at `path` to `len(migrations)`."""
    paths.private_file(path)
    if _wal_file(path).exists():
        # Closing the last read-write connection checkpoints the WAL into the database file,
        # so a WAL that a newer release left behind is read through a read-only connection.
        probe = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            _refuse_newer(probe, path, len(migrations), what)
        finally:
            probe.close()
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        db.row_factory = sqlite3.Row
        # A read; with no WAL there, closing this connection after a refusal changes nothing.
        _refuse_newer(db, path, len(migrations), what)
        _enter_wal(db)
        db.execute(f"PRAGMA synchronous={synchronous}")
        migrate(db, path, migrations, what)
    except BaseException:
        db.close()
        raise
    return db


# SQLite's words for a file the machine will not let it use, and what to do about each
# (any other error is a bug to report).
_UNUSABLE = (
    (
        ("not a database", "malformed"),
        "it is damaged: restore it from a backup, or move it aside to start a new one (semantic never overwrites it)",
    ),
    (("readonly", "read-only"), "it is read-only: make it and its directory writable (or point SEMANTIC_HOME elsewhere)"),
    (("disk I/O", "full"), "the disk may be full: free some space and try again"),
    (("unable to open",), "check that its directory exists and is writable by you"),
)
MACHINE_REFUSED = tuple(words for found, _ in _UNUSABLE[1:] for words in found)  # all but damage


def unusable(path: Path, what: str, exc: sqlite3.Error) -> StoreDamagedError | None:
    """Why `what` at `path` cannot be used, and what to do, in one line; None for an error
    that says nothing about the file (a bug, a lock), which the caller lets through."""
    text = str(exc)
    for found, hint in _UNUSABLE:
        if any(words in text for words in found):
            return StoreDamagedError(f"{what} {path} cannot be used ({text}): {hint}")
    return None


def _enter_wal(db: sqlite3.Connection, timeout: float = 30.0) -> None:
    """Switch to WAL. SQLite answers "database is locked" at once, without its busy
    timeout, while another process creates or converts the same new file: retried."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def _wal_file(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def schema_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _refuse_newer(db: sqlite3.Connection, path: Path, latest: int, what: str) -> None:
    found = schema_version(db)
    if found < 0:  # never written by semantic: no migration list starts there
        raise StoreVersionError(f"{what} {path} has schema version {found}, which no release of semantic writes; move the file aside")
    if found > latest:
        raise StoreVersionError(
            f"{what} {path} has schema version {found}, newer than this semantic understands ({latest}); "
            "upgrade semantic (it was written by a newer release), and leave the file as it is"
        )


def migrate(db: sqlite3.Connection, path: Path, migrations: Sequence[Migration], what: str) -> None:
    """Run the missing migrations, each with its version bump, in one transaction."""
    latest = len(migrations)
    if schema_version(db) == latest:
        return
    with Transaction(db):
        found = schema_version(db)  # again, under the write lock: another process may have migrated
        _refuse_newer(db, path, latest, what)
        for step in migrations[found:]:
            for statement in step:
                db.execute(statement)
        db.execute(f"PRAGMA user_version={latest}")


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error); inside an open transaction it
    joins it, so helpers that need one can be called from callers that hold one."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.owner = False

    def __enter__(self) -> None:
        if not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")
            self.owner = True

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self.owner:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def json_column(text: str | None, default: Any) -> Any:
    """A JSON column's value, or `default` where the row is damaged: a setting or a message's
    figures falling back to defaults costs less than a store that no command can read."""
    try:
        value = json.loads(text or "null")
    except ValueError:
        return default
    return value if isinstance(value, type(default)) else default
