"""exp-005: the engine (BatchGenerator, batch of one) equals mlx_lm's generate, greedy."""

from __future__ import annotations

import pytest

from semantic_cli.bench import exactness as bench_exactness
from semantic_cli.engine import get_engine
from semantic_cli.model.loader import ModelRef


@pytest.mark.parametrize("kind", ["llama", "gemma3_text"])
def test_engine_matches_mlx_lm_generate_on_tiny_models(tiny, home, kind):
    engine = get_engine(ModelRef(str(tiny[kind]), str(tiny[kind])))
    res = bench_exactness.run(engine, block_sizes=(1, 2, 8), max_tokens=64)
    rows = res.results["rows"]
    assert [(r["blocks"], r["mode"]) for r in rows] == [(n, m) for n in (1, 2, 8) for m in ("fresh", "resumed")]
    assert [r["restored_tokens"] for r in rows] == [0, 256, 0, 512, 0, 2048]  # resumed from real block files
    assert [r["engine_cached_tokens"] for r in rows] == [0, 256, 0, 512, 0, 2048]  # and the engine used them
    assert all(r["generated"] == 64 for r in rows)  # tiny models never emit EOS
    assert res.results["all_identical"], rows


@pytest.mark.smollm
def test_engine_matches_mlx_lm_generate_on_smollm2(smollm, home):
    engine = get_engine(ModelRef(str(smollm), str(smollm)))
    res = bench_exactness.run(engine, block_sizes=(1,), max_tokens=24)
    rows = res.results["rows"]
    assert rows[0]["prompt_tokens"] > 256 and rows[1]["restored_tokens"] == 256
    assert res.results["all_identical"], rows


def test_mismatch_would_be_reported(tiny):
    """The comparison itself can fail: a different model gives different ids."""
    a = get_engine(ModelRef(str(tiny["llama"]), str(tiny["llama"])))
    b = get_engine(ModelRef(str(tiny["qwen2"]), str(tiny["qwen2"])))
    prompt = [1, 5, 9, 200, 31]
    assert bench_exactness.engine_run(a, prompt, 8).generated != bench_exactness.reference(b, prompt, 8)[0]


def test_a_difference_from_mlx_lm_is_reported(tiny, home, monkeypatch):
    """run()'s comparison can fail: a reference one token off shows as not identical, where it differs."""
    engine = get_engine(ModelRef(str(tiny["llama"]), str(tiny["llama"])))
    real = bench_exactness.reference

    def off_by_one(engine, prompt, max_tokens):
        ids, text, seconds = real(engine, prompt, max_tokens)
        return ids[:5] + [ids[5] + 1] + ids[6:], text, seconds

    monkeypatch.setattr(bench_exactness, "reference", off_by_one)
    res = bench_exactness.run(engine, block_sizes=(1,), max_tokens=16)
    assert not res.results["all_identical"]
    assert [(r["identical"], r["first_difference"]) for r in res.results["rows"]] == [(False, 5), (False, 5)]


def _greedy_by_hand(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding written out with mlx-lm's model and cache classes only, as mlx-lm's
    generate_step feeds them (the prompt but its last token, then one token a step)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([prompt[:-1]]), cache=cache)
    token, out = prompt[-1], []
    for _ in range(max_tokens):
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
        token = int(mx.argmax(logits).item())
        out.append(token)
    return out


@pytest.mark.parametrize("kind", ["llama", "gemma3_text"])
def test_the_oracle_and_the_engine_equal_greedy_decoding_written_out(tiny, kind):
    """The exp-005 oracle is mlx-lm's generation, not the engine: both equal a greedy loop the
    test writes itself over the model, with MLX's own attention."""
    from semantic_cli.backend import cpu_split

    engine = get_engine(ModelRef(str(tiny[kind]), str(tiny[kind])))
    prompt = [1] + [(i * 37) % 250 + 3 for i in range(40)]
    with cpu_split.stock_attention():
        by_hand = _greedy_by_hand(engine.lm.model, prompt, 16)
    assert len(set(by_hand)) > 1  # a real sequence, not one token repeated
    assert bench_exactness.reference(engine, prompt, 16)[0] == by_hand
    assert bench_exactness.engine_run(engine, prompt, 16).generated == by_hand
