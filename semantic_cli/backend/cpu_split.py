"""Batched decoding on a multi-core CPU: each big matmul as two halves on two MLX streams.

OpenBLAS threads the matrix-vector product of one sequence well, but not the
skinny matrix product of a small batch: on the 2-core dev VM, SmolLM2's lm_head
for 4 rows took 27 ms with OpenBLAS's 2 threads, and 20 ms as two
single-threaded halves running side by side on two MLX CPU streams (one row:
about 18 ms either way). So while the engine decodes two or more sequences,
OpenBLAS is held to one thread and every `nn.Linear` (and a tied embedding's
`as_linear`) computes the two halves of its output features on two streams.
With one sequence nothing changes: a batch of one runs exactly as mlx-lm wrote it.

Only the CPU backend with a loaded OpenBLAS and at least two cores uses this.
"""

from __future__ import annotations

import os
from typing import Any

from . import runtime

_MIN_FEATURES = 128  # below this the extra stream hand-offs cost more than they save

# streams: the two split streams, once the patches are installed; threads: OpenBLAS's own count.
_state: dict[str, Any] = {"active": False, "streams": None, "threads": None}


def available() -> bool:
    mx = runtime.mx()
    return runtime.openblas() is not None and (os.cpu_count() or 1) >= 2 and mx.default_device().type == mx.cpu


def set_batched(active: bool) -> None:
    """Switch split matmuls on (two or more sequences decoding) or off.

    Waits for in-flight work first: OpenBLAS's thread count must not change under a running call.
    """
    if active == _state["active"] or (active and not available()):
        return
    mx = runtime.mx()
    blas = runtime.openblas()
    mx.synchronize()
    for stream in _state["streams"] or ():
        mx.synchronize(stream)
    if blas is not None and active:  # available() has said there is one
        _install()
        _state["threads"] = _state["threads"] or blas.openblas_get_num_threads()
        blas.openblas_set_num_threads(1)
    elif blas is not None and _state["threads"]:
        blas.openblas_set_num_threads(_state["threads"])
    _state["active"] = active


def _install() -> None:
    if _state["streams"] is not None:
        return
    import mlx.nn as nn

    mx = runtime.mx()
    _state["streams"] = (mx.new_stream(mx.cpu), mx.new_stream(mx.cpu))
    linear_call = nn.Linear.__call__
    as_linear = nn.Embedding.as_linear

    def split_linear(self: Any, x: Any) -> Any:
        if not _state["active"] or self["weight"].shape[0] < _MIN_FEATURES:
            return linear_call(self, x)
        y = _split_matmul(x, self["weight"])
        return y + self["bias"] if "bias" in self else y

    def split_as_linear(self: Any, x: Any) -> Any:
        if not _state["active"]:
            return as_linear(self, x)
        return _split_matmul(x, self["weight"])

    # Patched on the classes (not per instance): mlx-lm builds its layers before we run.
    setattr(nn.Linear, "__call__", split_linear)  # noqa: B010 (mypy forbids assigning to a method)
    setattr(nn.Embedding, "as_linear", split_as_linear)  # noqa: B010


def _split_matmul(x: Any, weight: Any) -> Any:
    """x @ weight.T with weight's rows (output features) cut in two, one half per stream."""
    mx = runtime.mx()
    s1, s2 = _state["streams"]
    half = weight.shape[0] // 2
    # Row slices of a row-major matrix are views: no copy of the weights.
    return mx.concatenate([mx.matmul(x, weight[:half].T, stream=s1), mx.matmul(x, weight[half:].T, stream=s2)], axis=-1)
