"""Ctrl-C at a step boundary: while an engine step runs (a prefill chunk, a decode step),
SIGINT only sets a flag, and the engine stops once the step is over, with its state
whole: what was read so far stays usable as cache (engine.Engine.generate). A long
prefill pass does not wait for its end: it stops between two layers and is rolled back
(backend/interruptible.py), so Ctrl-C is answered within a layer there too.

Only in the main thread, and only while Python's own SIGINT handler is installed (a
server or a test that installed its own keeps it)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass
class Deferred:
    requested: bool = False  # SIGINT arrived during the step
    active: bool = False  # this thread holds SIGINT for the step (else nothing can arrive)


@contextmanager
def deferred() -> Iterator[Deferred]:
    state = Deferred()
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield state
        return

    def note(signum: int, frame: Any) -> None:
        state.requested = True

    previous = signal.signal(signal.SIGINT, note)
    state.active = True
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)


_terminating: int | None = None  # SIGTERM or SIGHUP arrived: the command stops as for Ctrl-C, then ends
_wakers: list[Callable[[], None]] = []  # what must be told at once: a prompt waiting for input


def stop_on_termination() -> None:
    """SIGTERM and SIGHUP (the terminal closed) stop a command as Ctrl-C does: the reply being
    written is kept, marked interrupted, and nothing half-written is left; then the command
    ends (exit 128 + the signal: `terminating`), a REPL waiting at its prompt too (`waking`).
    Before, either signal killed the process mid-turn and the turn was lost. Only where
    nothing else handles them (a server installs its own) and not in a rank of a run over
    several ranks, which the launcher stops (killing ranks stuck in a collective)."""
    from .distributed import launched_rank

    if launched_rank() is not None or threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _terminate)


def _terminate(signum: int, frame: Any) -> None:
    global _terminating
    _terminating = signum
    for wake in list(_wakers):
        wake()  # a prompt leaves (prompt_toolkit holds SIGINT while it reads: the handler below does nothing then)
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)  # a step notes it and stops at its end; elsewhere KeyboardInterrupt
    else:
        raise KeyboardInterrupt


def terminating() -> int | None:
    """The signal (SIGTERM, SIGHUP) that is ending this command, if one is."""
    return _terminating


@contextmanager
def waking(wake: Callable[[], None]) -> Iterator[None]:
    """While the block runs, SIGTERM or SIGHUP also calls `wake` (a prompt's way out)."""
    _wakers.append(wake)
    try:
        yield
    finally:
        _wakers.remove(wake)
