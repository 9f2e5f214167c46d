"""Ctrl-C inside a long prefill step, not only after it.

A prefill step is one lazily built graph for the whole model, evaluated at once:
at 2K tokens of history a 512-token chunk of SmolLM2 ran 5 s here, and Ctrl-C
waited for all of it. While `watching` is on, each attention call with a long
query (a prefill chunk, never a decode step) first evaluates what the layers
before it computed and asks the check; when Ctrl-C has come it raises
`PrefillStopped`, so a step stops within one layer (~0.2 s there).

Evaluating earlier does not change a value (the same operations run on the same
inputs), so replies stay bit-identical (tests/test_interrupt.py). The stopped
step leaves the generator half-way: `compat.rolled_back_prompt` recovers the
tokens read before the chunk from it, and the caller drops the generator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from . import runtime

_MIN_QUERY = 64  # shorter queries (decode steps, short turns) run as one graph, as before

_state: dict[str, Any] = {"check": None, "installed": False}


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
        check = _state["check"]
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
    previous = _state["check"]
    _state["check"] = check
    try:
        yield
    finally:
        _state["check"] = previous
