"""The SQLite index of KV blocks and agent tails (in the cache dir, beside the files).

Refcounts are derived (how many agent chains name a block), never stored, so
they cannot drift. Deleting the whole cache dir is always safe: the index and
the files go together, and agents fall back to their transcripts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..db import Transaction, connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (
    hash TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    parent TEXT NOT NULL,
    n_tokens INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    checksum TEXT NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chains (
    agent TEXT NOT NULL,
    pos INTEGER NOT NULL,
    hash TEXT NOT NULL,
    model TEXT NOT NULL,
    PRIMARY KEY (agent, pos)
);
CREATE INDEX IF NOT EXISTS chains_hash ON chains(hash);
CREATE TABLE IF NOT EXISTS tails (
    agent TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    start INTEGER NOT NULL,
    n_tokens INTEGER NOT NULL,
    file TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    checksum TEXT NOT NULL,
    last_used REAL NOT NULL
);
"""


@dataclass(frozen=True)
class BlockRow:
    hash: str
    model: str
    parent: str
    n_tokens: int
    nbytes: int
    checksum: str
    last_used: float


@dataclass(frozen=True)
class TailRow:
    agent: str
    model: str
    start: int
    n_tokens: int
    file: str
    nbytes: int
    checksum: str
    last_used: float


def block_name(model: str, parent: str, tokens: list[int]) -> str:
    """A block's name: the chain hash of (model fingerprint, parent block's name, its token ids)."""
    return hashlib.blake2b(model.encode() + parent.encode() + array("I", tokens).tobytes(), digest_size=16).hexdigest()


def block_path(block_hash: str) -> Path:
    # Creates nothing (a restore names dozens of blocks); writers call `paths.blocks_dir()` first.
    return paths.blocks_dir(create=False) / block_hash[:2] / f"{block_hash}.kv"


def tails_dir() -> Path:
    path = paths.cache_dir() / "tails"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


class KVIndex:
    def __init__(self) -> None:
        # Derived data: a crash may lose the last commit, never corrupt the index.
        self.db = connect(paths.cache_dir() / "index.db", synchronous="NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def transaction(self) -> Transaction:
        return Transaction(self.db)

    # ---- reads --------------------------------------------------------
    def blocks(self, hashes: list[str]) -> dict[str, BlockRow]:
        out: dict[str, BlockRow] = {}
        for i in range(0, len(hashes), 500):
            part = hashes[i : i + 500]
            q = f"SELECT * FROM blocks WHERE hash IN ({','.join('?' * len(part))})"
            for r in self.db.execute(q, part):
                out[r["hash"]] = BlockRow(r["hash"], r["model"], r["parent"], r["n_tokens"], r["nbytes"], r["checksum"], r["last_used"])
        return out

    def all_blocks(self) -> list[BlockRow]:
        return [
            BlockRow(r["hash"], r["model"], r["parent"], r["n_tokens"], r["nbytes"], r["checksum"], r["last_used"])
            for r in self.db.execute("SELECT * FROM blocks")
        ]

    def tail(self, agent: str) -> TailRow | None:
        r = self.db.execute("SELECT * FROM tails WHERE agent=?", (agent,)).fetchone()
        return _tail(r) if r else None

    def all_tails(self) -> list[TailRow]:
        return [_tail(r) for r in self.db.execute("SELECT * FROM tails")]

    def chain(self, agent: str) -> list[str]:
        return [r["hash"] for r in self.db.execute("SELECT hash FROM chains WHERE agent=? ORDER BY pos", (agent,))]

    def chains(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for r in self.db.execute("SELECT agent, hash FROM chains ORDER BY agent, pos"):
            out.setdefault(r["agent"], []).append(r["hash"])
        return out

    def chain_model(self, agent: str) -> str | None:
        r = self.db.execute("SELECT model FROM chains WHERE agent=? LIMIT 1", (agent,)).fetchone()
        if r:
            return r["model"]
        tail = self.tail(agent)
        return tail.model if tail else None

    def cached_tokens(self) -> dict[str, int]:
        """Per agent: the tokens in its chain's blocks plus its tail."""
        chains = self.chains()
        rows = self.blocks(sorted({h for chain in chains.values() for h in chain}))
        out = {a: sum(rows[h].n_tokens for h in chain if h in rows) for a, chain in chains.items()}
        for tail in self.all_tails():
            out[tail.agent] = out.get(tail.agent, 0) + tail.n_tokens
        return out

    def refcounts(self) -> dict[str, int]:
        return {r["hash"]: r["n"] for r in self.db.execute("SELECT hash, COUNT(*) AS n FROM chains GROUP BY hash")}

    # ---- writes -------------------------------------------------------
    def add_block(self, row: BlockRow) -> None:
        now = time.time()
        self.db.execute(
            "INSERT OR REPLACE INTO blocks(hash, model, parent, n_tokens, nbytes, checksum, created, last_used) VALUES (?,?,?,?,?,?,?,?)",
            (row.hash, row.model, row.parent, row.n_tokens, row.nbytes, row.checksum, now, now),
        )

    def set_chain(self, agent: str, model: str, hashes: list[str]) -> None:
        self.db.execute("DELETE FROM chains WHERE agent=?", (agent,))
        self.db.executemany(
            "INSERT INTO chains(agent, pos, hash, model) VALUES (?,?,?,?)", [(agent, i, h, model) for i, h in enumerate(hashes)]
        )

    def set_tail(self, row: TailRow) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO tails(agent, model, start, n_tokens, file, nbytes, checksum, last_used) VALUES (?,?,?,?,?,?,?,?)",
            (row.agent, row.model, row.start, row.n_tokens, row.file, row.nbytes, row.checksum, row.last_used),
        )

    def touch(self, agent: str, hashes: list[str]) -> None:
        now = time.time()
        # One commit, not one per row: each commit grows the WAL, and its checkpoints stall restores.
        with self.transaction():
            self.db.executemany("UPDATE blocks SET last_used=? WHERE hash=?", [(now, h) for h in hashes])
            self.db.execute("UPDATE tails SET last_used=? WHERE agent=?", (now, agent))

    def drop_block(self, block_hash: str) -> None:
        """Forget a block (it was bad or evicted) and every chain link from it on."""
        for r in self.db.execute("SELECT agent, pos FROM chains WHERE hash=?", (block_hash,)).fetchall():
            self.db.execute("DELETE FROM chains WHERE agent=? AND pos>=?", (r["agent"], r["pos"]))
            self.drop_tail(r["agent"])
        self.db.execute("DELETE FROM blocks WHERE hash=?", (block_hash,))
        remove_file(block_path(block_hash))

    def drop_tail(self, agent: str) -> None:
        tail = self.tail(agent)
        self.db.execute("DELETE FROM tails WHERE agent=?", (agent,))
        if tail:
            remove_file(tails_dir() / tail.file)

    def drop_agent(self, agent: str) -> None:
        """Move an agent to cold: its chain and tail go; shared blocks stay for others."""
        self.db.execute("DELETE FROM chains WHERE agent=?", (agent,))
        self.drop_tail(agent)

    def release_agent(self, agent: str) -> int:
        """Drop an agent's cache and free the blocks only it used; returns bytes freed."""
        with self.transaction():
            own = set(self.chain(agent))
            tail = self.tail(agent)
            freed = 0
            if tail is not None:
                with contextlib.suppress(FileNotFoundError):  # a tail hard-linked by a fork stays on disk for the fork
                    freed = tail.nbytes if os.stat(tails_dir() / tail.file).st_nlink == 1 else 0
            self.drop_agent(agent)
            still_used = self.refcounts()
            for row in self.blocks(sorted(own)).values():
                if row.hash not in still_used:
                    self.db.execute("DELETE FROM blocks WHERE hash=?", (row.hash,))
                    remove_file(block_path(row.hash))
                    freed += row.nbytes
        return freed

    def rename_agent(self, old: str, new: str) -> None:
        """The chain moves; the tail file is relinked under the new name, so a later
        agent reusing the old name cannot overwrite (or unlink) it."""
        with self.transaction():
            self.db.execute("UPDATE chains SET agent=? WHERE agent=?", (new, old))
            tail = self.tail(old)
            self.db.execute("DELETE FROM tails WHERE agent=?", (old,))
            if tail and self._link_tail(tail, new):
                remove_file(tails_dir() / tail.file)

    def _link_tail(self, tail: TailRow, agent: str) -> bool:
        """Give `agent` a hard link to `tail`'s file (instant, no bytes copied)."""
        link = f"{agent}-{tail.checksum}.kv"
        try:
            os.link(tails_dir() / tail.file, tails_dir() / link)
        except FileExistsError:
            pass
        except OSError:
            return False  # no tail: the agent's next turn re-prefills its last partial block
        self.set_tail(TailRow(agent, tail.model, tail.start, tail.n_tokens, link, tail.nbytes, tail.checksum, tail.last_used))
        return True

    def fork_agent(self, source: str, new: str) -> None:
        """The fork shares every block; its tail is a hard link (instant, free on disk)."""
        with self.transaction():
            self.db.execute(
                "INSERT INTO chains(agent, pos, hash, model) SELECT ?, pos, hash, model FROM chains WHERE agent=?", (new, source)
            )
            tail = self.tail(source)
            if tail:
                self._link_tail(tail, new)

    def gc_unreferenced(self, max_blocks: int | None = None) -> int:
        """Delete blocks no chain names (stale), least recently used first; returns bytes freed."""
        rows = self.db.execute(
            "SELECT hash, nbytes FROM blocks WHERE hash NOT IN (SELECT hash FROM chains) ORDER BY last_used"
            + (f" LIMIT {int(max_blocks)}" if max_blocks else "")
        ).fetchall()
        for r in rows:
            self.db.execute("DELETE FROM blocks WHERE hash=?", (r["hash"],))
            remove_file(block_path(r["hash"]))
        return sum(r["nbytes"] for r in rows)

    def total_bytes(self) -> int:
        b = self.db.execute("SELECT COALESCE(SUM(nbytes),0) FROM blocks").fetchone()[0]
        t = self.db.execute("SELECT COALESCE(SUM(nbytes),0) FROM tails").fetchone()[0]
        return int(b + t)


def _tail(r: sqlite3.Row) -> TailRow:
    return TailRow(r["agent"], r["model"], r["start"], r["n_tokens"], r["file"], r["nbytes"], r["checksum"], r["last_used"])


def remove_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
