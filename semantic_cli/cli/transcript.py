"""How `semantic agents show` presents a transcript: Markdown wrapped to the terminal, or
plain text, every message byte for byte, anywhere else."""

from __future__ import annotations

import sys

from ..export import cut_mark
from ..history import compacted
from ..store import Agent, Message
from . import render
from .render import printable


def show(agent: Agent, messages: list[Message]) -> bool:
    """The transcript for reading: on a terminal, replies rendered as Markdown and
    wrapped (never cropped) to its width; anywhere else, plain text with every message
    byte for byte, unwrapped. False when there are no messages (the caller says so)."""
    if not render.is_terminal(sys.stdout):
        sys.stdout.write(plain(agent, messages))
        return bool(messages)
    from rich.markdown import Markdown
    from rich.text import Text

    out = render.stdout()
    covered = compacted(messages)
    out.print(Text(f"{agent.name} · {printable(agent.model)}", style="bold"))
    if agent.system:
        out.print(Text(f"persona: {printable(agent.system)}", style="dim"))
    for m in messages:
        out.print()
        mark = cut_mark(m)
        if m.role == "assistant":
            label = Text(agent.name, style="bold green")
            if mark:
                label.append(f" ({mark})", style="yellow")
        else:
            label = Text("you" if m.role == "user" else m.role, style="bold cyan")
            if mark:
                label.append(f" ({mark})", style="yellow")
        if m.id in covered:
            label.append(" (compacted)", style="dim")
        out.print(label)
        if m.role == "assistant":
            out.print(Markdown(printable(m.content)), soft_wrap=False)  # wrapped to the terminal: soft wrap would crop lists and code
        else:
            out.print(Text(printable(m.content)))
    return bool(messages)


def plain(agent: Agent, messages: list[Message]) -> str:
    """The terminal view's words, as plain text: a header line, the persona, then per
    message a blank line, who spoke (the agent's name; how it was cut, `export.cut_mark`;
    "(compacted)" for one a summary covers) and the text exactly as stored."""
    covered = compacted(messages)
    parts = [f"{agent.name} · {agent.model}\n"] + ([f"persona: {agent.system}\n"] if agent.system else [])
    for m in messages:
        mark = cut_mark(m)
        who = {"assistant": agent.name, "user": "you"}.get(m.role, m.role) + (f" ({mark})" if mark else "")
        who += " (compacted)" if m.id in covered else ""
        parts.append(f"\n{who}\n{m.content}\n")
    return "".join(parts)
