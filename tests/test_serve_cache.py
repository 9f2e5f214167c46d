"""A served turn's cache is written after its reply has gone out: the agent's lock is held
until it is on disk, a chat process waits a moment for that lock, and what the write ran
into is said with the agent's next turn."""

from __future__ import annotations

import json
import threading
import time

import pytest
from conftest import fill_up, run_cli
from servers import Server

from semantic_cli.errors import EXIT_BUSY
from semantic_cli.locks import GRACE_S, AgentLock
from semantic_cli.turn import CACHE_NOT_SAVED as NOT_SAVED

ENV = {"SEMANTIC_BLOCK_TOKENS": "16"}


def _chat(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict, list[str]]:
    r = run_cli("chat", *args, "--json", timeout=120, env={**ENV, **(env or {})})
    out = json.loads(r.stdout) if r.returncode == 0 else {}
    return r.returncode, out, r.stderr.decode().strip().splitlines()


def test_the_cli_right_after_a_served_turn_resumes_its_cache_from_disk(tiny, home):
    model = str(tiny["llama"])
    with Server(home, model, env=ENV):
        for i in range(3):
            code, served, err = _chat("-a", "w", "--model", model, "--max-tokens", "4", "-m", f"tell me about blocks, part {i}")
            assert code == 0, err
            # at once, in a process of its own: the server may still hold the agent while it writes
            code, alone, err = _chat("-a", "w", "--no-server", "--max-tokens", "4", "-m", "and in a word?")
            assert code == 0, err
            assert alone["cache_tier"] == "warm" and alone["cached_tokens"] >= served["prompt_tokens"], alone


def test_a_lock_freed_within_the_grace_is_waited_for_and_one_held_longer_is_busy(tiny, home):
    assert GRACE_S >= 0.5
    model = str(tiny["llama"])
    code, _, err = _chat("-a", "g", "--model", model, "--max-tokens", "2", "-m", "hello")
    assert code == 0, err
    lock = AgentLock("g").acquire()
    # Freed 0.45 s from now: a new chat process asks for it sooner than that (~0.2 s here)
    # and, within its grace, waits; were it later, it would find the lock free.
    threading.Timer(0.45, lock.release).start()
    code, _, err = _chat("-a", "g", "--no-server", "--max-tokens", "2", "-m", "again")
    assert code == 0, err
    with AgentLock("g"):
        started = time.monotonic()
        code, _, err = _chat("-a", "g", "--no-server", "--max-tokens", "2", "-m", "and again")
        assert code == EXIT_BUSY and len(err) == 1 and "busy" in err[0], err
        assert time.monotonic() - started >= GRACE_S


def test_acquire_waits_out_a_lock_freed_within_its_grace_and_no_longer(home):
    """In one process (another open file of the lock is another holder): refused at once
    without a grace, refused once a grace of 0.3 s runs out while it is still held, and
    taken, freed 0.2 s in, within a grace of GRACE_S."""
    from semantic_cli.errors import BusyError

    held = AgentLock("h").acquire()
    started = time.monotonic()
    with pytest.raises(BusyError):
        AgentLock("h").acquire()
    assert time.monotonic() - started < 0.1
    with pytest.raises(BusyError):
        AgentLock("h").acquire(grace=0.3)
    assert time.monotonic() - started >= 0.3
    threading.Timer(0.2, held.release).start()
    started = time.monotonic()
    AgentLock("h").acquire(grace=GRACE_S).release()
    assert 0.15 <= time.monotonic() - started < GRACE_S


def test_a_cache_the_server_could_not_write_is_said_with_the_next_turn(tiny, home, tiny_cache_disk):
    model = str(tiny["llama"])
    with Server(home, model, env=ENV) as server:
        code, _, err = _chat("-a", "f", "--model", model, "--max-tokens", "4", "-m", "hello")
        assert code == 0 and len(err) == 1 and err[0].startswith("new agent 'f'"), err
        AgentLock("f").acquire(wait=True, timeout=30).release()  # its cache written: the disk fills after
        filler = fill_up(tiny_cache_disk)
        code, second, err = _chat("-a", "f", "--max-tokens", "8", "-m", "a longer message " * 20)
        assert code == 0 and err == [], err  # its reply went out before the write failed
        AgentLock("f").acquire(wait=True, timeout=30).release()  # the server holds it until the write is over
        filler.unlink()
        code, third, err = _chat("-a", "f", "--max-tokens", "4", "-m", "and now?")
        assert code == 0, err
        assert err == ["warning: f: after the last reply, " + NOT_SAVED.format(reason="the disk is full")], err
        assert third["cache_tier"] == "hot" and third["cached_tokens"] > second["prompt_tokens"]  # memory still had it
        code, _, err = _chat("-a", "f", "--max-tokens", "4", "-m", "and again?")
        assert code == 0 and err == [], err  # said once
        _, log = server.stop()
    assert log.count("POST /semantic/v1/turns 200") == 4
    assert not list(tiny_cache_disk.rglob(".tmp-*"))
