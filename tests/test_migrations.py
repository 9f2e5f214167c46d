"""Versioned databases: a transcript database and a KV index written by the last
release before versioning (user_version 0) upgrade in place without losing a row,
and a database from a newer release is refused, untouched, with exit code 9."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from array import array
from contextlib import closing
from pathlib import Path

import pytest
from conftest import run_cli

from semantic_cli.db import schema_version
from semantic_cli.errors import EXIT_VERSION, StoreVersionError
from semantic_cli.kv.index import MIGRATIONS as INDEX_MIGRATIONS
from semantic_cli.kv.index import BlockRow, KVIndex, TailRow
from semantic_cli.store import MIGRATIONS as STORE_MIGRATIONS
from semantic_cli.store import Agent, Store

# ---- the previous release's schemas, verbatim (store.py and kvindex.py at c8eb5ba) ----
OLD_STORE_SCHEMA = """
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

OLD_INDEX_SCHEMA = """
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

LATEST_STORE = len(STORE_MIGRATIONS)
LATEST_INDEX = len(INDEX_MIGRATIONS)

# ---- the rows: every table, with the awkward values (persona on two lines, meta, an interrupted reply) ----
T0 = 1_700_000_000.25
AGENTS = [
    Agent("planner", "/models/SmolLM2", "You plan.\nBriefly.", {"temp": 0.2, "max_tokens": 64}, T0, T0 + 300.5),
    Agent("critic", "mlx-community/Qwen3-0.6B-4bit", "", {}, T0 + 10, T0 + 200),
    Agent("idle", "default", "Waits.", {}, T0 + 20, T0 + 20),
]
# (agent, role, content, status, created_at, meta)
MESSAGES = [
    ("planner", "user", "Plan a trip to **Paris**.", "complete", T0 + 100, {}),
    ("planner", "assistant", "Day 1: the Louvre.", "complete", T0 + 101, {"finish_reason": "stop", "generated_tokens": 6}),
    ("critic", "user", "Review the plan.", "complete", T0 + 150, {}),
    ("critic", "assistant", "Too long.", "complete", T0 + 151, {"finish_reason": "stop"}),
    ("planner", "user", "And then?", "complete", T0 + 300, {}),
    ("planner", "assistant", "Day 2: cafés and", "interrupted", T0 + 300.5, {"finish_reason": "interrupted"}),
]
# (agent, tokenizer, token ids)
CHUNKS = [
    ("planner", "tok-smol", [1, 9906, 11, 4_000_000_000]),
    ("critic", "tok-qwen", [151644, 872, 198]),
    ("planner", "tok-smol", list(range(600))),
]
ROOMS = [("team", ["planner", "critic"])]

SHARED, OWN, STALE = "ab" * 16, "cd" * 16, "ef" * 16
BLOCKS = [
    BlockRow(SHARED, "fp-smol", "", 256, 11_796_480, "c1", T0 + 160),
    BlockRow(OWN, "fp-smol", SHARED, 256, 11_796_480, "c2", T0 + 301),
    BlockRow(STALE, "fp-old", "", 256, 5_000_000, "c3", T0 + 5),
]
BLOCK_CREATED = {SHARED: T0 + 101, OWN: T0 + 300, STALE: T0}
# (agent, pos, hash, model)
CHAINS = [("planner", 0, SHARED, "fp-smol"), ("planner", 1, OWN, "fp-smol"), ("critic", 0, SHARED, "fp-smol")]
TAILS = [
    TailRow("planner", "fp-smol", 512, 92, "planner-1.kv", 4_239_360, "t1", T0 + 301),
    TailRow("critic", "fp-smol", 256, 3, "critic-1.kv", 138_240, "t2", T0 + 160),
]


def store_path(home: Path) -> Path:
    return home / "data" / "semantic.db"


def index_path(home: Path) -> Path:
    return home / "cache" / "index.db"


def _open_as_before(path: Path, synchronous: str) -> sqlite3.Connection:
    """As the previous release's db.connect did: a private file, WAL, autocommit."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    return db


def write_old_store(path: Path) -> None:
    db = _open_as_before(path, "FULL")
    db.execute("PRAGMA foreign_keys=ON")
    db.executescript(OLD_STORE_SCHEMA)
    for a in AGENTS:
        db.execute(
            "INSERT INTO agents(name, model, system, settings, created_at, last_active) VALUES (?,?,?,?,?,?)",
            (a.name, a.model, a.system, json.dumps(a.settings), a.created_at, a.last_active),
        )
    for agent, role, content, status, created, meta in MESSAGES:
        db.execute(
            "INSERT INTO messages(agent, role, content, status, created_at, meta) VALUES (?,?,?,?,?,?)",
            (agent, role, content, status, created, json.dumps(meta)),
        )
    for agent, tokenizer, tokens in CHUNKS:
        db.execute("INSERT INTO token_chunks(agent, tokenizer, tokens) VALUES (?,?,?)", (agent, tokenizer, array("I", tokens).tobytes()))
    for name, members in ROOMS:
        db.execute("INSERT OR REPLACE INTO rooms(name, agents) VALUES (?,?)", (name, json.dumps(members)))
    assert schema_version(db) == 0
    db.close()


def write_old_index(path: Path) -> None:
    db = _open_as_before(path, "NORMAL")
    db.executescript(OLD_INDEX_SCHEMA)
    for b in BLOCKS:
        db.execute(
            "INSERT OR REPLACE INTO blocks(hash, model, parent, n_tokens, nbytes, checksum, created, last_used) VALUES (?,?,?,?,?,?,?,?)",
            (b.hash, b.model, b.parent, b.n_tokens, b.nbytes, b.checksum, BLOCK_CREATED[b.hash], b.last_used),
        )
    db.executemany("INSERT INTO chains(agent, pos, hash, model) VALUES (?,?,?,?)", CHAINS)
    for t in TAILS:
        db.execute(
            "INSERT OR REPLACE INTO tails(agent, model, start, n_tokens, file, nbytes, checksum, last_used) VALUES (?,?,?,?,?,?,?,?)",
            (t.agent, t.model, t.start, t.n_tokens, t.file, t.nbytes, t.checksum, t.last_used),
        )
    assert schema_version(db) == 0
    db.close()


@pytest.fixture
def old_home(home: Path) -> Path:
    """SEMANTIC_HOME holding both databases exactly as the previous release left them."""
    write_old_store(store_path(home))
    write_old_index(index_path(home))
    return home


def version_of(path: Path) -> int:
    with closing(sqlite3.connect(path)) as db:
        return schema_version(db)


def schema_of(path: Path) -> list[tuple]:
    with closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name").fetchall()


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def tokens_of(agent: str) -> list[int]:
    return [t for a, _, tokens in CHUNKS if a == agent for t in tokens]


# ---- upgrade ----------------------------------------------------------------
def test_old_databases_upgrade_in_place_with_every_row(old_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with closing(Store()) as store:
        assert schema_version(store.db) == LATEST_STORE == 3
        assert store.list_agents() == sorted(AGENTS, key=lambda a: a.name)
        for a in AGENTS:
            got = [(m.agent, m.role, m.content, m.status, m.created_at, m.meta) for m in store.messages(a.name)]
            assert got == [m for m in MESSAGES if m[0] == a.name]
        assert [m.id for m in store.messages("planner")] == [1, 2, 5, 6]  # ids kept: they order the transcript
        assert store.token_log("planner", "tok-smol") == tokens_of("planner")
        assert store.token_log("critic", "tok-qwen") == tokens_of("critic")
        assert store.token_log("idle", "tok-smol") is None
        assert store.token_counts() == {"planner": len(tokens_of("planner")), "critic": 3}
        assert store.get_room("team") == ["planner", "critic"]
        # The upgraded database takes new turns after the old ones.
        store.record_turn("critic", [("user", "Why?", "complete", {}), ("assistant", "Costs.", "complete", {})], "tok-qwen", [7, 8], False)
        assert [m.content for m in store.messages("critic")] == ["Review the plan.", "Too long.", "Why?", "Costs."]
        assert store.token_log("critic", "tok-qwen") == [*tokens_of("critic"), 7, 8]

    with closing(KVIndex()) as index:
        assert schema_version(index.db) == LATEST_INDEX == 1
        assert sorted(index.all_blocks(), key=lambda b: b.hash) == sorted(BLOCKS, key=lambda b: b.hash)
        assert index.chains() == {"critic": [SHARED], "planner": [SHARED, OWN]}
        assert sorted(index.all_tails(), key=lambda t: t.agent) == sorted(TAILS, key=lambda t: t.agent)
        assert index.refcounts() == {SHARED: 2, OWN: 1}
        created = dict(index.db.execute("SELECT hash, created FROM blocks").fetchall())
        assert created == BLOCK_CREATED

    # The upgraded files are what a fresh install creates, plus the rows.
    assert version_of(store_path(old_home)) == LATEST_STORE and version_of(index_path(old_home)) == 1
    monkeypatch.setenv("SEMANTIC_HOME", str(tmp_path / "fresh"))
    Store().close()
    KVIndex().close()
    assert schema_of(store_path(old_home)) == schema_of(store_path(tmp_path / "fresh"))
    assert schema_of(index_path(old_home)) == schema_of(index_path(tmp_path / "fresh"))


def test_a_version_1_store_gains_summaries_without_losing_a_row(old_home: Path) -> None:
    """Version 2 (compaction summaries): a store the previous versioned release wrote
    upgrades in place, every row kept, and the index for per-role lookups is there."""
    with closing(sqlite3.connect(store_path(old_home))) as db:
        db.execute("PRAGMA user_version=1")
        db.commit()
    with closing(Store()) as store:
        assert schema_version(store.db) == LATEST_STORE
        for a in AGENTS:
            got = [(m.agent, m.role, m.content, m.status, m.created_at, m.meta) for m in store.messages(a.name)]
            assert got == [m for m in MESSAGES if m[0] == a.name]
        assert store.token_log("planner", "tok-smol") == tokens_of("planner")
        indexes = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "messages_role" in indexes
        store.add_summary("planner", "They planned.", {"through": 2})
        assert [m.role for m in store.messages("planner")][-1] == "summary"
        assert store.token_log("planner", "tok-smol") is None  # the prefix changed: re-rendered next turn


def test_a_version_2_store_gains_the_retry_journal_without_losing_a_row(old_home: Path) -> None:
    """Version 3 (the /retry journal, takeback.py): a store the version-2 release wrote
    upgrades in place, every row kept, and a retry's cut there is journaled and put back
    whole by the recovery a killed retry leaves to the next opening."""
    from semantic_cli import takeback

    with closing(sqlite3.connect(store_path(old_home))) as db:
        db.execute(STORE_MIGRATIONS[1][0])  # what version 2 added
        db.execute("PRAGMA user_version=2")
        db.commit()
    with closing(Store()) as store:
        assert schema_version(store.db) == LATEST_STORE == 3
        before = {a.name: (store.messages(a.name), store.log_tokens(a.name)) for a in AGENTS}
        for a in AGENTS:
            got = [(m.agent, m.role, m.content, m.status, m.created_at, m.meta) for m in before[a.name][0]]
            assert got == [m for m in MESSAGES if m[0] == a.name]
            assert before[a.name][1] == tokens_of(a.name)
        assert takeback.pending(store.db) == []
        last = [m.id for m in before["planner"][0][-2:]]
        takeback.cut(store.db, "planner", last, 1, journal=True)  # a retry of the interrupted last turn, then a kill
        assert takeback.pending(store.db) == ["planner"] and len(store.messages("planner")) == 2
        assert takeback.recover(store.db, "planner") == "restored"
        assert (store.messages("planner"), store.log_tokens("planner")) == before["planner"]  # ids, times and the log too
        assert takeback.pending(store.db) == [] and store.db.execute("SELECT COUNT(*) FROM retry_chunks").fetchone()[0] == 0


def test_old_databases_upgrade_through_the_cli(old_home: Path) -> None:
    r = run_cli("agents", "ls", "--json")
    assert r.returncode == 0, r.stderr.decode()
    assert version_of(store_path(old_home)) == LATEST_STORE and version_of(index_path(old_home)) == 1
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert list(rows) == ["critic", "idle", "planner"]
    for a in AGENTS:
        row = rows[a.name]
        assert (row["model"], row["system"], row["settings"]) == (a.model, a.system, a.settings)
        assert (row["created_at"], row["last_active"]) == (iso(a.created_at), iso(a.last_active))
    assert {n: r["turns"] for n, r in rows.items()} == {"planner": 2, "critic": 1, "idle": 0}
    assert {n: r["transcript_tokens"] for n, r in rows.items()} == {"planner": 604, "critic": 3, "idle": 0}
    assert {n: r["cached_tokens"] for n, r in rows.items()} == {"planner": 256 + 256 + 92, "critic": 256 + 3, "idle": 0}

    for a in AGENTS:
        r = run_cli("agents", "show", a.name, "--json")
        assert r.returncode == 0, r.stderr.decode()
        doc = json.loads(r.stdout)
        assert doc["agent"]["system"] == a.system
        got = [(m["role"], m["content"], m["status"], m["created_at"], m["meta"]) for m in doc["messages"]]
        assert got == [(role, text, status, iso(ts), meta) for who, role, text, status, ts, meta in MESSAGES if who == a.name]

    r = run_cli("cache", "ls", "--json")
    assert r.returncode == 0, r.stderr.decode()
    found = json.loads(r.stdout)
    assert (found["blocks"], found["stale_blocks"], found["stale_bytes"]) == (3, 1, 5_000_000)
    assert found["total_bytes"] == sum(b.nbytes for b in BLOCKS) + sum(t.nbytes for t in TAILS)
    agents = {a["agent"]: a for a in found["agents"]}
    planner, critic, idle = agents["planner"], agents["critic"], agents["idle"]
    assert (planner["blocks_own"], planner["blocks_shared"], planner["cached_tokens"], planner["tier"]) == (1, 1, 604, "warm")
    assert planner["bytes_own"] == 11_796_480 + 4_239_360 and planner["bytes_shared"] == 11_796_480
    assert planner["last_used"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + 301)) and planner["transcript_tokens"] == 604
    assert (critic["blocks_own"], critic["blocks_shared"], critic["cached_tokens"], critic["bytes_own"]) == (0, 1, 259, 138_240)
    assert (idle["tier"], idle["cached_tokens"], idle["model"]) == ("cold", 0, "default")
    assert version_of(store_path(old_home)) == LATEST_STORE and version_of(index_path(old_home)) == 1


# ---- a newer release's database ---------------------------------------------
BUMP_AND_DIE = """
import os, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA user_version=99")
db.execute("CREATE TABLE IF NOT EXISTS from_the_future (x)")
db.execute("INSERT INTO from_the_future VALUES (1)")
os._exit(0)  # killed before closing: the WAL stays, holding the newest pages
"""


def bump_to_99(path: Path, leave_wal: bool) -> None:
    if leave_wal:
        subprocess.run([sys.executable, "-c", BUMP_AND_DIE, str(path)], check=True)
        assert Path(f"{path}-wal").stat().st_size > 0
    else:
        with closing(sqlite3.connect(path, isolation_level=None)) as db:
            db.execute("PRAGMA user_version=99")
        assert not Path(f"{path}-wal").exists()


def snapshot(path: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for name in (path.name, f"{path.name}-wal"):
        f = path.with_name(name)
        out[name] = f.read_bytes() if f.exists() else None
    return out


@pytest.mark.parametrize("leave_wal", [False, True], ids=["checkpointed", "wal-left-behind"])
@pytest.mark.parametrize(
    ("which", "commands"),
    [
        ("transcript", [("agents", "ls"), ("agents", "show", "planner", "--json"), ("cache", "ls", "--json")]),
        ("index", [("agents", "ls", "--json"), ("cache", "ls")]),
    ],
)
def test_newer_database_is_refused_and_untouched(old_home: Path, which: str, commands: list[tuple[str, ...]], leave_wal: bool) -> None:
    path = store_path(old_home) if which == "transcript" else index_path(old_home)
    bump_to_99(path, leave_wal)
    before = snapshot(path)
    for args in commands:
        r = run_cli(*args)
        err = r.stderr.decode()
        assert r.returncode == EXIT_VERSION == 9, (args, r.returncode, err)
        assert err.startswith("semantic: error: ") and err.count("\n") == 1, err
        assert str(path) in err and "schema version 99" in err and "upgrade semantic" in err, err
        assert "Traceback" not in err and r.stdout == b""
        assert snapshot(path) == before, f"{args} changed {path}"

    opener = Store if which == "transcript" else KVIndex
    with pytest.raises(StoreVersionError, match="upgrade semantic"):
        opener()
    assert snapshot(path) == before


def test_a_negative_schema_version_is_refused_not_sliced(old_home: Path) -> None:
    """migrations[found:] with found < 0 would skip steps and stamp the latest version."""
    path = store_path(old_home)
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA user_version=-1")
    before = snapshot(path)
    r = run_cli("agents", "ls")
    assert r.returncode == EXIT_VERSION and "schema version -1" in r.stderr.decode(), r.stderr
    assert snapshot(path) == before


def test_a_database_being_created_by_another_process_is_waited_for(tmp_path):
    """SQLite answers `PRAGMA journal_mode=WAL` with "database is locked" at once, without
    its busy timeout, while another connection holds the new file's lock (two `semantic
    chat` starting together on a fresh home): connect waits for it instead of failing."""
    import threading

    from semantic_cli.db import connect

    path = tmp_path / "new.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # the other process, half-way through creating it (a RESERVED lock)
    threading.Timer(0.5, lambda: other.execute("COMMIT")).start()
    db = connect(path, "FULL", [("CREATE TABLE t (x)",)], "a test database")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        db.close()
        other.close()


# ---- concurrency and failure ------------------------------------------------
def rows_of(path: Path) -> dict[str, list[tuple]]:
    """Every row of the previous release's tables, in rowid order."""
    with closing(sqlite3.connect(path)) as db:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in ("agents", "messages", "token_chunks", "rooms")}


OPEN_THE_STORE = """
from semantic_cli.store import Store
store = Store()
print(store.db.execute("PRAGMA user_version").fetchone()[0], len(store.list_agents()))
store.close()
"""


def _has_open(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def test_two_processes_upgrading_one_old_store_at_once_both_succeed(old_home: Path, tmp_path: Path) -> None:
    """Both read the old version, then wait for the write lock (held here until both do):
    the one that gets it second finds the store already upgraded and runs no step again."""
    path = store_path(old_home)
    before = rows_of(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # as a third process would, mid-write
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_THE_STORE], stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    try:
        deadline = time.monotonic() + 60
        while not all(_has_open(p.pid, path) for p in procs):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "the processes never opened the store"
            time.sleep(0.02)
        time.sleep(2.0)  # both past reading the version, waiting on BEGIN IMMEDIATE
        assert all(p.poll() is None for p in procs)
        assert version_of(path) == 0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    results = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err.decode()
        assert out.decode().split() == [str(LATEST_STORE), str(len(AGENTS))]
    assert version_of(path) == LATEST_STORE
    assert rows_of(path) == before
    fresh = tmp_path / "fresh.db"
    Store(fresh).close()
    assert schema_of(path) == schema_of(fresh)


def test_a_migration_that_fails_partway_changes_nothing(old_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step, and the version, in one transaction: a failure in the last statement of
    the last step leaves the version, the schema and every row as they were, and the next
    opening upgrades it whole."""
    from semantic_cli import store as store_module
    from semantic_cli.errors import SemanticError

    path = store_path(old_home)
    before = (version_of(path), schema_of(path), rows_of(path))
    failing_last_step = (*STORE_MIGRATIONS[-1], "INSERT INTO no_such_table VALUES (1)")
    monkeypatch.setattr(store_module, "MIGRATIONS", [*STORE_MIGRATIONS[:-1], failing_last_step])
    with pytest.raises((sqlite3.Error, SemanticError), match="no_such_table"):
        Store()
    assert (version_of(path), schema_of(path), rows_of(path)) == before
    monkeypatch.setattr(store_module, "MIGRATIONS", STORE_MIGRATIONS)  # (not undo(): that would drop SEMANTIC_HOME too)
    with closing(Store()) as store:
        assert schema_version(store.db) == LATEST_STORE
    assert rows_of(path) == before[2]
