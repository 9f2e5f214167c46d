"""A greedy reply resumed by a fresh `semantic` process equals the reply of a process
that never stopped: every turn below is its own `semantic chat` invocation, and the
reference conversation runs in this process from start to end (hot cache)."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest
from conftest import quiet, run_cli
from helpers import Session, uncached_reply_end

from semantic_cli.store import Store

LONG = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(12))


def _never_stopped(model: Path, turns: list[str], max_tokens: int) -> tuple[list[tuple[str, list[int]]], list[int]]:
    """(reply text, generated ids) per turn, and the final token log, all in this process."""
    out, tiers = [], []
    with Session() as s:
        for text in turns:
            rec = s.say("a", text, model=model, max_tokens=max_tokens)
            out.append((rec.done.text, rec.done.generated))
            tiers.append(rec.tier)
        assert tiers == ["cold"] + ["hot"] * (len(turns) - 1)
        log = s.store.token_log("a", s.chat.engine_for(s.store.get_agent("a")).lm.tokenizer_fingerprint)
    return out, log


def _fresh_processes(model: Path, turns: list[str], max_tokens: int) -> tuple[list[dict], list[int]]:
    """Each turn a new `semantic chat --json` process; the JSON of each, and the final token log."""
    objs = []
    for i, text in enumerate(turns):
        args = ["chat", "-a", "a", "--temp", "0", "--max-tokens", str(max_tokens), "--json", "-m", text]
        r = run_cli(*args, *(["--model", str(model)] if i == 0 else []))
        assert r.returncode == 0 and quiet(r.stderr), r.stderr
        objs.append(json.loads(r.stdout))
    store = Store()
    try:
        [chunk_tokenizer] = {row[0] for row in store.db.execute("SELECT tokenizer FROM token_chunks WHERE agent='a'")}
        log = store.token_log("a", chunk_tokenizer)
    finally:
        store.close()
    return objs, log


def _check(model: Path, turns: list[str], max_tokens: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    monkeypatch.setenv("SEMANTIC_HOME", str(tmp_path / "never-stopped"))
    reference, ref_log = _never_stopped(model, turns, max_tokens)
    monkeypatch.setenv("SEMANTIC_HOME", str(tmp_path / "fresh-processes"))
    objs, log = _fresh_processes(model, turns, max_tokens)
    assert objs[0]["cache_tier"] == "cold" and objs[0]["cached_tokens"] == 0
    for prev, obj in pairwise(objs):
        # Resumed from disk: the previous turn's whole KV came from the blocks and tail.
        assert obj["cache_tier"] == "warm"
        # (all but the reply's last token, which no pass read on the CPU: backend/compat.py)
        assert obj["cached_tokens"] == prev["prompt_tokens"] + prev["generated_tokens"] - uncached_reply_end() > 0
        assert obj["prefilled_tokens"] == obj["prompt_tokens"] - obj["cached_tokens"]
    assert [o["reply"] for o in objs] == [text for text, _ in reference]
    # Token-identical: the logs hold every prompt and generated id of both conversations.
    assert log == ref_log
    return objs


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3_text", "qwen2"])
def test_fresh_process_resumes_exactly_on_tiny_models(tiny, tmp_path, monkeypatch, kind):
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "16")
    objs = _check(tiny[kind], [LONG, "tell me more about the fox"], 10, tmp_path, monkeypatch)
    assert objs[-1]["cached_tokens"] > 150  # many blocks restored, not just a tail


@pytest.mark.smollm
def test_fresh_process_resumes_exactly_on_smollm2(smollm, tmp_path, monkeypatch):
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "32")
    turns = ["Give me three colours.", "Now three animals."]
    objs = _check(smollm, turns, 32, tmp_path, monkeypatch)
    assert objs[-1]["cached_tokens"] > 64
