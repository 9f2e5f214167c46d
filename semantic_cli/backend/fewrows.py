"""Batched decoding's matmuls on the CPU: each weight matrix read once per step.

A decode step of B sequences multiplies B rows (one per sequence) by every weight
matrix. OpenBLAS's sgemm packs the whole weight for each such call, which costs
as much memory traffic as the product itself: on the 2-core dev VM a decode step
of 4 SmolLM2 sequences took 79 ms against 61 ms for one, and the lm_head alone
9.2 ms for 4 rows against 6.1 ms for one. The native `few_rows_matmul`
(`_native.cpp`) reads each row of the weight once and takes every sequence's dot
product with it, on all cores with the GIL released: the 4-row lm_head in 5.8 ms.
(Its predecessor here cut each matmul in two halves on two MLX streams with
OpenBLAS held to one thread; by the time this replaced it, that was slower than
OpenBLAS alone: 38-39 against 44 tokens/s for 4 sequences.)

Only decode steps of two or more sequences use it (`set_batched`, switched by the
engine while two or more sequences run): a prefill chunk, and a batch of one, run
exactly as mlx-lm wrote them, so a turn alone stays byte-identical to
mlx_lm.generate. A batch's replies may differ from the same turns run alone in
the last bits of a logit (the products sum in another order), as mlx-lm's own batching
may: greedy replies stay the same unless two logits are that close (tests/test_batched.py).
"""

from __future__ import annotations

import os
from typing import Any

from . import buffers, runtime

_MAX_ROWS = 16  # sequences decoding at once; past this a GEMM's packing pays for itself
# kernel: the native function, once installed; threads: what it may use. Both found once:
# `matmul_t` runs for every linear of every decode step (~200 a step).
_state: dict[str, Any] = {"active": False, "kernel": None, "threads": 1}


def available() -> bool:
    """The CPU backend and a native module with the kernel."""
    mx = runtime.mx()
    compiled = buffers.native()
    return mx.default_device().type == mx.cpu and compiled is not None and hasattr(compiled, "few_rows_matmul")


def set_batched(active: bool) -> None:
    """On while two or more sequences decode (the engine switches it between steps), off otherwise."""
    if active == _state["active"] or (active and not available()):
        return
    if active:
        _install()
    _state["active"] = active


def active() -> bool:
    return _state["active"]


def _threads() -> int:
    """The cores this process may run on (the native pool takes at most 8 threads)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def matmul_t(x: Any, weight: Any) -> Any | None:
    """x @ weight.T through the native kernel for a decode step of 2+ sequences (x of shape
    (..., 1, k), float32); None where it does not apply (the caller runs MLX's own)."""
    mx = runtime.mx()
    if x.ndim < 2 or x.shape[-2] != 1 or x.dtype != mx.float32 or weight.dtype != mx.float32 or weight.ndim != 2:
        return None
    k = x.shape[-1]
    rows = x.size // k
    if not 2 <= rows <= _MAX_ROWS:
        return None
    y = _state["kernel"](x.reshape(rows, k), weight, _state["threads"])  # lazy: a node of the step's graph
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _install() -> None:
    """Route `nn.Linear` and a tied embedding's `as_linear` through `matmul_t` while active.
    Patched on the classes (not per instance): mlx-lm builds its layers before we run."""
    if _state["kernel"] is not None:
        return
    import mlx.nn as nn

    compiled = buffers.native()
    assert compiled is not None  # available() said so
    _state["kernel"], _state["threads"] = compiled.few_rows_matmul, _threads()
    linear_call = nn.Linear.__call__
    as_linear = nn.Embedding.as_linear

    def few_rows_linear(self: Any, x: Any) -> Any:
        y = matmul_t(x, self["weight"]) if _state["active"] else None
        if y is None:
            return linear_call(self, x)
        return y + self["bias"] if "bias" in self else y

    def few_rows_as_linear(self: Any, x: Any) -> Any:
        y = matmul_t(x, self["weight"]) if _state["active"] else None
        return as_linear(self, x) if y is None else y

    setattr(nn.Linear, "__call__", few_rows_linear)  # noqa: B010 (mypy forbids assigning to a method)
    setattr(nn.Embedding, "as_linear", few_rows_as_linear)  # noqa: B010
