"""Attention on a multi-core CPU: one attention as two halves on two MLX streams.

MLX's CPU softmax is a single-threaded scalar loop (its
`exp` ran 27x slower than numpy's here), and at long contexts it is most of a
prefill: at 4K tokens of history, 20 new tokens spent ~0.55 s of SmolLM2's 30
layers in attention, the second core idle. The split computes MLX's own fallback
for `mx.fast.scaled_dot_product_attention`, op for op, over two groups of KV heads
(or of sequences, in a batch) on the two streams: every matmul call and softmax row is the
one MLX would make, so the output is bit-identical (tests/test_cpu_split.py).

Its softmax, and every float32 attention it does not split, go through the native
`exact_softmax` where it gives MLX's bits (x86, MLX 0.32: `_exact_softmax`): MLX's CPU
`exp` handles one float at a time, this one eight. At 2,400 keys and 13 query rows a
layer's softmax took 3.3 ms, now 0.7 ms. With it, only a cold prefill's long chunks
still gain from the split (`min_query_rows`); a turn's new tokens and decode steps run
MLX's ops on one stream.

Only the CPU backend with a loaded OpenBLAS and at least two cores uses this.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import buffers, runtime

# streams: the two split streams, once installed; sdpa: MLX's own attention, once replaced;
# softmax: the native exact_softmax, where built (found once, at install).
_state: dict[str, Any] = {"streams": None, "sdpa": None, "softmax": None}
# With the native softmax, fewer query rows in all (a turn's new tokens, a room's batch of
# them, decode steps) run on one stream: there the two streams' hand-offs, and two OpenBLAS
# pools on two cores, cost more than the split saves. Per layer on the dev VM, split vs one
# stream: 12 rows x 600 keys 0.72 vs 0.44 ms, 20 x 6,000 6.0 vs 5.9, 128 x 2,000 9.4 vs
# 9.1, 192 x 6,000 61.8 vs 61.5, 4 sequences x 20 x 2,000 10.8 vs 10.5, 8 x 20 x 2,000 21.7
# vs 21.4; but 256 x 4,096 38.5 vs 48.1, 512 x 8,192 180 vs 197 (a cold prefill's chunks),
# 4 x 64 x 2,000 22.3 vs 27.8, 2 x 192 x 2,000 30.8 vs 40.2.
_MIN_QUERY = 256
# With MLX's own scalar softmax the split pays from a few rows (1.3-1.5x at 20-512 rows);
# a decode step's one row per sequence is too short (batches of 4: 0.41 vs 0.26 ms a layer).
_MIN_QUERY_SCALAR_SOFTMAX = 8


def min_query_rows() -> int:
    """The fewest query rows (over all sequences) an attention is split for, with the softmax this process has."""
    return _MIN_QUERY if _state["softmax"] is not None else _MIN_QUERY_SCALAR_SOFTMAX


def available() -> bool:
    mx = runtime.mx()
    return runtime.openblas() is not None and (os.cpu_count() or 1) >= 2 and mx.default_device().type == mx.cpu


def _streams() -> tuple[Any, Any]:
    if _state["streams"] is None:
        mx = runtime.mx()
        _state["streams"] = (mx.new_stream(mx.cpu), mx.new_stream(mx.cpu))
    return _state["streams"]


def install_attention() -> bool:
    """Route `mx.fast.scaled_dot_product_attention` (which mlx-lm's models call at each
    use) through the two-stream split where `available()`; whether it is installed."""
    if _state["sdpa"] is not None:
        return True
    if not available():
        return False
    mx = runtime.mx()
    _streams()
    _state["sdpa"] = original = mx.fast.scaled_dot_product_attention
    _state["softmax"] = _exact_softmax()

    def sdpa(q: Any, k: Any, v: Any, *, scale: float, mask: Any = None, sinks: Any = None, **kwargs: Any) -> Any:
        plain = sinks is None and not kwargs and _plain(q, k, v, mask)
        groups = _attention_groups(q, k) if plain else None
        if groups is not None:
            return split_attention(q, k, v, scale, mask, groups)
        if plain and q.dtype == mx.float32 and _state["softmax"] is not None:
            return _fallback(q, k, v, scale, mask, None)  # the same ops on this stream, with the faster softmax
        return original(q, k, v, scale=scale, mask=mask, sinks=sinks, **kwargs)

    mx.fast.scaled_dot_product_attention = sdpa
    return True


@contextmanager
def stock_attention() -> Iterator[None]:
    """MLX's own attention for the block (a reference to compare the split against)."""
    original = _state["sdpa"]
    if original is None:
        yield
        return
    mx = runtime.mx()
    installed = mx.fast.scaled_dot_product_attention
    mx.fast.scaled_dot_product_attention = original
    try:
        yield
    finally:
        mx.fast.scaled_dot_product_attention = installed


def _plain(q: Any, k: Any, v: Any, mask: Any) -> bool:
    """One float dtype throughout and a mask that needs no conversion: nothing MLX would cast."""
    mx = runtime.mx()
    if not (q.dtype == k.dtype == v.dtype and mx.issubdtype(q.dtype, mx.floating)):
        return False
    if mask is None or isinstance(mask, str):
        return mask in (None, "causal")
    return mask.ndim in (2, 4) and mask.dtype in (mx.bool_, q.dtype)


def _attention_groups(q: Any, k: Any, min_rows: int | None = None) -> tuple[int, int] | None:
    """How to cut one attention in two: (axis, where) over sequences (axis 0) or KV heads
    (axis 1), or None when it is too small to gain (fewer than `min_rows` query rows over
    all its sequences, by default `min_query_rows()`)."""
    if q.ndim != 4 or k.ndim != 4:
        return None
    batch, kv_heads, rows = q.shape[0], k.shape[1], q.shape[2]
    if batch * rows < (min_query_rows() if min_rows is None else min_rows):
        return None
    if batch >= 2:
        return 0, batch // 2
    return (1, (kv_heads + 1) // 2) if kv_heads >= 2 else None


def split_attention(q: Any, k: Any, v: Any, scale: float, mask: Any, groups: tuple[int, int]) -> Any:
    """softmax(q k^T * scale + mask) v in two halves on the two streams, each as MLX computes it."""
    mx = runtime.mx()
    axis, cut = groups
    rep = q.shape[1] // k.shape[1]
    s1, s2 = _streams()

    def half(lo: int, hi: int, stream: Any) -> Any:
        if axis == 0:
            m = mask[lo:hi] if _is_array(mask) and mask.ndim == 4 and mask.shape[0] > 1 else mask
            return _fallback(q[lo:hi], k[lo:hi], v[lo:hi], scale, m, stream)
        m = mask
        if _is_array(mask) and mask.ndim >= 3 and mask.shape[-3] > 1:  # per query head
            m = mask[..., lo * rep : hi * rep, :, :]
        return _fallback(q[:, lo * rep : hi * rep], k[:, lo:hi], v[:, lo:hi], scale, m, stream)

    end = q.shape[0] if axis == 0 else k.shape[1]
    return mx.concatenate([half(0, cut, s1), half(cut, end, s2)], axis=axis)


def _exact_softmax() -> Any:
    """The native exact_softmax where it gives MLX's bits: it copies MLX 0.32's scalar CPU
    softmax, which x86 builds run (ARM builds vectorise theirs, in another order), and it
    is checked here once on rows with masked scores and values on its rounding edges."""
    mx = runtime.mx()
    kernel = getattr(buffers.native(), "exact_softmax", None)
    if kernel is None or not mx.__version__.startswith("0.32.") or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    edges = [0.49999997, -0.49999997, 0.5, -1.5, 88.0, 88.00001, -88.00001, 0.0, float(mx.finfo(mx.float32).min)]
    rows = mx.concatenate([mx.array([edges * 3]), mx.random.normal((7, 27), key=mx.random.key(0)) * 40.0])
    cpu = mx.default_stream(mx.cpu)
    same = mx.array_equal(kernel(rows, cpu), mx.softmax(rows, axis=-1, precise=True, stream=cpu)).item()
    return kernel if same else None


def _softmax(scores: Any, stream: Any) -> Any:
    """`mx.softmax(scores, axis=-1, precise=True)` on `stream` (None: the current one), through
    the native exact_softmax where built: the same bits (tests/test_cpu_split.py)."""
    mx = runtime.mx()
    kernel = _state["softmax"]
    if kernel is None or scores.dtype != mx.float32:
        return mx.softmax(scores, axis=-1, precise=True, stream=stream)
    return kernel(scores, stream if stream is not None else mx.default_stream(mx.default_device()))


def _is_array(mask: Any) -> bool:
    return mask is not None and not isinstance(mask, str)


def _fallback(q: Any, k: Any, v: Any, scale: float, mask: Any, stream: Any) -> Any:
    """MLX's own CPU fallback for fast SDPA (mlx/fast.cpp, mlx 0.32), op for op, on `stream`."""
    mx = runtime.mx()
    n_kv = k.shape[1]
    rep = q.shape[1] // n_kv
    q = mx.multiply(mx.array(scale, q.dtype), q, stream=stream)
    if rep > 1:
        q = mx.unflatten(q, 1, (n_kv, rep), stream=stream)
        k = mx.expand_dims(k, 2, stream=stream)
        v = mx.expand_dims(v, 2, stream=stream)
    scores = mx.matmul(q, mx.swapaxes(k, -1, -2, stream=stream), stream=stream)
    if mask is not None:
        if isinstance(mask, str):  # "causal": query row i sees keys up to (keys - queries) + i
            k_len, q_len = k.shape[-2], q.shape[-2]
            rows = mx.expand_dims(mx.arange(k_len - q_len, k_len, stream=stream), 1, stream=stream)
            mask = mx.greater_equal(rows, mx.expand_dims(mx.arange(0, k_len, stream=stream), 0, stream=stream), stream=stream)
        elif rep > 1 and mask.ndim >= 3:  # per KV head and its query heads
            one = mask.shape[-3] == 1
            mask = mx.expand_dims(mask, -3, stream=stream) if one else mx.unflatten(mask, -3, (n_kv, rep), stream=stream)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype), stream=stream)
        else:
            scores = mx.add(scores, mask, stream=stream)
    scores = _softmax(scores, stream)
    out = mx.matmul(scores, v, stream=stream)
    return mx.flatten(out, 1, 2, stream=stream) if rep > 1 else out
