"""REPL control, in-process on a real `Repl` (and one pty for --json): slash-command
suggestions, exit/quit, a multi-line /system, /edit through $EDITOR, /model NAME, and
the context fullness in the footer and /stats."""

from __future__ import annotations

import os
import re
from contextlib import closing
from pathlib import Path
from typing import Any

import pexpect
import pytest
from conftest import SEMANTIC
from helpers import Session

from semantic_cli.cli import slash
from semantic_cli.cli.repl import Repl
from semantic_cli.cli.repl_input import block_open
from semantic_cli.errors import NotFoundError, UsageError
from semantic_cli.kv.index import KVIndex
from semantic_cli.store import Store
from semantic_cli.turn import GenSettings, TurnRecorded

LONG = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(12))


@pytest.fixture
def blocks(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "32")
    return home


def repl_for(s: Session, *names: str, model: Path | None = None) -> Repl:
    agents = [s.chat.open_agent(n, str(model) if model else None) for n in names]
    return Repl(s.chat, agents, GenSettings(max_tokens=8))


def test_mistyped_commands_get_a_suggestion(home):
    with Session() as s:
        repl = repl_for(s, "a")
        with pytest.raises(UsageError, match=r"unknown command /retyr — did you mean /retry\?"):
            slash.dispatch(repl, "/retyr")
        with pytest.raises(UsageError, match=r"did you mean /compact\?"):
            slash.dispatch(repl, "/compcat")
        with pytest.raises(UsageError) as exc:
            slash.dispatch(repl, "/zzzzzz")
        assert "did you mean" not in exc.value.message


def test_exit_or_quit_alone_leaves_and_a_quoted_one_is_sent(home):
    for lines, sent in ((["EXIT"], []), (['"""exit"""', "say exit please", " quit "], ["exit", "say exit please"])):
        with Session() as s:
            repl = repl_for(s, "a")
            queue = list(lines)
            got: list[str] = []
            repl.read = lambda q=queue: q.pop(0)  # type: ignore[method-assign]
            repl.send = got.append  # type: ignore[method-assign]
            repl.run()  # returns: it did not wait for more input
            assert got == sent and queue == []


def test_system_takes_a_multi_line_persona(home):
    assert block_open('/system """You are terse.')
    assert block_open('/system """')
    assert not block_open('/system """You are terse.\nCite sources."""')
    assert not block_open("/system one line")
    with closing(Store()) as store:
        store.create_agent("a", "default", "old")
    with Session() as s:
        repl = repl_for(s, "a")
        slash.dispatch(repl, '/system """You are terse.\n\nCite sources."""')
        assert s.store.get_agent("a").system == repl.agent().system == "You are terse.\n\nCite sources."
        slash.dispatch(repl, "/system Plain.")
        assert s.store.get_agent("a").system == "Plain."


def editor(tmp_path: Path, body: str) -> str:
    script = tmp_path / "ed.sh"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_edit_sends_what_the_editor_wrote(home, tmp_path, monkeypatch):
    import tempfile

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the draft is written: ours alone
    with Session() as s:
        repl = repl_for(s, "a")
        got: list[str] = []
        repl.send = got.append  # type: ignore[method-assign]
        monkeypatch.delenv("VISUAL", raising=False)
        monkeypatch.setenv("EDITOR", editor(tmp_path, 'cat "$1" > "$1.seen"; printf "Composed\\nin the editor.\\n\\n" > "$1"'))
        slash.dispatch(repl, "/edit draft text")
        assert got == ["Composed\nin the editor."]
        seen = list((tmp_path / "tmp").glob("semantic-*.md.seen"))
        assert [p.read_text() for p in seen] == ["draft text"]  # the editor got /edit's text to start from
        for p in seen:
            p.unlink()
        assert not list((tmp_path / "tmp").glob("semantic-*.md"))  # the draft is removed
        monkeypatch.setenv("EDITOR", editor(tmp_path, ': > "$1"'))
        slash.dispatch(repl, "/edit")
        monkeypatch.setenv("EDITOR", editor(tmp_path, 'echo text > "$1"; exit 3'))
        slash.dispatch(repl, "/edit")
        assert got == ["Composed\nin the editor."]  # empty, or the editor failed: nothing sent
        monkeypatch.setenv("EDITOR", str(tmp_path / "no-such-editor"))
        with pytest.raises(UsageError, match="cannot run the editor"):
            slash.dispatch(repl, "/edit")


def cache_of(name: str) -> tuple[list[str], Any]:
    with closing(KVIndex()) as index:
        return index.chain(name), index.tail(name)


def test_model_switches_after_loading_and_drops_the_old_cache(tiny, blocks, capsys):
    with Session() as s:
        first = s.say("a", LONG, model=tiny["llama"])
        repl = repl_for(s, "a")
        before = (s.store.get_agent("a"), s.store.token_log("a", s.chat.engine_for(repl.agent()).lm.tokenizer_fingerprint), cache_of("a"))
        assert before[1] == first.done.all_tokens and before[2][0]
        with pytest.raises(NotFoundError):
            slash.dispatch(repl, f"/model {tiny['llama'].parent / 'nonexistent'}")
        after = (s.store.get_agent("a"), s.store.token_log("a", s.chat.engine_for(repl.agent()).lm.tokenizer_fingerprint), cache_of("a"))
        assert after == before  # a name that does not load changes nothing
        slash.dispatch(repl, f"/model {tiny['qwen3']}")
        assert s.store.get_agent("a").model == repl.agent().model == str(tiny["qwen3"])
        assert s.store.chunk_sizes("a") == [] and cache_of("a") == ([], None)
        rec = s.say("a", "And then?")
        assert rec.model == s.chat.engine_for(repl.agent()).lm.name and rec.tier == "cold" and rec.done.stats.cached_tokens == 0
    with Session() as s:
        room = repl_for(s, "a", "b")
        with pytest.raises(UsageError, match="share one model"):
            slash.dispatch(room, f"/model {tiny['llama']}")


def test_footer_and_stats_show_how_full_the_context_is(tiny, home, capsys):
    with Session() as s:
        repl = repl_for(s, "a", model=tiny["llama"])
        [rec] = repl.turn([(repl.agent(), "hello there")])
        capsys.readouterr()
        slash.dispatch(repl, "/stats")
        out = capsys.readouterr().out
    used = rec.done.stats.prompt_tokens + rec.done.stats.generated_tokens
    assert re.search(rf"context {used}/4096\b", out), out


def test_json_is_refused_in_the_repl(home):
    env = dict(os.environ, TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1")
    child = pexpect.spawn(SEMANTIC, ["chat", "-a", "a", "--json"], env=env, timeout=15)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    assert b"--json is for one-shot turns" in child.before


# Each is refused by its command in one line; none may reach int() or the file system raw.
BAD_ARGUMENTS = [
    "/compact ²",  # str.isdigit() accepts it, int() does not
    "/compact -1",
    "/compact " + "9" * 5000,  # int() refuses over 4,300 digits
    "/set seed ²",
    "/set seed -1",
    "/set seed " + "9" * 30,  # past 2**63 - 1: mlx's seed() would fail at the next turn
    "/set max_tokens ²",
    "/set top_k " + "1" * 5000,
    "/set temp ²",
    "/save a\x00b.md",
    "/cache ²",
    "/agent ²",
    "/model " + "²" * 300,  # a name too long for the file system
]
ROOM_ARGUMENTS = ["/round ²", "/round 0", "/round " + "9" * 5000]


def test_a_bad_argument_is_one_clear_error_and_the_repl_goes_on(home, capsys):
    for names, lines in ((("a",), BAD_ARGUMENTS), (("a", "b"), ROOM_ARGUMENTS)):
        with Session() as s:
            repl = repl_for(s, *names)
            queue = [*lines, "/quit"]
            repl.read = lambda q=queue: q.pop(0)  # type: ignore[method-assign]
            capsys.readouterr()
            repl.run()
            err = capsys.readouterr().err
        assert queue == [] and err.count("error: ") == len(lines), err  # every line read, one error each
        assert "unexpected" not in err and "…" in err  # a long argument is quoted shortened


def test_a_repeat_window_past_the_context_is_the_whole_context(tiny, home):
    with Session() as s:
        s.say("a", "hello", model=tiny["llama"], max_tokens=2)
        p = s.chat.prepare(s.chat.open_agent("a"), "hi", GenSettings(max_tokens=2, repeat_last_n=10**20, repeat_penalty=1.2))
        assert p.request.repeat_last_n == p.engine.lm.context_length
        assert [e for e in s.chat.run([p]) if isinstance(e, TurnRecorded)][0].done.finish_reason == "length"
