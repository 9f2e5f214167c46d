"""The resume benchmark compares like with like: mlx-lm's file holds exactly the restored tokens."""

from __future__ import annotations

from semantic_cli.backend import runtime
from semantic_cli.bench.results import summary
from semantic_cli.bench.resume import first_tokens


def test_mlx_lm_is_given_exactly_the_tokens_the_restore_brings_back(tmp_path):
    mx = runtime.mx()
    from mlx_lm.models.cache import KVCache, RotatingKVCache, load_prompt_cache, save_prompt_cache

    live = KVCache()
    live.update_and_fetch(mx.random.normal((1, 2, 300, 8)), mx.random.normal((1, 2, 300, 8)))
    assert live.state[0].shape[2] > 300  # mlx-lm 0.32 saves the spare room too
    window = RotatingKVCache(max_size=16)
    window.update_and_fetch(mx.random.normal((1, 2, 20, 8)), mx.random.normal((1, 2, 20, 8)))
    cut = first_tokens([live, window], 290)
    assert cut[1] is window  # other layer kinds are saved as they are
    path = str(tmp_path / "c.safetensors")
    save_prompt_cache(path, cut)
    loaded = load_prompt_cache(path)
    assert loaded[0].keys.shape[2] == 290 and loaded[0].offset == 290
    assert mx.array_equal(loaded[0].keys, live.keys[..., :290, :]).item()
    assert mx.array_equal(loaded[0].values, live.values[..., :290, :]).item()


def test_a_cache_the_engine_kept_saves_as_mlx_lms_own(tmp_path):
    """A turn alone keeps the batch's buffers as the engine's `KVCache` subclass; mlx-lm's
    loader knows only its own class names."""
    mx = runtime.mx()
    from mlx_lm.models.cache import KVCache, load_prompt_cache, save_prompt_cache

    from semantic_cli.backend import compat

    kept = compat.restored_kv_cache(mx.random.normal((1, 2, 300, 8)), mx.random.normal((1, 2, 300, 8)), 280)
    assert type(kept) is not KVCache
    path = str(tmp_path / "c.safetensors")
    save_prompt_cache(path, first_tokens([kept], 280))
    [loaded] = load_prompt_cache(path)
    assert type(loaded) is KVCache and loaded.offset == 280
    assert mx.array_equal(loaded.keys, kept.keys[..., :280, :]).item()


def test_bench_resume_times_real_new_processes_in_both_page_cache_states(tiny, home):
    """Warm is a real resume: a new `semantic chat` process restoring from disk, with the files
    in the page cache and dropped from it; cold re-prefills; the figures come from their JSON."""
    import json

    from conftest import run_cli

    out = home / "resume.json"
    r = run_cli(
        "bench", "resume", "--model", str(tiny["llama"]), "--sizes", "100", "--repeats", "2",
        "--cold-repeats", "2", "--pairs", "2", "--out", str(out), env={"SEMANTIC_BLOCK_TOKENS": "16"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    samples = res["samples"]["100"]
    assert [s["cache_tier"] for s in samples["cold"]] == ["cold", "cold"]
    assert all(s["cached_tokens"] == 0 and s["prefilled_tokens"] == s["prompt_tokens"] for s in samples["cold"])
    for state in ("warm", "warm_disk"):
        assert len(samples[state]) == 2
        for turn in samples[state]:
            assert turn["cache_tier"] == "warm" and turn["cached_tokens"] >= 96, turn
            assert turn["wall_s"] > turn["ttft_s"] > turn["restore_s"] > 0  # the process's whole life vs its turn vs its restore
    row = res["results"]["rows"][0]
    # Rounds in alternating order: (warm, disk, prime, hot), then (prime, hot, disk, warm).
    # Each turn adds an exchange of `step` tokens, so the prompt lengths say the order.
    first = samples["warm"][0]["prompt_tokens"]
    step = samples["warm_disk"][0]["prompt_tokens"] - first
    assert step > 0
    assert [t["prompt_tokens"] for t in samples["warm_disk"]] == [first + step, first + 6 * step]
    assert [t["prompt_tokens"] for t in samples["warm"]] == [first, first + 7 * step]
    assert samples["hot_prompt_tokens"] == [first + 3 * step, first + 5 * step]
    assert row["warm_prompt_tokens"] == first + 3.5 * step and row["hot_prompt_tokens"] == first + 4 * step
    assert row["page_cache_dropped"] is True and row["cache_bytes_dropped"] > 0
    assert row["warm_restore_in_turn_s"] == summary([t["restore_s"] for t in samples["warm"]])["p50"]
    # The restore alone ran in a new process just before each warm turn (the probe checked it
    # brought back the turn's tokens), and the ratio compares with those.
    assert len(samples["restore_alone_before_warm"]) == 2 and all(s > 0 for s in samples["restore_alone_before_warm"])
    assert row["restore_in_turn_over_fresh_alone"] == row["warm_restore_in_turn_s"] / summary(samples["restore_alone_before_warm"])["p50"]
    # The disk target's budget: hot TTFT plus 1.2x the time to read the agent's own files, as
    # they were at each disk turn, at the speed measured just before it.
    for turn in samples["warm_disk"]:
        assert 0 < turn["agent_cache_bytes"] <= turn["cache_bytes_dropped"] <= turn["disk_read_bytes"] and turn["disk_read_s"] > 0
    assert samples["warm_disk"][0]["agent_cache_bytes"] < samples["warm_disk"][1]["agent_cache_bytes"]  # measured each time
    cost = summary([t["agent_cache_bytes"] * t["disk_read_s"] / t["disk_read_bytes"] for t in samples["warm_disk"]])["p50"]
    assert abs(row["warm_disk_budget_s"] - (row["hot_ttft_s"] + 1.2 * cost)) < 1e-9
    assert row["warm_disk_over_budget"] == row["warm_disk_ttft_s"] / row["warm_disk_budget_s"]
    assert len(samples["fresh_process_restore"]) == len(samples["fresh_process_mlx_lm_load"]) == 2
    dedup = res["results"]["dedup"]
    assert dedup["bytes_stored"] == dedup["block_bytes_stored"] + dedup["tail_bytes"] and dedup["tail_bytes"] > 0


def test_dropping_the_page_cache_is_checked_not_assumed(tmp_path, monkeypatch):
    """The "from disk" state is verified with mincore: a file read into the page cache is
    resident; after the drop it is not; and a drop that does nothing is reported as not dropped."""
    import os

    from semantic_cli.bench import turns

    home = tmp_path / "home"
    monkeypatch.setenv("SEMANTIC_HOME", str(home))
    cache = home / "cache"
    cache.mkdir(parents=True)
    (cache / "f.kv").write_bytes(os.urandom(1 << 20))
    (cache / "f.kv").read_bytes()
    assert turns.resident_bytes() == 1 << 20
    assert turns.drop_page_cache() == (True, 1 << 20)
    assert turns.resident_bytes() == 0
    (cache / "f.kv").read_bytes()
    monkeypatch.setattr(os, "posix_fadvise", lambda *args: None)  # a kernel that ignores the advice
    assert turns.drop_page_cache() == (False, 1 << 20)
    assert turns.disk_read_seconds() is None  # no speed read from the page cache as if from disk


def test_bench_lists_are_checked_before_anything_loads(home):
    from conftest import run_cli

    for args in (
        ("resume", "--sizes", "abc"),
        ("resume", "--sizes", "0"),
        ("resume", "--repeats", "3"),
        ("batch", "--agents", "x"),
        ("batch", "--agents", "0"),
    ):
        r = run_cli("bench", *args, "--model", "/nonexistent")  # a model that would fail to load: never reached
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.decode().count("\n") == 1 and "Traceback" not in r.stderr.decode(), r.stderr
