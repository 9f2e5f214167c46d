"""The KV cache failing inside a process: one warning, and the turns and transcript go on."""

from __future__ import annotations

import errno
import sqlite3

import pytest
from helpers import Session

from semantic_cli.kv import blockfile
from semantic_cli.kv import store as kv_store
from semantic_cli.kv.failures import CacheUnavailable
from semantic_cli.store import Store

UNAVAILABLE = "KV cache unavailable (disk I/O error): re-prefilling, and not caching this turn"
NOT_SAVED = "KV cache not saved (Input/output error); the conversation is saved and will re-prefill next time"


def test_an_index_that_cannot_be_opened_costs_a_re_prefill_and_one_warning(tiny, home, monkeypatch):
    def broken_index() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(kv_store, "KVIndex", broken_index)
    with Session() as s:
        first = s.say("a", "hello there", model=tiny["llama"])
        second = s.say("a", "and again")
        assert s.chat.kv.down == "disk I/O error"
        with pytest.raises(CacheUnavailable) as raised:  # down: nothing is written for the rest of the process
            s.chat.kv.mark_used("a")
        assert raised.value.already_down
    assert s.notices == [UNAVAILABLE]  # said once; the skipped saves say nothing more
    assert first.tier == "cold" and first.persisted is None
    assert second.tier == "hot" and second.persisted is None  # the hot tier still serves
    assert [m.role for m in Store().messages("a")] == ["user", "assistant"] * 2


@pytest.mark.parametrize("fault", ["nonsense-row", "unreadable-files"])
def test_a_hot_copy_serves_whatever_the_index_says(tiny, home, monkeypatch, fault):
    """Before using its hot copy a process asks the index whether the files go further
    (another process wrote a later turn). Rows that make no sense, or files that cannot
    be read once they claim to go further, must not cost the hot copy or the store."""
    from semantic_cli.kv.index import KVIndex

    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "16")
    with Session() as s:
        first = s.say("a", "hello there", model=tiny["llama"])
        index = KVIndex()
        value = "'x'" if fault == "nonsense-row" else "1000000"  # start as text; or a tail claiming far more tokens
        index.db.execute(f"UPDATE tails SET n_tokens={value} WHERE agent='a'")
        index.db.commit()
        index.close()
        if fault == "unreadable-files":

            def failing_blocks(self: KVIndex, hashes: list[str]) -> dict:
                raise sqlite3.OperationalError("disk I/O error")

            monkeypatch.setattr(KVIndex, "blocks", failing_blocks)
        second = s.say("a", "and again")
        assert s.chat.kv.down is None
    assert second.tier == "hot" and second.done.stats.cached_tokens == len(first.done.cached_log)
    assert [m.role for m in Store().messages("a")] == ["user", "assistant"] * 2


def test_a_cache_that_cannot_be_written_warns_and_is_tried_again(tiny, home, monkeypatch):
    tries: list[str] = []

    def failing_write(agent: str, *args: object) -> tuple[str, int, str]:
        tries.append(agent)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(blockfile, "write_tail", failing_write)
    with Session() as s:
        first = s.say("b", "hello there", model=tiny["llama"])
        second = s.say("b", "and again")
        assert s.chat.kv.down is None  # a failed save does not stop the next one
    assert tries == ["b", "b"]
    assert s.notices == [NOT_SAVED]  # each warning once per agent per process
    assert first.persisted is None and second.persisted is None
    assert [m.role for m in Store().messages("b")] == ["user", "assistant"] * 2


def test_a_damaged_index_db_is_one_clear_line_for_the_cache_commands_and_a_re_prefill_for_chat(tiny, home):
    """index.db is derived data: when it is not a database, the commands that manage the cache say so in
    one line (and what to do), and a chat turn still answers from the transcript."""
    from conftest import run_cli

    model = str(tiny["llama"])
    assert run_cli("chat", "-a", "a", "--model", model, "--max-tokens", "2", "-m", "hello").returncode == 0
    (home / "cache" / "index.db").write_bytes(b"this is not a database" * 100)
    (home / "cache" / "index.db-wal").unlink(missing_ok=True)
    for args in (("agents", "ls"), ("cache", "ls"), ("cache", "verify")):
        r = run_cli(*args)
        err = r.stderr.decode()
        assert r.returncode == 1 and err.count("\n") == 1 and "Traceback" not in err, (args, err)
        assert "index.db" in err and "only derived data" in err and "unexpected" not in err, err
    r = run_cli("chat", "-a", "a", "--max-tokens", "2", "-m", "still there?")
    assert r.returncode == 0 and "KV cache unavailable" in r.stderr.decode(), r.stderr
