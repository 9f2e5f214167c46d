"""Split matmuls for batched decoding on the CPU (cpu_split): same numbers, same
replies, OpenBLAS's threads handed back, and a batch of one untouched."""

from __future__ import annotations

import pytest

from semantic_cli.backend import cpu_split, runtime
from semantic_cli.engine import TurnDone, TurnRequest, get_engine
from semantic_cli.model.loader import ModelRef

needs_split = pytest.mark.skipif(not cpu_split.available(), reason="needs the CPU backend with OpenBLAS and 2+ cores")


def _replies(engine, prompts: list[list[int]], max_tokens: int = 12) -> dict[str, list[int]]:
    reqs = [TurnRequest(f"s{i}", p, None, 0, max_tokens) for i, p in enumerate(prompts)]
    return {ev.key: ev.generated for ev in engine.generate(reqs) if isinstance(ev, TurnDone)}


@needs_split
def test_split_matmul_equals_the_plain_one():
    mx = runtime.mx()
    import mlx.nn as nn

    mx.random.seed(3)
    layer = nn.Linear(96, 300, bias=True)
    embed = nn.Embedding(500, 96)
    x = mx.random.normal((4, 1, 96))
    plain = (layer(x), embed.as_linear(x))
    try:
        cpu_split.set_batched(True)
        split = (layer(x), embed.as_linear(x))
    finally:
        cpu_split.set_batched(False)
    for a, b in zip(plain, split, strict=False):
        assert a.shape == b.shape
        assert mx.allclose(a, b, atol=1e-5, rtol=1e-5).item()


@needs_split
def test_batched_mode_holds_openblas_to_one_thread_and_gives_it_back():
    blas = runtime.openblas()
    before = blas.openblas_get_num_threads()
    cpu_split.set_batched(True)
    try:
        assert blas.openblas_get_num_threads() == 1
    finally:
        cpu_split.set_batched(False)
    assert blas.openblas_get_num_threads() == before


@needs_split
def test_batched_replies_match_unsplit_ones_and_the_mode_ends_with_the_batch(tiny, monkeypatch):
    """qwen2's tiny model has an untied lm_head and an MLP wide enough to be split."""
    engine = get_engine(ModelRef(str(tiny["qwen2"]), str(tiny["qwen2"])))
    prompts = [[5, 9, 13, 2], [7, 7, 1], [11, 3, 4, 8, 21]]
    split = _replies(engine, prompts)
    assert not cpu_split._state["active"]
    monkeypatch.setattr(cpu_split, "available", lambda: False)
    plain = _replies(engine, prompts)
    assert split == plain and all(len(g) == 12 for g in split.values())


@needs_split
def test_closing_a_batch_early_turns_the_mode_off(tiny):
    engine = get_engine(ModelRef(str(tiny["qwen2"]), str(tiny["qwen2"])))
    events = engine.generate([TurnRequest("a", [5, 9, 13], None, 0, 50), TurnRequest("b", [7, 1], None, 0, 50)])
    next(e for e in events if not isinstance(e, TurnDone))
    assert cpu_split._state["active"]  # on between the steps of a batch of two
    events.close()  # what Ctrl-C in a room does
    assert not cpu_split._state["active"]
    assert runtime.openblas().openblas_get_num_threads() == cpu_split._state["threads"]


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
    groups = cpu_split._attention_groups(q, k)
    assert groups is not None or queries < cpu_split._MIN_QUERY or (kv_heads == 1 and batch == 1)
    if groups is None:
        return
    got = cpu_split.split_attention(q, k, v, dim**-0.5, m, groups)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert mx.array_equal(got, want).item()


@needs_split
def test_models_attend_through_the_split_once_installed(tiny):
    """The engine installs it; mlx-lm's models call it at each use, and the replies stay exact."""
    engine = get_engine(ModelRef(str(tiny["llama"]), str(tiny["llama"])))
    mx = runtime.mx()
    calls = []
    split = cpu_split.split_attention
    try:
        cpu_split.split_attention = lambda *a: calls.append(a[-1]) or split(*a)  # type: ignore[assignment]
        prompt = list(range(3, 40))
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
        exactness.reference(engine, list(range(3, 40)), 3)
        assert calls == []
        exactness.engine_run(engine, list(range(3, 40)), 3)
        assert calls
    finally:
        cpu_split.split_attention = split  # type: ignore[assignment]
