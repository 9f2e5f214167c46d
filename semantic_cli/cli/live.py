"""rich's Live region, made to survive a terminal that is resized while a reply streams.

rich redraws its region by moving the cursor up as many rows as its last render had
lines. A terminal that reflows on resize (tmux, VTE, iTerm2, kitty and most others)
re-wraps those lines: made narrower, a line of the old width takes two or more rows,
the cursor-up count falls short, and the top of the old render stays on screen as a
fragment. This region remembers each line it drew and, after a resize, erases the rows
those lines take now. It also drops the trailing blank padding rich
puts on a line, so that padding never wraps into rows of its own.

A terminal that does not reflow (xterm, the Linux console) cuts lines instead, and
each still takes one row: erasing more rows there would delete text above the region,
so the reflow count is used only where the terminal is known to reflow (`reflows`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from rich.cells import get_character_cell_size
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.control import Control
from rich.live import Live
from rich.live_render import LiveRender
from rich.segment import ControlType, Segment

# Terminals that re-wrap lines on resize, known by the TERM they set themselves (a terminal
# started from another sets its own TERM, where it inherits the other's variables).
_REFLOWING_TERMS = ("xterm-kitty", "alacritty", "foot", "xterm-ghostty", "wezterm")
# These say which terminal runs, but are inherited by any started from it: trusted only with
# the TERM those terminals set (an xterm started from GNOME Terminal has VTE_VERSION, and TERM=xterm).
_REFLOWING_MARKERS = ("VTE_VERSION", "KITTY_WINDOW_ID", "WT_SESSION", "WEZTERM_PANE", "KONSOLE_VERSION")
_REFLOWING_PROGRAMS = ("iTerm.app", "Apple_Terminal", "WezTerm", "vscode", "ghostty")


def reflows(env: Mapping[str, str] | None = None) -> bool:
    """Whether the terminal re-wraps its lines when resized. `SEMANTIC_TERMINAL_REFLOW=1`
    or `0` overrides the guess, made from the variables terminals set. Unsure means no: a
    wrong yes erases lines above the region, a wrong no leaves a fragment of it."""
    env = os.environ if env is None else env
    forced = env.get("SEMANTIC_TERMINAL_REFLOW", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    term = env.get("TERM", "")
    if term.startswith(_REFLOWING_TERMS):
        return True
    if env.get("TMUX"):  # tmux re-wraps its panes; its TERM is screen*, tmux* or what its users set
        return term.startswith(("screen", "tmux")) or term == "xterm-256color"
    markers = any(env.get(name) for name in _REFLOWING_MARKERS) or env.get("TERM_PROGRAM", "") in _REFLOWING_PROGRAMS
    return markers and term == "xterm-256color"


def rows_taken(lines: Iterable[str], columns: int) -> int:
    """How many terminal rows these lines take once re-wrapped at `columns`: a character
    two cells wide that does not fit at a row's end starts the next row."""
    columns = max(2, columns)
    total = 0
    for line in lines:
        rows, used = 1, 0
        for ch in line:
            width = get_character_cell_size(ch)
            if used + width > columns:
                rows, used = rows + 1, 0
            used += width
        total += rows
    return total


def _without_padding(line: list[Segment]) -> list[Segment]:
    """The line without the trailing spaces rich pads it with (those with no background)."""
    out = list(line)
    while out:
        seg = out[-1]
        if seg.control or (seg.style is not None and seg.style.bgcolor is not None):
            break
        text = seg.text.rstrip(" ")
        if text:
            out[-1] = Segment(text, seg.style)
            break
        out.pop()
    return out


class _ReflowRender(LiveRender):
    """LiveRender that records the lines it drew and the terminal's width then."""

    def __init__(self, renderable: RenderableType, console: Console, reflowing: bool) -> None:
        super().__init__(renderable, vertical_overflow="ellipsis")
        self.console = console
        self.reflowing = reflowing
        self.drawn = False  # whether anything was drawn yet
        self.lines: list[str] = []  # the last render's lines, as drawn (without padding)
        self.drawn_at = 0  # the terminal's width when the last render was drawn

    def rows(self) -> int:
        """The rows the last render takes on screen now."""
        if self.reflowing and self.console.width != self.drawn_at:
            return rows_taken(self.lines, self.console.width)
        return len(self.lines)

    def position_cursor(self) -> Control:
        if not self.drawn:
            return Control()
        up = ((ControlType.CURSOR_UP, 1), (ControlType.ERASE_IN_LINE, 2)) * max(0, self.rows() - 1)
        return Control(ControlType.CARRIAGE_RETURN, (ControlType.ERASE_IN_LINE, 2), *up)

    def restore_cursor(self) -> Control:
        if not self.drawn:
            return Control()
        return Control(ControlType.CARRIAGE_RETURN, *((ControlType.CURSOR_UP, 1), (ControlType.ERASE_IN_LINE, 2)) * self.rows())

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        segments = (s for s in super().__rich_console__(console, options) if isinstance(s, Segment))  # only segments come
        drawn = list(Segment.split_lines(segments))
        lines = [_without_padding(line) for line in drawn]
        self.lines = ["".join(seg.text for seg in line if not seg.control) for line in lines]
        self.drawn = True
        self.drawn_at = options.max_width
        new_line = Segment.line()
        for i, line in enumerate(lines):
            yield from line
            if i < len(lines) - 1:
                yield new_line


class ResizableLive(Live):
    """`rich.live.Live` whose redraw erases what a reflowing terminal made of its last render."""

    def __init__(self, renderable: RenderableType, console: Console, refresh_per_second: float = 10) -> None:
        super().__init__(renderable, console=console, refresh_per_second=refresh_per_second, transient=False)
        # rich keeps the region's renderer in this attribute; its replacement keeps LiveRender's interface.
        self._live_render = _ReflowRender(self.get_renderable(), console, reflows())
