"""`semantic bench resume`: time to first token with N tokens of history, cold vs warm vs hot;
bytes written per turn; prefix dedup across agents.

cold = the agent's KV was evicted: its turn re-prefills the whole transcript.
warm = a fresh process state (empty hot tier): the turn restores blocks from disk.
hot  = the same process as the previous turn: the cache is still in memory.
Also, in the same run: mlx-lm's own save_prompt_cache/load_prompt_cache of the same cache,
timed against the restore alone in two memory states: in this process, taking turns
(each reuses memory the other freed), and each in a fresh process (every page is new:
what a new `semantic` invocation pays).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..backend import runtime
from ..chat import Chat, GenSettings, TurnRecorded
from ..engine import Engine, TokenEvent, TurnDone
from ..store import Store
from .probe import run_probe
from .results import Results, filler_tokens, model_info, summary

QUESTION = "In one word: is this about caching?"
INPROCESS_PAIRS = 7  # restore/load pairs timed in this process (cheap: no model calls)
FRESH_PAIRS = 11  # restore/load pairs timed in fresh processes (~2 s each for the imports; 5 left medians moving by 0.3)


@contextmanager
def scratch_home() -> Iterator[str]:
    """Benchmarks run in their own SEMANTIC_HOME so they never touch the user's agents."""
    old = os.environ.get("SEMANTIC_HOME")
    with tempfile.TemporaryDirectory(prefix="semantic-bench-") as tmp:
        os.environ["SEMANTIC_HOME"] = tmp
        try:
            yield tmp
        finally:
            if old is None:
                os.environ.pop("SEMANTIC_HOME", None)
            else:
                os.environ["SEMANTIC_HOME"] = old


def timed_turn(chat: Chat, name: str, text: str, model: str, max_tokens: int = 1, system: str = "") -> tuple[float, TurnRecorded]:
    """Wall time from the turn's start (restore included) to its first token."""
    agent = chat.open_agent(name, model, system)
    t0 = time.perf_counter()
    pending = chat.prepare(agent, text, GenSettings(max_tokens=max_tokens))
    first = None
    rec = None
    for ev in chat.run([pending]):
        if first is None and isinstance(ev, (TokenEvent, TurnDone)):
            first = time.perf_counter()
        if isinstance(ev, TurnRecorded):
            rec = ev
    assert first is not None and rec is not None
    return first - t0, rec


def run(engine: Engine, sizes: tuple[int, ...] = (1024, 2048, 4096, 8192), repeats: int = 3, on_progress: Any = None) -> Results:
    mx = runtime.mx()
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    lm = engine.lm
    spec = lm.ref.path
    res = Results("resume", model_info(lm), {"sizes": list(sizes), "repeats": repeats, "question": QUESTION})
    rows = []
    step = 0
    with scratch_home() as home:
        store = Store()
        for n in sizes:
            name = f"resume-{n}"
            # Leave room for the template, the question and the measured turns.
            history = min(n, lm.context_length - 32 * (2 * repeats + 2)) - 40
            # The history goes straight into the transcript with no KV cache:
            # the first measured turn is exactly a cold (evicted) agent's turn.
            store.create_agent(name, spec)
            store.record_turn(
                name,
                [("user", filler_tokens(lm.tokenizer, history, seed=n), "complete", {}), ("assistant", "Noted.", "complete", {})],
                lm.tokenizer_fingerprint,
                [],
                replace_log=True,
            )
            chat = Chat(store)
            cold, rec = timed_turn(chat, name, QUESTION, spec)
            assert rec.tier == "cold", rec.tier
            tokens = rec.done.stats.prompt_tokens
            warm_s, hot_s = [], []
            for _ in range(repeats):
                chat.close()
                chat = Chat(store)  # a new process: empty hot tier
                w, rec_w = timed_turn(chat, name, QUESTION, spec)
                assert rec_w.tier == "warm", rec_w.tier
                warm_s.append(w)
                h, rec_h = timed_turn(chat, name, QUESTION, spec)
                assert rec_h.tier == "hot", rec_h.tier
                hot_s.append(h)
            # mlx-lm's own prompt-cache file of the same cache, holding exactly the tokens a restore brings back.
            cache = rec_h.done.cache
            del rec_h, rec_w
            chat.kv.drop_hot(name)
            prompt_probe = store.token_log(name, lm.tokenizer_fingerprint) + [0]
            restored = chat.kv.restore(name, lm.fingerprint, chat.spec(engine), prompt_probe, capacity=len(prompt_probe))
            matched = restored.matched
            del restored
            path = os.path.join(home, f"mlx-lm-{n}.safetensors")
            t = time.perf_counter()
            save_prompt_cache(path, first_tokens(cache, matched))
            save_s = time.perf_counter() - t
            del cache
            # In this process, taking turns, so both find the same memory state
            # (buffers freed by the other are reused: no page faults).
            restore_s, load_s = [], []
            for _ in range(INPROCESS_PAIRS):
                t = time.perf_counter()
                restored = chat.kv.restore(name, lm.fingerprint, chat.spec(engine), prompt_probe, capacity=len(prompt_probe))
                restore_s.append(time.perf_counter() - t)
                assert restored.tier == "warm", restored.tier
                del restored
                t = time.perf_counter()
                loaded = load_prompt_cache(path)
                mx.eval([c.state for c in loaded])
                load_s.append(time.perf_counter() - t)
                del loaded
            # The same two loads, each in a fresh process: what a new invocation pays.
            restore_job = {
                "op": "restore",
                "agent": name,
                "model_fp": lm.fingerprint,
                "kinds": list(chat.spec(engine).kinds),
                "prompt": prompt_probe,
                "block_tokens": chat.kv.block_tokens,
            }
            fresh_restore_s, fresh_load_s = [], []
            for _ in range(FRESH_PAIRS):
                fresh_restore_s.append(run_probe(restore_job))
                fresh_load_s.append(run_probe({"op": "mlx_lm_load", "path": path}))
            os.unlink(path)
            chat.close()
            w50, h50, r50, l50, fr50, fl50 = (summary(x)["p50"] for x in (warm_s, hot_s, restore_s, load_s, fresh_restore_s, fresh_load_s))
            rows.append(
                {
                    "history_tokens": tokens,
                    "restored_tokens": matched,  # what both the restore and mlx-lm's load bring back
                    "cold_ttft_s": cold,
                    "warm_ttft_s": w50,
                    "hot_ttft_s": h50,
                    "warm_speedup": cold / w50,
                    "hot_speedup": cold / h50,
                    "warm_restore_s": r50,
                    "mlx_lm_load_s": l50,
                    "mlx_lm_save_s": save_s,
                    "restore_over_mlx_lm_load": r50 / l50,
                    "fresh_process_restore_s": fr50,
                    "fresh_process_mlx_lm_load_s": fl50,
                    "fresh_process_restore_over_load": fr50 / fl50,
                    # Each pair ran back to back: the median of their ratios cancels the VM's drift.
                    "fresh_process_paired_ratio_p50": summary([r / load for r, load in zip(fresh_restore_s, fresh_load_s, strict=True)])[
                        "p50"
                    ],
                }
            )
            res.samples[str(n)] = {
                "cold": [cold],
                "warm": warm_s,
                "hot": hot_s,
                "restore": restore_s,
                "mlx_lm_load": load_s,
                "fresh_process_restore": fresh_restore_s,
                "fresh_process_mlx_lm_load": fresh_load_s,
            }
            step += 1
            if on_progress:
                on_progress("resume", step, len(sizes))
        res.results = {"rows": rows, "write_cost": write_cost(engine, store), "dedup": dedup(engine, store)}
        store.close()
    return res


def first_tokens(cache: list[Any], tokens: int) -> list[Any]:
    """The cache cut to its first `tokens` tokens with no spare room. mlx-lm 0.32's
    `KVCache.state` is the whole buffer, so a live cache saved as it is holds up to
    255 tokens more than a restore reads, and its load would have more to do."""
    from mlx_lm.models.cache import KVCache

    out = []
    for c in cache:
        if type(c) is KVCache:
            cut = KVCache()
            cut.keys, cut.values, cut.offset = c.keys[..., :tokens, :], c.values[..., :tokens, :], tokens
            c = cut
        out.append(c)
    return out


def write_cost(engine: Engine, store: Store, turns: int = 10) -> dict[str, Any]:
    """Bytes written per turn of a 10-turn conversation, against the bound
    (KV bytes of the tokens the turn added + one block)."""
    lm = engine.lm
    chat = Chat(store)
    per_token = None
    rows = []
    prev = 0
    for i in range(turns):
        _, rec = timed_turn(chat, "write-cost", f"Question {i + 1}: tell me one fact about the number {i + 7}.", lm.ref.path, max_tokens=32)
        if per_token is None:
            per_token = sum(c.keys.nbytes // c.keys.shape[2] * 2 for c in rec.done.cache if hasattr(c, "keys") and c.keys is not None)
        added = len(rec.done.all_tokens) - prev
        prev = len(rec.done.all_tokens)
        bound = added * per_token + chat.kv.block_tokens * per_token
        rows.append(
            {
                "turn": i + 1,
                "tokens_added": added,
                "total_tokens": prev,
                "bytes_written": rec.persisted.bytes_written,
                "bound": bound,
                "within_bound": rec.persisted.bytes_written <= bound * 1.01,
            }
        )
    chat.close()
    return {"kv_bytes_per_token": per_token, "turns": rows, "all_within_bound": all(r["within_bound"] for r in rows)}


def dedup(engine: Engine, store: Store, agents: int = 10, system_tokens: int = 1000) -> dict[str, Any]:
    """Ten agents with the same 1,000-token system prompt store it once."""
    lm = engine.lm
    system = filler_tokens(lm.tokenizer, system_tokens, seed=99)
    chat = Chat(store)
    for i in range(agents):
        timed_turn(chat, f"dedup-{i}", f"Hello, I am user {i}.", lm.ref.path, system=system)
    chat.close()
    index = chat.kv.index
    chains = index.chains()
    mine = {a: c for a, c in chains.items() if a.startswith("dedup-")}
    refs = index.refcounts()
    shared = {h for c in mine.values() for h in c if refs.get(h, 0) == agents}
    blocks = index.blocks(sorted({h for c in mine.values() for h in c}))
    stored = sum(b.nbytes for b in blocks.values())
    naive = sum(blocks[h].nbytes for c in mine.values() for h in c)
    return {
        "agents": agents,
        "system_tokens": system_tokens,
        "shared_blocks": len(shared),
        "block_bytes_stored": stored,
        "block_bytes_without_sharing": naive,
        "saving": naive / stored if stored else None,
    }


def table(res: Results) -> list[tuple[str, ...]]:
    head = (
        "history",
        "cold ttft",
        "warm ttft",
        "hot ttft",
        "warm x",
        "hot x",
        "restore",
        "mlx-lm load",
        "restore/load",
        "new process: restore/load",
    )
    return [head] + [
        (
            str(r["history_tokens"]),
            f"{r['cold_ttft_s']:.2f}s",
            f"{r['warm_ttft_s']:.3f}s",
            f"{r['hot_ttft_s']:.3f}s",
            f"{r['warm_speedup']:.0f}x",
            f"{r['hot_speedup']:.0f}x",
            f"{r['warm_restore_s'] * 1000:.0f}ms",
            f"{r['mlx_lm_load_s'] * 1000:.0f}ms",
            f"{r['restore_over_mlx_lm_load']:.2f}",
            f"{r['fresh_process_restore_s'] * 1000:.0f}/{r['fresh_process_mlx_lm_load_s'] * 1000:.0f}ms"
            f" = {r['fresh_process_restore_over_load']:.2f}",
        )
        for r in res.results["rows"]
    ]
