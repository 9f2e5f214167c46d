"""A room's agents answering at once (one Chat.run over several turns, one batch on the
engine) against the same turns run one at a time, each in its own Chat.run.

Measured first on all four tiny models (greedy, 24 tokens, 4 agents, cold, warm and
hot rounds): the replies were token-identical in every position. Batching pads the
prompts and stacks the sequences; each sequence's attention sums run over its own tokens
in the same order, and a batch's decode-step matmuls (backend/fewrows.py) sum the same
products in another order, which moves a logit in its last bits only. Measured again
with that kernel: still identical on all four, so the check stays exact; a near-tie of
two logits in a future model would show up here first.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Session

from semantic_cli.chat import GenSettings, TurnRecorded

NAMES = ["r1", "r2", "r3", "r4"]
# Different prompt lengths (padding) and different max_tokens (sequences leave the batch
# at different steps while the others go on).
ROUNDS = [
    {n: (f"question {i}: " + "tell me about the sea " * (i + 1), mt) for i, (n, mt) in enumerate(zip(NAMES, [24, 9, 17, 24], strict=True))},
    {
        n: (t, 20)
        for n, t in zip(NAMES, ["why?", "tell me more about the fox and the dog", "ok", "and the village by the sea?"], strict=True)
    },
    {
        n: (t, mt)
        for n, t, mt in zip(NAMES, ["go on", "a much longer follow-up question about caches", "more", "stop"], [11, 20, 5, 16], strict=True)
    },
]


def _turns(s: Session, model: Path, round_: dict[str, tuple[str, int]], together: bool) -> dict[str, TurnRecorded]:
    pendings = [s.chat.prepare(s.chat.open_agent(n, str(model)), text, GenSettings(max_tokens=mt)) for n, (text, mt) in round_.items()]
    groups = [pendings] if together else [[p] for p in pendings]
    out: dict[str, TurnRecorded] = {}
    for group in groups:
        for ev in s.chat.run(group):
            if isinstance(ev, TurnRecorded):
                out[ev.key] = ev
    assert sorted(out) == sorted(round_)
    return out


def _conversation(model: Path, together: bool) -> list[dict[str, TurnRecorded]]:
    """Round 1 cold; round 2 in a new session (warm, from disk); round 3 hot."""
    with Session() as s:
        first = _turns(s, model, ROUNDS[0], together)
    with Session() as s:
        return [first, _turns(s, model, ROUNDS[1], together), _turns(s, model, ROUNDS[2], together)]


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3_text", "qwen2"])
def test_batched_replies_equal_sequential_ones(tiny, tmp_path, monkeypatch, kind):
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "16")
    monkeypatch.setenv("SEMANTIC_HOME", str(tmp_path / "batched"))
    batched = _conversation(tiny[kind], together=True)
    monkeypatch.setenv("SEMANTIC_HOME", str(tmp_path / "sequential"))
    sequential = _conversation(tiny[kind], together=False)
    for i, (b_round, s_round) in enumerate(zip(batched, sequential, strict=True)):
        for name in NAMES:
            b, s = b_round[name].done, s_round[name].done
            assert b.generated == s.generated, (i, name)
            assert b.text == s.text and b.finish_reason == s.finish_reason == "length"
            assert len(b.generated) == ROUNDS[i][name][1]
            assert b.all_tokens == s.all_tokens
            assert b.stats.cached_tokens == s.stats.cached_tokens
            assert b_round[name].tier == s_round[name].tier == ["cold", "warm", "hot"][i]
    # Each agent resumed its own conversation (a mixed-up cache would not cover its prompt).
    for name in NAMES:
        assert batched[1][name].done.stats.cached_tokens == len(batched[0][name].done.cached_log)
        assert batched[2][name].done.stats.cached_tokens == len(batched[1][name].done.cached_log)
