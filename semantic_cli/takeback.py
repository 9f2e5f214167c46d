"""Taking an agent's last messages back, and the /retry journal that puts them back.

This module owns the SQL of those operations on the transcript database: deleting
messages and the end of the token log (`cut`), and the journal's tables (`retries`,
`retry_messages`, `retry_chunks`; created by store.py's `MIGRATIONS`, version 3). Every
other statement on that database is store.py's. Callers pass the store's connection.

A /retry cuts the last exchange and writes what it deleted, with the whole token log it
replaced, to the journal in the cut's own transaction: at every moment the old exchange
is on disk, in the transcript or in the journal. The entry goes when the retry ends:
`settle` once the new reply is recorded whole, `put_back` when it is not (the old exchange
comes back, ids and all). A process killed in between leaves the entry behind, and
`recover` resolves it when the agent is next opened (history.recover_retry).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any, Literal

from .db import Transaction
from .errors import SemanticError

Outcome = Literal["restored", "finished", "overtaken"]


@dataclass(frozen=True)
class Journal:
    """A /retry's entry: what its cut deleted."""

    agent: str
    last_id: int  # the agent's last message id before the cut: anything above it came later
    messages: list[tuple[Any, ...]]  # the deleted rows: id, role, content, status, created_at, meta
    log: list[tuple[Any, ...]]  # the whole token log before the cut: id, tokenizer, tokens

    @property
    def retried(self) -> list[str]:
        """The retried message (the cut exchange's user message), as a list of at most one."""
        return [m[2] for m in self.messages if m[1] == "user"][:1]


def cut(db: sqlite3.Connection, name: str, drop: list[int], chunks: int, journal: bool = False) -> None:
    """Delete the messages with these ids and keep only the first `chunks` chunks of the
    token log (0: none, and the next turn re-renders the transcript), in one transaction.
    With `journal` (a /retry), what it deletes and the whole log go to the journal in that
    transaction. Without, any entry the agent had goes: a put-back after another cut (an
    undo, a trim) would restore a log that no longer matches the transcript."""
    with Transaction(db):
        forget(db, name)
        if journal:
            db.execute("INSERT INTO retries(agent, last_id) SELECT ?, COALESCE(MAX(id), -1) FROM messages WHERE agent=?", (name, name))
            db.executemany(
                "INSERT INTO retry_messages(id, agent, role, content, status, created_at, meta) "
                "SELECT id, agent, role, content, status, created_at, meta FROM messages WHERE agent=? AND id=?",
                [(name, i) for i in drop],
            )
            db.execute(
                "INSERT INTO retry_chunks(id, agent, tokenizer, tokens) "
                "SELECT id, agent, tokenizer, tokens FROM token_chunks WHERE agent=?",
                (name,),
            )
        db.executemany("DELETE FROM messages WHERE agent=? AND id=?", [(name, i) for i in drop])
        ids = [r[0] for r in db.execute("SELECT id FROM token_chunks WHERE agent=? ORDER BY id", (name,))]
        last = ids[min(chunks, len(ids)) - 1] if chunks > 0 and ids else -1
        db.execute("DELETE FROM token_chunks WHERE agent=? AND id>?", (name, last))


def settle(db: sqlite3.Connection, name: str) -> None:
    """The retry ended with its new reply recorded: its entry goes."""
    forget(db, name)


def forget(db: sqlite3.Connection, name: str) -> None:
    """Drop the agent's entry, if any. Also for what changes the ground a put-back would
    restore onto: a reset, a new persona, a compaction (store.py)."""
    with Transaction(db):  # all or nothing: a half-forgotten entry would be resolved as overtaken
        for table in ("retry_messages", "retry_chunks", "retries"):  # not ON DELETE CASCADE: foreign keys are per connection
            db.execute(f"DELETE FROM {table} WHERE agent=?", (name,))


def pending(db: sqlite3.Connection) -> list[str]:
    """The agents with an entry: a /retry running, or one a killed process left."""
    return [r[0] for r in db.execute("SELECT agent FROM retries ORDER BY agent")]


def put_back(db: sqlite3.Connection, name: str) -> None:
    """Undo the retry's cut: what was recorded since goes and the old exchange and its log
    come back as they were, ids and all (ids only grow, so none was reused); the entry goes
    either way, in one transaction. Refused (SemanticError) when anything but the retry's
    own message and reply was recorded since, or the entry is gone (a reset, an undo, a new
    persona meanwhile): another process changed the agent, and what is there stays."""
    with Transaction(db):
        entry = _read(db, name)
        ok = entry is not None and _only_the_retry(_since(db, entry), entry.retried)
        if entry is not None and ok:
            _restore(db, entry)
        forget(db, name)
    if not ok:
        raise SemanticError(f"agent {name!r} changed since the retry began; what is there now stays")


def recover(db: sqlite3.Connection, name: str) -> Outcome | None:
    """Resolve an entry whose retry no process runs any more (the caller makes sure), in one
    transaction; None when there is none. The rule, by what was recorded since the cut:
    nothing, or only the retry's message and at most an interrupted reply: the old exchange
    is put back ("restored"); the retry's message and its complete reply: the retry
    succeeded and only its cleanup was lost ("finished"); anything else: another client
    wrote since, and what is there stays ("overtaken"). The entry goes in every case."""
    with Transaction(db):
        entry = _read(db, name)
        if entry is None:
            return None
        since = _since(db, entry)
        outcome: Outcome = "overtaken"
        if _only_the_retry(since, entry.retried):
            outcome = "finished" if [(r, s) for r, _, s in since[1:]] == [("assistant", "complete")] else "restored"
        if outcome == "restored":
            _restore(db, entry)
        forget(db, name)
    return outcome


def _read(db: sqlite3.Connection, name: str) -> Journal | None:
    row = db.execute("SELECT last_id FROM retries WHERE agent=?", (name,)).fetchone()
    if row is None:
        return None
    cols = "id, role, content, status, created_at, meta"
    messages = db.execute(f"SELECT {cols} FROM retry_messages WHERE agent=? ORDER BY id", (name,)).fetchall()
    log = db.execute("SELECT id, tokenizer, tokens FROM retry_chunks WHERE agent=? ORDER BY id", (name,)).fetchall()
    return Journal(name, int(row[0]), [tuple(m) for m in messages], [tuple(c) for c in log])


def _since(db: sqlite3.Connection, entry: Journal) -> list[tuple[str, str, str]]:
    """What was recorded after the cut: (role, content, status), oldest first."""
    rows = db.execute("SELECT role, content, status FROM messages WHERE agent=? AND id>? ORDER BY id", (entry.agent, entry.last_id))
    return [(r[0], r[1], r[2]) for r in rows]


def _only_the_retry(since: list[tuple[str, str, str]], retried: list[str]) -> bool:
    """Whether what was recorded after a cut is at most the retry's own user message and reply."""
    if not since:
        return True
    first = [(role, content) for role, content, _ in since[:1]]
    return len(since) <= 2 and first == [("user", t) for t in retried] and all(r == "assistant" for r, _, _ in since[1:])


def _restore(db: sqlite3.Connection, entry: Journal) -> None:
    name = entry.agent
    db.execute("DELETE FROM messages WHERE agent=? AND id>?", (name, entry.last_id))
    db.executemany(
        "INSERT INTO messages(id, agent, role, content, status, created_at, meta) VALUES (?,?,?,?,?,?,?)",
        [(i, name, *rest) for i, *rest in entry.messages],
    )
    db.execute("DELETE FROM token_chunks WHERE agent=?", (name,))
    db.executemany("INSERT INTO token_chunks(id, agent, tokenizer, tokens) VALUES (?,?,?,?)", [(i, name, *rest) for i, *rest in entry.log])
