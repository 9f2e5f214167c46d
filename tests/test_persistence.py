"""KV persistence on tiny models: exact resume, prefix sharing, damage handling, write cost."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import Session

from semantic_cli import paths
from semantic_cli.kv.blockfile import block_path, tails_dir
from semantic_cli.kv.fileread import file_checksum
from semantic_cli.kv.index import KVIndex
from semantic_cli.kv.store import KVStore

LONG = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(30))


def _conversation(model: Path, turns: list[str], restart_before_last: bool, max_tokens: int = 12) -> tuple[list, list[int]]:
    """Run turns; optionally start a fresh session (new hot tier) for the last one."""
    recs = []
    s = Session()
    for i, text in enumerate(turns):
        if restart_before_last and i == len(turns) - 1:
            s.close()
            s = Session()
        recs.append(s.say("a", text, model=model, max_tokens=max_tokens))
    s.close()
    return recs, recs[-1].done.generated


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3_text", "qwen2"])
def test_resume_from_disk_is_byte_identical_to_continuing(tiny, tmp_path, monkeypatch, kind):
    """A reply after a restart (warm blocks) equals the reply of the uninterrupted process (hot)."""
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "32")
    turns = [LONG, "tell me more about the fox", "and the dog?"]
    monkeypatch.setenv("SEMANTIC_HOME", str(tmp_path / "hot"))
    hot, hot_ids = _conversation(tiny[kind], turns, restart_before_last=False)
    monkeypatch.setenv("SEMANTIC_HOME", str(tmp_path / "warm"))
    warm, warm_ids = _conversation(tiny[kind], turns, restart_before_last=True)
    assert hot[-1].tier == "hot" and warm[-1].tier == "warm"
    assert warm[-1].done.stats.cached_tokens == hot[-1].done.stats.cached_tokens > 300
    assert warm[-1].done.stats.prefilled_tokens < 40
    assert warm_ids == hot_ids
    assert warm[-1].done.text == hot[-1].done.text


def test_restored_buffers_room_to_grow_is_never_read(tiny, tmp_path, monkeypatch):
    """Restored buffers are allocated uninitialised past the saved tokens (no page faults for
    room a reply may never use). Filled with NaNs there, the resumed reply is still exact."""

    from semantic_cli.backend import buffers

    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "32")
    turns = [LONG, "tell me more about the fox", "and the dog?"]
    monkeypatch.setenv("SEMANTIC_HOME", str(tmp_path / "hot"))
    _, hot_ids = _conversation(tiny["llama"], turns, restart_before_last=False)

    real_empty_arrays = buffers.empty_arrays
    poisoned = []

    def empty_full_of_nans(specs: list[tuple[tuple[int, ...], str]]):  # all-ones bits: NaN in every float type
        arrays = real_empty_arrays(specs)
        for a in arrays:
            memoryview(a).cast("B")[:] = b"\xff" * a.nbytes
        poisoned.extend(specs)
        return arrays

    monkeypatch.setattr(buffers, "empty_arrays", empty_full_of_nans)
    monkeypatch.setenv("SEMANTIC_HOME", str(tmp_path / "warm"))
    warm, warm_ids = _conversation(tiny["llama"], turns, restart_before_last=True)
    assert warm[-1].tier == "warm" and poisoned
    assert warm_ids == hot_ids


def test_sliding_window_model_resumes_past_a_wrapped_window(tiny, home, monkeypatch):
    """gemma3_text's sliding layers (window 32) wrap; their snapshot makes resume exact anyway."""
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "16")
    with Session() as s:
        first = s.say("g", LONG, model=tiny["gemma3_text"])
    assert first.done.stats.prompt_tokens > 64
    tail = KVIndex().tail("g")
    assert tail is not None
    with Session() as s:
        again = s.say("g", "continue")
    assert again.tier == "warm" and again.done.stats.cached_tokens == len(first.done.cached_log)


def test_cold_turn_reports_zero_cached_and_full_prefill(tiny, home):
    with Session() as s:
        rec = s.say("a", "hello", model=tiny["llama"])
    assert rec.tier == "cold"
    assert rec.done.stats.cached_tokens == 0
    assert rec.done.stats.prefilled_tokens == rec.done.stats.prompt_tokens


def test_a_hot_copy_older_than_the_files_gives_way_to_them(tiny, home, monkeypatch):
    """A server (one process, its hot copy kept between turns) and a `--no-server` turn
    (another process) on one agent: the files the other process wrote go further than the
    hot copy, so the next turn reads them instead of re-reading that turn's tokens."""
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "16")
    server = Session()
    try:
        server.say("a", "hello there", model=tiny["llama"])
        server.chat.release("a")  # as the server does between turns
        with Session() as other:
            later = other.say("a", "tell me more about it")
        rec = server.say("a", "and then?")
        assert rec.tier == "warm" and rec.done.stats.cached_tokens == len(later.done.cached_log)
        server.chat.release("a")
        reads: list[str] = []
        read = KVStore._from_disk
        monkeypatch.setattr(KVStore, "_from_disk", lambda self, agent, *a: reads.append(agent) or read(self, agent, *a))
        again = server.say("a", "ok")  # nobody else wrote: the hot copy, which is the newest, and no file read
        assert again.tier == "hot" and again.done.stats.cached_tokens == len(rec.done.cached_log) and reads == []
    finally:
        server.close()


def test_identical_system_prompts_are_stored_once(tiny, home, monkeypatch):
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "32")
    system = "You are a careful planner. " * 40
    with Session() as s:
        for i in range(5):
            s.say(f"agent{i}", f"question number {i}", model=tiny["llama"], system=system, max_tokens=4)
    index = KVIndex()
    refs = index.refcounts()
    shared = [h for h, n in refs.items() if n == 5]
    assert len(shared) >= 8  # the system prompt's full blocks
    files = list(paths.blocks_dir().rglob("*.kv"))
    assert len(files) == len(index.all_blocks())  # one file per distinct block
    # A later agent with the same persona reuses those blocks on its first turn.
    with Session() as s:
        rec = s.say("agent9", "another question", model=tiny["llama"], system=system, max_tokens=4)
    assert rec.tier == "warm" and rec.done.stats.cached_tokens >= 8 * 32


def test_write_cost_grows_with_the_turn_not_the_conversation(tiny, home, monkeypatch):
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "32")
    per_token = None
    with Session() as s:
        first = s.say("w", LONG, model=tiny["llama"])
        per_token = sum(c.keys.nbytes // c.keys.shape[2] * 2 for c in first.done.cache)
        block_bytes = 32 * per_token
        for i in range(5):
            before = len(s.chat.store.token_log("w", s.chat.engine_for(s.chat.store.get_agent("w")).lm.tokenizer_fingerprint))
            rec = s.say("w", f"more {i}")
            added = len(rec.done.all_tokens) - before
            # KV bytes of the added tokens plus at most one block (the rewritten tail), plus headers.
            assert rec.persisted.bytes_written <= (added * per_token + block_bytes) + 64 * 1024
            # So a turn writes a small part of the conversation's KV, not all of it again.
            assert rec.persisted.bytes_written < len(rec.done.all_tokens) * per_token / 4
    # The first turn wrote the KV of every token it cached: per_token is the real cost, so the bound above is tight.
    assert first.persisted.bytes_written >= len(first.done.cached_log) * per_token


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) - 100] ^= 0x40
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", [None, 3])
def test_a_restore_reads_its_files_in_batches_of_open_files(tiny, tmp_path, monkeypatch, damaged):
    """More files than one native Reader holds open at once: every batch is read, in order,
    and a damaged block in a later batch still keeps the blocks before it."""
    from semantic_cli.kv import fileread

    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "32")
    monkeypatch.setattr(fileread, "_OPEN_AT_ONCE", 2)
    turns = [LONG, "tell me more about the fox"]
    monkeypatch.setenv("SEMANTIC_HOME", str(tmp_path / "hot"))
    hot, hot_ids = _conversation(tiny["llama"], turns, restart_before_last=False)
    monkeypatch.setenv("SEMANTIC_HOME", str(tmp_path / "warm"))
    with Session() as s:
        s.say("a", turns[0], model=tiny["llama"], max_tokens=12)
    index = KVIndex()
    assert len(index.chain("a")) >= 6  # three batches and more
    if damaged is not None:
        _damage(block_path(index.chain("a")[damaged]), "bitflip")  # the second file of the second batch
    with Session() as s:
        rec = s.say("a", turns[1], max_tokens=12)
    if damaged is None:
        assert rec.tier == "warm" and rec.done.stats.cached_tokens == hot[-1].done.stats.cached_tokens
        assert rec.done.generated == hot_ids
    else:
        assert rec.done.stats.cached_tokens == damaged * 32


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
@pytest.mark.parametrize("target", ["block", "tail"])
def test_damaged_cache_file_is_dropped_and_the_reply_is_still_right(tiny, tmp_path, monkeypatch, how, target):
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "32")
    turns = [LONG, "next question"]
    monkeypatch.setenv("SEMANTIC_HOME", str(tmp_path / "clean"))
    _, clean_ids = _conversation(tiny["llama"], turns, restart_before_last=True)
    monkeypatch.setenv("SEMANTIC_HOME", str(tmp_path / "damaged"))
    with Session() as s:
        s.say("a", turns[0], model=tiny["llama"])
    index = KVIndex()
    blocks_before = len(index.chain("a"))
    victim = block_path(index.chain("a")[3]) if target == "block" else tails_dir() / index.tail("a").file
    _damage(victim, how)
    with Session() as s:
        rec = s.say("a", turns[1])
        assert any("damaged" in n for n in s.notices)
    # Blocks before the damage are still used; the rest is re-prefilled.
    expected_cached = 3 * 32 if target == "block" else blocks_before * 32
    assert rec.done.stats.cached_tokens == expected_cached
    # The damaged file was dropped; after the turn the block was written afresh.
    fresh = KVIndex()
    if target == "block":
        row = fresh.blocks([victim.stem])[victim.stem]
        assert file_checksum(victim, row.nbytes) == row.checksum
    else:
        assert not victim.exists() and fresh.tail("a").file != victim.name
    # Re-prefilled KV can differ in the last bits from cached KV, so compare the
    # first tokens, which are decided by a wide logit margin on this model.
    assert rec.done.generated[:4] == clean_ids[:4]


def test_changed_model_never_reuses_blocks(tiny, home):
    with Session() as s:
        s.say("m", LONG, model=tiny["llama"])
    with Session() as s:
        rec = s.say("m", "again", model=tiny["qwen3"])
        assert any("model changed" in n for n in s.notices)
    assert rec.tier == "cold" and rec.done.stats.cached_tokens == 0
    assert rec.done.stats.prompt_tokens > 100  # the whole transcript, re-rendered for the new tokenizer


def test_files_are_private(tiny, home):
    with Session() as s:
        s.say("p", LONG, model=tiny["llama"])
    for root, dirs, files in os.walk(home):
        for d in dirs:
            assert os.stat(os.path.join(root, d)).st_mode & 0o077 == 0, d
        for f in files:
            assert os.stat(os.path.join(root, f)).st_mode & 0o077 == 0, f


def test_a_stale_tail_is_not_reported_as_damage(tiny, home, monkeypatch):
    """After the log is re-rendered (persona change), the old cache no longer matches from its
    first block: the turn is cold, and nothing is reported as damage. (A tail whose own tokens
    or prefix no longer match: tests/test_kvstore.py, test_a_tail_is_used_only_after_the_prefix_it_was_computed_on.)"""
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "64")
    with Session() as s:
        s.say("t", "short", model=tiny["llama"])
        agent = s.store.get_agent("t")
        s.store.update_agent(agent, system="A new persona.")
    with Session() as s:
        rec = s.say("t", "again")
        assert rec.tier == "cold" and not s.notices


def test_a_warm_turns_restore_time_is_the_restore_alone(tiny, home, monkeypatch):
    """`restore_s` (the JSON, bench resume's "restore in turn") times the restore, not the
    model's cache spec, which a new process traces before its first restore: both are in
    the TTFT."""
    import time

    from semantic_cli import turncache

    with Session() as s:
        s.say("a", LONG, model=tiny["llama"])
    traced = turncache.cache_spec

    def slow_spec(model):
        time.sleep(0.3)
        return traced(model)

    monkeypatch.setattr(turncache, "cache_spec", slow_spec)
    with Session() as s:  # a new process: no spec yet
        rec = s.say("a", "and then?", model=tiny["llama"])
    assert rec.tier == "warm"
    assert rec.done.stats.ttft_s > 0.3 > rec.done.stats.restore_s > 0
