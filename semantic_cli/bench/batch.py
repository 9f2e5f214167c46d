"""`semantic bench batch`: N agents answering at once through one BatchGenerator,
against the same N turns run one after another, in the same run."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..engine import Engine
from ..events import TokenEvent, TurnDone, TurnRequest
from .results import Results, model_info

QUESTIONS = [
    "Name three uses of a hash table.",
    "Why is the sky blue? Answer briefly.",
    "Give two tips for writing clear code.",
    "What does a compiler do?",
    "List three planets and one fact about each.",
    "What is a prime number?",
    "Explain recursion in two sentences.",
    "What is the difference between RAM and disk?",
]


def _requests(engine: Engine, n: int, max_tokens: int) -> list[TurnRequest]:
    tok = engine.lm.tokenizer
    out = []
    for i in range(n):
        prompt = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], add_generation_prompt=True)
        out.append(TurnRequest(f"agent{i}", list(prompt), None, 0, max_tokens))
    return out


def _run(engine: Engine, requests: list[TurnRequest]) -> dict[str, Any]:
    t0 = time.perf_counter()
    first: dict[str, float] = {}
    generated: dict[str, list[int]] = {}
    for ev in engine.generate(requests):
        if isinstance(ev, (TokenEvent, TurnDone)) and ev.key not in first:
            first[ev.key] = time.perf_counter() - t0
        if isinstance(ev, TurnDone):
            generated[ev.key] = ev.generated
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "ttft_s": first, "generated": generated}


def run(engine: Engine, agents: tuple[int, ...] = (1, 2, 4, 8), max_tokens: int = 64, on_progress: Any = None) -> Results:
    from ..backend import fewrows

    # few_rows_matmul: whether decode steps of 2+ sequences ran the native matmul (see backend/fewrows).
    config = {"agents": list(agents), "max_tokens": max_tokens, "few_rows_matmul": fewrows.available()}
    res = Results("batch", model_info(engine.lm), config)
    _run(engine, _requests(engine, 1, 4))  # warm-up: first-call allocations
    rows = []
    for step, n in enumerate(agents):
        reqs = _requests(engine, n, max_tokens)
        batched = _run(engine, reqs)
        seq_wall, seq_first, seq_gen = 0.0, {}, {}
        for r in reqs:
            one = _run(engine, [r])
            seq_first[r.key] = seq_wall + one["ttft_s"][r.key]  # when it would have started answering
            seq_wall += one["wall_s"]
            seq_gen.update(one["generated"])
        b_tokens = sum(len(g) for g in batched["generated"].values())
        s_tokens = sum(len(g) for g in seq_gen.values())
        same = sum(batched["generated"][k] == seq_gen[k] for k in seq_gen)
        rows.append(
            {
                "agents": n,
                "batched_tokens": b_tokens,
                "batched_wall_s": batched["wall_s"],
                "batched_tps": b_tokens / batched["wall_s"],
                "sequential_tokens": s_tokens,
                "sequential_wall_s": seq_wall,
                "sequential_tps": s_tokens / seq_wall,
                "throughput_ratio": (b_tokens / batched["wall_s"]) / (s_tokens / seq_wall),
                "batched_ttft_mean_s": sum(batched["ttft_s"].values()) / n,
                "batched_ttft_max_s": max(batched["ttft_s"].values()),
                "sequential_ttft_mean_s": sum(seq_first.values()) / n,
                "replies_identical_to_sequential": same,
            }
        )
        res.samples[str(n)] = {"batched_ttft_s": batched["ttft_s"], "sequential_ttft_s": seq_first}
        if on_progress:
            on_progress("batch", step + 1, len(agents))
    res.results = {"rows": rows}
    return res


def table(res: Results) -> Sequence[tuple[str, ...]]:
    head = ("agents", "batched tok/s", "sequential tok/s", "ratio", "ttft batched (mean)", "ttft sequential (mean)", "identical")
    return [head] + [
        (
            str(r["agents"]),
            f"{r['batched_tps']:.1f}",
            f"{r['sequential_tps']:.1f}",
            f"{r['throughput_ratio']:.2f}x",
            f"{r['batched_ttft_mean_s']:.2f}s",
            f"{r['sequential_ttft_mean_s']:.2f}s",
            f"{r['replies_identical_to_sequential']}/{r['agents']}",
        )
        for r in res.results["rows"]
    ]
