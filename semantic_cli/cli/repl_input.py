"""The REPL's input side: `\"\"\"` blocks that span lines, the prompt's key bindings, and the
terminal kept quiet while a reply streams.

Apart from cli/repl.py, which keeps the loop and the turns, so that each reads on its own;
slash.py reads a `/system \"\"\"` block through `unblock` too.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

BLOCK = '"""'  # opens and closes a multi-line message, as in ollama


def unblock(text: str) -> tuple[str, bool]:
    """The message inside a triple-quoted block, and whether it was one."""
    s = text.strip()
    if not s.startswith(BLOCK):
        return text, False
    s = s[len(BLOCK) :]
    if s.rstrip().endswith(BLOCK):
        s = s.rstrip()[: -len(BLOCK)]
    return s.strip("\n"), True


def block_open(text: str) -> bool:
    """A `\"\"\"` block (a message, or `/system \"\"\"` a persona) is still open: Enter adds a line."""
    s = text.strip()
    if s.startswith("/system"):
        s = s[len("/system") :].strip()
    return s.startswith(BLOCK) and (len(s) < 2 * len(BLOCK) or not s.endswith(BLOCK))


@contextmanager
def _quiet_tty() -> Iterator[None]:
    """No echo while a reply streams: an echoed key (or the ^C of Ctrl-C) would shift
    the live region by a line and leave a stale copy on screen. Non-canonical, so keys
    typed meanwhile (Ctrl-D included) reach the next prompt as typed; Ctrl-C still signals."""
    try:
        import termios

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError):  # no tty (or not POSIX): nothing to quiet
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ICANON | getattr(termios, "ECHOCTL", 0))
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def _key_bindings() -> Any:
    from prompt_toolkit.filters import has_focus
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()
    default = has_focus("DEFAULT_BUFFER")

    @kb.add("enter", filter=default)
    def _enter(event: Any) -> None:
        buf = event.current_buffer
        if block_open(buf.text):
            buf.newline(copy_margin=False)
        else:
            buf.validate_and_handle()

    @kb.add("escape", "enter", filter=default)
    def _newline(event: Any) -> None:
        event.current_buffer.newline(copy_margin=False)

    @kb.add("c-c", filter=default)
    def _interrupt(event: Any) -> None:
        # With text: drop it (like a shell). At an empty prompt: leave.
        if event.current_buffer.text:
            event.current_buffer.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt())

    return kb
