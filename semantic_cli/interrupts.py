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
from collections.abc import Iterator
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
