"""Ctrl-C inside a long prefill step, not only after it.

A prefill step is one lazily built graph for the whole model, evaluated at once:
at 2K tokens of history a 512-token chunk of SmolLM2 ran 5 s here, and Ctrl-C
waited for all of it. While `watching` is on, each attention call with a long
query (a prefill chunk, never a decode step) first evaluates what the layers
before it computed and asks the check; when Ctrl-C has come it raises
`PrefillStopped`, so a step stops within one layer (~0.2 s there).

Evaluating earlier does not change a value (the same operations run on the same
inputs): tests/test_exactness.py runs the engine watched, on the main thread, and its
tokens equal mlx_lm.generate's. The prompt batch of `compat.batch_generator` rolls the stopped pass back
to where it began, the step's other work (decode steps of other sequences) is
delivered, and the caller then drops the generator (`engine.Batch.step`). Only on
the CPU backend, where `compat.stoppable_mid_step` (plain KV caches), and never in
a run over several ranks, whose other ranks are in the same pass
(`Batch.mid_step_stop`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from . import runtime

_MIN_QUERY = 64  # shorter queries (decode steps, short turns) run as one graph, as before

_state: dict[str, Any] = {"installed": False}
_watch = threading.local()  # .check: the check of this thread's `watching` block, if any


class PrefillStopped(Exception):
    """Ctrl-C came during a prefill step: it stopped between two layers."""


def install() -> None:
    """Wrap `mx.fast.scaled_dot_product_attention` (whatever is installed now, e.g. the CPU
    split) once per process; the wrapper costs nothing while nobody is `watching`."""
    if _state["installed"]:
        return
    mx = runtime.mx()
    inner = mx.fast.scaled_dot_product_attention

    def sdpa(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> Any:
        check = getattr(_watch, "check", None)
        if check is not None and q.ndim == 4 and q.shape[2] >= _MIN_QUERY:
            mx.eval(q, k, v)
            if check():
                raise PrefillStopped
        return inner(q, k, v, *args, **kwargs)

    mx.fast.scaled_dot_product_attention = sdpa
    _state["installed"] = True


@contextmanager
def watching(check: Callable[[], bool], active: bool = True) -> Iterator[None]:
    """Long prefill steps inside the block stop between layers once `check()` is true
    (when `active`: else the block runs as if not watched)."""
    if not active:
        yield
        return
    previous = getattr(_watch, "check", None)
    _watch.check = check
    try:
        yield
    finally:
        _watch.check = previous
