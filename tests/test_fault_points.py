"""SIGKILL at each named point of a turn's writes (semantic_cli/faults.py), on a real `semantic chat`.

After each kill: the transcript holds every completed turn, `cache verify` reports at
most removable leftovers (exactly which, per point), and the next turn shows no warning
and resumes warm from exactly what the index names.
"""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path

import pytest
from conftest import quiet, run_cli
from helpers import uncached_reply_end

from semantic_cli.faults import EVICTION_POINTS, POINTS

B = 16  # SEMANTIC_BLOCK_TOKENS: small, so the second turn adds full blocks
ENV = {"SEMANTIC_BLOCK_TOKENS": str(B)}


def _log_length(home: Path, agent: str) -> int:
    db = sqlite3.connect(home / "data" / "semantic.db")
    try:
        return int(db.execute("SELECT COALESCE(SUM(LENGTH(tokens)), 0) / 4 FROM token_chunks WHERE agent=?", (agent,)).fetchone()[0])
    finally:
        db.close()


def _messages(home: Path, agent: str) -> list[tuple[str, str]]:
    db = sqlite3.connect(home / "data" / "semantic.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return db.execute("SELECT role, status FROM messages WHERE agent=? ORDER BY id", (agent,)).fetchall()
    finally:
        db.close()


def _leftovers(home: Path) -> list[str]:
    """What `cache verify` reports, as 'what:where' with where = tmp, block or tail."""
    report = json.loads(run_cli("cache", "verify", "--json").stdout)
    out = []
    for p in report["problems"]:
        path = Path(p["name"])
        where = "tmp" if path.name.startswith(".tmp-") else "tail" if path.parent.name == "tails" else "block"
        out.append(f"{p['what']}:{where}")
    return sorted(out)


# Per point: what verify finds after the kill, and how many tokens the next turn restores
# ("L1": turn 1's whole cache, "blocks2": turn 2's full blocks, "L2": turn 2's whole cache).
EXPECTED = {
    "after-transcript-commit": ([], "L1"),
    "after-block-temp-write": (["orphan:tmp"], "L1"),
    "after-block-rename": (["orphan:block"], "L1"),
    "after-tail-rename": (["orphan:tail"], "blocks2"),
    "before-index-commit": (["orphan:tail"], "blocks2"),
    "after-index-commit": (["orphan:tail"], "L2"),  # turn 1's tail, replaced but not yet removed
}


def test_every_fault_point_is_covered():
    assert set(EXPECTED) == set(POINTS)


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_a_write_point_loses_no_turn_and_resumes_from_what_the_index_names(tiny, home, point):
    model = str(tiny["llama"])
    first = run_cli("chat", "-a", "f", "--model", model, "--max-tokens", "4", "--json", "-m", "hello there", env=ENV)
    assert first.returncode == 0 and quiet(first.stderr), first.stderr
    l1 = _log_length(home, "f") - uncached_reply_end()  # what the cache covers: all but the reply's last token on the CPU
    killed = run_cli(
        "chat", "-a", "f", "--max-tokens", "4", "--json", "-m", "tell me about blocks " * 6, env={**ENV, "SEMANTIC_FAULT": point}
    )
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    # Every point comes after the transcript commit: both turns are there, complete.
    assert _messages(home, "f") == [("user", "complete"), ("assistant", "complete")] * 2
    l2 = _log_length(home, "f") - uncached_reply_end()
    assert l2 // B > l1 // B, "the second turn must add a full block for the block points to be reached"
    leftovers, restored = EXPECTED[point]
    assert _leftovers(home) == leftovers
    # The next turn: no warning, warm, from exactly what the index names (leftovers are never read).
    again = run_cli("chat", "-a", "f", "--max-tokens", "2", "--json", "-m", "still there?", env=ENV)
    assert again.returncode == 0 and again.stderr == b"", again.stderr
    turn = json.loads(again.stdout)
    expected = {"L1": l1, "blocks2": l2 // B * B, "L2": l2}[restored]
    assert (turn["cache_tier"], turn["cached_tokens"]) == ("warm", expected)
    assert _messages(home, "f") == [("user", "complete"), ("assistant", "complete")] * 3
    # The leftovers are removable, and removing them leaves a sound cache.
    assert run_cli("cache", "verify", "--repair").returncode == 0
    assert _leftovers(home) == []


@pytest.mark.parametrize("point", EVICTION_POINTS)
def test_sigkill_during_an_eviction_never_leaves_the_index_naming_missing_files(tiny, home, point):
    """The budget evicts agent a during b's turn. Files go only after the index commits, so a kill
    before the commit leaves a's cache whole (a resumes warm) and a kill after it leaves orphans
    that verify names and repair removes (a re-prefills all but what it shares with b) — never a row without its file."""
    model = str(tiny["llama"])
    first = run_cli("chat", "-a", "a", "--model", model, "--max-tokens", "4", "--json", "-m", "tell me about blocks " * 4, env=ENV)
    assert first.returncode == 0 and quiet(first.stderr), first.stderr
    a_log = _log_length(home, "a") - uncached_reply_end()  # what the cache covers
    budget = {**ENV, "SEMANTIC_CACHE_BUDGET": "1"}  # any turn must evict every other agent
    killed = run_cli(
        "chat", "-a", "b", "--model", model, "--max-tokens", "4", "--json", "-m", "hi", env={**budget, "SEMANTIC_FAULT": point}
    )
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    assert _messages(home, "b") == [("user", "complete"), ("assistant", "complete")]
    report = json.loads(run_cli("cache", "verify", "--json").stdout)
    assert {p["what"] for p in report["problems"]} <= {"orphan"}, report["problems"]  # no missing file, no bad row
    again = run_cli("chat", "-a", "a", "--max-tokens", "2", "--json", "-m", "still there?", env=ENV)
    assert again.returncode == 0 and again.stderr == b"", again.stderr
    turn = json.loads(again.stdout)
    if point == "eviction-before-commit":
        assert report["problems"] == [] and (turn["cache_tier"], turn["cached_tokens"]) == ("warm", a_log)
    else:
        # a's own files are gone (orphans until repaired); only blocks it shares with b's chain remain.
        assert report["problems"] and turn["cached_tokens"] < a_log
    assert run_cli("cache", "verify", "--repair").returncode == 0
    assert json.loads(run_cli("cache", "verify", "--json").stdout)["problems"] == []
