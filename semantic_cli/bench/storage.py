"""What the cache costs on disk: bytes written per turn, and prefix sharing across agents."""

from __future__ import annotations

from typing import Any

from ..chat import Chat
from ..engine import Engine
from ..store import Store
from .results import filler_tokens
from .turns import timed_turn


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
        assert rec.done.cache is not None and rec.persisted is not None, "a finished turn is cached and persisted"
        if per_token is None:
            per_token = sum(c.keys.nbytes // c.keys.shape[2] * 2 for c in rec.done.cache if hasattr(c, "keys") and c.keys is not None)
        added = len(rec.done.cached_log) - prev
        prev = len(rec.done.cached_log)
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
    """Ten agents with the same 1,000-token system prompt store it once.

    Every file an agent's cache uses is counted: its chain's blocks and its own tail.
    """
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
    tail_bytes = sum(t.nbytes for t in index.all_tails() if t.agent.startswith("dedup-"))
    block_stored = sum(b.nbytes for b in blocks.values())
    block_naive = sum(blocks[h].nbytes for c in mine.values() for h in c)
    stored, naive = block_stored + tail_bytes, block_naive + tail_bytes
    return {
        "agents": agents,
        "system_tokens": system_tokens,
        "shared_blocks": len(shared),
        "block_bytes_stored": block_stored,
        "block_bytes_without_sharing": block_naive,
        "tail_bytes": tail_bytes,
        "bytes_stored": stored,
        "bytes_without_sharing": naive,
        "saving": naive / stored if stored else None,
    }
