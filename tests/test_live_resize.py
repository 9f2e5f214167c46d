"""The REPL's live region when the terminal is resized mid-reply: no fragment of the wider
render is left on screen, and nothing above the region is erased (issue 20, polish)."""

from __future__ import annotations

import pytest
from rich.console import Console

from semantic_cli.cli.live import ResizableLive, reflows, rows_taken
from semantic_cli.cli.turnview import Reply, TurnView
from tests.vt import Terminal


class _Screen:
    """A console's file that is the terminal model."""

    def __init__(self, term: Terminal) -> None:
        self.term = term

    def write(self, data: str) -> int:
        self.term.write(data)
        return len(data)

    def flush(self) -> None:
        pass


def _stream_and_resize(monkeypatch: pytest.MonkeyPatch, reflow: bool, panels: bool, trims: bool = False) -> list[str]:
    """Earlier conversation on screen, then a reply streaming in a live region at 100
    columns; the terminal goes to 50 columns mid-reply; the reply ends. The screen after."""
    monkeypatch.setenv("SEMANTIC_TERMINAL_REFLOW", "1" if reflow else "0")
    term = Terminal(100)
    term.write("you: an earlier question\nplanner: an earlier answer " + "x" * 60 + "\n")
    console = Console(file=_Screen(term), width=100, height=60, force_terminal=True, force_interactive=True, color_system=None)
    console.soft_wrap = False
    steps = "".join(f"\n- step {i}" for i in range(1, 5))  # short lines, padded by rich to the width
    reply = Reply("planner", "planner", text="The plan has steps. " * 12 + "\n" + steps + "\n\n", state="streaming")
    view = TurnView([reply], markdown=True, panels=panels)
    live = ResizableLive(view, console)
    live.auto_refresh = False  # frames only where the test draws them
    with live:
        live.refresh()
        reply.text += "More words arrive. " * 3
        live.refresh()
        term.resize(50, reflow=reflow, trims=trims)
        console.width = 50
        reply.text += "And the end."
        live.refresh()
        reply.state, reply.footer = "done", "12 tokens · 3.1 tok/s"
        view.final = True
    return term.text()


@pytest.mark.parametrize("panels", [True, False], ids=["room-panels", "plain"])
@pytest.mark.parametrize(
    ("reflow", "trims"),
    [(True, False), (True, True), (False, False)],
    ids=["reflowing-terminal", "reflowing-trimming-terminal", "cutting-terminal"],
)
def test_resize_mid_reply_leaves_one_copy_and_keeps_the_text_above(
    monkeypatch: pytest.MonkeyPatch, reflow: bool, trims: bool, panels: bool
) -> None:
    screen = _stream_and_resize(monkeypatch, reflow, panels, trims)
    joined = "\n".join(screen)
    assert "you: an earlier question" in joined
    assert "planner: an earlier answer" in joined
    # One render on screen, the final one: one footer, one start of the reply, and
    # (with panels) one top and one bottom border.
    assert joined.count("12 tokens") == 1, joined
    assert " ".join(screen).split().count("plan") == 12, joined  # the reply's 12, and no copy of any of them left behind
    if panels:
        assert sum(line.lstrip().startswith("╭") for line in screen) == 1, joined
        assert sum(line.lstrip().startswith("╰") for line in screen) == 1, joined
    # Nothing drawn at the old width is left (the earlier answer is the only wide line).
    wide = [line for line in screen if len(line) > 50 and "earlier answer" not in line]
    assert not wide, joined


def test_the_final_render_is_whole_after_the_resize(monkeypatch: pytest.MonkeyPatch) -> None:
    screen = _stream_and_resize(monkeypatch, True, False)
    words = " ".join(screen).split()
    assert words.count("plan") == 12 and words.count("arrive.") == 3 and "end." in words
    assert words.count("step") == 4


def test_wide_characters_at_an_odd_width_leave_no_fragment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two-cell characters at 51 columns: each row holds 25 of them, not 25.5, so counting
    cells alone would erase too few rows and leave part of the earlier render."""
    monkeypatch.setenv("SEMANTIC_TERMINAL_REFLOW", "1")
    term = Terminal(102)
    term.write("you: 一个问题\n")
    console = Console(file=_Screen(term), width=102, height=60, force_terminal=True, force_interactive=True, color_system=None)
    console.soft_wrap = False
    reply = Reply("planner", "planner", text="\n\n".join(["计划有步骤" * 20] * 3), state="streaming")
    view = TurnView([reply], markdown=False, panels=False)
    live = ResizableLive(view, console)
    live.auto_refresh = False
    with live:
        live.refresh()
        term.resize(51, reflow=True)
        console.width = 51
        live.refresh()
        reply.state, reply.footer = "done", "7 tokens"
        view.final = True
    screen = "".join(term.text())
    assert screen.count("计划有步骤") == 60 and screen.count("7 tokens") == 1 and screen.startswith("you: 一个问题"), term.text()


def test_rows_taken_counts_rewrapped_rows() -> None:
    assert rows_taken(["x" * 100, "y" * 100, "", "z" * 30], 50) == 2 + 2 + 1 + 1
    assert rows_taken(["x" * 100, "x" * 101], 100) == 1 + 2
    assert rows_taken(["x" * 40], 120) == 1
    # A two-cell character never straddles two rows: 51 of them at 51 columns take 3 rows (25, 25, 1).
    assert rows_taken(["字" * 51], 51) == 3 and rows_taken(["字" * 51], 102) == 1


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TMUX": "/tmp/tmux-0/default,1,0", "TERM": "screen"}, True),
        ({"TMUX": "/tmp/tmux-0/default,1,0", "TERM": "tmux-256color"}, True),
        ({"VTE_VERSION": "7600", "TERM": "xterm-256color"}, True),
        ({"TERM_PROGRAM": "iTerm.app", "TERM": "xterm-256color"}, True),
        ({"TERM": "xterm-kitty"}, True),
        ({"TERM": "xterm-256color"}, False),  # xterm cuts lines
        ({"TERM": "linux"}, False),
        ({"VTE_VERSION": "7600", "TERM": "xterm"}, False),  # an xterm started from GNOME Terminal inherits VTE_VERSION
        ({"TERM_PROGRAM": "iTerm.app", "TERM": "rxvt-unicode-256color"}, False),
        ({"TERM_PROGRAM": "iTerm.app"}, False),
        ({"TERM": "xterm-256color", "SEMANTIC_TERMINAL_REFLOW": "1"}, True),
        ({"TMUX": "x", "SEMANTIC_TERMINAL_REFLOW": "0"}, False),
    ],
)
def test_which_terminals_reflow(env: dict[str, str], expected: bool) -> None:
    assert reflows(env) is expected
