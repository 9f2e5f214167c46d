"""Terminal output: consoles that respect NO_COLOR/--color, progress bars, footers,
the CLI's one formatter each for byte counts and ages, and `printable`, the one
filter between stored or generated text and a terminal."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

_color_mode = "auto"


def set_color(mode: str) -> None:
    global _color_mode
    _color_mode = mode


def _color_system(stream: Any) -> Literal["auto", "standard"] | None:
    if _color_mode == "never" or (_color_mode == "auto" and (os.environ.get("NO_COLOR") or not stream.isatty())):
        return None
    return "auto" if _color_mode == "auto" else "standard"


def _console(stream: Any) -> Console:
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


def footer(stats: Any, tier: str) -> str:
    cached = f", {stats.cached_tokens} from {tier} cache" if stats.cached_tokens else ""
    return (
        f"ttft {stats.ttft_s:.2f}s · prompt {stats.prompt_tps:.0f} tok/s · gen {stats.generation_tps:.1f} tok/s · "
        f"prefilled {stats.prefilled_tokens} of {stats.prompt_tokens} tokens{cached}"
    )


ProgressFn = Callable[[str, int, int], None]


@contextmanager
def progress(console: Console, enabled: bool = True) -> Iterator[ProgressFn]:
    """A progress callback (stage, done, total) drawing rich bars on `console`."""
    if not enabled:
        yield lambda stage, done, total: None
        return
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
