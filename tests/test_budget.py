"""Disk budget, eviction selectors and waiting for a busy agent."""

from __future__ import annotations

import json
import threading
import time

from conftest import run_cli
from helpers import Session

from semantic_cli.kv.index import KVIndex
from semantic_cli.locks import AgentLock
from semantic_cli.store import Store


def _cached(index: KVIndex, agent: str) -> bool:
    """Whether any of the agent's cache is on disk (blocks, or a tail: a cache that ends on a block boundary has none)."""
    return index.tail(agent) is not None or index.chain(agent) != []


TEXT = "a message long enough to fill a few blocks of the cache " * 4


def test_disk_budget_moves_least_recently_used_agents_to_cold(tiny, home, monkeypatch):
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "16")
    with Session() as s:
        first = s.say("old", TEXT, model=tiny["llama"])
    per_agent = sum(b.nbytes for b in KVIndex().blocks(KVIndex().chain("old")).values()) + KVIndex().tail("old").nbytes
    # Room for about two agents' caches: the third turn pushes the oldest out.
    monkeypatch.setenv("SEMANTIC_CACHE_BUDGET", str(int(per_agent * 2.5)))
    with Session() as s:
        s.say("mid", TEXT.upper(), model=tiny["llama"])
        time.sleep(0.01)
        s.say("new", TEXT[::-1], model=tiny["llama"])
    index = KVIndex()
    # "old" went first; "mid" and "new" were in use by this process, so they stay.
    assert not _cached(index, "old")
    assert _cached(index, "mid") and _cached(index, "new")
    with Session() as s:  # a later process using only "new": now "mid" may go too
        s.say("new", "next")
    index = KVIndex()
    assert not _cached(index, "mid") and _cached(index, "new")
    assert index.total_bytes() <= per_agent * 2.5
    # Eviction never touches transcripts: "old" answers, from a cold start.
    assert len(Store().messages("old")) == 2
    with Session() as s:
        rec = s.say("old", "are you still there?")
    # Only blocks shared with the others (the chat template's opening) were still cached.
    assert rec.done.stats.cached_tokens <= 32 and rec.done.stats.prompt_tokens > len(first.done.all_tokens)


def test_the_disk_budget_picks_the_least_recently_used_of_the_agents_it_may_evict(tiny, home, monkeypatch):
    """Two agents the writing process does not hold: the one used longer ago goes, the other stays."""
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "16")
    for name, text in (("older", TEXT), ("newer", TEXT.upper())):  # each in its own session: nothing held after
        with Session() as s:
            s.say(name, text, model=tiny["llama"])
        time.sleep(0.01)
    index = KVIndex()
    older, newer = index.tail("older"), index.tail("newer")
    assert older is not None and newer is not None and older.last_used < newer.last_used
    # No room for more: a third agent's short turn pushes out one of the two (either would make room).
    monkeypatch.setenv("SEMANTIC_CACHE_BUDGET", str(index.total_bytes()))
    with Session() as s:
        s.say("third", "hi", model=tiny["llama"])
    index = KVIndex()
    assert not _cached(index, "older")
    assert _cached(index, "newer") and _cached(index, "third")


def test_evict_older_than_and_max_bytes(tiny, home):
    env = {"SEMANTIC_BLOCK_TOKENS": "16"}
    for name in ("e1", "e2", "e3"):
        assert (
            run_cli("chat", "-a", name, "--model", str(tiny["llama"]), "--max-tokens", "4", "-m", f"{name}: {TEXT}", env=env).returncode
            == 0
        )
    none_old = json.loads(run_cli("cache", "evict", "--older-than", "1h", "--dry-run", "--json").stdout)
    assert none_old["agents"] == []
    time.sleep(1.1)
    all_old = json.loads(run_cli("cache", "evict", "--older-than", "1s", "--dry-run", "--json").stdout)
    assert sorted(all_old["agents"]) == ["e1", "e2", "e3"]
    ls = json.loads(run_cli("cache", "ls", "--json").stdout)
    target = ls["total_bytes"] // 2
    plan = json.loads(run_cli("cache", "evict", "--max-bytes", str(target), "--yes", "--json").stdout)
    assert plan["agents"][0] == "e1"  # least recently used first
    after = json.loads(run_cli("cache", "ls", "--json").stdout)
    assert after["total_bytes"] <= target
    assert run_cli("cache", "evict", "--older-than", "soon").returncode == 2


def test_wait_for_a_busy_agent(tiny, home):
    lock = AgentLock("w").acquire()
    threading.Timer(1.5, lock.release).start()
    t0 = time.monotonic()
    r = run_cli("chat", "-a", "w", "--model", str(tiny["llama"]), "--max-tokens", "2", "--wait", "-m", "hi")
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 >= 1.4


def test_last_use_is_recorded_by_every_turn_even_an_interrupted_one(tiny, home, monkeypatch):
    """Restores commit nothing (it would delay the first token): the turn's end records the use."""
    from semantic_cli.chat import GenSettings
    from semantic_cli.events import TokenEvent

    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "16")
    with Session() as s:
        s.say("a", TEXT, model=tiny["llama"])
    index = KVIndex()
    before = index.tail("a").last_used, {b.last_used for b in index.blocks(index.chain("a")).values()}
    time.sleep(0.02)
    with Session() as s:  # a new process: the turn restores from disk, then Ctrl-C mid-reply
        agent = s.chat.open_agent("a", None, None)
        pending = s.chat.prepare(agent, "go on", GenSettings(max_tokens=40))
        events = s.chat.run([pending])
        next(ev for ev in events if isinstance(ev, TokenEvent))
        events.close()  # what Ctrl-C does to the turn's generator
    assert Store().messages("a")[-1].status == "interrupted"
    index = KVIndex()
    after = index.tail("a").last_used, {b.last_used for b in index.blocks(index.chain("a")).values()}
    assert after[0] > before[0] and min(after[1]) > max(before[1])
