"""The SQLite index of KV blocks and agent tails (in the cache dir, beside the files).

The only module that runs SQL on `index.db`: every read and write of blocks,
chains and tails is a named method here. When the index lets a block or tail go
it deletes the file through kv/blockfile.py, which owns the files themselves:
inside a transaction, only once it has committed (a rollback leaves every file
the index still names), and only by a name that matches a cache file's pattern
(a row naming anything else is dropped, and nothing is deleted for it).

Refcounts are derived (how many agent chains name a block), never stored, so
they cannot drift. Deleting the whole cache dir is always safe: the index and
the files go together, and agents fall back to their transcripts.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .. import faults, paths
from ..db import Transaction, connect, statements
from . import blockfile
from .failures import CACHE_ERRORS, CacheUnavailable, failure_reason

# Schema migrations, oldest first (see db.py). Version 1 is the schema of every
# release before versioning: IF NOT EXISTS lets such an index upgrade in place.
MIGRATIONS: list[tuple[str, ...]] = [
    statements(
        """
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
    ),
]


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


def chain_hashes(model_fp: str, tokens: list[int], block_tokens: int) -> list[str]:
    """The names of the whole blocks of `tokens`, each chained to the one before it."""
    out, parent = [], model_fp
    for i in range(len(tokens) // block_tokens):
        parent = block_name(model_fp, parent, tokens[i * block_tokens : (i + 1) * block_tokens])
        out.append(parent)
    return out


def open_index() -> KVIndex:
    """The index, for commands that manage the cache: one that cannot be opened (damaged,
    unreadable) is one clear error. It holds only derived data, so the remedy is to move
    the cache dir aside (`semantic doctor` shows it): every agent then re-prefills."""
    try:
        return KVIndex()
    except CACHE_ERRORS as exc:
        where = paths.cache_dir(create=False)
        raise CacheUnavailable(
            f"{where / 'index.db'}: {failure_reason(exc)}; it holds only derived data: move {where} aside and agents re-prefill"
        ) from exc


class KVIndex:
    def __init__(self) -> None:
        # Derived data: a crash may lose the last commit, never corrupt the index.
        self.db = connect(paths.cache_dir() / "index.db", "NORMAL", MIGRATIONS, "the KV cache index")
        self._after_commit: list[Callable[[], None]] | None = None  # file removals the open transaction waits to commit

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT (joining one already open). Files that the changes
        let go are deleted after the commit, never before: a rollback deletes nothing."""
        if self._after_commit is not None:
            yield
            return
        removals: list[Callable[[], None]] = []
        self._after_commit = removals
        try:
            with Transaction(self.db):
                yield
                if removals:
                    faults.point("eviction-before-commit")
        finally:
            self._after_commit = None
        if removals:
            faults.point("eviction-after-commit")
        for remove in removals:  # committed: a file that cannot go now is an orphan for `cache verify --repair`
            with contextlib.suppress(OSError):
                remove()

    def after_commit(self, remove: Callable[[], None]) -> None:
        """Run `remove` (a file deletion) once the open transaction commits, or now outside one."""
        if self._after_commit is not None:
            self._after_commit.append(remove)
        else:
            remove()

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

    def set_agent_cache(self, agent: str, model: str, hashes: list[str], tail: TailRow | None) -> None:
        """After a turn: the agent's chain and its new tail (or none), used now, in one
        transaction. The tail file it replaces is deleted after the commit: a crash in
        between leaves an orphan for `cache verify --repair`, never a missing file."""
        old = self.tail(agent)
        faults.point("before-index-commit")
        with self.transaction():
            self.set_chain(agent, model, hashes)
            self.db.execute("DELETE FROM tails WHERE agent=?", (agent,))
            if tail is not None:
                self.set_tail(tail)
            self.touch(agent, hashes)
        faults.point("after-index-commit")
        if old is not None and (tail is None or old.file != tail.file):
            self._remove_tail(old.file)

    def touch(self, agent: str, hashes: list[str]) -> None:
        now = time.time()
        # One commit, not one per row: each commit grows the WAL, and its checkpoints stall restores.
        with self.transaction():
            self.db.executemany("UPDATE blocks SET last_used=? WHERE hash=?", [(now, h) for h in hashes])
            self.db.execute("UPDATE tails SET last_used=? WHERE agent=?", (now, agent))

    def drop_block(self, block_hash: str) -> None:
        """Forget a block (it was bad or evicted) and every chain link from it on."""
        for r in self.db.execute("SELECT agent, pos FROM chains WHERE hash=?", (block_hash,)).fetchall():
            self.cut_chain(r["agent"], r["pos"])
        self._delete_block(block_hash)

    def cut_chain(self, agent: str, pos: int) -> None:
        """Forget an agent's chain from block `pos` on, and its tail (which only continues the whole chain)."""
        self.db.execute("DELETE FROM chains WHERE agent=? AND pos>=?", (agent, pos))
        self.drop_tail(agent)

    def drop_tail(self, agent: str) -> None:
        tail = self.tail(agent)
        self.db.execute("DELETE FROM tails WHERE agent=?", (agent,))
        if tail:
            self._remove_tail(tail.file)

    def _remove_tail(self, name: str) -> None:
        self.after_commit(lambda: blockfile.remove_tail(name))

    def drop_agent(self, agent: str) -> None:
        """Move an agent to cold: its chain and tail go; shared blocks stay for others."""
        self.db.execute("DELETE FROM chains WHERE agent=?", (agent,))
        self.drop_tail(agent)

    def release_agent(self, agent: str) -> int:
        """Drop an agent's cache and free the blocks only it used; returns bytes freed."""
        with self.transaction():
            own = set(self.chain(agent))
            tail = self.tail(agent)
            # A tail hard-linked by a fork stays on disk for the fork.
            freed = tail.nbytes if tail is not None and blockfile.tail_links(tail.file) == 1 else 0
            self.drop_agent(agent)
            freed += self.free_blocks(sorted(own))
        return freed

    def free_blocks(self, hashes: list[str]) -> int:
        """Delete those of these blocks that no chain names now (one may have gained a
        user since the caller looked); returns bytes freed."""
        freed = 0
        with self.transaction():
            still_used = self.refcounts()
            for row in self.blocks(hashes).values():
                if row.hash not in still_used:
                    self._delete_block(row.hash)
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
                self._remove_tail(tail.file)

    def _link_tail(self, tail: TailRow, agent: str) -> bool:
        """Give `agent` a hard link to `tail`'s file (instant, no bytes copied)."""
        link = blockfile.link_tail(tail.file, agent, tail.checksum)
        if link is None:
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
            self._delete_block(r["hash"])
        return sum(r["nbytes"] for r in rows)

    def _delete_block(self, block_hash: str) -> None:
        """The block's row and its file (callers have dealt with the chains that name it)."""
        self.db.execute("DELETE FROM blocks WHERE hash=?", (block_hash,))
        self.after_commit(lambda: blockfile.remove_block(block_hash))

    def total_bytes(self) -> int:
        b = self.db.execute("SELECT COALESCE(SUM(nbytes),0) FROM blocks").fetchone()[0]
        t = self.db.execute("SELECT COALESCE(SUM(nbytes),0) FROM tails").fetchone()[0]
        return int(b + t)


def _tail(r: sqlite3.Row) -> TailRow:
    return TailRow(r["agent"], r["model"], r["start"], r["n_tokens"], r["file"], r["nbytes"], r["checksum"], r["last_used"])
