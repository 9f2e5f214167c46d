"""Terminal output (issue 18, item 8): stored and generated text reaches a terminal only
through `render.printable`, so an escape sequence in a persona, a message or a model's
reply (an OSC 52 clipboard write, a CSI that clears the screen or asks the terminal to
answer) is shown, never obeyed. A pipe gets the raw text, byte for byte.

Replies with escapes in them are real generations: a logits processor makes the tiny
model emit the token ids of `PAYLOAD`, as `turns.eos_at` does for an end of turn.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
from conftest import SEMANTIC, run_cli
from test_repl import FOOTER, Term
from turns import encode, forcing

from semantic_cli import export
from semantic_cli.chat import Chat, GenSettings
from semantic_cli.cli import render
from semantic_cli.cli.chat import one_shot
from semantic_cli.cli.render import printable
from semantic_cli.engine import Engine
from semantic_cli.store import Store

# A clipboard write (OSC 52, BEL-terminated), a clear screen and a cursor position
# request (CSI), an 8-bit CSI (C1), DEL and a carriage return.
PAYLOAD = "\x1b]52;c;aGVsbG8=\x07 \x1b[2J\x1b[6n \x9b31m \x7f\r end"
SHOWN = "␛]52;c;aGVsbG8=␇ ␛[2J␛[6n \ufffd31m ␡␍ end"
# Byte strings that must never reach a terminal: what PAYLOAD would send it.
RAW = [b"\x1b]52", b"\x07", b"\x1b[2J", b"\x1b[6n", "\x9b".encode(), b"\x7f"]


def assert_safe(raw: bytes) -> None:
    for seq in RAW:
        assert seq not in raw, (seq, raw[-2000:])


def test_printable_shows_every_control_but_newline_and_tab():
    assert printable(PAYLOAD) == SHOWN
    assert printable("a\tb\nc") == "a\tb\nc"
    every = "".join(map(chr, range(0xA0)))  # every C0 control, ASCII, DEL, every C1 control
    shown = printable(every)
    assert len(shown) == len(every) and [c for c in shown if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0] == ["\t", "\n"]


def test_printable_with_a_stream_leaves_a_pipe_alone_and_cleans_a_terminal():
    assert printable(PAYLOAD, io.StringIO()) == PAYLOAD
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as tty:
            assert printable(PAYLOAD, tty) == SHOWN
    finally:
        os.close(master)
        os.close(slave)


# ---- agents show / agents ls -----------------------------------------------------
@pytest.fixture
def stored(home, tiny) -> str:
    """An agent whose persona and messages hold PAYLOAD."""
    store = Store()
    try:
        store.create_agent("x", str(tiny["llama"]), "persona " + PAYLOAD, {})
        messages = [
            ("user", "question " + PAYLOAD, "complete", {}),
            ("assistant", "# answer\n\n" + PAYLOAD + "\n\n- item " + PAYLOAD, "complete", {"finish_reason": "stop"}),
        ]
        store.record_turn("x", messages, "tok", [1, 2, 3], replace_log=True)
    finally:
        store.close()
    return "x"


def _exports(name: str) -> tuple[str, str]:
    store = Store()
    try:
        agent, messages = store.get_agent(name), store.messages(name)
    finally:
        store.close()
    return export.to_markdown(agent, messages), export.to_json(agent, messages)


def test_agents_show_exports_on_a_pipe_are_the_stored_text_byte_for_byte(stored):
    markdown, as_json = _exports(stored)
    r = run_cli("agents", "show", stored, "--markdown")
    assert r.returncode == 0, r.stderr
    assert r.stdout == markdown.encode() and PAYLOAD.encode() in r.stdout
    r = run_cli("agents", "show", stored, "--json")
    assert r.returncode == 0, r.stderr
    assert r.stdout == as_json.encode()


def _on_a_terminal(*args: str) -> bytes:
    """What `semantic ARGS` sends to a terminal (a pty), to its end."""
    env = dict(os.environ, TERM="xterm-256color")
    env.pop("NO_COLOR", None)
    child = pexpect.spawn(SEMANTIC, list(args), env=env, dimensions=(50, 160), timeout=60)
    try:
        out = child.read()
    finally:
        child.close()
    assert child.exitstatus == 0, out
    return out


@pytest.mark.parametrize("args", [[], ["--markdown"], ["--json"]], ids=["rich", "markdown", "json"])
def test_agents_show_on_a_terminal_shows_the_escapes_and_never_sends_them(stored, args):
    raw = _on_a_terminal("agents", "show", stored, *args)
    assert_safe(raw)
    text = raw.decode()
    if args == ["--json"]:
        data = json.loads(text)  # still valid JSON, the same but for the C1 and DEL characters
        assert data["agent"]["system"] == "persona " + PAYLOAD.replace("\x9b", "\ufffd").replace("\x7f", "␡")
    else:
        assert "␛]52;c;aGVsbG8=" in text and "␛[2J␛[6n" in text


def test_agents_ls_on_a_terminal_shows_the_persona_escapes_and_never_sends_them(stored):
    raw = _on_a_terminal("agents", "ls")
    assert_safe(raw)
    assert "persona ␛]52;c;aGVsbG8=" in raw.decode()


# ---- one-shot chat ---------------------------------------------------------------
def saying(engine: Engine, ids: list[int]) -> contextlib.AbstractContextManager[None]:
    """Make the model's replies the token ids `ids` (every sequence inserted meanwhile)."""
    return forcing(engine, lambda i: ids[i] if i < len(ids) else None)


@contextlib.contextmanager
def stdout_to(stream: Any) -> Iterator[None]:
    saved = sys.stdout
    sys.stdout = stream
    try:
        yield
    finally:
        sys.stdout = saved


@contextlib.contextmanager
def pty_stdout() -> Iterator[list[bytes]]:
    """sys.stdout on a pseudo-terminal; the list gets what the terminal received."""
    master, slave = os.openpty()
    got: list[bytes] = []
    try:
        with open(slave, "w", encoding="utf-8", closefd=False) as tty, stdout_to(tty):
            yield got
            tty.flush()
        while select.select([master], [], [], 0.2)[0]:
            chunk = os.read(master, 1 << 16)
            if not chunk:
                break
            got.append(chunk)
    finally:
        os.close(master)
        os.close(slave)


def _one_shot(chat: Chat, names: list[str], model: Path, ids: list[int]) -> None:
    targets = [(chat.open_agent(n, str(model)), "say it") for n in names]
    with saying(chat.engine_for(targets[0][0]), ids):
        one_shot(chat, targets, GenSettings(max_tokens=len(ids)), json_out=False, verbose=False)


@pytest.mark.parametrize("names", [["solo"], ["r1", "r2"]], ids=["one agent", "room"])
def test_one_shot_stdout_is_raw_on_a_pipe_and_clean_on_a_terminal(tiny, home, names):
    chat = Chat(Store())
    try:
        ids = encode(chat.engine_for(chat.open_agent(names[0], str(tiny["llama"]))).lm.tokenizer, PAYLOAD)
        piped = io.StringIO()
        with stdout_to(piped):
            _one_shot(chat, names, tiny["llama"], ids)
        replies = {n: chat.store.messages(n)[-1].content for n in names}
        assert all(r == PAYLOAD for r in replies.values())  # the model really said it
        if len(names) == 1:
            assert piped.getvalue() == replies[names[0]] + "\n"
        else:
            assert piped.getvalue() == "".join(f"[{n}]\n{replies[n]}\n\n" for n in names)
        with pty_stdout() as got:
            _one_shot(chat, names, tiny["llama"], ids)
        raw = b"".join(got)
        assert_safe(raw)
        assert b"\x1b" not in raw  # nothing styles one-shot output: no escape at all
        assert raw.decode().count(SHOWN) == len(names)
    finally:
        chat.close()
        chat.store.close()


# ---- the REPL --------------------------------------------------------------------
SITECUSTOMIZE = textwrap.dedent(
    '''
    """Test-only: every reply of this process is the token ids in SEMANTIC_TEST_SAY."""
    import json
    import os

    from semantic_cli import engine

    _ids = json.loads(os.environ["SEMANTIC_TEST_SAY"])
    _real = engine.Engine.generate


    def _processor():
        step = [0]

        def force(_tokens, logits):
            import mlx.core as mx

            i = step[0]
            step[0] += 1
            if i >= len(_ids):
                return logits
            return mx.where(mx.arange(logits.shape[-1]) == _ids[i], mx.array(1e4, logits.dtype), logits)

        return force


    def generate(self, requests, seed=None, **kwargs):
        gen = self.generator
        if not getattr(gen, "_forced", False):
            real_insert = gen.insert

            def insert(*args, **kwargs):
                n = len(args[0]) if args else len(kwargs["prompts"])
                kwargs["logits_processors"] = [[_processor()] for _ in range(n)]
                return real_insert(*args, **kwargs)

            gen.insert = insert
            gen._forced = True
        return _real(self, requests, seed=seed, **kwargs)


    engine.Engine.generate = generate
    '''
)


@pytest.mark.parametrize("markdown", [True, False], ids=["markdown", "plain"])
def test_the_repl_shows_escapes_in_replies_and_personas_and_never_sends_them(tiny, home, tmp_path, monkeypatch, markdown):
    from semantic_cli.engine import get_engine
    from semantic_cli.model.loader import resolve

    ids = encode(get_engine(resolve(str(tiny["llama"]))).lm.tokenizer, PAYLOAD)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("SEMANTIC_TEST_SAY", json.dumps(ids))
    store = Store()
    try:
        store.create_agent("a", str(tiny["llama"]), "persona " + PAYLOAD, {})
    finally:
        store.close()
    t = Term("--model", str(tiny["llama"]), "-a", "a", "-a", "b", "--max-tokens", str(len(ids)), *([] if markdown else ["--no-markdown"]))
    try:
        t.prompt("a")
        t.send("@all hello")
        t.expect(FOOTER)
        t.expect(FOOTER)
        t.prompt("a")
        t.send("/agents")
        t.expect(r"persona ␛\]52;c;aGVsbG8=")
        t.prompt("a")
        t.send("/system")
        t.expect(r"persona ␛\]52;c;aGVsbG8=␇")
        t.prompt("a")
        store = Store()
        try:
            assert store.messages("a")[-1].content == store.messages("b")[-1].content == PAYLOAD
        finally:
            store.close()
        t.child.sendeof()
        assert t.exit_code() == 0
        assert_safe(t.raw)
        assert "␛]52;c;aGVsbG8=" in t.text
    finally:
        t.close()


def test_one_filter():
    """One function: the REPL's, the CLI's and the slash commands' `printable` are render's."""
    from semantic_cli.cli import agents, repl, slash
    from semantic_cli.cli import chat as chat_cli

    assert repl.printable is slash.printable is agents.printable is chat_cli.printable is render.printable
