"""SQLite connections for the transcript store and the KV index: WAL, private files,
and explicit transactions (autocommit otherwise)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from . import paths


def connect(path: Path, synchronous: str) -> sqlite3.Connection:
    db = sqlite3.connect(paths.private_file(path), timeout=30, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    return db


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
