"""The interactive REPL, driven in a pseudo-terminal (pexpect) against a tiny model,
asserting on what the terminal shows; plus its pieces (view, completion) in-process.

Tiny models emit gibberish and never EOS: replies run to --max-tokens.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pexpect
import pytest
from conftest import SEMANTIC, run_cli
from prompt_toolkit.document import Document
from rich.console import Console

from semantic_cli.cli import slash
from semantic_cli.cli.repl_input import block_open, unblock
from semantic_cli.cli.slash import printable
from semantic_cli.cli.turnview import Reply, TurnView
from semantic_cli.errors import UsageError

ANSI = re.compile(r"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][A-Za-z0-9]|\x1b[@-Z\\-_]")
FOOTER = r"ttft [\d.]+s · prompt \d+ tok/s · gen [\d.]+ tok/s · prefilled (\d+) of (\d+) tokens"
LONG = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(40))


class Term:
    """A `semantic chat` in a pty; `text` is everything it drew, escape sequences removed."""

    def __init__(self, *args: str, rows: int = 40, cols: int = 120) -> None:
        env = dict(os.environ, TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1")
        env.pop("NO_COLOR", None)
        # As from a terminal: a suite run under nohup would hand down SIGHUP ignored.
        hangup_as_default = lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL)  # noqa: E731
        self.child = pexpect.spawn(SEMANTIC, ["chat", *args], env=env, dimensions=(rows, cols), timeout=5, preexec_fn=hangup_as_default)
        self.raw = b""
        self.mark = 0  # expect() searches text drawn after the previous match
        self._text = ("", 0)

    @property
    def text(self) -> str:
        if self._text[1] != len(self.raw):
            self._text = (ANSI.sub("", self.raw.decode("utf-8", "replace")).replace("\r", ""), len(self.raw))
        return self._text[0]

    def pump(self, timeout: float = 0.05) -> bool:
        """Read what the child drew; False at end of file."""
        try:
            self.raw += self.child.read_nonblocking(1 << 16, timeout)
        except pexpect.TIMEOUT:
            pass
        except pexpect.EOF:
            return False
        return True

    def until(self, ok: Callable[[str], Any], what: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            found = ok(self.text[self.mark :])
            if found:
                return found
            if not self.pump() or time.monotonic() > deadline:
                raise AssertionError(f"{what} never appeared; the screen ended with:\n{self.text[-3000:]}")

    def expect(self, pattern: str, timeout: float = 60) -> re.Match:
        m = self.until(lambda s: re.search(pattern, s), repr(pattern), timeout)
        self.mark += m.end()
        return m

    def prompt(self, agent: str = "a") -> None:
        self.expect(rf"(?m)^{agent}>")

    def send(self, line: str) -> None:
        self.child.send(line + "\r")

    def say(self, line: str, agent: str = "a", timeout: float = 120) -> re.Match:
        """Send a message; wait for its footer and the next prompt."""
        self.send(line)
        m = self.expect(FOOTER, timeout)
        self.prompt(agent)
        return m

    def exit_code(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self.pump() and time.monotonic() < deadline:
            pass
        self.child.close()
        return self.child.exitstatus

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


@pytest.fixture
def term(tiny, home):
    opened: list[Term] = []

    def spawn(*args: str) -> Term:
        t = Term("--model", str(tiny["llama"]), *args)
        opened.append(t)
        return t

    yield spawn
    for t in opened:
        t.close()


def rows(home: Path, agent: str) -> list[sqlite3.Row]:
    db = sqlite3.connect(home / "data" / "semantic.db")
    db.row_factory = sqlite3.Row
    try:
        return db.execute("SELECT role, content, status, meta FROM messages WHERE agent=? ORDER BY id", (agent,)).fetchall()
    finally:
        db.close()


def persona(home: Path, agent: str) -> str:
    db = sqlite3.connect(home / "data" / "semantic.db")
    try:
        return db.execute("SELECT system FROM agents WHERE name=?", (agent,)).fetchone()[0]
    finally:
        db.close()


# ---- in a terminal -----------------------------------------------------------
def test_reply_streams_with_a_dim_footer_and_slash_commands_work(term, home):
    t = term("--agent", "a", "--max-tokens", "40")
    t.expect("chatting with a")
    t.prompt()
    start = t.mark
    m = t.say("hello there")
    assert int(m.group(1)) == int(m.group(2)) > 0  # a new agent: everything prefilled
    [user, reply] = rows(home, "a")
    assert (user["role"], user["content"], reply["status"]) == ("user", "hello there", "complete")
    shown = t.text[start:]
    words = re.findall(r"[A-Za-z]{4,}", printable(reply["content"]))
    assert words and sum(w in shown for w in words) >= 0.8 * len(words), (words, shown)
    assert b"\x1b[2mttft " in t.raw  # the footer is dim, on one line (FOOTER has no newline)

    t.send("/help")
    for shown_cmd in ("/agent NAME", "/system [TEXT]", "/stats", "/cache [NAME]", "/save FILE", "/round N [TOPIC]", "/quit", "Ctrl-R"):
        t.expect(re.escape(shown_cmd))
    t.prompt()
    t.send("/stats")
    t.expect(r"last turn \(a\): cut off at the token limit \(40 tokens[^\n]*\s+ttft [\d.]+s ")
    t.expect(r"40 tokens generated, finish: length")
    t.expect(r"session: 1 turn · 40 tokens generated")
    t.prompt()
    t.send("/cache")
    t.expect(r"a: tier hot · transcript \d+ tokens")
    t.prompt()
    t.send("/system you are terse")
    t.expect("persona set")
    t.prompt()
    assert persona(home, "a") == "you are terse"
    t.send("/system")
    t.expect(r"(?m)^you are terse")
    t.prompt()
    m = t.say("and now?")
    assert int(m.group(1)) == int(m.group(2))  # a new persona: nothing stale reused
    assert "warning" not in t.text
    t.send("/model")
    t.expect(r"a: llama\n")
    t.expect(r"dtype float32 · context 4,096 tokens")
    t.prompt()
    t.send("/nonsense")
    t.expect(r"error: unknown command /nonsense")
    t.prompt()
    t.send("/quit")
    assert t.exit_code() == 0


def test_room_switch_mentions_and_round(term, home):
    t = term("--agent", "a", "--agent", "b", "--max-tokens", "12")
    t.expect(r"room a, b · @name or @all")
    t.prompt("a")
    t.send("/agent b")
    t.expect("talking to b")
    t.prompt("b")
    t.send("hi")
    t.expect(r"╭─ b ─")
    t.expect(FOOTER)
    t.prompt("b")
    assert len(rows(home, "b")) == 2 and rows(home, "a") == []
    t.say("@a hello", agent="b")
    assert [r["content"] for r in rows(home, "a")][0] == "hello" and len(rows(home, "b")) == 2
    t.send("@all hey")
    t.expect(FOOTER)
    t.expect(FOOTER)  # both panels finish
    t.prompt("b")
    assert len(rows(home, "a")) == len(rows(home, "b")) == 4
    t.send("@nobody hi")
    t.expect(r"no agent @nobody in this room; agents here: a, b")
    t.prompt("b")
    t.send("/round 1 the plan")
    t.expect(r"a · round 1/1")
    t.expect(r"b · round 1/1")
    t.expect(r"round over: 2 turns")
    t.prompt("b")
    a_user = [r["content"] for r in rows(home, "a") if r["role"] == "user"]
    b_user = [r["content"] for r in rows(home, "b") if r["role"] == "user"]
    a_reply = rows(home, "a")[-1]["content"].strip()
    assert a_user[-1] == "the plan"
    assert b_user[-1] == f"the plan\n\n[a]: {a_reply or '(no reply)'}"  # b hears a, attributed
    t.send("/agents")
    t.expect(r"\*\s+b\s")
    t.prompt("b")
    t.child.sendeof()
    assert t.exit_code() == 0


def test_ctrl_c_stops_a_round_and_keeps_the_finished_turns(term, home):
    t = term("--agent", "a", "--agent", "b", "--max-tokens", "1000", "--no-markdown")
    t.prompt("a")
    t.send("/round 2 the plan")
    t.expect(r"b · round 1/2")  # a's turn is over when b's panel opens
    t.expect("thinking")
    t.until(lambda s: len(re.sub(r"\s|[\u2800-\u28ff] thinking|─|╮|╰|╯|│", "", s)) > 80, "b streaming")
    t.child.sendintr()
    t.expect(r"round stopped after 1 complete turn; they are kept")
    t.prompt("a")
    assert [r["status"] for r in rows(home, "a")] == ["complete", "complete"]
    # b was cut while streaming (its partial reply kept) or while still reading (its message kept, unanswered: no empty reply)
    assert [r["status"] for r in rows(home, "b")] in (["complete", "interrupted"], ["unanswered"])
    assert rows(home, "b")[0]["content"].startswith("the plan\n\n[a]: ")
    t.child.sendeof()
    assert t.exit_code() == 0


def test_ctrl_c_stops_a_reply_keeps_it_interrupted_and_chat_goes_on(term, home):
    t = term("--agent", "a", "--max-tokens", "1000", "--no-markdown")
    t.prompt()
    t.send("tell me a long story")
    t.expect("thinking")  # the live region is up; all that follows is the reply
    # Tokens show up while it is still generating: no footer yet.
    t.until(lambda s: len(re.sub(r"\s|[\u2800-\u28ff] thinking", "", s)) > 80, "a streaming reply")
    assert not re.search(FOOTER, t.text[t.mark :])
    t.child.sendintr()
    t.expect(r"interrupted after \d+ tokens \(kept, marked interrupted\)")
    t.prompt()
    [user, cut] = rows(home, "a")
    assert cut["status"] == "interrupted" and json.loads(cut["meta"])["finish_reason"] == "interrupted"
    assert cut["content"].strip() and len(json.loads(cut["meta"])) > 1
    t.say("go on", timeout=180)
    assert [r["status"] for r in rows(home, "a")] == ["complete", "interrupted", "complete", "complete"]
    t.child.sendintr()  # Ctrl-C at an empty prompt leaves, cleanly
    assert t.exit_code() == 0


def test_sigterm_mid_reply_keeps_it_interrupted_and_ends_the_repl(term, home):
    """`kill` stops a REPL's reply as Ctrl-C does (kept, marked interrupted), and then the
    REPL ends (143) instead of waiting at its prompt."""
    import signal

    t = term("--agent", "a", "--max-tokens", "1000", "--no-markdown")
    t.prompt()
    t.send("tell me a long story")
    t.expect("thinking")
    t.until(lambda s: len(re.sub(r"\s|[\u2800-\u28ff] thinking", "", s)) > 80, "a streaming reply")
    t.child.kill(signal.SIGTERM)
    assert t.exit_code() == 143, t.text[-2000:]
    [user, cut] = rows(home, "a")
    assert user["content"] == "tell me a long story" and cut["status"] == "interrupted" and cut["content"].strip()


def test_sigterm_at_an_idle_prompt_ends_the_repl(term, home):
    """`kill` ends a REPL waiting for input (prompt_toolkit holds SIGINT while it reads)."""
    import signal

    t = term("--agent", "a", "--max-tokens", "4", "--no-markdown")
    t.prompt()
    t.child.kill(signal.SIGTERM)
    assert t.exit_code(timeout=20) == 143, t.text[-2000:]


def test_a_terminal_that_hangs_up_mid_reply_keeps_it_and_exits_129(term, home):
    """The terminal closing (its pty's master gone: SIGHUP, then every write to it fails)
    keeps the cut reply, marked interrupted, and the command exits 129."""
    t = term("-a", "h", "--max-tokens", "4000", "-m", "go on forever")
    t.until(lambda s: "first turn" in s and len(s.split("first turn", 1)[1].strip()) > 80, "a streaming reply")
    os.close(t.child.child_fd)  # hang up
    _, status = os.waitpid(t.child.pid, 0)
    t.child.terminated = t.child.ptyproc.terminated = True  # reaped here: pexpect must not wait for it again
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 129, status
    [user, cut] = rows(home, "h")
    assert user["content"] == "go on forever" and cut["status"] == "interrupted" and cut["content"].strip()


def test_multiline_input_history_and_search(term, home):
    t = term("--agent", "a", "--max-tokens", "6")
    t.prompt()
    t.child.send('"""\rline one\rline two\r"""\r')
    t.expect(FOOTER)
    t.prompt()
    t.child.send("first\x1b\rsecond\r")  # Esc Enter: a new line, not a send
    t.expect(FOOTER)
    t.prompt()
    t.child.send("\x1b[200~pasted one\npasted two\x1b[201~\r")  # a bracketed paste is one message
    t.expect(FOOTER)
    t.prompt()
    t.say("remember the fox")
    t.child.sendeof()
    assert t.exit_code() == 0
    said = [r["content"] for r in rows(home, "a") if r["role"] == "user"]
    assert said == ["line one\nline two", "first\nsecond", "pasted one\npasted two", "remember the fox"]
    assert "remember the fox" in (home / "data" / "history" / "a.history").read_text()

    t = term("--agent", "a", "--max-tokens", "6")
    t.prompt()
    t.child.send("\x12fox")  # Ctrl-R: search this agent's history from the last session
    t.expect(r"remember the fox")
    t.child.send("\r")
    t.child.send("\r")
    t.expect(FOOTER)
    t.prompt()
    assert [r["content"] for r in rows(home, "a") if r["role"] == "user"][-1] == "remember the fox"
    t.send("one more")
    t.child.sendeof()  # typed while the reply streams: it still leaves, after the reply
    assert t.exit_code() == 0
    assert rows(home, "a")[-1]["status"] == "complete" and rows(home, "a")[-2]["content"] == "one more"


def test_cold_conversation_shows_prefill_progress(term, home, tiny):
    done = run_cli("chat", "--agent", "a", "--model", str(tiny["llama"]), "--max-tokens", "4", "-m", LONG)
    assert done.returncode == 0, done.stderr
    shutil.rmtree(home / "cache")  # no KV left: the next turn re-reads the whole conversation
    t = term("--agent", "a", "--max-tokens", "4")
    t.prompt()
    t.send("more")
    t.expect(r"reading the conversation .* \d[\d,]*/[\d,]+ tokens")
    m = t.expect(FOOTER)
    assert int(m.group(1)) == int(m.group(2)) > 512
    t.prompt()
    t.child.sendeof()
    assert t.exit_code() == 0


def test_save_and_reset(term, home, tmp_path):
    t = term("--agent", "a", "--max-tokens", "8", "--system", "be brief")
    t.prompt()
    t.say("hello")
    t.send(f"/save {tmp_path}/t.md")
    t.expect(r"saved 2 messages of a to")
    t.prompt()
    t.send(f"/save {tmp_path}/t.json")
    t.expect(r"saved 2 messages")
    t.prompt()
    t.send(f"/save {tmp_path}/t.txt")
    t.expect(r"error: say the format by the extension")
    t.prompt()
    md = (tmp_path / "t.md").read_text()
    assert md.startswith("# a\n") and "> be brief" in md and "## You\n\nhello\n" in md and "## a\n" in md
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["agent"]["system"] == "be brief" and [m["role"] for m in data["messages"]] == ["user", "assistant"]
    t.send("/reset")
    t.expect(r"empty a's conversation \(2 messages; the persona stays\)\? \[y/N\]")
    t.send("y")
    t.expect(r"a: conversation emptied, .* of cache freed")
    t.prompt()
    assert rows(home, "a") == [] and persona(home, "a") == "be brief"
    t.send("/cache")
    t.expect(r"a: tier cold")
    t.prompt()
    t.child.sendeof()
    assert t.exit_code() == 0


# ---- in-process ----------------------------------------------------------------
def test_triple_quote_blocks():
    assert block_open('"""') and block_open('"""\nsome text') and not block_open('"""one line"""')
    assert not block_open('"""\ntext\n"""') and not block_open("plain")
    assert unblock('"""\nline one\nline two\n"""') == ("line one\nline two", True)
    assert unblock('"""inline"""') == ("inline", True)
    assert unblock("plain") == ("plain", False)


def test_control_characters_are_shown_not_obeyed():
    assert printable("ok\x1b[2Jbye\r\x07\tx\ny\x9b") == "ok␛[2Jbye␍␇\tx\ny\ufffd"


def _fake_repl(agents: list[str]) -> Any:
    store = SimpleNamespace(list_agents=lambda: [SimpleNamespace(name=n) for n in ("a", "b", "zed")])
    return SimpleNamespace(agents={n: None for n in agents}, room=len(agents) > 1, session=SimpleNamespace(store=store))


def _complete(repl: Any, text: str) -> list[str]:
    return [c.text for c in slash.Completer(repl).get_completions(Document(text, len(text)), None)]


def test_completion_of_commands_agents_and_mentions():
    room = _fake_repl(["a", "b"])
    assert _complete(room, "/sy") == ["/system"]
    assert _complete(room, "/s") == ["/system", "/stats", "/save", "/set"]
    assert _complete(room, "/agent ") == ["a", "b", "zed"]
    assert _complete(room, "/agent z") == ["zed"]
    assert _complete(room, "@") == ["@a ", "@b ", "@all "]
    assert _complete(room, "@a @al") == ["@all "]
    assert _complete(room, "hello @") == []
    assert _complete(_fake_repl(["a"]), "@") == []  # no mentions outside a room


def test_unknown_slash_command_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown command /frobnicate"):
        slash.dispatch(_fake_repl(["a"]), "/frobnicate now")


def _render(view: TurnView, width: int = 60, height: int = 20) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width, height=height, color_system=None, legacy_windows=False).print(view)
    return out.getvalue().rstrip("\n").split("\n")


def test_view_renders_markdown_and_wraps_the_footer_losing_no_figure():
    md = "# Plan\n\n- first step\n- second step\n\n```python\nx = 1\n```\n"
    footer = "ttft 0.10s · " + "".join(f"prompt {i} tok/s · " for i in range(8)) + "prefilled 56 of 56 tokens"
    reply = Reply("a", "a", text=md, state="done", footer=footer)
    view = TurnView([reply], markdown=True, panels=False)
    view.final = True
    lines = _render(view)
    assert not any("```" in line or line.startswith("- ") for line in lines)
    assert any("• first step" in line for line in lines) and any("x = 1" in line for line in lines)
    start = next(i for i, line in enumerate(lines) if line.startswith("ttft 0.10s"))
    assert " ".join(line.strip() for line in lines[start:]) == footer.replace("  ", " ")  # wrapped, every figure kept
    assert len(lines) - start > 1 and all(len(line) <= 60 for line in lines[start:]) and "…" not in "".join(lines)
    plain = TurnView([reply], markdown=False, panels=False)
    assert any(line.startswith("- first step") for line in _render(plain))


def test_view_shows_the_latest_lines_while_streaming_and_everything_at_the_end():
    text = "\n\n".join(f"paragraph {i}" for i in range(60))
    room = [Reply("a", "a", text=text, state="streaming"), Reply("b", "b · round 1/2", state="waiting")]
    view = TurnView(room, markdown=True, panels=True)
    lines = _render(view, height=30)
    assert len(lines) <= 30
    assert any("more lines above" in line for line in lines) and any("paragraph 59" in line for line in lines)
    assert any("╭─ b · round 1/2 ─" in line for line in lines) and any("thinking" in line for line in lines)
    view.final = True
    full = "\n".join(_render(view, height=30))
    assert "paragraph 0" in full and "paragraph 59" in full
