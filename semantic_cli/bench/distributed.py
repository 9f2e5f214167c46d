"""`semantic bench distributed`: 2 ranks on loopback (mlx.launch, ring) against one process.

Each mode runs real `semantic chat --json` processes in a scratch home, on one agent whose
conversation is ~TOKENS long:
1. TTFT of the next turn cold (every rank's cache evicted first: the whole conversation is
   prefilled) and warm (each rank restores its own shard's blocks), alternating; the
   figure is warm/cold per mode, and the 2-rank ratio against the 1-process one.
2. decode: a reply of DECODE tokens on the warm agent; per-token time 2 ranks minus 1
   process is what the hand-off and the collectives cost per token (on one machine both
   ranks share the cores, so this measures overhead, not speed).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..engine import Engine
from .results import Results, filler_tokens, model_info
from .turns import scratch_home, semantic_command

Report = Callable[[str, int, int], None]
HOSTS = ["--hosts", "127.0.0.1,127.0.0.1", "--backend", "ring"]


def _chat(agent: str, model: str, text: str, max_tokens: int, mode: list[str]) -> dict[str, Any]:
    cmd = [*semantic_command(), "chat", "-a", agent, "--model", model, "-m", text, "--max-tokens", str(max_tokens), "--temp", "0"]
    t = time.perf_counter()
    out = subprocess.run([*cmd, "--json", *mode], capture_output=True, text=True, check=False, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"semantic chat failed ({out.returncode}): {out.stderr.strip()[-400:]}")
    record: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    record["wall_s"] = time.perf_counter() - t
    return record


def _evict(agent: str) -> None:
    """Every rank's cache of `agent` on this host: rank 0's and the other ranks' shards."""
    import os

    root = Path(os.environ["SEMANTIC_HOME"]) / "cache" / "ranks"
    for rank in [None, *sorted(p.name for p in root.glob("*") if p.is_dir())]:
        scope = ["--rank", rank] if rank else []
        subprocess.run([*semantic_command(), "cache", *scope, "evict", agent, "--yes"], capture_output=True, check=True, timeout=600)


def _mode(name: str, mode: list[str], model: str, history: str, rounds: int, decode: int, report: Report) -> dict[str, Any]:
    agent = f"bench-{name}"
    first = _chat(agent, model, history, 1, mode)
    cold: list[float] = []
    warm: list[float] = []
    for i in range(rounds):
        report(f"{name}: ttft", i, rounds)
        _evict(agent)
        cold.append(_chat(agent, model, f"Question {i}: one word?", 1, mode)["ttft_s"])
        warm.append(_chat(agent, model, f"Again {i}: one word?", 1, mode)["ttft_s"])
    report(f"{name}: decode", 0, 1)
    dec = _chat(agent, model, "Tell me a long story about caches.", decode, mode)
    per_token = 1.0 / dec["generation_tps"] if dec["generation_tps"] else float("nan")
    return {
        "history_tokens": first["prompt_tokens"],
        "cold_ttft_s": cold,
        "warm_ttft_s": warm,
        "cold_p50_s": statistics.median(cold),
        "warm_p50_s": statistics.median(warm),
        "warm_over_cold": statistics.median(warm) / statistics.median(cold),
        "decode_tokens": dec["generated_tokens"],
        "decode_tps": dec["generation_tps"],
        "decode_ms_per_token": per_token * 1000,
    }


def run(engine: Engine, tokens: int, rounds: int, decode: int, report: Report) -> Results:
    model = engine.lm.ref.spec if engine.lm.ref.spec != "default" else engine.lm.ref.path
    res = Results("distributed", model_info(engine.lm), {"history_tokens": tokens, "rounds": rounds, "decode_tokens": decode, "ranks": 2})
    history = filler_tokens(engine.lm.tokenizer, tokens)
    with scratch_home():
        one = _mode("one", ["--no-server"], model, history, rounds, decode, report)
        two = _mode("two", HOSTS, model, history, rounds, decode, report)
    res.results = {
        "one_process": one,
        "two_ranks": two,
        "ratio_of_ratios": two["warm_over_cold"] / one["warm_over_cold"],
        "collective_ms_per_token": two["decode_ms_per_token"] - one["decode_ms_per_token"],
        "state": "2 ranks on loopback (ring) sharing this machine's cores; TTFT as each rank-0 process reports it",
    }
    return res


def table(res: Results) -> list[tuple[str, ...]]:
    r = res.results
    one, two = r["one_process"], r["two_ranks"]
    rows: list[tuple[str, ...]] = [("measure", "1 process", "2 ranks", "note")]
    rows.append(("cold TTFT p50", f"{one['cold_p50_s']:.3f} s", f"{two['cold_p50_s']:.3f} s", f"{one['history_tokens']} tokens prefilled"))
    rows.append(("warm TTFT p50", f"{one['warm_p50_s']:.3f} s", f"{two['warm_p50_s']:.3f} s", "restored from each rank's blocks"))
    rows.append(
        (
            "warm / cold",
            f"{one['warm_over_cold']:.3f}",
            f"{two['warm_over_cold']:.3f}",
            f"2 ranks / 1 process: {r['ratio_of_ratios']:.2f}x (target <= 2x)",
        )
    )
    rows.append(
        (
            "decode ms/token",
            f"{one['decode_ms_per_token']:.1f}",
            f"{two['decode_ms_per_token']:.1f}",
            f"hand-off + collectives: {r['collective_ms_per_token']:+.1f} ms/token",
        )
    )
    return rows
