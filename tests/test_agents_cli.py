"""`semantic agents ...` through the installed entry point, on real stores and tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from conftest import SEMANTIC, run_cli
from helpers import Session

from semantic_cli import paths
from semantic_cli.kv.blockfile import tails_dir
from semantic_cli.kv.index import KVIndex
from semantic_cli.locks import AgentLock
from semantic_cli.store import Store

LONG = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(12))


@pytest.fixture
def blocks32(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "32")
    return home


def talk(agent: str, text: str, model: Path | None = None, system: str | None = None):
    with Session() as s:
        return s.say(agent, text, model=model, system=system)


def ok(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    r = run_cli(*args, input=input)
    assert r.returncode == 0, r.stderr.decode()
    return r


def fails(code: int, *args: str) -> str:
    """Run a command that must fail: its exit code and exactly one stderr line."""
    r = run_cli(*args)
    err = r.stderr.decode()
    assert r.returncode == code, (r.returncode, err)
    assert err.startswith("semantic: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and r.stdout == b""
    return err


def block_files() -> set[str]:
    return {p.name for p in paths.blocks_dir().rglob("*.kv")}


# Each read opens and closes its own connection, as a separate process would.
def agent_names() -> list[str]:
    with closing(Store()) as store:
        return [a.name for a in store.list_agents()]


def agent(name: str):
    with closing(Store()) as store:
        return store.get_agent(name)


def messages(name: str) -> list:
    with closing(Store()) as store:
        return store.messages(name)


def chain(name: str) -> list[str]:
    with closing(KVIndex()) as index:
        return index.chain(name)


def tail(name: str):
    with closing(KVIndex()) as index:
        return index.tail(name)


# ---- ls -----------------------------------------------------------------
def test_ls_reports_turns_tokens_and_cache(tiny, blocks32):
    talk("a", LONG, model=tiny["llama"], system="You are terse.")
    rec = talk("a", "and then?")
    ok("agents", "new", "idle", "--system", "Waits.")
    rows = json.loads(ok("agents", "ls", "--json").stdout)
    assert [r["name"] for r in rows] == ["a", "idle"]
    a, idle = rows
    assert set(a) == {"name", "model", "system", "settings", "created_at", "last_active", "turns", "compacted_turns",
                      "transcript_tokens", "context_length", "cached_tokens"}  # fmt: skip
    assert a["turns"] == 2 and a["system"] == "You are terse." and a["model"] == str(tiny["llama"])
    assert a["transcript_tokens"] == len(rec.done.all_tokens)
    assert a["cached_tokens"] == len(rec.done.cached_log) > 5 * 32  # every block plus the tail
    assert (idle["turns"], idle["transcript_tokens"], idle["cached_tokens"]) == (0, 0, 0)
    table = ok("agents", "ls").stdout.decode()
    assert table.splitlines()[0].split()[:3] == ["NAME", "MODEL", "PERSONA"]
    line = next(ln for ln in table.splitlines() if ln.startswith("a\t"))  # piped: tab-separated
    assert "llama" in line and "You are terse." in line and str(len(rec.done.all_tokens)) in line.split("\t")
    assert line.split("\t")[-1] == a["last_active"]  # piped: ISO 8601, as in --json


def test_ls_empty(home):
    r = ok("agents", "ls")
    assert r.stdout == b"" and b"no agents yet" in r.stderr
    assert json.loads(ok("agents", "ls", "--json").stdout) == []


def test_ls_does_not_import_mlx(home):
    code = (
        "import sys\nfrom semantic_cli.cli import app as cli\n"
        "try:\n    cli.main(['agents', 'ls', '--json'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm', 'numpy', 'transformers'))\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, env=dict(os.environ))
    assert r.returncode == 0, r.stderr.decode()


# ---- new ----------------------------------------------------------------
def test_new_stores_persona_model_and_settings(tiny, home, tmp_path):
    persona = tmp_path / "persona.txt"
    persona.write_text("You review plans.\nBe blunt.\n")
    r = ok("agents", "new", "critic", "--system-file", str(persona), "--model", str(tiny["llama"]),
           "--temp", "0.7", "--max-tokens", "64", "--top-p", "0.9")  # fmt: skip
    assert r.stdout == b"" and b"created agent 'critic'" in r.stderr
    critic = agent("critic")
    assert critic.system == "You review plans.\nBe blunt." and critic.model == str(tiny["llama"])
    assert critic.settings == {"temp": 0.7, "max_tokens": 64, "top_p": 0.9}
    rec = talk("critic", "hello")  # the stored model is used without --model
    assert rec.model == "llama" and rec.done.generated


def test_new_defaults_and_persona_from_stdin(home):
    ok("agents", "new", "p", "--system-file", "-", input="From stdin.\n")
    p = agent("p")
    assert (p.model, p.system, p.settings) == ("default", "From stdin.", {})


def test_new_errors_write_nothing(tiny, home, tmp_path):
    ok("agents", "new", "taken")
    bad_dir = tmp_path / "notamodel"
    bad_dir.mkdir()
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    assert "already exists" in fails(2, "agents", "new", "taken")
    assert "invalid agent name" in fails(2, "agents", "new", "Bad Name")
    assert "unknown model" in fails(3, "agents", "new", "x", "--model", str(tmp_path / "missing"))
    assert "not an mlx-lm model directory" in fails(7, "agents", "new", "x", "--model", str(bad_dir))
    assert "not both" in fails(2, "agents", "new", "x", "--system", "a", "--system-file", str(latin1))
    assert "cannot read" in fails(2, "agents", "new", "x", "--system-file", str(tmp_path / "nope.txt"))
    assert "not valid UTF-8" in fails(6, "agents", "new", "x", "--system-file", str(latin1))
    assert run_cli("agents", "new", "x", "--temp", "-1").returncode == 2
    assert agent_names() == ["taken"]


# ---- show ---------------------------------------------------------------
def test_show_renders_the_transcript(tiny, home):
    talk("s", "What is **two** plus two?", model=tiny["llama"], system="You count.")
    with closing(Store()) as store:
        store.record_turn("s", [("user", "go on", "complete", {}), ("assistant", "cut *short*", "interrupted", {})], "x", [], False)
    stored = messages("s")

    plain = ok("agents", "show", "s").stdout.decode()
    assert "persona: You count." in plain and "What is **two** plus two?" in plain
    assert "\ns (interrupted)\ncut *short*\n" in plain  # piped: assistant text as stored
    assert plain.index("What is") < plain.index("go on") < plain.index("cut *short*")

    md = ok("agents", "show", "s", "--markdown").stdout.decode()
    assert md.startswith("# s\n") and "> You count." in md and "## You\n\nWhat is **two** plus two?" in md
    assert "## s\n\ncut *short*\n\n*(interrupted)*" in md

    doc = json.loads(ok("agents", "show", "s", "--json").stdout)
    assert doc["agent"]["name"] == "s" and doc["agent"]["system"] == "You count."
    assert [(m["role"], m["content"], m["status"]) for m in doc["messages"]] == [(m.role, m.content, m.status) for m in stored]
    assert doc["messages"][1]["meta"]["finish_reason"] in ("stop", "length")


def test_show_errors(home):
    ok("agents", "new", "s")
    assert "no agent named 'ghost'" in fails(3, "agents", "show", "ghost")
    assert "invalid agent name" in fails(2, "agents", "show", "../etc")
    assert "not both" in fails(2, "agents", "show", "s", "--json", "--markdown")


# ---- edit ---------------------------------------------------------------
def test_edit_persona_invalidates_the_cache(tiny, blocks32):
    talk("e", LONG, model=tiny["llama"], system="Old persona.")
    assert chain("e")
    r = ok("agents", "edit", "e", "--system", "New persona.")
    err = r.stderr.decode()
    assert "updated agent 'e': persona" in err and "cached prefix" in err and "invalidated" in err
    assert chain("e") == [] and tail("e") is None
    rec = talk("e", "who are you now?")
    assert rec.tier == "cold" and rec.done.stats.cached_tokens == 0
    assert agent("e").system == "New persona."


def test_edit_settings_keeps_the_cache(tiny, blocks32):
    talk("e", LONG, model=tiny["llama"])
    before = chain("e")
    r = ok("agents", "edit", "e", "--temp", "0.5", "--max-tokens", "20")
    assert "invalidated" not in r.stderr.decode()
    assert agent("e").settings == {"temp": 0.5, "max_tokens": 20}
    assert chain("e") == before
    rec = talk("e", "more")
    assert rec.tier == "warm" and rec.done.stats.cached_tokens > 0


def test_edit_model_and_errors(tiny, home):
    ok("agents", "new", "e", "--model", str(tiny["llama"]))
    ok("agents", "edit", "e", "--model", str(tiny["qwen3"]))
    assert agent("e").model == str(tiny["qwen3"])
    assert "nothing to change" in fails(2, "agents", "edit", "e")
    assert "unknown model" in fails(3, "agents", "edit", "e", "--model", "/no/such/model")
    assert "no agent named" in fails(3, "agents", "edit", "ghost", "--temp", "1")
    assert agent("e").model == str(tiny["qwen3"])


# ---- reset --------------------------------------------------------------
def test_reset_empties_the_conversation_and_frees_its_cache(tiny, blocks32):
    talk("r", LONG, model=tiny["llama"], system="Keep me.")
    assert block_files()
    r = ok("agents", "reset", "r", "--yes")
    assert "freed" in r.stderr.decode()
    assert messages("r") == [] and agent("r").system == "Keep me."
    with closing(Store()) as store:
        assert store.token_counts().get("r", 0) == 0
    assert block_files() == set() and tail("r") is None
    assert list(tails_dir().iterdir()) == []


# ---- rm -----------------------------------------------------------------
def test_rm_frees_own_blocks_and_keeps_shared_ones(tiny, blocks32):
    talk("a", LONG, model=tiny["llama"])
    ok("agents", "fork", "a", "b")
    shared = set(chain("a"))
    rec_b = talk("b", "a follow-up question that makes new blocks for b alone, " * 3)
    own_b = set(chain("b")) - shared
    assert own_b and {f"{h}.kv" for h in own_b} <= block_files()
    paths.history_dir().joinpath("b.history").write_text("+hi\n")

    r = ok("agents", "rm", "b", "--yes")
    assert "removed agent 'b'" in r.stderr.decode() and " 0 B " not in r.stderr.decode()
    assert agent_names() == ["a"] and messages("b") == []
    files = block_files()
    assert not {f"{h}.kv" for h in own_b} & files
    assert {f"{h}.kv" for h in shared} <= files
    assert not paths.history_dir().joinpath("b.history").exists()
    assert rec_b.done.generated
    rec = talk("a", "still there?")
    assert rec.tier == "warm" and rec.done.stats.cached_tokens >= len(shared) * 32


def test_rm_needs_confirmation(home):
    ok("agents", "new", "a")
    assert "pass --yes" in fails(2, "agents", "rm", "a")
    assert "pass --yes" in fails(2, "agents", "reset", "a")
    assert "no agent named" in fails(3, "agents", "rm", "ghost", "--yes")
    assert agent_names() == ["a"]


def test_rm_asks_on_a_terminal(home):
    pexpect = pytest.importorskip("pexpect")
    ok("agents", "new", "a")
    child = pexpect.spawn(SEMANTIC, ["agents", "rm", "a"], env=dict(os.environ), timeout=30)
    child.expect(r"delete agent 'a'.*\[y/N\]")
    child.sendline("n")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and agent_names() == ["a"]
    child = pexpect.spawn(SEMANTIC, ["agents", "rm", "a"], env=dict(os.environ), timeout=30)
    child.expect(r"\[y/N\]")
    child.sendline("y")
    child.expect("removed agent 'a'")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and agent_names() == []


# ---- rename -------------------------------------------------------------
def test_rename_moves_conversation_cache_and_history(tiny, blocks32):
    talk("old", LONG, model=tiny["llama"])
    before = chain("old")
    history = paths.history_dir() / "old.history"
    history.write_text("+hello\n")
    with closing(Store()) as store:
        store.save_room("team", ["x", "old"])
    ok("agents", "rename", "old", "new")
    with closing(Store()) as store:
        assert store.get_room("team") == ["x", "new"]  # saved rooms follow the rename
    assert agent_names() == ["new"] and len(messages("new")) == 2
    assert chain("new") == before and chain("old") == [] and tail("old") is None
    assert tail("new").file.startswith("new-")  # a later agent called 'old' cannot clobber it
    assert [p.name for p in tails_dir().iterdir()] == [tail("new").file]
    assert not history.exists() and (paths.history_dir() / "new.history").read_text() == "+hello\n"
    rec = talk("new", "continue")
    assert rec.tier == "warm" and rec.done.stats.cached_tokens > len(before) * 32


def test_rename_errors(home):
    ok("agents", "new", "a")
    ok("agents", "new", "b")
    assert "already exists" in fails(2, "agents", "rename", "a", "b")
    assert "no agent named" in fails(3, "agents", "rename", "ghost", "c")
    assert "invalid agent name" in fails(2, "agents", "rename", "a", "C!")
    assert "same" in fails(2, "agents", "rename", "a", "a")
    assert agent_names() == ["a", "b"]


# ---- fork ---------------------------------------------------------------
def test_fork_shares_every_block_and_resumes_warm(tiny, blocks32):
    first = talk("src", LONG, model=tiny["llama"], system="Shared persona.")
    before = block_files()
    r = ok("agents", "fork", "src", "copy")
    assert "forked 'src' as 'copy': 1 turn," in r.stderr.decode()
    ok("agents", "fork", "src", "copy2")
    assert block_files() == before  # nothing copied
    assert chain("copy") == chain("copy2") == chain("src") and len(chain("src")) >= 5
    inode = os.stat(tails_dir() / tail("src").file).st_ino
    assert os.stat(tails_dir() / tail("copy").file).st_ino == os.stat(tails_dir() / tail("copy2").file).st_ino == inode
    assert [(m.role, m.content) for m in messages("copy")] == [(m.role, m.content) for m in messages("src")]
    assert agent("copy").system == "Shared persona."
    rec = talk("copy", "and what next?")
    assert rec.tier == "warm" and rec.done.stats.cached_tokens == len(first.done.cached_log)
    assert len(messages("src")) == 2  # the source is untouched
    # Removing the source frees nothing: its blocks are the forks', its tail is copy2's too.
    r = ok("agents", "rm", "src", "--yes")
    assert "0 B of KV cache freed" in r.stderr.decode()
    assert {f"{h}.kv" for h in chain("copy") + chain("copy2")} <= block_files()
    rec2 = talk("copy2", "something else entirely")
    assert rec2.tier == "warm" and rec2.done.stats.cached_tokens == len(first.done.cached_log)


def test_fork_errors(home):
    ok("agents", "new", "a")
    ok("agents", "new", "b")
    assert "already exists" in fails(2, "agents", "fork", "a", "b")
    assert "no agent named" in fails(3, "agents", "fork", "ghost", "c")
    assert "invalid agent name" in fails(2, "agents", "fork", "a", "Bad")
    assert agent_names() == ["a", "b"]


# ---- busy ---------------------------------------------------------------
def test_busy_agents_are_refused_and_untouched(tiny, blocks32):
    talk("a", LONG, model=tiny["llama"])
    ok("agents", "new", "free")
    before = chain("a")
    with AgentLock("a"), AgentLock("target"):
        for args in (
            ("rm", "a", "--yes"),
            ("reset", "a", "--yes"),
            ("edit", "a", "--system", "x"),
            ("rename", "a", "z"),
            ("rename", "free", "target"),
            ("fork", "free", "target"),
            ("new", "target"),
            ("compact", "a"),
            ("trim", "a", "--keep-last", "0", "--yes"),
        ):
            err = fails(4, "agents", *args)
            assert "is busy" in err and f"pid {os.getpid()}" in err
            assert "--wait" not in err  # the advice names only options the command has: agents commands have no --wait
        assert json.loads(ok("agents", "ls", "--json").stdout)[0]["turns"] == 1  # reads are never refused
        assert b"a" in ok("agents", "show", "a").stdout
    assert agent_names() == ["a", "free"] and chain("a") == before
    assert agent("a").system == "" and len(messages("a")) == 2
