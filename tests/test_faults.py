"""Faults: SIGKILL mid-turn and mid-write, a full disk, Ctrl-C during a reply."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from conftest import SEMANTIC, fill_up, quiet, run_cli


def _transcript(home: Path, agent: str) -> list[tuple[str, str, str]]:
    db = sqlite3.connect(home / "data" / "semantic.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return db.execute("SELECT role, content, status FROM messages WHERE agent=? ORDER BY id", (agent,)).fetchall()
    finally:
        db.close()


def test_sigkill_loop_loses_nothing_and_never_serves_bad_blocks(tiny, home):
    env = dict(os.environ, SEMANTIC_BLOCK_TOKENS="16")
    model = str(tiny["llama"])
    agents = ["k1", "k2"]

    def start(agent: str, i: int) -> subprocess.Popen:
        return subprocess.Popen(
            [
                SEMANTIC,
                "chat",
                "-a",
                agent,
                "--model",
                model,
                "--max-tokens",
                "48",
                "--json",
                "-m",
                f"message {i}: " + "tell me about blocks " * (i % 5 + 1),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )

    # How long an undisturbed turn takes, so kills land during the turn and its writes.
    t0 = time.monotonic()
    warm_up = start("k1", 0)
    out, err = warm_up.communicate(timeout=120)
    assert warm_up.returncode == 0, err
    duration = time.monotonic() - t0
    completed: dict[str, list[str]] = {"k1": [json.loads(out)["reply"]], "k2": []}
    rng = random.Random(1234)
    kills = 0
    i = 1
    while kills < 20:
        agent = agents[i % 2]
        proc = start(agent, i)
        time.sleep(rng.uniform(0.5, 1.05) * duration)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        out, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            completed[agent].append(json.loads(out)["reply"])
            # A turn after a kill never finds damage: only files the index names are read.
            assert b"damaged" not in err and b"Traceback" not in err, err
        i += 1
        assert i < 200, "could not land 20 kills"
    # Every agent still answers, and every completed turn is still in its transcript.
    for agent in agents:
        r = run_cli("chat", "-a", agent, "--max-tokens", "4", "--json", "-m", "still there?", env={"SEMANTIC_BLOCK_TOKENS": "16"})
        assert r.returncode == 0 and b"damaged" not in r.stderr, r.stderr
        replies = [c for role, c, _ in _transcript(home, agent) if role == "assistant"]
        for reply in completed[agent]:
            assert reply in replies
        prior_turns = sum(1 for role, _, _ in _transcript(home, agent) if role == "user") - 1
        assert json.loads(r.stdout)["prompt_tokens"] > 30 * (prior_turns + 1)  # it saw its whole history
    # A kill leaves at most removable leftovers (tests/test_fault_points.py names each):
    # a temp file, or a block or tail file the index does not name.
    report = json.loads(run_cli("cache", "verify", "--json").stdout)
    assert {p["what"] for p in report["problems"]} <= {"orphan"}, report["problems"]
    for p in report["problems"]:
        path = Path(p["name"])
        assert path.parent.name == "tails" or path.parent.parent.name == "blocks", path
        assert path.name.startswith(".tmp-") or path.suffix == ".kv", path
    assert run_cli("cache", "verify", "--repair").returncode == 0
    assert run_cli("cache", "verify").returncode == 0


def test_full_disk_while_writing_blocks_keeps_the_reply_and_the_transcript(tiny, home, tiny_cache_disk):
    env = {"SEMANTIC_BLOCK_TOKENS": "16"}
    model = str(tiny["llama"])
    first = run_cli("chat", "-a", "f", "--model", model, "--max-tokens", "4", "--json", "-m", "hello", env=env)
    assert first.returncode == 0 and quiet(first.stderr), first.stderr
    filler = fill_up(tiny_cache_disk)
    r = run_cli("chat", "-a", "f", "--max-tokens", "8", "--json", "-m", "a longer message " * 20, env=env)
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)["reply"]
    warnings = r.stderr.decode().strip().splitlines()
    assert len(warnings) == 1 and "KV cache" in warnings[0] and "the disk is full" in warnings[0], warnings
    assert _transcript(home, "f")[-1] == ("assistant", reply, "complete")
    filler.unlink()
    again = run_cli("chat", "-a", "f", "--max-tokens", "4", "--json", "-m", "and now?", env=env)
    assert again.returncode == 0 and json.loads(again.stdout)["prompt_tokens"] > 60
    assert not [p for p in tiny_cache_disk.rglob(".tmp-*")]


def test_ctrl_c_during_a_reply_keeps_the_partial_turn_marked(tiny, home):
    """SIGINT mid-reply: exit 130, the partial reply kept as interrupted, the store sound."""
    model = str(tiny["llama"])
    proc = subprocess.Popen(
        [SEMANTIC, "chat", "-a", "c", "--model", model, "--max-tokens", "4000", "-m", "go on forever"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # Wait until the reply is streaming, then interrupt.
    first = os.read(proc.stdout.fileno(), 1)  # unbuffered: communicate() reads the fd itself
    assert first
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    rows = _transcript(home, "c")
    assert rows[0] == ("user", "go on forever", "complete")
    assert rows[1][0] == "assistant" and rows[1][2] == "interrupted" and rows[1][1]
    assert (first + out).decode(errors="replace").startswith(rows[1][1][:20])
    r = run_cli("chat", "-a", "c", "--max-tokens", "3", "--json", "-m", "next")
    assert r.returncode == 0 and json.loads(r.stdout)["prompt_tokens"] > 20
