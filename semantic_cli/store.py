"""The transcript store: agents, their messages and the exact token ids the model saw.

SQLite in the data dir, WAL mode. This is the truth; KV blocks are derived
from it and may vanish at any time. A turn (user message, reply, the tokens
the model saw) is committed in one transaction, so a killed process leaves
either the whole turn or none of it. The schema is versioned: `MIGRATIONS`
below, applied by db.connect. All SQL on this database lives here, but for taking
messages back and the /retry journal that puts them back (takeback.py).
"""

from __future__ import annotations

import difflib
import json
import re
import sqlite3
import time
from array import array
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import paths, takeback
from .db import Transaction, connect, json_column, statements, unusable
from .errors import NotFoundError, StoreDamagedError, UsageError

# The one rule for agent and room names (rooms.py derives `@name` mentions from it).
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

# Schema migrations, oldest first (see db.py). Version 1 is the schema of every
# release before versioning: IF NOT EXISTS lets such a database upgrade in place.
MIGRATIONS: list[tuple[str, ...]] = [
    statements(
        """
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    system TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    last_active REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    agent TEXT NOT NULL REFERENCES agents(name) ON DELETE CASCADE ON UPDATE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'complete',
    created_at REAL NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS messages_agent ON messages(agent, id);
-- Append-only log of the token ids the model has seen, one chunk per turn.
CREATE TABLE IF NOT EXISTS token_chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    agent TEXT NOT NULL REFERENCES agents(name) ON DELETE CASCADE ON UPDATE CASCADE,
    tokenizer TEXT NOT NULL,
    tokens BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS token_chunks_agent ON token_chunks(agent, id);
CREATE TABLE IF NOT EXISTS rooms (
    name TEXT PRIMARY KEY,
    agents TEXT NOT NULL
);
"""
    ),
    # Version 2: a transcript may hold compaction summaries (role 'summary', see
    # history.py). A release before it would hand that role to the chat template, so the
    # bump makes such releases refuse this store (exit 9) instead; the index serves the
    # per-role lookups (turn counts, the latest summary).
    statements("CREATE INDEX IF NOT EXISTS messages_role ON messages(agent, role, id)"),
    # Version 3: the /retry journal (takeback.py owns its rows): what a retry's cut deleted,
    # kept until the retry ends, so a killed process never loses the exchange it was
    # replacing. Ids are the rows' own, put back as they were.
    statements(
        """
CREATE TABLE retries (
    agent TEXT PRIMARY KEY REFERENCES agents(name) ON DELETE CASCADE ON UPDATE CASCADE,
    last_id INTEGER NOT NULL
);
CREATE TABLE retry_messages (
    id INTEGER PRIMARY KEY,
    agent TEXT NOT NULL REFERENCES retries(agent) ON DELETE CASCADE ON UPDATE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    meta TEXT NOT NULL
);
CREATE INDEX retry_messages_agent ON retry_messages(agent, id);
CREATE TABLE retry_chunks (
    id INTEGER PRIMARY KEY,
    agent TEXT NOT NULL REFERENCES retries(agent) ON DELETE CASCADE ON UPDATE CASCADE,
    tokenizer TEXT NOT NULL,
    tokens BLOB NOT NULL
);
CREATE INDEX retry_chunks_agent ON retry_chunks(agent, id);
"""
    ),
]


def validate_name(name: str, what: str = "agent") -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise UsageError(f"invalid {what} name {name!r}: use 1-64 characters of a-z, 0-9, '_' and '-', starting with a letter or digit")
    return name


@dataclass(frozen=True)
class Agent:
    name: str
    model: str
    system: str
    settings: dict
    created_at: float
    last_active: float


@dataclass(frozen=True)
class Message:
    id: int
    agent: str
    role: str  # "user" | "assistant" | "summary" (a compaction: history.py)
    content: str
    status: str  # "complete" | "interrupted"
    created_at: float
    meta: dict


def _pack(tokens: list[int]) -> bytes:
    return array("I", tokens).tobytes()


def _unpack(blob: bytes) -> list[int]:
    """A token chunk's ids (ValueError for a blob that cannot be one: damaged)."""
    out = array("I")
    out.frombytes(blob)
    return out.tolist()


class Store:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or paths.db_file()
        # The truth: durable on every commit.
        try:
            self.db = connect(self.path, "FULL", MIGRATIONS, "the transcript database")
            self.db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as exc:  # the KV index's failures cost a re-prefill; the transcript's stop the command
            if (refused := unusable(self.path, "the transcript database", exc)) is None:
                raise
            raise refused from exc

    def close(self) -> None:
        self.db.close()

    def _tx(self) -> Transaction:
        return Transaction(self.db)

    # ---- agents -------------------------------------------------------
    def _agent(self, row: sqlite3.Row) -> Agent:
        return Agent(row["name"], row["model"], row["system"], json_column(row["settings"], {}), row["created_at"], row["last_active"])

    def find_agent(self, name: str) -> Agent | None:
        row = self.db.execute("SELECT * FROM agents WHERE name=?", (name,)).fetchone()
        return self._agent(row) if row else None

    def get_agent(self, name: str) -> Agent:
        agent = self.find_agent(validate_name(name))
        if agent is None:
            near = self.near_names(name)
            if near:
                raise NotFoundError(f"no agent named {name!r}; did you mean {' or '.join(repr(n) for n in near)}?")
            raise NotFoundError(
                f"no agent named {name!r}; create it with `semantic agents new {name}` or list them with `semantic agents ls`"
            )
        return agent

    def near_names(self, name: str) -> list[str]:
        """Existing agents whose names are close to `name` (a typo's likely meaning), closest first."""
        names = [r["name"] for r in self.db.execute("SELECT name FROM agents")]
        return difflib.get_close_matches(name, [n for n in names if n != name], n=3, cutoff=0.75)

    def has_messages(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM messages WHERE agent=? LIMIT 1", (name,)).fetchone() is not None

    def list_agents(self) -> list[Agent]:
        return [self._agent(r) for r in self.db.execute("SELECT * FROM agents ORDER BY name")]

    def create_agent(self, name: str, model: str, system: str = "", settings: dict | None = None) -> Agent:
        validate_name(name)
        now = time.time()
        try:
            self.db.execute(
                "INSERT INTO agents(name, model, system, settings, created_at, last_active) VALUES (?,?,?,?,?,?)",
                (name, model, system, json.dumps(settings or {}), now, now),
            )
        except sqlite3.IntegrityError:
            raise UsageError(f"agent {name!r} already exists; pick another name or `semantic agents rm {name}`") from None
        return self.get_agent(name)

    def update_agent(self, agent: Agent, **changes: Any) -> Agent:
        """Change model, system or settings. A persona or model change drops the token log:
        the next turn re-renders the transcript (and so cannot reuse stale KV)."""
        new = replace(agent, **changes)
        with self._tx():
            self.db.execute(
                "UPDATE agents SET model=?, system=?, settings=? WHERE name=?",
                (new.model, new.system, json.dumps(new.settings), agent.name),
            )
            if new.system != agent.system or new.model != agent.model:
                self.db.execute("DELETE FROM token_chunks WHERE agent=?", (agent.name,))
                takeback.forget(self.db, agent.name)  # a put-back would restore the old log under the new prefix
        return new

    def delete_agent(self, name: str) -> list[str]:
        """Delete an agent; it leaves every saved room too (a room it leaves empty goes). The
        rooms it was in: a room naming a deleted agent could no longer be opened."""
        self.get_agent(name)
        with self._tx():
            self.db.execute("DELETE FROM agents WHERE name=?", (name,))
            return self._rooms_replace(name, None)

    def rename_agent(self, old: str, new: str) -> None:
        self.get_agent(old)
        validate_name(new)
        if self.find_agent(new):
            raise UsageError(f"agent {new!r} already exists")
        with self._tx():
            self.db.execute("UPDATE agents SET name=? WHERE name=?", (new, old))
            # Saved rooms follow the rename; otherwise `--room` would recreate the old name, empty.
            self._rooms_replace(old, new)

    def _rooms_replace(self, agent: str, by: str | None) -> list[str]:
        """In every saved room naming `agent`, put `by` in its place (None: take it out, and
        drop a room left empty); the rooms changed. Inside the caller's transaction."""
        changed = []
        for r in self.db.execute("SELECT name, agents FROM rooms").fetchall():
            members = json_column(r["agents"], [])
            if agent not in members:
                continue
            changed.append(r["name"])
            members = [by if m == agent else m for m in members] if by is not None else [m for m in members if m != agent]
            if members:
                self.db.execute("UPDATE rooms SET agents=? WHERE name=?", (json.dumps(members), r["name"]))
            else:
                self.db.execute("DELETE FROM rooms WHERE name=?", (r["name"],))
        return changed

    def fork_agent(self, source: str, new: str, through: int | None = None, chunks: int | None = None) -> Agent:
        """A copy of `source`: its messages up to id `through` (None: all) and the first
        `chunks` chunks of its token log (None: all; the caller says how many cover them)."""
        src = self.get_agent(source)
        last = -1 if through is None else through
        with self._tx():
            self.create_agent(new, src.model, src.system, src.settings)
            self.db.execute(
                "INSERT INTO messages(agent, role, content, status, created_at, meta) "
                "SELECT ?, role, content, status, created_at, meta FROM messages WHERE agent=? AND (?<0 OR id<=?) ORDER BY id",
                (new, source, last, last),
            )
            self.db.execute(
                "INSERT INTO token_chunks(agent, tokenizer, tokens) "
                "SELECT ?, tokenizer, tokens FROM token_chunks WHERE agent=? ORDER BY id LIMIT ?",
                (new, source, -1 if chunks is None else chunks),
            )
            self._renumber_summaries(source, new, last)
        return self.get_agent(new)

    def _renumber_summaries(self, source: str, new: str, last: int) -> None:
        """A summary's meta names the last message it covers by id (`history.compacted`); a
        copy's messages have new ids, so its summaries must name the copies."""
        old_ids = [
            r[0] for r in self.db.execute("SELECT id FROM messages WHERE agent=? AND (?<0 OR id<=?) ORDER BY id", (source, last, last))
        ]
        rows = self.db.execute("SELECT id, role, meta FROM messages WHERE agent=? ORDER BY id", (new,)).fetchall()
        renumber = dict(zip(old_ids, (r[0] for r in rows), strict=True))
        for new_id, role, meta in rows:
            if role != "summary" or not meta:
                continue
            fields = json_column(meta, {})
            if fields.get("through") in renumber:
                fields["through"] = renumber[fields["through"]]
                self.db.execute("UPDATE messages SET meta=? WHERE id=?", (json.dumps(fields), new_id))

    def chunk_sizes(self, name: str) -> list[int]:
        """The token log's chunks, oldest first, in tokens. `record_turn` is the log's only
        writer and adds one chunk per recorded turn, ending at that turn's last token; the
        first chunk starts wherever the log was last (re)started (history.log_cut uses this)."""
        rows = self.db.execute("SELECT LENGTH(tokens) / 4 AS n FROM token_chunks WHERE agent=? ORDER BY id", (name,))
        return [int(r["n"]) for r in rows]

    def log_tokens(self, name: str, chunks: int | None = None) -> list[int]:
        """The ids of the log's first `chunks` chunks (None: all), whatever their tokenizer."""
        limit = -1 if chunks is None else chunks
        rows = self.db.execute("SELECT tokens FROM token_chunks WHERE agent=? ORDER BY id LIMIT ?", (name, limit)).fetchall()
        return [t for r in rows for t in _unpack(r["tokens"])]

    def add_summary(self, name: str, content: str, meta: dict) -> Message:
        """Record a compaction summary and drop the token log (the prefix changed: the next
        turn renders persona, summary and the turns after it)."""
        with self._tx():
            cur = self.db.execute(
                "INSERT INTO messages(agent, role, content, status, created_at, meta) VALUES (?,?,?,?,?,?)",
                (name, "summary", content, "complete", time.time(), json.dumps(meta)),
            )
            self.db.execute("DELETE FROM token_chunks WHERE agent=?", (name,))
            takeback.forget(self.db, name)
        return next(m for m in self.messages(name) if m.id == cur.lastrowid)

    def reset_agent(self, name: str) -> None:
        self.get_agent(name)
        with self._tx():
            self.db.execute("DELETE FROM messages WHERE agent=?", (name,))
            self.db.execute("DELETE FROM token_chunks WHERE agent=?", (name,))
            takeback.forget(self.db, name)

    # ---- transcript ---------------------------------------------------
    def messages(self, name: str) -> list[Message]:
        rows = self.db.execute("SELECT * FROM messages WHERE agent=? ORDER BY id", (name,))
        return [
            Message(r["id"], r["agent"], r["role"], r["content"], r["status"], r["created_at"], json_column(r["meta"], {})) for r in rows
        ]

    def token_log(self, name: str, tokenizer: str) -> list[int] | None:
        """The ids the model has seen, or None when there is no log for this tokenizer."""
        rows = self.db.execute("SELECT tokenizer, tokens FROM token_chunks WHERE agent=? ORDER BY id", (name,)).fetchall()
        if not rows or any(r["tokenizer"] != tokenizer for r in rows):
            return None
        out: list[int] = []
        try:
            for r in rows:
                out += _unpack(r["tokens"])
        except ValueError:  # a damaged chunk: the turn renders the transcript again instead
            return None
        return out

    def record_turn(
        self,
        name: str,
        messages: list[tuple[str, str, str, dict]],
        tokenizer: str,
        new_tokens: list[int],
        replace_log: bool,
        changes: dict[str, str] | None = None,
    ) -> None:
        """Commit one turn: its messages (role, content, status, meta), the tokens it added,
        and `changes` to the agent's model or system (a command-line flag's, saved only with
        the turn it belongs to; the caller replaces the log then)."""
        now = time.time()
        with self._tx():
            for column, value in (changes or {}).items():
                if column not in ("model", "system"):
                    raise ValueError(f"not a turn's change: {column}")
                self.db.execute(f"UPDATE agents SET {column}=? WHERE name=?", (value, name))
            if replace_log:
                self.db.execute("DELETE FROM token_chunks WHERE agent=?", (name,))
            for role, content, status, meta in messages:
                self.db.execute(
                    "INSERT INTO messages(agent, role, content, status, created_at, meta) VALUES (?,?,?,?,?,?)",
                    (name, role, content, status, now, json.dumps(meta)),
                )
            if new_tokens:
                self.db.execute("INSERT INTO token_chunks(agent, tokenizer, tokens) VALUES (?,?,?)", (name, tokenizer, _pack(new_tokens)))
            self.db.execute("UPDATE agents SET last_active=? WHERE name=?", (now, name))

    def turn_counts(self) -> dict[str, tuple[int, int]]:
        """Per agent with any: how many turns (user messages) its transcript holds, and how
        many of them its latest compaction summary covers (`history.turn_counts`' figures)."""
        through: dict[str, int] = {}
        for r in self.db.execute("SELECT agent, id, meta FROM messages WHERE role='summary' ORDER BY id"):
            through[r["agent"]] = int(json_column(r["meta"], {}).get("through", r["id"]))
        rows = self.db.execute("SELECT agent, id FROM messages WHERE role='user' ORDER BY id")
        counts: dict[str, tuple[int, int]] = {}
        for r in rows:
            turns, covered = counts.get(r["agent"], (0, 0))
            counts[r["agent"]] = (turns + 1, covered + (r["id"] <= through.get(r["agent"], -1)))
        return counts

    def token_counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT agent, SUM(LENGTH(tokens)) / 4 AS n FROM token_chunks GROUP BY agent")
        return {r["agent"]: int(r["n"] or 0) for r in rows}

    # ---- rooms --------------------------------------------------------
    def save_room(self, name: str, agents: list[str]) -> None:
        validate_name(name, "room")
        self.db.execute("INSERT OR REPLACE INTO rooms(name, agents) VALUES (?,?)", (name, json.dumps(agents)))

    def get_room(self, name: str) -> list[str]:
        row = self.db.execute("SELECT agents FROM rooms WHERE name=?", (validate_name(name, "room"),)).fetchone()
        if row is None:
            raise NotFoundError(f"no room named {name!r}; open one with `semantic chat --agent a --agent b --save-room {name}`")
        members = json_column(row["agents"], [])
        if not members or not all(isinstance(m, str) for m in members):
            raise StoreDamagedError(
                f"room {name!r} in {self.path} is damaged (its agent list): save it again with --save-room, or `semantic rooms rm {name}`"
            )
        return members

    def list_rooms(self) -> list[tuple[str, list[str]]]:
        """Every saved room, by name: (name, its agents in room order)."""
        return [(r["name"], json_column(r["agents"], [])) for r in self.db.execute("SELECT name, agents FROM rooms ORDER BY name")]

    def delete_room(self, name: str) -> list[str]:
        """Forget a saved room (its agents stay); the agents it named."""
        with self._tx():
            row = self.db.execute("SELECT agents FROM rooms WHERE name=?", (validate_name(name, "room"),)).fetchone()
            if row is None:
                raise NotFoundError(f"no room named {name!r}; list the saved rooms with `semantic rooms ls`")
            self.db.execute("DELETE FROM rooms WHERE name=?", (name,))
        return json_column(row["agents"], [])
