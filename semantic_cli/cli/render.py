"""Terminal output: consoles that respect NO_COLOR/--color, progress bars, footers,
the CLI's one formatter each for byte counts, ages, counted nouns and tables, and
`printable`, the one filter between stored or generated text and a terminal.

Output fits its medium: a table on a terminal is aligned (its first column, the name,
is never cropped; long free text wraps); anywhere else it is tab-separated values, one
record per line, every field complete (see `table`)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from rich.cells import cell_len

if TYPE_CHECKING:  # imported where used: a piped turn through a server never builds a console
    from rich.console import Console

_color_mode = "auto"


def set_color(mode: str) -> None:
    global _color_mode
    _color_mode = mode


def _color_system(stream: Any) -> Literal["auto", "standard"] | None:
    if _color_mode == "never" or (_color_mode == "auto" and (os.environ.get("NO_COLOR") or not stream.isatty())):
        return None
    return "auto" if _color_mode == "auto" else "standard"


def _console(stream: Any) -> Console:
    from rich.console import Console

    system = _color_system(stream)
    return Console(
        file=stream,
        color_system=system,
        force_terminal=_color_mode == "always" or None,
        highlight=False,
        soft_wrap=True,
        no_color=system is None,
    )


def stdout() -> Console:
    return _console(sys.stdout)


def exit_now() -> NoReturn:
    """End a command that succeeded without loading MLX (a turn a server ran) at once: its
    output flushed, the interpreter's teardown skipped (~10 ms of a ~0.27 s piped turn).
    The caller has closed what it opened; nothing else in such a process needs a finalizer."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def stderr() -> Console:
    return _console(sys.stderr)


# Stored and generated text may hold raw control characters: an ESC would let a persona or
# a model's reply drive the terminal (an OSC 52 clipboard write, a CSI that clears the
# screen or moves the cursor) and would break a live redraw. `printable` shows every C0
# control but \n and \t, DEL and every C1 control as a visible symbol instead, so no
# escape sequence can survive it (its ESC is shown as "␛").
_CONTROLS = {c: 0x2400 + c for c in range(32) if c not in (9, 10)} | {0x7F: 0x2421} | {c: 0xFFFD for c in range(0x80, 0xA0)}


def printable(text: str, stream: Any = None) -> str:
    """`text` with its control characters made visible: the one filter for stored or
    generated text on its way to a terminal. With `stream`, only when that stream is a
    terminal (or --color always says it leads to one): a pipe or a file gets the text
    byte for byte."""
    if stream is not None and not is_terminal(stream):
        return text
    return text.translate(_CONTROLS)


def is_terminal(stream: Any) -> bool:
    if _color_mode == "always":
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):  # closed, or not a real file
        return False


def human_bytes(n: float) -> str:
    """Decimal units, as disks are sold: 999 B, 1.5 KB, 377.5 MB, 12.0 GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_age(ts: float | None) -> str:
    """How long ago `ts` was: "just now", "5m ago", "3h ago", "2d ago"; "-" for never."""
    if not ts:
        return "-"
    s = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{int(s // size)}{unit} ago"
    return "just now"


def say_recovered(recovered: dict[str, str]) -> None:
    """Say on stderr, one line per agent, what opening it did to a /retry a killed process
    left (`Chat.recovered`, `history.recover_retry`); the lines are said once: emptied."""
    for name, line in recovered.items():
        stderr().print(f"{name}: {printable(line)}", markup=False, highlight=False)
    recovered.clear()


def plural(n: int, word: str, many: str | None = None) -> str:
    """A count and its noun: "1 block", "2 blocks", "0 turns"; `many` for irregular plurals."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def fullness(tokens: int, context: int | None) -> str:
    """How much of a model's context a conversation fills: "812/8192"; the tokens alone
    ("812") when the context length is not known."""
    return f"{tokens}/{context}" if context else str(tokens)


def turns_cell(turns: int, compacted: int) -> str:
    """TURNS in `agents ls` and /agents: every recorded turn, and how many of them a
    compaction summary covers (kept in the transcript, no longer seen by the model)."""
    return f"{turns} ({compacted} compacted)" if compacted else str(turns)


@dataclass(frozen=True)
class Column:
    header: str
    right: bool = False  # numbers: right-aligned on a terminal
    wrap: bool = False  # long free text (a persona, a model path): wraps on a narrow terminal


_MIN_WRAP = 12  # a wrapping column is never narrowed below this (or its own width)
_TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def tsv_field(text: str) -> str:
    """A field of a tab-separated line: backslash, tab, newline and carriage return
    written as \\\\, \\t, \\n and \\r (as PostgreSQL's text COPY and `mysql --batch` do), so
    every record stays on one line and the text can be recovered exactly."""
    return text.translate(_TSV_ESCAPES)


def table(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> None:
    """Print a table on stdout, fitted to its medium.

    On a terminal: aligned columns under bold headers. The first column (the name) is
    never cropped or wrapped; when the table is wider than the terminal the `wrap`
    columns wrap first, and nothing is ever cut (a table wider than the terminal even
    then is left to the terminal to wrap). Anywhere else (a pipe, a file): tab-separated
    values, a header line and one line per row, each field complete (`tsv_field`).
    Cells are printed as given: the caller passes stored text through `printable` for a
    terminal."""
    if not is_terminal(sys.stdout):
        lines = ["\t".join(tsv_field(cell) for cell in row) for row in [[c.header for c in columns], *rows]]
        sys.stdout.write("".join(line + "\n" for line in lines))
        return
    from rich.table import Table

    console = stdout()
    widths = fit_widths(columns, rows, console.width)
    grid = Table(box=None, header_style="bold", pad_edge=False)
    for col, width in zip(columns, widths, strict=True):
        grid.add_column(col.header, justify="right" if col.right else "left", width=width, no_wrap=not col.wrap, overflow="fold")
    for row in rows:
        grid.add_row(*row)
    console.width = max(console.width, sum(widths) + 2 * (len(widths) - 1))  # wider than the terminal: it wraps, nothing is cut
    with console.capture() as captured:
        console.print(grid, soft_wrap=False)
    # Without the padding after each line's last cell, a line the terminal wraps leaves no blank line behind.
    sys.stdout.write("".join(line.rstrip(" ") + "\n" for line in captured.get().splitlines()))


def fit_widths(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int) -> list[int]:
    """Each column's width on a terminal `width` cells wide (two cells between columns):
    its widest cell, the `wrap` columns narrowed (the widest first) until the table fits
    or each is down to its floor."""
    natural = [max([cell_len(c.header), *(cell_len(line) for row in rows for line in row[i].splitlines())]) for i, c in enumerate(columns)]
    widths = list(natural)
    excess = sum(widths) + 2 * (len(widths) - 1) - width
    floors = [min(n, _MIN_WRAP) if c.wrap else n for c, n in zip(columns, natural, strict=True)]
    while excess > 0:
        narrowable = [i for i, w in enumerate(widths) if w > floors[i]]
        if not narrowable:
            break
        widest = max(narrowable, key=lambda i: widths[i])
        widths[widest] -= 1
        excess -= 1
    return widths


def footer(stats: Any, tier: str, finish_reason: str = "stop", context: int | None = None, name: str = "", repl: bool = False) -> str:
    """A reply's figures; first, on a line of its own, what cut it, if something did
    (`cut_note`); with the model's `context` length, how full the conversation now is."""
    cached = f", {stats.cached_tokens} from {tier} cache" if stats.cached_tokens else ""
    full = f" · context {fullness(stats.prompt_tokens + stats.generated_tokens, context)}" if context else ""
    cut = cut_note(stats, finish_reason, context, name, repl)
    return (
        f"{cut + chr(10) if cut else ''}ttft {stats.ttft_s:.2f}s · prompt {stats.prompt_tps:.0f} tok/s · "
        f"gen {stats.generation_tps:.1f} tok/s · prefilled {stats.prefilled_tokens} of {stats.prompt_tokens} tokens{cached}{full}"
    )


def cut_note(stats: Any, finish_reason: str, context: int | None, name: str, repl: bool) -> str:
    """Why a reply stopped short ("" if it did not), with the ways out that apply: a full
    context (the reply reached the model's `context` length) needs room made, which no
    token limit gives; otherwise the limit is raised by the flag, or in the REPL by /set."""
    if finish_reason != "length":
        return ""
    used = stats.prompt_tokens + stats.generated_tokens
    if context and used >= context:
        agent = name or "NAME"
        if repl:
            ways = (
                f"/compact (summarise older turns), /undo or /reset; or, outside this REPL, "
                f"`semantic agents trim {agent} --keep-last N` or `semantic agents fork {agent} NEW --at-turn N`"
            )
        else:
            ways = (
                f"`semantic agents compact {agent}` (summarise older turns), `semantic agents trim {agent} --keep-last N` "
                f"or `semantic agents fork {agent} NEW --at-turn N`"
            )
        return f"cut off: the context is full ({fullness(used, context)} tokens); make room: {ways}"
    raise_it = "/set max_tokens N raises it" if repl else "--max-tokens raises it"
    return f"cut off at the token limit ({plural(stats.generated_tokens, 'token')}; {raise_it})"


ProgressFn = Callable[[str, int, int], None]


@contextmanager
def progress(console: Console | None) -> Iterator[ProgressFn]:
    """A progress callback (stage, done, total) drawing rich bars on `console` (None: no bars)."""
    if console is None:
        yield lambda stage, done, total: None
        return
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    bars = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=max(total, 1))
        bars.update(tasks[stage], completed=done, total=max(total, 1))

    with bars:
        yield update
