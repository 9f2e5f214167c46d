"""`semantic bench resume`: time to first token with N tokens of history, cold vs warm vs hot;
bytes written per turn; prefix dedup across agents.

Every cold and warm turn is a real `semantic chat ... --json` invocation in a new process,
as a user's next command is; its TTFT (from the turn's start, the restore included) comes
from the JSON, and its end-to-end wall time (process start, imports, model load) is timed
around the process.
- cold: the agent's KV cache was evicted first: the turn re-prefills the whole transcript.
- warm: the block files are on disk. Two states: as the previous turn left them (in the
  page cache), and dropped from the page cache first (POSIX_FADV_DONTNEED on every cache
  file: the "a day later" read from disk; the model's own weights are not dropped).
- hot: the turn right after a turn in this process: the cache never left memory.
The three are measured in rounds whose order alternates (`_rounds`), so that none runs
at a longer history than the others.
Also, in the same run: mlx-lm's own save_prompt_cache/load_prompt_cache of the same cache,
timed against the restore alone, in this process and each in a fresh process, the order
alternating within each pair so neither always runs second.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..backend import runtime
from ..chat import Chat
from ..engine import Engine
from ..store import Store
from .probe import probe_record, run_probe
from .results import Results, filler_tokens, model_info, summary
from .storage import dedup, write_cost
from .turns import QUESTION, cli_turn, disk_read_seconds, drop_page_cache, evict, scratch_home, timed_turn

# Restore/load pairs timed in this process and in fresh processes (~2 s each for the imports;
# 5 left the medians moving by 0.3 between runs).
FRESH_PAIRS = 12


def _p50(records: list[dict[str, Any]], key: str) -> float:
    return summary([r[key] for r in records])["p50"]


def _expect(records: list[dict[str, Any]], tier: str) -> None:
    for r in records:
        if r["cache_tier"] != tier:
            raise RuntimeError(f"expected a {tier} turn, got {r['cache_tier']} ({r['cached_tokens']} cached tokens)")


def run(
    engine: Engine,
    sizes: tuple[int, ...] = (1024, 2048, 4096, 8192),
    repeats: int = 4,
    on_progress: Any = None,
    cold_repeats: int = 3,
    pairs: int = FRESH_PAIRS,
) -> Results:
    if repeats % 2:
        raise ValueError(f"the rounds alternate their order: an even number of them, not {repeats}")
    lm = engine.lm
    res = Results(
        "resume",
        model_info(lm),
        {"sizes": list(sizes), "repeats": repeats, "cold_repeats": cold_repeats, "pairs": pairs, "question": QUESTION},
    )
    rows = []
    step = 0
    with scratch_home() as home:
        store = Store()
        for n in sizes:
            row, res.samples[str(n)] = measure_size(engine, store, home, n, repeats, cold_repeats, pairs)
            rows.append(row)
            step += 1
            if on_progress:
                on_progress("resume", step, len(sizes))
        res.results = {"rows": rows, "write_cost": write_cost(engine, store), "dedup": dedup(engine, store)}
        store.close()
    return res


def measure_size(
    engine: Engine, store: Store, home: str, n: int, repeats: int, cold_repeats: int, pairs: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One history length: cold, warm (two page-cache states), hot, and restore vs mlx-lm load."""
    mx = runtime.mx()
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    lm = engine.lm
    spec = lm.ref.path
    name = f"resume-{n}"
    # Leave room for the template, the question and the turns: cold, four per round, and the last ones here.
    history = min(n, lm.context_length - 32 * (cold_repeats + 4 * repeats + 4)) - 40
    # The history goes straight into the transcript with no KV cache.
    store.create_agent(name, spec)
    store.record_turn(
        name,
        [("user", filler_tokens(lm.tokenizer, history, seed=n), "complete", {}), ("assistant", "Noted.", "complete", {})],
        lm.tokenizer_fingerprint,
        [],
        replace_log=True,
    )
    cold = []
    for _ in range(cold_repeats):
        evict(name)
        cold.append(cli_turn(name, spec))
    _expect(cold, "cold")
    chat = Chat(store)
    restore_job = {
        "op": "restore",
        "agent": name,
        "model_fp": lm.fingerprint,
        "spec": chat.cache.spec(engine).to_json(),
        "block_tokens": chat.kv.block_tokens,
    }
    chat.close()
    rounds = _rounds(store, name, spec, repeats, restore_job, lm.tokenizer_fingerprint)
    warm, warm_disk = rounds.warm, rounds.warm_disk
    chat = Chat(store)
    _, rec_h = timed_turn(chat, name, QUESTION, spec)  # a turn in this process: its cache, for mlx-lm's file below
    # mlx-lm's own prompt-cache file of the same cache, holding exactly the tokens a restore brings back.
    cache = rec_h.done.cache
    assert cache is not None, "a finished turn carries its cache"
    del rec_h
    chat.kv.drop_hot(name)
    log = store.token_log(name, lm.tokenizer_fingerprint)
    assert log is not None, "the turns above wrote a token log"
    prompt_probe = log + [0]
    restored = chat.kv.restore(name, lm.fingerprint, chat.cache.spec(engine), prompt_probe, capacity=len(prompt_probe))
    matched = restored.matched
    del restored
    path = os.path.join(home, f"mlx-lm-{n}.safetensors")
    t = time.perf_counter()
    save_prompt_cache(path, first_tokens(cache, matched))
    save_s = time.perf_counter() - t
    del cache

    def restore_once() -> float:
        t = time.perf_counter()
        restored = chat.kv.restore(name, lm.fingerprint, chat.cache.spec(engine), prompt_probe, capacity=len(prompt_probe))
        seconds = time.perf_counter() - t
        assert restored.tier == "warm", restored.tier
        return seconds

    def load_once() -> float:
        t = time.perf_counter()
        loaded = load_prompt_cache(path)
        mx.eval([c.state for c in loaded])
        return time.perf_counter() - t

    # In this process, taking turns, so both find the same memory state (buffers freed
    # by the other are reused: no page faults); the order alternates within the pairs.
    restore_s, load_s = _pairs(restore_once, load_once, pairs)
    # The same two loads, each in a fresh process: what a new invocation pays.
    final_job = restore_job | {"prompt": prompt_probe}
    fresh_restore_s, fresh_load_s = _pairs(lambda: run_probe(final_job), lambda: run_probe({"op": "mlx_lm_load", "path": path}), pairs)
    os.unlink(path)
    chat.close()
    cold_ttft, warm_ttft, hot_ttft = _p50(cold, "ttft_s"), _p50(warm, "ttft_s"), summary(rounds.hot_s)["p50"]
    cold_wall, warm_wall = _p50(cold, "wall_s"), _p50(warm, "wall_s")
    r50, l50, fr50, fl50 = (summary(x)["p50"] for x in (restore_s, load_s, fresh_restore_s, fresh_load_s))
    row: dict[str, Any] = {
        "history_tokens": cold[0]["prompt_tokens"],
        "restored_tokens": matched,  # what both the restore and mlx-lm's load bring back
        "cold_ttft_s": cold_ttft,
        "warm_ttft_s": warm_ttft,
        "hot_ttft_s": hot_ttft,
        "warm_speedup": cold_ttft / warm_ttft,
        "hot_speedup": cold_ttft / hot_ttft,
        "warm_over_hot": warm_ttft / hot_ttft,
        # Where in the history each kind ran (mean prompt tokens): the rounds keep them level.
        "warm_prompt_tokens": sum(t["prompt_tokens"] for t in warm) / len(warm),
        "hot_prompt_tokens": sum(rounds.hot_tokens) / len(rounds.hot_tokens),
        "cold_wall_s": cold_wall,
        "warm_wall_s": warm_wall,
        "warm_wall_speedup": cold_wall / warm_wall,
        "page_cache_dropped": bool(warm_disk),
        "warm_restore_s": r50,
        "mlx_lm_load_s": l50,
        "mlx_lm_save_s": save_s,
        "restore_over_mlx_lm_load": r50 / l50,
        "fresh_process_restore_s": fr50,
        "fresh_process_mlx_lm_load_s": fl50,
        "fresh_process_restore_over_load": fr50 / fl50,
        # Each pair ran back to back: the median of their ratios cancels the VM's drift.
        "fresh_process_paired_ratio_p50": summary([r / load for r, load in zip(fresh_restore_s, fresh_load_s, strict=True)])["p50"],
        # The restore as a warm turn's new process timed it, against the same restore timed
        # alone in a new process just before that turn (like with like: fresh memory both, the
        # same files and tokens), and against the restore in this process.
        "warm_restore_in_turn_s": _p50(warm, "restore_s"),
        "restore_alone_before_warm_s": summary(rounds.alone_s)["p50"],
        "restore_in_turn_over_fresh_alone": _p50(warm, "restore_s") / summary(rounds.alone_s)["p50"],
        "restore_in_turn_over_alone": _p50(warm, "restore_s") / r50,
    }
    if warm_disk:
        disk_ttft = _p50(warm_disk, "ttft_s")
        # Each disk turn's budget: what reading the agent's files as they were then took at the
        # disk speed measured just before it (all the cache files, dropped first, read once).
        read_cost = [t["agent_cache_bytes"] * t["disk_read_s"] / t["disk_read_bytes"] for t in warm_disk]
        row |= {
            "warm_disk_ttft_s": disk_ttft,
            "warm_disk_wall_s": _p50(warm_disk, "wall_s"),
            "warm_disk_over_hot": disk_ttft / hot_ttft,
            "warm_disk_prompt_tokens": sum(t["prompt_tokens"] for t in warm_disk) / len(warm_disk),
            "cache_bytes_dropped": max(t["cache_bytes_dropped"] for t in warm_disk),
            "disk_read_mb_s": summary([t["disk_read_bytes"] / t["disk_read_s"] / 1e6 for t in warm_disk])["p50"],
            "agent_cache_bytes": _p50(warm_disk, "agent_cache_bytes"),
            "agent_read_s": summary(read_cost)["p50"],
            # The target: hot TTFT plus 1.2x the time this disk takes to read the agent's files.
            "warm_disk_budget_s": hot_ttft + 1.2 * summary(read_cost)["p50"],
        }
        row["warm_disk_over_budget"] = disk_ttft / row["warm_disk_budget_s"]
    samples = {
        "cold": cold,
        "warm": warm,
        "warm_disk": warm_disk,
        "hot_ttft_s": rounds.hot_s,
        "hot_prompt_tokens": rounds.hot_tokens,
        "restore_alone_before_warm": rounds.alone_s,
        "restore": restore_s,
        "mlx_lm_load": load_s,
        "fresh_process_restore": fresh_restore_s,
        "fresh_process_mlx_lm_load": fresh_load_s,
    }
    return row, samples


@dataclass
class Rounds:
    warm: list[dict[str, Any]] = field(default_factory=list)  # the new processes' JSON records
    warm_disk: list[dict[str, Any]] = field(default_factory=list)  # the same, plus what their budget needs
    hot_s: list[float] = field(default_factory=list)
    hot_tokens: list[int] = field(default_factory=list)  # each hot turn's prompt tokens
    alone_s: list[float] = field(default_factory=list)  # the restore alone in a new process, before each warm turn


def _rounds(store: Store, name: str, spec: str, repeats: int, restore_job: dict[str, Any], tokenizer_fp: str) -> Rounds:
    """`repeats` rounds of the three measured turns: warm (a new process, the files as the last
    turn left them), warm from disk (a new process, the files dropped from the page cache
    first) and hot (in this process, right after an unmeasured turn here). Every turn adds
    its exchange to the history, so the rounds alternate their order, (warm, disk, prime,
    hot) then (prime, hot, disk, warm): over each pair of rounds the three sit at nearly the
    same history length (hot half a turn later; `repeats` is even), where measuring each
    kind in a batch of its own had the warm turns 7 turns (~150 tokens) before the hot ones.
    A `Chat` in this process lives for one prime and hot turn: it holds the agent, which the
    new processes' turns need. Where the page cache cannot be dropped, there are no disk
    turns. Just before each warm turn, the same restore runs alone in a new process; before
    each disk turn, the disk's read speed and the agent's bytes on disk are measured."""
    out = Rounds()
    can_drop = True

    def warm_turn() -> None:
        log = store.token_log(name, tokenizer_fp)
        assert log is not None, "the cold turns wrote a token log"
        alone = probe_record(restore_job | {"prompt": log + [0]})  # restores what the warm turn will
        turn = cli_turn(name, spec)
        if alone["tokens"] != turn["cached_tokens"]:
            raise RuntimeError(f"the restore alone brought back {alone['tokens']} tokens, the warm turn {turn['cached_tokens']}")
        out.alone_s.append(alone["seconds"])
        out.warm.append(turn)

    def disk_turn() -> None:
        nonlocal can_drop
        measured = disk_read_seconds() if can_drop else None
        if measured is None:
            if out.warm_disk:
                raise RuntimeError("the kernel kept the cache files in the page cache after POSIX_FADV_DONTNEED")
            can_drop = False  # not on this platform or file system: no disk turns
            return
        read_s, read_bytes = measured
        agent_bytes = store_usage_bytes(name)  # what this turn reads (the drop below drops the index too)
        dropped, named = drop_page_cache()
        if not dropped:
            raise RuntimeError("the kernel kept the cache files in the page cache after POSIX_FADV_DONTNEED")
        turn = cli_turn(name, spec)
        turn |= {"disk_read_s": read_s, "disk_read_bytes": read_bytes, "agent_cache_bytes": agent_bytes, "cache_bytes_dropped": named}
        out.warm_disk.append(turn)

    def in_process() -> None:
        chat = Chat(store)
        try:
            timed_turn(chat, name, QUESTION, spec)  # restores from disk: the files moved on since this process's last turn
            seconds, rec = timed_turn(chat, name, QUESTION, spec)
        finally:
            chat.close()
        if rec.tier != "hot":
            raise RuntimeError(f"expected a hot turn, got {rec.tier}")
        out.hot_s.append(seconds)
        out.hot_tokens.append(rec.done.stats.prompt_tokens)

    for r in range(repeats):
        steps = [warm_turn, disk_turn, in_process]
        for step in steps if r % 2 == 0 else steps[::-1]:
            step()
    _expect(out.warm, "warm")
    _expect(out.warm_disk, "warm")
    return out


def store_usage_bytes(name: str) -> int:
    """The bytes of the agent's block files and tail on disk."""
    from ..chat import make_kvstore

    kv = make_kvstore()
    try:
        return kv.usage(name).disk_bytes
    finally:
        kv.close()


def _pairs(first: Any, second: Any, n: int) -> tuple[list[float], list[float]]:
    """n timings of each, run in pairs whose order alternates (first, second), (second, first), ..."""
    a: list[float] = []
    b: list[float] = []
    for i in range(n):
        if i % 2 == 0:
            a.append(first())
            b.append(second())
        else:
            b.append(second())
            a.append(first())
    return a, b


def first_tokens(cache: list[Any], tokens: int) -> list[Any]:
    """The cache cut to its first `tokens` tokens with no spare room. mlx-lm 0.32's
    `KVCache.state` is the whole buffer, so a live cache saved as it is holds up to
    255 tokens more than a restore reads, and its load would have more to do. A turn's
    cache may be the engine's own `KVCache` subclass (`compat.restored_kv_cache`), whose
    name mlx-lm's loader does not know: it is saved as a plain `KVCache`."""
    from mlx_lm.models.cache import KVCache

    out = []
    for layer in cache:
        if isinstance(layer, KVCache):
            full: Any = layer  # mlx-lm types keys/values as optional; a filled cache has both
            layer = KVCache()
            layer.keys, layer.values, layer.offset = full.keys[..., :tokens, :], full.values[..., :tokens, :], tokens
        out.append(layer)
    return out


def table(res: Results) -> Sequence[tuple[str, ...]]:
    head = (
        "history",
        "cold ttft",
        "warm ttft",
        "warm ttft (disk)",
        "hot ttft",
        "warm/hot",
        "warm x",
        "cold wall",
        "warm wall",
        "wall x",
        "disk/budget",
        "restore in turn/alone",
        "restore/load",
        "new process: restore/load",
    )
    return [head] + [
        (
            str(r["history_tokens"]),
            f"{r['cold_ttft_s']:.2f}s",
            f"{r['warm_ttft_s']:.3f}s",
            f"{r['warm_disk_ttft_s']:.3f}s" if "warm_disk_ttft_s" in r else "n/a",
            f"{r['hot_ttft_s']:.3f}s",
            f"{r['warm_over_hot']:.2f}",
            f"{r['warm_speedup']:.0f}x",
            f"{r['cold_wall_s']:.1f}s",
            f"{r['warm_wall_s']:.2f}s",
            f"{r['warm_wall_speedup']:.1f}x",
            f"{r['warm_disk_over_budget']:.2f}" if "warm_disk_over_budget" in r else "n/a",
            f"{r['warm_restore_in_turn_s'] * 1000:.0f}/{r['restore_alone_before_warm_s'] * 1000:.0f}ms"
            f" = {r['restore_in_turn_over_fresh_alone']:.2f}",
            f"{r['warm_restore_s'] * 1000:.0f}/{r['mlx_lm_load_s'] * 1000:.0f}ms = {r['restore_over_mlx_lm_load']:.2f}",
            f"{r['fresh_process_restore_s'] * 1000:.0f}/{r['fresh_process_mlx_lm_load_s'] * 1000:.0f}ms"
            f" = {r['fresh_process_restore_over_load']:.2f}",
        )
        for r in res.results["rows"]
    ]
