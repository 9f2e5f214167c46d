"""Rooms: several agents answering concurrently on one batched engine."""

from __future__ import annotations

import json

from conftest import run_cli
from helpers import Session

from semantic_cli.errors import EXIT_BUSY, EXIT_USAGE
from semantic_cli.locks import AgentLock


def test_all_without_a_terminal_prints_each_reply_labelled(tiny, home):
    r = run_cli("chat", "-a", "planner", "-a", "critic", "--model", str(tiny["llama"]), "--max-tokens", "5", "--all", input="what now?")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert out.index("[planner]\n") < out.index("[critic]\n")
    lines = (
        run_cli("chat", "-a", "planner", "-a", "critic", "--max-tokens", "5", "--all", "--json", input="and then?")
        .stdout.decode()
        .splitlines()
    )
    objs = [json.loads(line) for line in lines]
    assert [o["agent"] for o in objs] == ["planner", "critic"]
    assert all(o["generated_tokens"] == 5 and o["cached_tokens"] > 0 for o in objs)  # each resumed its own cache


def test_mention_addresses_one_agent(tiny, home):
    r = run_cli("chat", "-a", "a", "-a", "b", "--model", str(tiny["llama"]), "--max-tokens", "3", "--json", "-m", "@b just you")
    assert r.returncode == 0, r.stderr
    [obj] = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert obj["agent"] == "b"


def test_room_errors(tiny, home):
    model = str(tiny["llama"])
    nobody = run_cli("chat", "-a", "a", "-a", "b", "--model", model, "-m", "@nobody hi")
    assert nobody.returncode == EXIT_USAGE and b"a, b" in nobody.stderr and nobody.stderr.count(b"\n") == 1
    empty = run_cli("chat", "-a", "a", "-a", "b", "--model", model, "-m", "@all   ")
    assert empty.returncode == EXIT_USAGE and b"empty message" in empty.stderr
    unaddressed = run_cli("chat", "-a", "a", "-a", "b", "--model", model, "-m", "hello")
    assert unaddressed.returncode == EXIT_USAGE and b"@name" in unaddressed.stderr
    twice = run_cli("chat", "-a", "a", "-a", "a", "--model", model, "-m", "hi")
    assert twice.returncode == EXIT_USAGE and b"twice" in twice.stderr


def test_room_of_one_is_just_a_chat(tiny, home):
    r = run_cli("chat", "-a", "solo", "--model", str(tiny["llama"]), "--max-tokens", "3", "--all", "--json", "-m", "@all hi")
    assert r.returncode == 0 and json.loads(r.stdout)["agent"] == "solo"


def test_busy_agent_is_left_out_of_the_room(tiny, home):
    model = str(tiny["llama"])
    with AgentLock("b"):
        r = run_cli("chat", "-a", "a", "-a", "b", "--model", model, "--max-tokens", "3", "--all", "--json", "-m", "hi")
        assert r.returncode == 0
        assert [json.loads(line)["agent"] for line in r.stdout.decode().splitlines()] == ["a"]
        assert b"'b' is busy" in r.stderr
        with AgentLock("a"):
            assert run_cli("chat", "-a", "a", "-a", "b", "--model", model, "--all", "-m", "hi").returncode == EXIT_BUSY


def test_mixed_models_are_refused(tiny, home):
    assert run_cli("chat", "-a", "x", "--model", str(tiny["llama"]), "--max-tokens", "2", "-m", "hi").returncode == 0
    assert run_cli("chat", "-a", "y", "--model", str(tiny["qwen3"]), "--max-tokens", "2", "-m", "hi").returncode == 0
    r = run_cli("chat", "-a", "x", "-a", "y", "--all", "-m", "hi")
    assert r.returncode == EXIT_USAGE and b"share one model" in r.stderr


def test_batch_of_one_equals_single_agent_reply(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SEMANTIC_HOME", str(tmp_path / "one"))
    with Session() as s:
        single = s.say("a", "the same question", model=tiny["llama"])
    monkeypatch.setenv("SEMANTIC_HOME", str(tmp_path / "room"))
    with Session() as s:
        [in_room] = s.room({"a": "the same question"}, model=tiny["llama"])
    assert in_room.done.generated == single.done.generated


def test_concurrent_replies_are_complete_persisted_and_resumable(tiny, home, monkeypatch):
    """Batched kernels are not bit-identical to single-sequence ones, so a room's
    replies are checked for being whole turns that persist and resume."""
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "16")
    names = ["r1", "r2", "r3", "r4"]
    with Session() as s:
        recs = s.room({n: f"question {i} " * (i + 1) for i, n in enumerate(names)}, model=tiny["llama"], max_tokens=20)
    assert sorted(r.key for r in recs) == names
    for rec in recs:
        assert rec.done.finish_reason == "length" and len(rec.done.generated) == 20
        assert rec.persisted is not None and rec.persisted.bytes_written > 0
        assert len(rec.done.all_tokens) == rec.done.stats.prompt_tokens + 20
    with Session() as s:
        again = s.room({n: "follow-up" for n in names})
    for rec, before in zip(sorted(again, key=lambda r: r.key), sorted(recs, key=lambda r: r.key), strict=False):
        assert rec.tier == "warm" and rec.done.stats.cached_tokens == len(before.done.cached_log)


def test_an_agent_named_twice_in_a_message_answers_once(tiny, home):
    """`@b @all hi` and `@b @b hi` address each agent once: in the REPL (which runs what
    `address` returns as it is) every agent addressed answers once, and its transcript holds
    the message once."""
    from test_repl import FOOTER, Term, rows

    from semantic_cli.rooms import address

    assert address("@b @all hi", ["a", "b"], None) == (["b", "a"], "hi")
    assert address("@b @b hi", ["a", "b"], "a") == (["b"], "hi")
    t = Term("--model", str(tiny["llama"]), "-a", "a", "-a", "b", "--max-tokens", "3", "--no-markdown")
    try:
        t.prompt("a")
        t.send("@b @all hi")
        t.expect(FOOTER)
        t.expect(FOOTER)  # both panels finish
        t.prompt("a")
        assert [(r["role"], r["status"]) for r in rows(home, "a")] == [("user", "complete"), ("assistant", "complete")]
        assert [(r["role"], r["status"]) for r in rows(home, "b")] == [("user", "complete"), ("assistant", "complete")]
        t.say("@b @b again")
        assert len(rows(home, "a")) == 2
        assert [r["content"] for r in rows(home, "b") if r["role"] == "user"] == ["hi", "again"] and len(rows(home, "b")) == 4
        assert "error" not in t.text, t.text[-2000:]
        t.send("/quit")
        assert t.exit_code() == 0
    finally:
        t.close()
