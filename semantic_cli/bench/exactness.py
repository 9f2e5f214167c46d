"""exp-005: the engine's greedy output equals `mlx_lm.generate`'s, token for token.

Three chat-templated prompts of about 1, 2 and 8 blocks (256-token blocks), 64
new tokens each, greedy. The reference is mlx-lm as its users call it:
`mlx_lm.generate(model, tokenizer, prompt, max_tokens=...)` for the text and
`mlx_lm.stream_generate` (what `generate` runs) for the token ids, with mlx-lm's
own defaults (its prefill step included). The engine (BatchGenerator, a batch of
one) runs each prompt twice:
- fresh: no cache, the whole prompt prefilled;
- resumed: the prompt's first n full blocks were persisted as block files by the
  real KV store (with the tail's whole-layer snapshots where the model has
  sliding-window layers), restored from disk, and only the rest prefilled.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..backend import runtime
from ..engine import PREFILL_STEP, Engine
from ..events import TurnDone, TurnRequest
from ..kv.layers import cache_spec
from .results import Results, filler_tokens, model_info


def reference(engine: Engine, prompt: list[int], max_tokens: int) -> tuple[list[int], str, float]:
    """mlx-lm's own greedy generation: (token ids without the final EOS, the text `generate`
    returns, the seconds `generate` took), with MLX's own attention (not the engine's split)."""
    from mlx_lm import generate, stream_generate

    from ..backend import cpu_split

    lm = engine.lm
    with cpu_split.stock_attention():
        ids = [r.token for r in stream_generate(lm.model, lm.tokenizer, prompt, max_tokens=max_tokens) if r.finish_reason != "stop"]
        t = time.perf_counter()
        text = generate(lm.model, lm.tokenizer, prompt, max_tokens=max_tokens)
        seconds = time.perf_counter() - t
    return ids, text, seconds


def engine_run(engine: Engine, prompt: list[int], max_tokens: int, cache: list[Any] | None = None, cached: int = 0) -> TurnDone:
    request = TurnRequest("exp-005", prompt, cache, cached, max_tokens)
    for ev in engine.generate([request]):
        if isinstance(ev, TurnDone):
            return ev
    raise RuntimeError("the engine finished without a result")


def restored_prefix(engine: Engine, prompt: list[int], n_blocks: int, block_tokens: int) -> tuple[list[Any], int]:
    """Persist the cache of the prompt's first n blocks through the real KV store, then restore it from disk.

    The prefix's cache is built by a plain prefill (mlx-lm's model call, in PREFILL_STEP
    chunks), so it covers exactly those tokens: layers that blocks cannot rebuild (a
    sliding window) are then stored as the tail's whole-layer snapshot, which only fits
    a cache that ends where the restore resumes.
    """
    from mlx_lm.models.cache import make_prompt_cache

    from ..kv.store import KVStore

    mx = runtime.mx()
    lm = engine.lm
    spec = cache_spec(lm.model)
    prefix = prompt[: n_blocks * block_tokens]
    cache = make_prompt_cache(lm.model)
    for i in range(0, len(prefix), PREFILL_STEP):
        lm.model(mx.array([prefix[i : i + PREFILL_STEP]]), cache=cache)
        mx.eval([c.state for c in cache])
    store = KVStore(block_tokens, disk_budget=1 << 40, hot_budget=0)
    try:
        store.persist("exp-005", lm.fingerprint, spec, prefix, cache, protect=set())
        restored = store.restore("exp-005", lm.fingerprint, spec, prompt, capacity=len(prompt) + 256)
    finally:
        store.close()
    if restored.cache is None or restored.matched != len(prefix):
        raise RuntimeError(f"restored {restored.matched} of the {len(prefix)} prefix tokens ({restored.warnings})")
    return restored.cache, restored.matched


def _first_difference(a: list[int], b: list[int]) -> int | None:
    diverge = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if diverge is None and len(a) != len(b):
        diverge = min(len(a), len(b))
    return diverge


def run(engine: Engine, block_sizes: tuple[int, ...] = (1, 2, 8), block_tokens: int = 256, max_tokens: int = 64) -> Results:
    tok = engine.lm.tokenizer
    eos = set(tok.eos_token_ids)
    res = Results("exp-005", model_info(engine.lm), {"blocks": list(block_sizes), "block_tokens": block_tokens, "max_tokens": max_tokens})
    rows = []
    for n_blocks in block_sizes:
        target = n_blocks * block_tokens
        text = filler_tokens(tok, max(8, target), seed=n_blocks)
        prompt = list(tok.apply_chat_template([{"role": "user", "content": f"Summarise this:\n{text}"}], add_generation_prompt=True))
        ref_ids, ref_text, mlx_lm_s = reference(engine, prompt, max_tokens)
        t1 = time.perf_counter()
        fresh = engine_run(engine, prompt, max_tokens)
        t2 = time.perf_counter()
        cache, cached = restored_prefix(engine, prompt, n_blocks, block_tokens)
        t3 = time.perf_counter()  # persist + restore (t2..t3) are not in the resumed engine's seconds
        resumed = engine_run(engine, prompt, max_tokens, cache, cached)
        t4 = time.perf_counter()
        sample: dict[str, Any] = {"mlx_lm": ref_ids}
        for label, done, seconds in (("fresh", fresh, t2 - t1), ("resumed", resumed, t4 - t3)):
            ids = [t for t in done.generated if t not in eos]
            rows.append(
                {
                    "blocks": n_blocks,
                    "mode": label,
                    "prompt_tokens": len(prompt),
                    "restored_tokens": cached if label == "resumed" else 0,
                    "engine_cached_tokens": done.stats.cached_tokens,  # what the engine really skipped
                    "generated": len(ids),
                    "identical": ids == ref_ids and done.text == ref_text,
                    "same_text": done.text == ref_text,
                    "first_difference": _first_difference(ref_ids, ids),
                    "mlx_lm_s": round(mlx_lm_s, 3),  # the generate() call alone
                    "engine_s": round(seconds, 3),
                }
            )
            sample[label] = ids
        res.samples[f"{n_blocks}_blocks"] = sample
    res.results = {"rows": rows, "all_identical": all(r["identical"] for r in rows)}
    return res


def table(res: Results) -> Sequence[tuple[str, ...]]:
    head = ("blocks", "engine", "prompt tokens", "restored", "generated", "identical", "mlx_lm s", "engine s")
    return [head] + [
        (
            str(r["blocks"]),
            r["mode"],
            str(r["prompt_tokens"]),
            str(r["restored_tokens"]),
            str(r["generated"]),
            "yes" if r["identical"] else f"NO (at token {r['first_difference']})",
            f"{r['mlx_lm_s']:.2f}",
            f"{r['engine_s']:.2f}",
        )
        for r in res.results["rows"]
    ]
