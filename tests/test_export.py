"""The one transcript exporter (`agents show --markdown/--json` and `/save`), the
one byte formatter, the one agent-name rule and `pid_alive`: no model needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import closing

import pytest
from conftest import run_cli

from semantic_cli import export, rooms
from semantic_cli.cli import render, slash
from semantic_cli.errors import UsageError
from semantic_cli.locks import pid_alive
from semantic_cli.store import NAME_RE, Store


def _fill(store: Store) -> None:
    store.create_agent("s", "/models/m", "You count.\n\nBriefly.", {"temp": 0.5})
    turn = [("user", "What is **two** plus two?", "complete", {}), ("assistant", "Four.\n", "complete", {"finish_reason": "stop"})]
    store.record_turn("s", turn, "tok", [1, 2, 3], False)
    store.record_turn("s", [("user", "go on", "complete", {}), ("assistant", "cut *short*", "interrupted", {})], "tok", [], False)


def test_markdown_and_json(home):
    with closing(Store()) as store:
        _fill(store)
        agent, messages = store.get_agent("s"), store.messages("s")
    md = export.to_markdown(agent, messages)
    assert md.startswith("# s\n\n- model: `/models/m`\n- temp: 0.5\n\n## Persona\n\n> You count.\n>\n> Briefly.\n")
    assert "\n## You\n\nWhat is **two** plus two?\n\n## s\n\nFour.\n\n## You\n\ngo on\n" in md
    assert md.endswith("\n## s\n\ncut *short*\n\n*(interrupted)*\n")

    text = export.to_json(agent, messages)
    assert text.endswith("}\n")
    doc = json.loads(text)
    assert doc == export.to_dict(agent, messages)
    assert doc["agent"] == {
        "name": "s",
        "model": "/models/m",
        "system": "You count.\n\nBriefly.",
        "settings": {"temp": 0.5},
        "created_at": export.iso(agent.created_at),
        "last_active": export.iso(agent.last_active),
    }
    assert [(m["id"], m["role"], m["status"]) for m in doc["messages"]] == [
        (1, "user", "complete"),
        (2, "assistant", "complete"),
        (3, "user", "complete"),
        (4, "assistant", "interrupted"),
    ]
    assert doc["messages"][1]["meta"] == {"finish_reason": "stop"}
    assert all(m["created_at"].endswith("Z") and m["created_at"][10] == "T" for m in doc["messages"])  # ISO 8601, UTC
    assert export.iso(0) == "1970-01-01T00:00:00Z"


def test_agents_show_writes_what_the_exporter_writes(home):
    with closing(Store()) as store:
        _fill(store)
        agent, messages = store.get_agent("s"), store.messages("s")
    for flag, expected in (("--markdown", export.to_markdown(agent, messages)), ("--json", export.to_json(agent, messages))):
        r = run_cli("agents", "show", "s", flag)
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout.decode() == expected


def test_one_byte_formatter():
    assert slash._bytes is render.human_bytes
    cases = {
        0: "0 B",
        999: "999 B",
        1000: "1.0 KB",
        1500: "1.5 KB",
        377_487_360: "377.5 MB",
        12 * 10**9: "12.0 GB",
        5 * 10**12: "5000.0 GB",
    }
    assert {n: render.human_bytes(n) for n in cases} == cases


def test_mentions_follow_the_name_rule():
    assert NAME_RE.pattern in rooms._MENTION.pattern
    longest = "a" * 64
    assert rooms.address(f"@{longest} hi", [longest], None) == ([longest], "hi")
    for bad in ("@Upper hi", "@-x hi", f"@{longest}a hi"):
        with pytest.raises(UsageError):
            rooms.address(bad, ["x"], None)


def test_pid_alive():
    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_alive(child.pid)
