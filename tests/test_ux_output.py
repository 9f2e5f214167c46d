"""Output that fits its medium (issue 20): piped tables are tab-separated, one complete
record per line; a terminal never crops the name column; `agents show` loses no text in
any mode; `agents ls` and `cache ls` show how full each agent's context is; counted
nouns agree with their counts; flags show no `<bool>` in help; every JSON time is ISO
8601; `doctor` reports a model it cannot find and fails with exit 3 after the report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pexpect
import pytest
from conftest import SEMANTIC, run_cli

from semantic_cli.errors import EXIT_NOT_FOUND
from semantic_cli.store import Store

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
WORDS = " ".join(f"w{i:03d}" for i in range(90))  # 450 characters of distinct words
PERSONA = "You review plans.\n\tBe blunt, \\ say why. " + "Mind the details. " * 12
LONG_NAME = "a-rather-long-agent-name-for-narrow-terminals"  # 45 characters


def ok(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    r = run_cli(*args, env=env)
    assert r.returncode == 0, r.stderr.decode()
    return r


def on_a_terminal(columns: int, *args: str) -> str:
    """What `semantic ARGS` writes to a terminal `columns` wide, escape sequences removed."""
    env = dict(os.environ, TERM="xterm-256color")
    child = pexpect.spawn(SEMANTIC, list(args), env=env, dimensions=(50, columns), timeout=120)
    try:
        out = child.read()
    finally:
        child.close()
    assert child.exitstatus == 0, out
    return ANSI.sub("", out.decode()).replace("\r\n", "\n")


def untsv(field: str) -> str:
    """The inverse of render.tsv_field."""
    return re.sub(r"\\(.)", lambda m: {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}[m.group(1)], field)


@pytest.fixture
def agents(tiny, home) -> dict[str, list[tuple[str, str, str, dict]]]:
    """Two agents without a model run: `LONG_NAME` on the tiny llama (a 4,096-token
    context) with a long persona and a turn of 812 logged tokens, and `plain` on the
    default model, which is not prepared under this temporary home."""
    turn = [
        ("user", "first line\n  indented " + WORDS, "complete", {}),
        ("assistant", "# Plan\n\n" + WORDS + "\n\n- item " + WORDS + "\n- two\n\n```\ncode " + WORDS + "\n```", "complete", {}),
        ("user", "go on", "complete", {}),
        ("assistant", "cut *short* " + WORDS, "interrupted", {}),
    ]
    with closing(Store()) as store:
        store.create_agent(LONG_NAME, str(tiny["llama"]), PERSONA, {})
        store.record_turn(LONG_NAME, turn, "tok", list(range(812)), replace_log=True)
        store.create_agent("plain", "default", "", {})
    return {LONG_NAME: turn, "plain": []}


# ---- agents show: lossless in every mode --------------------------------------------
def test_agents_show_piped_is_every_message_byte_for_byte(agents, tiny):
    r = ok("agents", "show", LONG_NAME)
    expected = f"{LONG_NAME} · {tiny['llama']}\npersona: {PERSONA}\n"
    for role, content, status, _ in agents[LONG_NAME]:
        who = "you" if role == "user" else LONG_NAME + (" (interrupted)" if status == "interrupted" else "")
        expected += f"\n{who}\n{content}\n"
    assert r.stdout.decode() == expected
    for _, content, _, _ in agents[LONG_NAME]:
        assert content.encode() in r.stdout  # every message, byte for byte (list items, code, indentation)


def test_agents_show_on_a_narrow_terminal_wraps_and_loses_no_word(agents):
    shown = on_a_terminal(60, "agents", "show", LONG_NAME).split()
    for i in range(90):
        # every word of the paragraph, the list item, the code block and both user messages
        assert shown.count(f"w{i:03d}") == 5, f"w{i:03d}"


# ---- agents ls / cache ls: piped, one complete record per line ------------------------
def test_agents_ls_piped_is_tab_separated_complete_records(agents, tiny):
    r = ok("agents", "ls")
    lines = r.stdout.decode().split("\n")
    assert lines[-1] == "" and len(lines) == 4  # a header and one line per agent
    header, *rows = (line.split("\t") for line in lines[:-1])
    assert header == ["NAME", "MODEL", "PERSONA", "TURNS", "COMPACTED", "TOKENS", "CONTEXT", "CACHED", "LAST ACTIVE"]
    long, plain = rows
    assert long[:2] == [LONG_NAME, str(tiny["llama"])]  # the model as given, not shortened
    assert untsv(long[2]) == PERSONA and "\t" not in long[2] and "\n" not in long[2]
    assert long[3:8] == ["2", "0", "812", "4096", "0"]  # numbers only: logged tokens, the model's context
    assert plain[:8] == ["plain", "default", "", "0", "0", "0", "", "0"]  # context unknown: empty
    for row in rows:  # ISO 8601, as in --json
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row[8]), row[8]


def test_cache_ls_piped_is_tab_separated_and_its_totals_go_to_stderr(agents, tiny):
    r = ok("cache", "ls")
    lines = r.stdout.decode().splitlines()
    assert [line.split("\t")[:4] for line in lines] == [
        ["agent", "model", "tokens", "context"],
        [LONG_NAME, str(tiny["llama"]), "812", "4096"],
        ["plain", "default", "0", ""],
    ]
    assert lines[0].split("\t")[4:] == ["cached", "blocks_own", "blocks_shared", "bytes_own", "bytes_shared", "tier", "used"]
    assert all(line.count("\t") == 10 for line in lines)
    assert all(field.isdigit() for line in lines[1:] for field in line.split("\t")[4:9])
    assert r.stderr.decode() == "total 0 B in 0 blocks · stale 0 B (0 blocks) · orphaned 0 B (0 files)\n"


@pytest.mark.parametrize("command", ["agents", "cache"])
def test_on_a_narrow_terminal_the_name_column_is_never_cropped(agents, command):
    shown = on_a_terminal(50, command, "ls")
    lines = shown.splitlines()
    assert any(line.startswith(LONG_NAME + " ") for line in lines), shown
    assert shown.count("…") == (1 if command == "agents" else 0)  # only the persona excerpt is shortened
    if command == "cache":
        assert "total 0 B in 0 blocks" in shown  # on a terminal the totals follow the table


# ---- JSON: fullness and ISO 8601 times --------------------------------------------------
def test_json_shows_fullness_and_iso_times(tiny, home):
    r = ok("chat", "-a", "c", "--model", str(tiny["llama"]), "--max-tokens", "3", "--json", "-m", "hello there")
    turn = json.loads(r.stdout)
    tokens = turn["prompt_tokens"] + turn["generated_tokens"]
    [row] = json.loads(ok("agents", "ls", "--json").stdout)
    assert (row["transcript_tokens"], row["context_length"]) == (tokens, 4096)
    assert ISO.fullmatch(row["created_at"]) and ISO.fullmatch(row["last_active"])
    [cached] = json.loads(ok("cache", "ls", "--json").stdout)["agents"]
    assert (cached["transcript_tokens"], cached["context_length"]) == (tokens, 4096)
    assert isinstance(cached["last_used"], str) and ISO.fullmatch(cached["last_used"]), cached["last_used"]
    doc = json.loads(ok("agents", "show", "c", "--json").stdout)
    assert all(ISO.fullmatch(m["created_at"]) for m in doc["messages"])


# ---- counted nouns -------------------------------------------------------------------------
def test_counted_nouns_agree_with_their_counts(tiny, home):
    with closing(Store()) as store:
        store.create_agent("one", str(tiny["llama"]), "", {})
        store.record_turn("one", [("user", "hi", "complete", {}), ("assistant", "hello", "complete", {})], "tok", [1, 2], True)
    err = ok("agents", "fork", "one", "two").stderr.decode()
    assert "1 turn," in err and "0 cached blocks" in err
    ok("chat", "-a", "v", "--model", str(tiny["llama"]), "--max-tokens", "2", "-m", "hi", env={"SEMANTIC_BLOCK_TOKENS": "4096"})
    out = ok("cache", "verify").stdout.decode()  # the one tail file, no block file
    assert out == "checked 1 file: 0 problems\n"


# ---- help: no <bool> beside a flag ---------------------------------------------------------
@pytest.mark.parametrize(
    "command, flags",
    [
        (["agents", "ls"], ["--json"]),
        (["agents", "show"], ["--json", "--markdown"]),
        (["agents", "rm"], ["--yes"]),
        (["agents", "reset"], ["--yes"]),
        (["cache", "ls"], ["--json"]),
        (["cache", "evict"], ["--all", "--dry-run", "--yes", "--json"]),
        (["cache", "verify"], ["--repair", "--json"]),
        (["doctor"], ["--json"]),
        (["rooms", "ls"], ["--json"]),
    ],
)
def test_help_shows_no_type_beside_a_flag(home, command, flags):
    out = ok(*command, "--help", env={"COLUMNS": "200"}).stdout.decode()
    for flag in flags:
        [line] = [ln for ln in out.splitlines() if ln.startswith(f"│ {flag} ")]  # its row in the options box
        assert "<bool>" not in line, line


# ---- doctor ------------------------------------------------------------------------------------
@pytest.mark.parametrize("json_out", [False, True], ids=["text", "json"])
def test_doctor_reports_a_missing_model_and_exits_not_found_after_the_report(home, json_out):
    r = run_cli("doctor", *(["--json"] if json_out else []), env={"SEMANTIC_MODEL": "/nonexistent"})
    assert r.returncode == EXIT_NOT_FOUND, r.stderr
    err = r.stderr.decode()
    assert err.startswith("semantic: error: unknown model '/nonexistent'") and err.count("\n") == 1, err
    out = r.stdout.decode()
    if json_out:
        report = json.loads(out)
        assert report["model"] == "/nonexistent" and report["model_ready"] is False and report["server"]
    else:
        assert re.search(r"^model_ready +no \(not found\)$", out, re.M), out
        assert "None" not in out and out.rstrip().splitlines()[-1].startswith("server")  # the whole report came first


def test_doctor_with_a_usable_model_exits_zero(tiny, home):
    r = run_cli("doctor", "--json", env={"SEMANTIC_MODEL": str(tiny["llama"])})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model_ready"] is True


# ---- cheap: no mlx ---------------------------------------------------------------------------
def test_ls_with_agents_reads_the_context_without_importing_mlx(agents):
    code = (
        "import sys\nfrom semantic_cli.cli.app import main\n"
        "for argv in (['agents', 'ls'], ['agents', 'ls', '--json'], ['cache', 'ls'], ['cache', 'ls', '--json']):\n"
        "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, (argv, e.code)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm', 'numpy', 'transformers'))\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, env=dict(os.environ), cwd=Path(__file__).parent)
    assert r.returncode == 0, r.stderr.decode()
    assert b"\t812\t4096\t" in r.stdout  # piped: the tokens and the context length read from config.json


def test_no_help_page_shows_a_type_beside_any_flag(home):
    """Every command's page, -h/--help included (typer gives the help flag a `<bool>`)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import gen_docs

    def paths(cmd: gen_docs.Cmd) -> list[list[str]]:
        return [cmd.path[1:]] + [p for sub in cmd.subs for p in paths(sub)]

    pages = paths(gen_docs.load())
    assert len(pages) > 20
    for command in pages:
        out = ok(*command, "--help", env={"COLUMNS": "200"}).stdout.decode()
        assert re.search(r"│ +--help +-h ", out) and "<bool>" not in out, (command, [ln for ln in out.splitlines() if "<bool>" in ln])
