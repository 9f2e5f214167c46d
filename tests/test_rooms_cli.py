"""`semantic rooms ls` and `semantic rooms rm` (issue 20): the saved rooms that
`semantic chat ... --save-room NAME` creates, listed and forgotten; their agents stay."""

from __future__ import annotations

import json
import os
import re
import subprocess
from contextlib import closing

import pexpect
from conftest import SEMANTIC, run_cli

from semantic_cli.errors import EXIT_NOT_FOUND, EXIT_USAGE
from semantic_cli.store import Store


def ok(*args: str) -> subprocess.CompletedProcess:
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr.decode()
    return r


def fails(code: int, *args: str) -> str:
    """A command that must fail: its exit code, one stderr line, nothing on stdout."""
    r = run_cli(*args)
    err = r.stderr.decode()
    assert r.returncode == code, (r.returncode, err)
    assert err.startswith("semantic: error: ") and err.count("\n") == 1 and r.stdout == b"", err
    return err


def test_no_rooms(home):
    r = ok("rooms", "ls")
    assert r.stdout == b"" and b"no saved rooms" in r.stderr and b"--save-room" in r.stderr
    assert json.loads(ok("rooms", "ls", "--json").stdout) == []


def test_ls_lists_saved_rooms_and_rm_forgets_one_keeping_its_agents(tiny, home):
    r = run_cli("chat", "-a", "planner", "-a", "critic", "--model", str(tiny["llama"]), "--max-tokens", "2",
                "--all", "--save-room", "design", "-m", "hello")  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    with closing(Store()) as store:
        store.save_room("alpha", ["critic"])

    assert json.loads(ok("rooms", "ls", "--json").stdout) == [
        {"name": "alpha", "agents": ["critic"]},
        {"name": "design", "agents": ["planner", "critic"]},  # room order, as saved
    ]
    assert ok("rooms", "ls").stdout.decode() == "NAME\tAGENTS\nalpha\tcritic\ndesign\tplanner, critic\n"  # piped: one line per room

    r = ok("rooms", "rm", "design")
    assert r.stdout == b"" and r.stderr.decode() == "removed room 'design'; its agents stay (planner, critic)\n"
    assert [room["name"] for room in json.loads(ok("rooms", "ls", "--json").stdout)] == ["alpha"]
    assert [a["name"] for a in json.loads(ok("agents", "ls", "--json").stdout)] == ["critic", "planner"]
    with closing(Store()) as store:
        assert len(store.messages("planner")) == 2  # the conversation stays too
    assert "no room named 'design'" in fails(EXIT_NOT_FOUND, "chat", "--room", "design", "-m", "hi")


def test_rm_errors(home):
    with closing(Store()) as store:
        store.save_room("kept", ["a", "b"])
    err = fails(EXIT_NOT_FOUND, "rooms", "rm", "ghost")
    assert "no room named 'ghost'" in err and "semantic rooms ls" in err
    assert "invalid room name" in fails(EXIT_USAGE, "rooms", "rm", "Bad Name")
    assert json.loads(ok("rooms", "ls", "--json").stdout) == [{"name": "kept", "agents": ["a", "b"]}]


def test_ls_on_a_terminal_is_a_table(home):
    with closing(Store()) as store:
        store.save_room("a-room-with-a-long-name-that-stays-whole", ["planner", "critic", "reviewer", "summariser", "editor"])
    child = pexpect.spawn(SEMANTIC, ["rooms", "ls"], env=dict(os.environ, TERM="xterm"), dimensions=(24, 50), timeout=60)
    try:
        out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", child.read().decode())
    finally:
        child.close()
    assert child.exitstatus == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "AGENTS"] and "\t" not in out
    assert lines[1].startswith("a-room-with-a-long-name-that-stays-whole  planner,")  # the name whole, the agents wrapped
    assert " ".join(out.split()[3:]) == "planner, critic, reviewer, summariser, editor"
