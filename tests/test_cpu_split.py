"""Attention split over two CPU streams (cpu_split): the same bits as MLX's own, and the
engine's models attend through it (batched decoding's matmuls: test_fewrows.py)."""

from __future__ import annotations

import pytest

from semantic_cli.backend import cpu_split, runtime
from semantic_cli.engine import get_engine
from semantic_cli.events import TurnDone, TurnRequest
from semantic_cli.model.loader import ModelRef

needs_split = pytest.mark.skipif(not cpu_split.available(), reason="needs the CPU backend with OpenBLAS and 2+ cores")


ATTENTION_CASES = [
    # (batch, query heads, KV heads, head dim, keys, queries): SmolLM2's 9/3 heads, GQA 4/2,
    # Gemma 3's 4/1 (split over sequences only), multi-head 4/4; prefill chunks and decode steps.
    (1, 9, 3, 64, 1500, 20),
    (1, 9, 3, 64, 300, 300),
    (1, 8, 2, 32, 777, 33),
    (1, 4, 4, 32, 400, 9),
    (4, 9, 3, 64, 600, 1),
    (5, 4, 1, 64, 300, 1),
    (2, 4, 1, 64, 300, 9),
    (3, 8, 2, 32, 200, 16),
    (2, 4, 1, 64, 400, 260),
]


@needs_split
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "additive"])
def test_split_attention_is_bit_identical_to_mlx(case, mask):
    """Each half is MLX's own fallback over its KV heads or sequences, so every matmul call
    and softmax row is the one MLX makes: equal bits, not just close numbers."""
    mx = runtime.mx()
    batch, heads, kv_heads, dim, keys, queries = case
    mx.random.seed(sum(case))
    q = mx.random.normal((batch, heads, queries, dim))
    k = mx.random.normal((batch, kv_heads, keys + 64, dim))[..., :keys, :]  # a view with room, as caches are
    v = mx.random.normal((batch, kv_heads, keys + 64, dim))[..., :keys, :]
    m = {
        "none": None,
        "causal": "causal",
        "bool": mx.random.uniform(shape=(batch, 1, queries, keys)) > 0.2,
        "additive": mx.random.normal((1, heads, queries, keys)),
    }[mask]
    original = cpu_split._state["sdpa"] or mx.fast.scaled_dot_product_attention
    want = original(q, k, v, scale=dim**-0.5, mask=m)
    groups = cpu_split._attention_groups(q, k, min_rows=1)  # every case split, whatever its size
    assert groups is not None or (kv_heads == 1 and batch == 1)
    if groups is None:
        return
    got = cpu_split.split_attention(q, k, v, dim**-0.5, m, groups)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert mx.array_equal(got, want).item()


@needs_split
def test_a_turns_attention_runs_on_one_stream_and_a_prefill_chunk_is_split():
    """With the native softmax, a turn's new tokens (tens of rows) gain nothing from the
    split and pay its hand-offs; a cold prefill's 512-row chunks gain. With MLX's scalar
    softmax, 8 rows and more are split (the softmax is most of their attention)."""
    mx = runtime.mx()
    assert cpu_split.install_attention()
    k, k1 = mx.zeros((1, 3, 6000, 64)), mx.zeros((2, 1, 6000, 64))
    native = cpu_split._state["softmax"] is not None
    assert cpu_split.min_query_rows() == (256 if native else 8)
    least = cpu_split.min_query_rows()
    for rows in (1, 4, 7, 8, 20, 64, 127, 128, 255, 256, 512):
        alone, in_two = rows >= least, 2 * rows >= least  # a room's batch counts all its sequences' rows
        assert cpu_split._attention_groups(mx.zeros((1, 9, rows, 64)), k) == ((1, 2) if alone else None), rows
        assert cpu_split._attention_groups(mx.zeros((2, 4, rows, 64)), k1) == ((0, 1) if in_two else None), rows
    if native:
        assert cpu_split._attention_groups(mx.zeros((1, 9, 20, 64)), k) is None
        assert cpu_split._attention_groups(mx.zeros((4, 9, 20, 64)), k) is None
        assert cpu_split._attention_groups(mx.zeros((4, 9, 64, 64)), k) == (0, 2)


@needs_split
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "additive"])
def test_installed_attention_is_bit_identical_to_mlx(case, mask, monkeypatch):
    """What models call once the engine installs it: split from `min_query_rows()` rows, else
    MLX's ops on one stream with the native softmax. Equal bits either way."""
    mx = runtime.mx()
    native = []
    softmax = cpu_split._softmax
    monkeypatch.setattr(cpu_split, "_softmax", lambda scores, stream: native.append(stream) or softmax(scores, stream))
    splits = []
    split = cpu_split.split_attention
    monkeypatch.setattr(cpu_split, "split_attention", lambda *a: splits.append(1) or split(*a))
    batch, heads, kv_heads, dim, keys, queries = case
    mx.random.seed(sum(case) + 1)
    q = mx.random.normal((batch, heads, queries, dim))
    k = mx.random.normal((batch, kv_heads, keys + 64, dim))[..., :keys, :]
    v = mx.random.normal((batch, kv_heads, keys + 64, dim))[..., :keys, :]
    m = {
        "none": None,
        "bool": mx.random.uniform(shape=(batch, 1, queries, keys)) > 0.2,
        "additive": mx.random.normal((1, heads, queries, keys)),
        "causal": "causal",
    }[mask]
    assert cpu_split.install_attention()
    want = cpu_split._state["sdpa"](q, k, v, scale=dim**-0.5, mask=m)
    got = mx.fast.scaled_dot_product_attention(q, k, v, scale=dim**-0.5, mask=m)
    assert mx.array_equal(got, want).item()
    assert bool(splits) == (batch * queries >= cpu_split.min_query_rows() and (kv_heads > 1 or batch > 1))
    if cpu_split._state["softmax"] is not None:  # x86 with the native module: every case went through it
        assert native


@needs_split
def test_the_native_softmax_gives_mlx_softmax_bits():
    """exact_softmax (_native.cpp) against mx.softmax(precise=True) bit for bit: rows of every
    length (the vector loop and its scalar tail), scales up to where exp saturates, attention's
    masked scores, NaN, +-inf, and values on the exp's rounding edges."""
    import numpy as np

    from semantic_cli.backend import buffers

    compiled = buffers.native()
    if compiled is None or not hasattr(compiled, "exact_softmax"):
        pytest.skip("no native module with exact_softmax")
    cpu_split.install_attention()
    if cpu_split._state["softmax"] is None:
        pytest.skip("MLX's CPU softmax here is not the scalar one exact_softmax copies (not x86, or not mlx 0.32)")
    mx = runtime.mx()
    stream = mx.default_stream(mx.cpu)
    rng = np.random.default_rng(0)
    rows_list = []
    for trial in range(120):
        shape = (int(rng.integers(1, 24)), int(rng.integers(1, 2600)))
        a = (rng.standard_normal(shape) * [0.1, 1, 10, 60, 200][trial % 5]).astype(np.float32)
        if trial % 3 == 0:
            a[rng.random(a.shape) < 0.3] = np.finfo(np.float32).min  # mx.where's fill for masked scores
        rows_list.append(a)
    special = np.array([[0.49999997, -0.49999997, 0.5, -0.5, 1.5, -2.5, 88.0, 88.00001, -88.0, -88.00001, 0.0, -0.0, 1e-30]], np.float32)
    rows_list += [special + np.float32(shift) for shift in (0.0, 5.0, -30.0, 90.0)]
    rows_list += [np.array([[1.0, np.nan, 2.0]], np.float32), np.array([[1.0, np.inf, 2.0]], np.float32)]
    rows_list += [np.array([[-np.inf, -np.inf]], np.float32), np.linspace(-200, 200, 4001, dtype=np.float32)[None]]
    for a in rows_list:
        x = mx.array(a)
        want = np.array(mx.softmax(x, axis=-1, precise=True, stream=stream))
        got = np.array(compiled.exact_softmax(x, stream))
        same = (want.view(np.uint32) == got.view(np.uint32)) | (np.isnan(want) & np.isnan(got))
        assert same.all(), (a.shape, want[~same][:4], got[~same][:4])
    x3 = mx.random.normal((2, 3, 5, 70))  # any leading shape: rows of the last axis
    assert mx.array_equal(compiled.exact_softmax(x3, stream), mx.softmax(x3, axis=-1, precise=True, stream=stream)).item()


@needs_split
def test_models_attend_through_the_split_once_installed(tiny):
    """The engine installs it; mlx-lm's models call it at each use, and the replies stay exact."""
    engine = get_engine(ModelRef(str(tiny["llama"]), str(tiny["llama"])))
    mx = runtime.mx()
    calls = []
    split = cpu_split.split_attention
    try:
        cpu_split.split_attention = lambda *a: calls.append(a[-1]) or split(*a)  # type: ignore[assignment]
        prompt = list(range(3, 300))
        reqs = [TurnRequest("a", prompt, None, 0, 4)]
        [done] = [ev for ev in engine.generate(reqs) if isinstance(ev, TurnDone)]
        assert cpu_split._state["sdpa"] is not None  # the engine installed it
    finally:
        cpu_split.split_attention = split  # type: ignore[assignment]
    assert calls, "the prefill's attention did not go through the split"
    assert mx.fast.scaled_dot_product_attention is not cpu_split._state["sdpa"]
    assert len(done.generated) == 4


@needs_split
def test_the_exactness_reference_runs_on_mlx_own_attention(tiny):
    """exp-005 compares the engine with mlx-lm as shipped: its reference must not go through the split."""
    from semantic_cli.bench import exactness

    engine = get_engine(ModelRef(str(tiny["llama"]), str(tiny["llama"])))
    assert engine.generator is not None and cpu_split._state["sdpa"] is not None  # creating it installs the split
    calls = []
    split = cpu_split.split_attention
    try:
        cpu_split.split_attention = lambda *a: calls.append(1) or split(*a)  # type: ignore[assignment]
        exactness.reference(engine, list(range(3, 300)), 3)
        assert calls == []
        exactness.engine_run(engine, list(range(3, 300)), 3)
        assert calls
    finally:
        cpu_split.split_attention = split  # type: ignore[assignment]
