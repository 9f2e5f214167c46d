"""exp-005: the engine's greedy output equals `mlx_lm.generate`'s, token for token.

Three chat-templated prompts of about 1, 2 and 8 blocks (256-token blocks) go
through the engine (BatchGenerator, batch of one) and through mlx-lm's own
`generate_step` with the same model object, prompt, greedy sampling and
prefill step, 64 new tokens each.
"""

from __future__ import annotations

import time

from ..backend import runtime
from ..engine import PREFILL_STEP, Engine, TurnDone, TurnRequest
from .results import Results, filler_tokens, model_info


def reference_ids(engine: Engine, prompt: list[int], max_tokens: int) -> list[int]:
    mx = runtime.mx()
    from mlx_lm.generate import generate_step

    eos = engine.lm.tokenizer.eos_token_ids
    out: list[int] = []
    for token, _ in generate_step(mx.array(prompt), engine.lm.model, max_tokens=max_tokens, prefill_step_size=PREFILL_STEP):
        token = int(token)
        out.append(token)
        if token in eos:
            break
    return out


def engine_ids(engine: Engine, prompt: list[int], max_tokens: int) -> list[int]:
    request = TurnRequest("exp-005", prompt, None, 0, max_tokens)
    for ev in engine.generate([request]):
        if isinstance(ev, TurnDone):
            return ev.generated
    raise RuntimeError("the engine finished without a result")


def run(engine: Engine, block_sizes: tuple[int, ...] = (1, 2, 8), block_tokens: int = 256, max_tokens: int = 64) -> Results:
    tok = engine.lm.tokenizer
    res = Results("exp-005", model_info(engine.lm), {"blocks": list(block_sizes), "block_tokens": block_tokens, "max_tokens": max_tokens})
    rows = []
    for n_blocks in block_sizes:
        target = n_blocks * block_tokens
        text = filler_tokens(tok, max(8, target - 40), seed=n_blocks)
        prompt = tok.apply_chat_template([{"role": "user", "content": f"Summarise this:\n{text}"}], add_generation_prompt=True)
        t0 = time.perf_counter()
        ref = reference_ids(engine, list(prompt), max_tokens)
        t1 = time.perf_counter()
        got = engine_ids(engine, list(prompt), max_tokens)
        t2 = time.perf_counter()
        diverge = next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), None)
        if diverge is None and len(ref) != len(got):
            diverge = min(len(ref), len(got))
        rows.append(
            {
                "blocks": n_blocks,
                "prompt_tokens": len(prompt),
                "generated": len(got),
                "identical": ref == got,
                "first_difference": diverge,
                "mlx_lm_s": round(t1 - t0, 3),
                "engine_s": round(t2 - t1, 3),
            }
        )
        res.samples[f"{n_blocks}_blocks"] = {"mlx_lm": ref, "engine": got}
    res.results = {"rows": rows, "all_identical": all(r["identical"] for r in rows)}
    return res


def table(res: Results) -> list[tuple[str, ...]]:
    head = ("blocks", "prompt tokens", "generated", "identical", "mlx_lm s", "engine s")
    return [head] + [
        (
            str(r["blocks"]),
            str(r["prompt_tokens"]),
            str(r["generated"]),
            "yes" if r["identical"] else f"NO (at {r['first_difference']})",
            f"{r['mlx_lm_s']:.2f}",
            f"{r['engine_s']:.2f}",
        )
        for r in res.results["rows"]
    ]
