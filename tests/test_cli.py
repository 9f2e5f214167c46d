"""The `semantic` entry point end to end (subprocess) against a temp SEMANTIC_HOME."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from helpers import uncached_reply_end

from semantic_cli.errors import EXIT_BAD_INPUT, EXIT_BUSY, EXIT_MODEL, EXIT_NOT_FOUND, EXIT_TOO_LONG, EXIT_USAGE

JSON_FIELDS = {
    "reply",
    "agent",
    "model",
    "finish_reason",
    "restore_s",
    "ttft_s",
    "prompt_tokens",
    "cached_tokens",
    "prefilled_tokens",
    "generated_tokens",
    "prompt_tps",
    "generation_tps",
    "cache_tier",
}


def _db_rows(home, sql: str, *args) -> list:
    db = sqlite3.connect(home / "data" / "semantic.db")
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def test_pipe_prints_only_the_reply(tiny, home):
    r = run_cli("chat", "--agent", "planner", "--model", str(tiny["llama"]), "--max-tokens", "8", input="hello there\n")
    assert r.returncode == 0, r.stderr
    [line] = r.stderr.decode().splitlines()  # stderr says the agent is new, once; stdout is the reply alone
    assert line.startswith("new agent 'planner'")
    assert r.stdout.endswith(b"\n") and b"\x1b[" not in r.stdout
    rows = _db_rows(home, "SELECT role, content, status FROM messages WHERE agent='planner' ORDER BY id")
    assert rows[0] == ("user", "hello there", "complete")
    assert rows[1][0] == "assistant" and rows[1][2] == "complete"
    assert r.stdout.decode() == rows[1][1] + "\n"
    again = run_cli("chat", "--agent", "planner", "--max-tokens", "8", input="and again\n")
    assert again.returncode == 0 and again.stderr == b""


def test_json_output_and_continuation_across_invocations(tiny, home):
    args = ("chat", "--agent", "a", "--model", str(tiny["llama"]), "--max-tokens", "6", "--json")
    first = json.loads(run_cli(*args, "-m", "first message").stdout)
    assert set(first) == JSON_FIELDS  # the documented, stable fields
    assert first["cache_tier"] == "cold"
    assert first["agent"] == "a" and first["generated_tokens"] == 6 and first["finish_reason"] == "length"
    assert first["cached_tokens"] == 0 and first["prefilled_tokens"] == first["prompt_tokens"]
    second = json.loads(run_cli(*args, "-m", "second message").stdout)
    # The second turn sees the first: its prompt is longer, and the first turn's KV came from disk.
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["generated_tokens"]
    # all but the reply's last token, which no pass read (on the CPU)
    assert second["cached_tokens"] == first["prompt_tokens"] + first["generated_tokens"] - uncached_reply_end()
    assert second["prefilled_tokens"] == second["prompt_tokens"] - second["cached_tokens"]
    assert second["cache_tier"] == "warm" and second["ttft_s"] > 0
    assert len(_db_rows(home, "SELECT id FROM messages WHERE agent='a'")) == 4


def test_verbose_puts_status_on_stderr_only(tiny, home):
    r = run_cli("chat", "-a", "v", "--model", str(tiny["llama"]), "--max-tokens", "4", "-v", "-m", "hi")
    assert r.returncode == 0
    assert b"ttft" in r.stderr and b"ttft" not in r.stdout


def test_system_persona_is_stored_on_first_use(tiny, home):
    run_cli("chat", "-a", "p", "--model", str(tiny["llama"]), "--system", "You are terse.", "--max-tokens", "2", "-m", "hi")
    assert _db_rows(home, "SELECT system FROM agents WHERE name='p'") == [("You are terse.",)]


@pytest.mark.parametrize(
    "args, stdin, code, needle",
    [
        (["--agent", "../x", "-m", "hi"], None, EXIT_USAGE, b"invalid agent name"),
        (["--agent", "Bad Name", "-m", "hi"], None, EXIT_USAGE, b"invalid agent name"),
        (["--agent", "a", "--model", "/nonexistent/model"], "hi", EXIT_NOT_FOUND, b"unknown model"),
        (["--agent", "a", "--model", "{tmp}"], "hi", EXIT_MODEL, b"not an mlx-lm model directory"),
        (["--agent", "a", "--model", "{llama}"], "", EXIT_BAD_INPUT, b"empty message"),
        (["--agent", "a", "--model", "{llama}"], b"\xff\xfe bad", EXIT_BAD_INPUT, b"not valid UTF-8"),
        (["--agent", "a", "--agent", "a", "-m", "hi"], None, EXIT_USAGE, b"named twice"),
        (["--agent", "a", "--color", "purple", "-m", "hi"], None, EXIT_USAGE, b"--color"),
        (["--agent", "a", "--temp", "nan", "-m", "hi"], None, EXIT_USAGE, b"--temp must be a finite number"),
        (["--agent", "a", "--temp", "1e309", "-m", "hi"], None, EXIT_USAGE, b"--temp must be a finite number"),
        (["--agent", "a", "--top-p", "nan", "-m", "hi"], None, EXIT_USAGE, b"--top-p must be"),
        (["--agent", "a", "--repeat-penalty", "inf", "-m", "hi"], None, EXIT_USAGE, b"--repeat-penalty must be"),
        (["--agent", "a", "--wait-timeout", "nan", "-m", "hi"], None, EXIT_USAGE, b"--wait-timeout"),
        (["--agent", "a", "--model", "", "-m", "hi"], None, EXIT_USAGE, b"--model is empty"),
        (["-a", "a", "-a", "b", "--model", "{llama}", "--save-room", "bad name!", "--all", "-m", "hi"], None, EXIT_USAGE, b"invalid room"),
    ],
)
def test_bad_input_is_one_line_an_exit_code_and_nothing_written(tiny, home, tmp_path, args, stdin, code, needle):
    args = [a.replace("{tmp}", str(tmp_path)).replace("{llama}", str(tiny["llama"])) for a in args]
    r = run_cli("chat", *args, input=stdin)
    assert r.returncode == code, r.stderr
    assert needle in r.stderr
    assert r.stderr.count(b"\n") == 1 and b"Traceback" not in r.stderr
    assert r.stdout == b""
    db = home / "data" / "semantic.db"
    assert not db.exists() or _db_rows(home, "SELECT COUNT(*) FROM agents") == [(0,)]


def test_message_longer_than_the_context_says_the_numbers(tiny, home):
    long = "word " * 5000  # the tiny models have a 4,096-token context
    r = run_cli("chat", "-a", "a", "--model", str(tiny["llama"]), input=long)
    assert r.returncode == EXIT_TOO_LONG
    line = r.stderr.decode()
    assert "4096" in line and "tokens" in line and line.count("\n") == 1
    assert _db_rows(home, "SELECT COUNT(*) FROM agents") == [(0,)]


@pytest.mark.parametrize("command", [["chat", "-a", "endless"], ["agents", "new", "endless", "--system-file", "-"]])
def test_an_endless_input_is_refused_at_its_cap_not_read_into_memory(tiny, home, command):
    """`yes | semantic chat` used to read until memory ran out; now at most 8 MiB is read."""
    import subprocess

    from conftest import SEMANTIC

    yes = subprocess.Popen(["yes"], stdout=subprocess.PIPE)
    try:
        r = subprocess.run([SEMANTIC, *command, "--model", str(tiny["llama"])], stdin=yes.stdout, capture_output=True, timeout=120)
    finally:
        yes.kill()
        yes.wait()
    assert r.returncode == EXIT_TOO_LONG, r.stderr
    assert b"over 8 MiB" in r.stderr and r.stderr.count(b"\n") == 1
    assert not (home / "data" / "semantic.db").exists() or _db_rows(home, "SELECT COUNT(*) FROM agents") == [(0,)]


def test_second_process_on_the_same_agent_is_refused(tiny, home):
    from semantic_cli.locks import AgentLock

    with AgentLock("busy"):
        r = run_cli("chat", "-a", "busy", "--model", str(tiny["llama"]), "-m", "hi")
        assert r.returncode == EXIT_BUSY
        assert f"busy (pid {__import__('os').getpid()})".encode() in r.stderr
        other = run_cli("chat", "-a", "other", "--model", str(tiny["llama"]), "--max-tokens", "2", "-m", "hi")
        assert other.returncode == 0


def test_help_and_cache_ls_do_not_import_mlx(home):
    code = (
        "import sys\n"
        "from semantic_cli.cli.app import main\n"
        "for argv in (['--help'], ['cache', 'ls'], ['agents', 'ls'], ['config', 'show']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (argv, e.code)\n"
        "bad = sorted(m for m in sys.modules if m == 'mlx' or m.startswith(('mlx.', 'mlx_lm')))\n"
        "print('MLX:' + ','.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "MLX:\n" in r.stdout, r.stdout[-300:]


def test_semantic_home_relocates_everything(tiny, home, tmp_path):
    r = run_cli("chat", "-a", "h", "--model", str(tiny["llama"]), "--max-tokens", "2", "-m", "hi")
    assert r.returncode == 0
    written = {p.relative_to(home).parts[0] for p in home.rglob("*")}
    assert written <= {"data", "cache", "config"}
    assert (home / "data" / "semantic.db").exists() and any((home / "cache").rglob("*.kv"))


def test_debug_env_shows_tracebacks(home):
    r = run_cli("chat", "--agent", "../bad", "-m", "hi", env={"SEMANTIC_DEBUG": "1"})
    assert r.returncode != 0 and b"Traceback" in r.stderr


def test_cache_commands(tiny, home, monkeypatch):
    env = {"SEMANTIC_BLOCK_TOKENS": "16"}
    for name in ("c1", "c2"):
        assert (
            run_cli(
                "chat", "-a", name, "--model", str(tiny["llama"]), "--max-tokens", "4", "-m", "tell me a story about caches " * 4, env=env
            ).returncode
            == 0
        )
    ls = json.loads(run_cli("cache", "ls", "--json").stdout)
    rows = {a["agent"]: a for a in ls["agents"]}
    assert rows["c1"]["tier"] == "warm" and rows["c1"]["cached_tokens"] > 16
    assert rows["c1"]["blocks_shared"] >= 1  # the same template prefix and message
    assert run_cli("cache", "verify").returncode == 0
    dry = run_cli("cache", "evict", "c1", "--dry-run", "--json")
    plan = json.loads(dry.stdout)
    assert plan["agents"] == ["c1"] and plan["dry_run"] is True and plan["bytes_freed"] > 0
    assert json.loads(run_cli("cache", "ls", "--json").stdout) == ls  # dry run changed nothing
    refused = run_cli("cache", "evict", "c1")  # no terminal, no --yes
    assert refused.returncode == EXIT_USAGE
    done = json.loads(run_cli("cache", "evict", "c1", "--yes", "--json").stdout)
    assert done["bytes_freed"] == plan["bytes_freed"]
    after = {a["agent"]: a for a in json.loads(run_cli("cache", "ls", "--json").stdout)["agents"]}
    assert after["c1"]["tier"] == "cold" and after["c1"]["transcript_tokens"] == rows["c1"]["transcript_tokens"]
    assert after["c2"]["cached_tokens"] == rows["c2"]["cached_tokens"]  # shared blocks stayed for c2
    assert run_cli("cache", "evict", "nobody", "--yes").returncode == EXIT_NOT_FOUND
    assert run_cli("cache", "evict").returncode == EXIT_USAGE


def test_cache_verify_reports_and_repairs_damage(tiny, home):
    env = {"SEMANTIC_BLOCK_TOKENS": "16"}
    run_cli("chat", "-a", "d", "--model", str(tiny["llama"]), "--max-tokens", "4", "-m", "some words to fill blocks " * 6, env=env)
    victim = sorted((home / "cache" / "blocks").rglob("*.kv"))[0]
    data = bytearray(victim.read_bytes())
    data[-10] ^= 1
    victim.write_bytes(bytes(data))
    (home / "cache" / "blocks" / "zz").mkdir()
    (home / "cache" / "blocks" / "zz" / "orphan.kv").write_bytes(b"x")
    r = run_cli("cache", "verify", "--json")
    assert r.returncode == 8
    problems = json.loads(r.stdout)["problems"]
    assert {p["what"] for p in problems} == {"block", "orphan"}
    assert run_cli("cache", "verify", "--repair").returncode == 0
    assert run_cli("cache", "verify").returncode == 0
    again = run_cli("chat", "-a", "d", "--max-tokens", "2", "--json", "-m", "still there?", env=env)
    assert again.returncode == 0 and json.loads(again.stdout)["prompt_tokens"] > 40


def test_config_precedence(home, monkeypatch):
    assert run_cli("config", "set", "max_tokens", "77").returncode == 0
    assert run_cli("config", "get", "max_tokens").stdout.strip() == b"77"
    assert run_cli("config", "get", "model", env={"SEMANTIC_MODEL": "/x"}).stdout.strip() == b"/x"
    assert run_cli("config", "set", "block_tokens", "-3").returncode == EXIT_USAGE
    assert run_cli("config", "get", "nope").returncode == EXIT_USAGE
    path = run_cli("config", "path").stdout.decode().strip()
    assert path.startswith(str(home)) and "max_tokens = 77" in Path(path).read_text()


def test_a_damaged_or_unusable_store_is_one_line_naming_the_file(tiny, home, tmp_path):
    """A transcript database that is not one, and a home under a regular file: one line
    that names the path and the way out, never "unexpected"."""
    assert run_cli("agents", "new", "x").returncode == 0
    db = home / "data" / "semantic.db"
    for name in ("semantic.db-wal", "semantic.db-shm"):
        (home / "data" / name).unlink(missing_ok=True)
    db.write_bytes(b"not a database at all" * 100)
    r = run_cli("agents", "ls")
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1, r.stderr
    assert str(db).encode() in r.stderr and b"damaged" in r.stderr and b"unexpected" not in r.stderr
    assert db.read_bytes() == b"not a database at all" * 100  # never overwritten
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = run_cli("agents", "ls", env={"SEMANTIC_HOME": str(blocker / "sub")})
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1 and b"unexpected" not in r.stderr and str(blocker).encode() in r.stderr


def test_a_token_log_naming_ids_past_the_vocabulary_is_not_fed_to_the_model(tiny, home):
    """A chunk of the right length whose ids the model has no embedding for (a damaged row)
    is not trusted: the turn renders the transcript again instead of reading past the table."""
    model = str(tiny["llama"])
    assert run_cli("chat", "-a", "a", "--model", model, "--max-tokens", "2", "-m", "hi").returncode == 0
    db = sqlite3.connect(home / "data" / "semantic.db")
    try:
        with db:
            db.execute("UPDATE token_chunks SET tokens=? WHERE agent='a'", ((2**31).to_bytes(4, "little") * 8,))
    finally:
        db.close()
    turn = run_cli("chat", "-a", "a", "--max-tokens", "2", "--json", "-m", "again")
    assert turn.returncode == 0, turn.stderr
    assert json.loads(turn.stdout)["prompt_tokens"] > 8  # the transcript's render, not the 8 bad ids and a delta


def test_damaged_rows_cost_their_own_values_not_every_command(tiny, home):
    """An agent's settings, a message's figures or a token chunk that are not what they
    should be: `agents ls`, `rooms ls` and the next turn still work (defaults, a re-render);
    a room whose member list is damaged says so by name."""
    model = str(tiny["llama"])
    for name in ("a", "b"):
        assert run_cli("chat", "-a", name, "--model", model, "--max-tokens", "2", "-m", "hi").returncode == 0
    assert run_cli("chat", "-a", "a", "-a", "b", "--save-room", "r", "--all", "--max-tokens", "2", "-m", "hi").returncode == 0
    db = sqlite3.connect(home / "data" / "semantic.db")
    try:
        with db:
            db.execute("UPDATE agents SET settings='{broken' WHERE name='a'")
            db.execute("UPDATE messages SET meta='[1, 2' WHERE agent='a'")
            db.execute("UPDATE token_chunks SET tokens=X'010203' WHERE agent='a'")
            db.execute("UPDATE rooms SET agents='not json' WHERE name='r'")
    finally:
        db.close()
    listed = run_cli("agents", "ls", "--json")
    assert listed.returncode == 0 and sorted(a["name"] for a in json.loads(listed.stdout)) == ["a", "b"], listed.stderr
    assert run_cli("rooms", "ls").returncode == 0
    turn = run_cli("chat", "-a", "a", "--max-tokens", "2", "--json", "-m", "again")
    assert turn.returncode == 0, turn.stderr
    # The damaged chunk was not trusted (reading it raised before): the turn rendered the
    # transcript again and wrote a whole log.
    assert [row[0] for row in _db_rows(home, "SELECT content FROM messages WHERE agent='a' AND role='user' ORDER BY id")][-1] == "again"
    room = run_cli("chat", "--room", "r", "--all", "-m", "hi")
    assert room.returncode == 1 and b"room 'r'" in room.stderr and b"damaged" in room.stderr and room.stderr.count(b"\n") == 1
    assert run_cli("rooms", "rm", "r").returncode == 0  # the way out works


@pytest.mark.parametrize("closed", ["<&-", ">&-"])
def test_a_closed_standard_stream_is_like_dev_null(tiny, home, closed):
    from conftest import SEMANTIC

    cmd = f"{SEMANTIC} chat -a c --model {tiny['llama']} --max-tokens 2" + (" -m hi" if closed == ">&-" else "")
    r = subprocess.run(["bash", "-c", f"{cmd} {closed}"], capture_output=True, timeout=120)
    if closed == "<&-":
        assert r.returncode == EXIT_BAD_INPUT and b"empty message" in r.stderr, r.stderr
    else:
        assert r.returncode == 0 and b"unexpected" not in r.stderr, r.stderr
        assert [row[0] for row in _db_rows(home, "SELECT role FROM messages WHERE agent='c' ORDER BY id")] == ["user", "assistant"]


def test_a_bench_out_that_cannot_be_written_is_refused_before_the_run(home, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (tmp_path, blocker / "results.json"):
        r = run_cli("bench", "exp-005", "--model", "/nonexistent/model", "--out", str(out))
        assert r.returncode == EXIT_USAGE and b"--out" in r.stderr and r.stderr.count(b"\n") == 1, r.stderr


def test_an_unknown_flag_or_command_is_one_line(home):
    for args in (["chat", "--bogus"], ["bogus"], ["cache", "ls", "--nope"]):
        r = run_cli(*args)
        assert r.returncode == EXIT_USAGE and r.stderr.count(b"\n") == 1 and b"--help" in r.stderr, (args, r.stderr)


def test_a_hub_error_over_several_lines_is_one(home, monkeypatch):
    """huggingface_hub's errors span lines; the model error quotes the first."""
    from semantic_cli.backend import compat
    from semantic_cli.errors import ModelError
    from semantic_cli.model import loader

    def offline(repo, cache_dir):
        raise OSError("We couldn't connect to the hub.\nCheck your connection\nor set HF_HUB_OFFLINE=1.")

    monkeypatch.setattr(compat, "hf_download", offline)
    with pytest.raises(ModelError) as caught:
        loader._hf_download("owner/name")
    assert "\n" not in caught.value.message and "couldn't connect" in caught.value.message


def test_only_what_the_machine_refuses_is_an_environment_error_the_rest_is_a_bug_to_report():
    import errno

    from semantic_cli.cli.app import _environment_error

    assert "free disk space" in (_environment_error(OSError(errno.ENOSPC, "No space left on device", "/x")) or "")
    assert "free disk space" in (_environment_error(sqlite3.OperationalError("disk I/O error")) or "")
    assert _environment_error(sqlite3.ProgrammingError("Cannot operate on a closed database.")) is None
    assert _environment_error(sqlite3.OperationalError("no such column: x")) is None
    assert _environment_error(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")) is None


def test_a_group_run_bare_prints_its_help_and_no_error_line(home):
    r = run_cli("agents")
    assert b"Usage" in r.stdout + r.stderr and b"error:" not in r.stderr, r.stderr


def test_an_empty_model_flag_is_refused_for_an_existing_agent_and_in_every_command(tiny, home):
    assert run_cli("chat", "-a", "e", "--model", str(tiny["llama"]), "--max-tokens", "2", "-m", "hi").returncode == 0
    blanks = (["chat", "-a", "e", "--model", "", "-m", "hi"], ["agents", "new", "f", "--model", " "], ["bench", "exp-005", "--model", ""])
    for args in blanks:
        r = run_cli(*args)
        assert r.returncode == EXIT_USAGE and b"--model is empty" in r.stderr and r.stderr.count(b"\n") == 1, (args, r.stderr)
    assert [row[0] for row in _db_rows(home, "SELECT name FROM agents")] == ["e"]


def test_cache_rank_names_a_shard_or_is_not_found(home):
    assert run_cli("cache", "ls").returncode == 0
    bad = run_cli("cache", "--rank", "../x", "ls")
    assert bad.returncode == EXIT_USAGE and b"not a shard's name" in bad.stderr
    missing = run_cli("cache", "--rank", "layers-w2-r1", "ls")
    assert missing.returncode == EXIT_NOT_FOUND and b"no shard 'layers-w2-r1'" in missing.stderr
