"""A conversation whose length is an exact multiple of the block size: every token is
in a full block and the tail holds no tokens, only the whole-layer snapshots of a
model that has them (gemma3's sliding-window layers). Writing that tail once failed
with TypeError (an empty KV slice cannot be cast to bytes), after the turn was recorded."""

from __future__ import annotations

import pytest
from helpers import Session, uncached_reply_end
from turns import encode, render

from semantic_cli.engine import get_engine
from semantic_cli.kv.index import KVIndex
from semantic_cli.model.loader import resolve

B = 16


@pytest.mark.parametrize("kind", ["llama", "gemma3_text"])
def test_conversation_ending_on_a_block_boundary_persists_and_resumes(tiny, home, monkeypatch, kind):
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", str(B))
    tok = get_engine(resolve(str(tiny[kind]))).lm.tokenizer
    prompt = encode(tok, render(tok, [{"role": "user", "content": "hello"}]))
    # Random weights never stop early: the cached part of prompt + reply fills whole blocks.
    max_tokens = (uncached_reply_end() - len(prompt)) % B or B
    with Session() as s:
        first = s.say("b", "hello", model=tiny[kind], max_tokens=max_tokens)
    assert len(first.done.cached_log) % B == 0 and first.persisted is not None
    tail = KVIndex().tail("b")
    assert (tail.n_tokens if tail else None) == (0 if kind == "gemma3_text" else None)  # snapshots only, or no tail
    with Session() as s:
        again = s.say("b", "again", max_tokens=2)
    assert again.tier == "warm" and again.done.stats.cached_tokens == len(first.done.cached_log)
