"""/retry's journal (takeback.py): a retry killed at any moment loses no exchange.

The rules of recovery on a real store (what was recorded since the cut decides), what
makes a journal entry moot, who may recover it (never while its retry runs), and real
crashes: a REPL SIGKILLed in the middle of a retried reply, and one killed just after
recording it.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

import pexpect
import pytest
from conftest import SEMANTIC, run_cli
from helpers import uncached_reply_end

from semantic_cli import history, takeback
from semantic_cli.errors import SemanticError
from semantic_cli.kv.index import KVIndex
from semantic_cli.locks import AgentLock, retry_lock, retrying
from semantic_cli.store import Store

Row = tuple[Any, ...]


@pytest.fixture
def store(home: Path) -> Iterator[Store]:
    with closing(Store()) as s:
        yield s


def rows(store: Store, name: str = "a") -> list[Row]:
    return [(m.id, m.role, m.content, m.status, m.created_at, m.meta) for m in store.messages(name)]


def turn(store: Store, user: str, reply: str | None, status: str = "complete", name: str = "a") -> None:
    messages = [("user", user, "complete", {})] + ([("assistant", reply, status, {})] if reply is not None else [])
    store.record_turn(name, messages, "tok", [len(user), len(reply or "")], False)


def two_turns(store: Store, name: str = "a") -> tuple[list[Row], list[int]]:
    store.create_agent(name, "m")
    turn(store, "hi", "hello", name=name)
    turn(store, "and then?", "then this", name=name)
    return rows(store, name), store.log_tokens(name)


def retry_cut(store: Store, name: str = "a") -> None:
    """What /retry's cut does: the last exchange and its log chunk go, into the journal."""
    takeback.cut(store.db, name, [r[0] for r in rows(store, name)[-2:]], len(store.chunk_sizes(name)) - 1, journal=True)


# ---- the rules of recovery ------------------------------------------------------------
@pytest.mark.parametrize("since", ["nothing", "unanswered", "interrupted"])
def test_a_retry_killed_before_its_reply_was_recorded_whole_is_put_back(store, since):
    """Killed mid-reply (nothing recorded), or after a cut reply was recorded (Ctrl-C, a
    server gone) but before the put-back: the old exchange and its log come back, ids and all."""
    before = two_turns(store)
    retry_cut(store)
    assert len(rows(store)) == 2 and takeback.pending(store.db) == ["a"]
    if since != "nothing":
        turn(store, "and then?", "the new rep" if since == "interrupted" else None, "interrupted")
    assert takeback.recover(store.db, "a") == "restored"
    assert (rows(store), store.log_tokens("a")) == before
    assert takeback.pending(store.db) == [] and takeback.recover(store.db, "a") is None


def test_a_retry_that_finished_before_the_kill_keeps_its_new_reply(store):
    two_turns(store)
    retry_cut(store)
    turn(store, "and then?", "a better reply")
    after = rows(store), store.log_tokens("a")
    assert takeback.recover(store.db, "a") == "finished"
    assert (rows(store), store.log_tokens("a")) == after and [r[2] for r in after[0]][-1] == "a better reply"
    assert takeback.pending(store.db) == []


@pytest.mark.parametrize("retried", [False, True])
def test_turns_another_client_recorded_since_stay(store, retried):
    two_turns(store)
    retry_cut(store)
    if retried:
        turn(store, "and then?", "the new reply")
    turn(store, "from elsewhere", "noted")
    after = rows(store), store.log_tokens("a")
    assert takeback.recover(store.db, "a") == "overtaken"
    assert (rows(store), store.log_tokens("a")) == after and takeback.pending(store.db) == []


@pytest.mark.parametrize("change", ["reset", "persona", "summary", "undo"])
def test_what_changes_the_ground_of_a_put_back_drops_the_entry(store, change):
    """Putting the old exchange and log back after these would contradict them (a log under
    another persona, a conversation the user erased): the retry's put-back is refused."""
    two_turns(store)
    retry_cut(store)
    if change == "reset":
        store.reset_agent("a")
    elif change == "persona":
        store.update_agent(store.get_agent("a"), system="Someone else.")
    elif change == "summary":
        store.add_summary("a", "They talked.", {"through": rows(store)[-1][0]})
    else:
        takeback.cut(store.db, "a", [r[0] for r in rows(store)], 0)
    after = rows(store)
    assert takeback.pending(store.db) == [] and takeback.recover(store.db, "a") is None
    with pytest.raises(SemanticError, match="changed since the retry began"):
        takeback.put_back(store.db, "a")
    assert rows(store) == after


def test_the_entry_follows_a_rename_and_goes_with_its_agent(store):
    before = two_turns(store)
    retry_cut(store)
    store.rename_agent("a", "b")
    assert takeback.pending(store.db) == ["b"]
    assert takeback.recover(store.db, "b") == "restored"
    assert ([r[1:] for r in rows(store, "b")], store.log_tokens("b")) == ([r[1:] for r in before[0]], before[1])
    retry_cut(store, "b")
    store.delete_agent("b")
    assert takeback.pending(store.db) == []
    assert store.db.execute("SELECT (SELECT COUNT(*) FROM retry_messages) + (SELECT COUNT(*) FROM retry_chunks)").fetchone()[0] == 0


def test_nothing_recovers_an_entry_while_its_retry_runs(store):
    """A REPL whose turns a server runs holds the agent's lock only for its slash commands:
    the retry lock keeps every other opener (the server's turn included) off its entry."""
    before = two_turns(store)
    retry_cut(store)
    with closing(KVIndex()) as index:
        lock = retry_lock("a").acquire()  # as another process would hold it (a lock of its own open file)
        try:
            assert history.recover_retry(store, lambda: index, "a", 16) is None
        finally:
            lock.release()
        with retrying("a"):  # this process's own retry
            assert history.recover_retry(store, lambda: index, "a", 16) is None
        assert len(rows(store)) == 2 and takeback.pending(store.db) == ["a"]
        assert history.recover_retry(store, lambda: index, "a", 16) == history.RECOVERED["restored"]
    assert (rows(store), store.log_tokens("a")) == before


def test_a_recovery_that_fails_releases_the_agent_and_runs_again_at_the_next_opening(store, monkeypatch):
    """A recovery that raises (a full disk, a locked database) must not leave the agent held
    by this process (a server would answer "busy" for it until it exits), nor skip the
    recovery at the next opening (turns would then be recorded over the cut)."""
    from semantic_cli.chat import Chat
    from semantic_cli.locks import holder

    before = two_turns(store)
    retry_cut(store)
    real = takeback.recover

    def full_disk(db: sqlite3.Connection, name: str) -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    chat = Chat(store)
    try:
        monkeypatch.setattr(takeback, "recover", full_disk)
        with pytest.raises(sqlite3.OperationalError):
            chat.open_agent("a")
        assert "a" not in chat.locks and holder("a") is None
        monkeypatch.setattr(takeback, "recover", real)
        chat.open_agent("a")
        assert chat.recovered["a"].startswith("the previous reply is back")
        assert (rows(store), store.log_tokens("a")) == before
    finally:
        chat.close()


def test_agents_show_and_ls_recover_an_agent_no_process_holds(store):
    before = two_turns(store)
    retry_cut(store)
    with AgentLock("a"):  # a process has it open (and so recovers it itself): shown as it is
        busy = run_cli("agents", "show", "a", "--json")
        assert busy.returncode == 0 and busy.stderr.decode() == "a: a /retry is running: its previous reply is set aside until it ends\n"
        assert len(json.loads(busy.stdout)["messages"]) == 2
    shown = run_cli("agents", "show", "a", "--json")
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr.decode() == "a: the previous reply is back: a /retry did not finish (its process ended)\n"
    assert len(json.loads(shown.stdout)["messages"]) == 4 and (rows(store), store.log_tokens("a")) == before
    retry_cut(store)
    listed = run_cli("agents", "ls", "--json")
    assert "a: the previous reply is back" in listed.stderr.decode() and json.loads(listed.stdout)[0]["turns"] == 2


@pytest.mark.parametrize("command", [["agents", "edit", "a", "--system", "New."], ["agents", "trim", "a", "--keep-last", "5", "-y"]])
def test_agents_commands_that_change_an_agent_recover_it_first(store, command):
    """Else a new persona would drop the entry, and the old exchange with it."""
    before = two_turns(store)
    retry_cut(store)
    r = run_cli(*command)
    assert r.returncode == 0 and "a: the previous reply is back" in r.stderr.decode(), r.stderr
    assert rows(store) == before[0] and takeback.pending(store.db) == []


def test_a_repl_whose_turns_a_server_runs_recovers_before_a_slash_command_changes_the_agent(store, capsys):
    """Such a REPL opens no agent (it takes the lock only for a change): /undo first puts back
    what a killed retry left, then takes the last exchange back."""
    from semantic_cli.chat import Chat
    from semantic_cli.cli import slash
    from semantic_cli.cli.repl import Repl
    from semantic_cli.turn import GenSettings

    before = two_turns(store)
    retry_cut(store)
    chat = Chat(store)
    try:
        repl = Repl(chat, [chat.peek_agent("a")], GenSettings(), remote="/nonexistent.sock")
        slash.dispatch(repl, "/undo")
    finally:
        chat.close()
    assert "a: the previous reply is back: a /retry did not finish" in capsys.readouterr().err
    assert rows(store) == before[0][:2] and takeback.pending(store.db) == []


def test_a_server_says_what_it_recovered_with_the_agents_next_turn(tiny, home):
    """A server opens the agent for a client's turn: the line comes as that turn's Notice."""
    from helpers import Session

    with Session() as s:
        s.say("a", "hello there", model=tiny["llama"])
        s.say("a", "tell me more")
        before = rows(s.store)
        retry_cut(s.store)
    with Session() as s:
        s.say("a", "why so?")
        assert s.notices == [history.RECOVERED["restored"]]
        assert rows(s.store)[:4] == before and len(rows(s.store)) == 6
        # A second recovery in the same process (a server's life) is said too, not only the first.
        s.chat.release("a")  # as a server does after each turn
        retry_cut(s.store)
        s.say("a", "and again?")
        assert s.notices == [history.RECOVERED["restored"]] * 2


# ---- real crashes ---------------------------------------------------------------------
def messages_of(home: Path, name: str) -> list[Row]:
    with closing(sqlite3.connect(home / "data" / "semantic.db")) as db:
        return db.execute("SELECT id, role, content, status, created_at, meta FROM messages WHERE agent=? ORDER BY id", (name,)).fetchall()


def log_of(home: Path, name: str) -> list[bytes]:
    with closing(sqlite3.connect(home / "data" / "semantic.db")) as db:
        return [r[0] for r in db.execute("SELECT tokens FROM token_chunks WHERE agent=? ORDER BY id", (name,))]


def journaled(home: Path) -> list[str]:
    with closing(sqlite3.connect(home / "data" / "semantic.db")) as db:
        return [r[0] for r in db.execute("SELECT agent FROM retries")]


def say(name: str, text: str, *flags: str) -> dict:
    r = run_cli("chat", "-a", name, "--max-tokens", "8", "--json", *flags, "-m", text)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def repl(*args: str, env: dict | None = None) -> pexpect.spawn:
    env = dict(os.environ, TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1", **(env or {}))
    child = pexpect.spawn(SEMANTIC, ["chat", *args], env=env, dimensions=(40, 120), timeout=60)
    child.expect(r"a(\x1b\[[0-9;]*m)*>")  # the prompt, drawn in bold
    return child


def test_a_repl_killed_in_the_middle_of_a_retried_reply_loses_nothing(tiny, home, monkeypatch):
    """SIGKILL while /retry's new reply streams: the next command that opens the agent puts
    the old exchange back (ids, log and all), says so in one line, and the next turn is the
    one an agent that never retried gives, cache included."""
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "16")  # small blocks: the conversation fills some
    say("a", "hello there", "--model", str(tiny["llama"]))
    say("a", "tell me more")
    assert run_cli("agents", "fork", "a", "ref").returncode == 0  # the same conversation, never retried
    before, log = messages_of(home, "a"), log_of(home, "a")
    covered = sum(map(len, log)) // 4 - uncached_reply_end()  # the cache: the log but the reply's last token (CPU)
    child = repl("-a", "a", "--max-tokens", "3000")
    try:
        child.send("/retry\r")
        deadline = time.monotonic() + 60
        while not journaled(home) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert journaled(home) == ["a"], "the retry never cut the exchange"
        drawn = b""
        while len(drawn) < 2000 and time.monotonic() < deadline:  # its reply is streaming
            with suppress(pexpect.TIMEOUT):
                drawn += child.read_nonblocking(1 << 16, 0.1)
        assert messages_of(home, "a") == before[:2]  # the old exchange is only in the journal now
        child.kill(signal.SIGKILL)
        child.wait()
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)
    shown = run_cli("agents", "show", "a", "--json")
    assert shown.returncode == 0 and shown.stderr.decode() == "a: the previous reply is back: a /retry did not finish (its process ended)\n"
    assert (messages_of(home, "a"), log_of(home, "a")) == (before, log) and journaled(home) == []
    with closing(KVIndex()) as index:  # the blocks of the old exchange are the agent's again (eviction, `agents ls`)
        assert index.chain("a") == index.chain("ref") and len(index.chain("a")) == covered // 16
    nxt, ref = say("a", "why so?"), say("ref", "why so?")
    assert (nxt["reply"], nxt["prompt_tokens"]) == (ref["reply"], ref["prompt_tokens"])
    assert (nxt["cache_tier"], nxt["cached_tokens"]) == ("warm", covered)  # the old exchange's cache serves again
    assert [m[1:4] for m in messages_of(home, "a")] == [m[1:4] for m in messages_of(home, "ref")]
    assert messages_of(home, "a")[:4] == before and log_of(home, "a") == log_of(home, "ref")


def test_a_repl_killed_just_after_its_retry_was_recorded_keeps_the_new_reply(tiny, home):
    """Killed after the retried turn's commit, before the journal entry went: the next
    opening finds the new reply whole and keeps it."""
    say("a", "hello there", "--model", str(tiny["llama"]))
    say("a", "tell me more")
    before = messages_of(home, "a")
    child = repl("-a", "a", "--max-tokens", "6", env={"SEMANTIC_FAULT": "after-transcript-commit"})
    child.send("/retry\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.signalstatus == signal.SIGKILL and journaled(home) == ["a"]
    nxt = run_cli("chat", "-a", "a", "--max-tokens", "4", "-m", "why so?")
    assert nxt.returncode == 0 and nxt.stderr.decode() == "a: a /retry finished just before its process ended: the new reply stays\n"
    after = messages_of(home, "a")
    assert after[:2] == before[:2] and after[2][1:3] == before[2][1:3] and after[2][0] > before[3][0]  # the message, sent again
    assert (after[3][1], after[3][3]) == ("assistant", "complete") and len(after) == 6 and journaled(home) == []
