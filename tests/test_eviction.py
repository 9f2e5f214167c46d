"""Eviction's re-check: a block that gained a user between the scan (and its plan) and
the execution stays, with its file, for the agent that now uses it."""

from __future__ import annotations

from helpers import Session

from semantic_cli.kv.admin import execute_eviction, plan_eviction, scan, verify
from semantic_cli.kv.index import KVIndex
from semantic_cli.store import Store

MESSAGE = "tell me a story about caches " * 6


def test_blocks_that_gained_a_user_since_the_scan_are_kept(tiny, home, monkeypatch):
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "16")
    with Session() as s:
        s.say("c1", MESSAGE, model=tiny["llama"], max_tokens=4)
    index, store = KVIndex(), Store()
    try:
        plan = plan_eviction(index, scan(index, store), agents=["c1"])
        c1_chain = index.chain("c1")
        assert plan.agents == ["c1"] and len(c1_chain) >= 4 and set(plan.blocks) == set(c1_chain)  # all c1's own, then
        # Before the plan runs, c2 says the same: its turn reuses c1's blocks (same prefix).
        with Session() as s:
            c2 = s.say("c2", MESSAGE, model=tiny["llama"], max_tokens=4)
        assert index.chain("c2")[: len(c1_chain)] == c1_chain
        execute_eviction(index, plan)
        assert index.chain("c1") == [] and index.tail("c1") is None  # c1 went cold
        assert set(index.blocks(c1_chain)) == set(c1_chain)  # but the blocks c2 uses stayed
        assert verify(index).problems == []  # and so did their files, intact
    finally:
        index.close()
        store.close()
    with Session() as s:
        again = s.say("c2", "and then?", max_tokens=2)
    assert again.tier == "warm" and again.done.stats.cached_tokens == len(c2.done.cached_log)
