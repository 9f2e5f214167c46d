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
