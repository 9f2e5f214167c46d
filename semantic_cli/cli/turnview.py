"""A turn's live view in the REPL: one streaming reply per agent (a labelled panel each in a room),
its prefill bar, and a footer; drawn by the live region (cli/live.py) in cli/repl.py."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.markdown import Markdown
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.segment import SegmentLines
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from .render import plural, printable

PREFILL_BAR_MIN = 256  # shorter prefills are over before a bar could be read


@dataclass
class Reply:
    """One agent's reply as it streams: what the view draws."""

    name: str
    title: str
    text: str = ""
    tokens: int = 0
    prefill: tuple[int, int] | None = None
    footer: str = ""
    state: str = "waiting"  # waiting | streaming | done | interrupted | failed (generated, not saved)
    notes: list[str] = field(default_factory=list)


class TurnView:
    """The live region. While streaming, each reply shows only its last lines so the
    region never outgrows the screen (rich cannot redraw what scrolled away); the
    final render (`final`) shows everything."""

    def __init__(self, replies: list[Reply], markdown: bool, panels: bool) -> None:
        self.replies = replies
        self.markdown = markdown
        self.panels = panels
        self.final = False

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        per_reply = max(3, (console.height - 2) // len(self.replies) - (4 if self.panels else 2))
        inner = options.max_width - (4 if self.panels else 0)
        for r in self.replies:
            body = self._body(r, console, options.update(width=inner, height=None), per_reply)
            if self.panels:
                style = "yellow" if r.state == "interrupted" else "dim" if r.state == "done" else "cyan"
                yield Panel(body, title=r.title, title_align="left", border_style=style)
            else:
                yield body

    def _body(self, r: Reply, console: Console, options: ConsoleOptions, max_lines: int) -> RenderableType:
        parts: list[RenderableType] = [Text(printable(n), style="yellow") for n in r.notes]
        if r.text:
            shown = printable(r.text)
            content: RenderableType = Markdown(shown) if self.markdown else Text(shown)
            parts.append(content if self.final else _tail(content, console, options, max_lines))
        status = self._status(r)
        if status is not None:
            parts.append(status)
        return Group(*parts)

    def _status(self, r: Reply) -> RenderableType | None:
        if r.state == "interrupted" and not r.tokens:
            return Text("stopped before the reply: your message is kept (unanswered), and what was read of it is cached", style="yellow")
        if r.state == "interrupted":
            return Text(f"interrupted after {plural(r.tokens, 'token')} (kept, marked interrupted)", style="yellow")
        if r.state == "failed":
            return Text("not saved (see the error below)", style="red", no_wrap=True, overflow="ellipsis")
        if r.footer:
            return Text(r.footer, style="dim")  # wraps on a narrow terminal rather than lose figures
        if r.prefill is not None and r.prefill[1] >= PREFILL_BAR_MIN and r.prefill[0] < r.prefill[1]:
            done, total = r.prefill
            bar = Table.grid(padding=(0, 1))
            bar.add_row(
                Text("reading the conversation", style="dim"),
                ProgressBar(total=total, completed=done, width=30),
                Text(f"{done:,}/{total:,} tokens", style="dim"),
            )
            return bar
        if r.state == "waiting" and not r.text:
            return Spinner("dots", text=Text("thinking", style="dim"), style="dim")
        return None


def _tail(renderable: RenderableType, console: Console, options: ConsoleOptions, max_lines: int) -> RenderableType:
    """The last `max_lines` lines of `renderable`, rendered once (this runs every frame)."""
    lines = console.render_lines(renderable, options, pad=False)
    if len(lines) <= max_lines:
        return SegmentLines(lines, new_lines=True)
    hidden = len(lines) - max_lines + 1
    return Group(Text(f"… {hidden} more lines above", style="dim"), SegmentLines(lines[hidden:], new_lines=True))
