"""Cache files are data, never instructions (issue 18, items 1, 2 and 7).

A crafted block or tail file, with an index row that vouches for it (its size and
checksum, as someone with write access to the cache directory could write them), costs
one "damaged" warning and a re-prefill: the file is dropped, and the next restore is
clean. Names from the index are never paths. `cache verify --repair` plans, then runs
its plan in one transaction, and leaves files another process may be writing alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cachefiles import build, checksum, craft, index_db, set_row, split, synthetic_cache
from conftest import run_cli
from helpers import Session

from semantic_cli.backend import buffers
from semantic_cli.kv import admin, fileread
from semantic_cli.kv.blockfile import block_path, tails_dir
from semantic_cli.kv.index import KVIndex
from semantic_cli.kv.layers import CacheSpec, cache_spec
from semantic_cli.kv.store import KVStore

KV2 = CacheSpec.uniform(("kv", "kv"), heads=2, head_dim=8)
ROTATING = CacheSpec.uniform(("kv", "RotatingKVCache", "kv"), heads=2, head_dim=8, window=32)
TOKENS = 300  # with 128-token blocks: two blocks and a 44-token tail
IDS = [(7 * i) % 101 for i in range(TOKENS)]
LONG = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(30))


@pytest.fixture(params=["native", "python"])
def restore_code(request, monkeypatch) -> str:
    """Runs a test with the compiled restore loops and with Python's."""
    if request.param == "python":
        monkeypatch.setenv("SEMANTIC_NATIVE", "0")
    elif buffers.restore_code() != "native":
        pytest.skip("the native restore loops are not built here (scripts/build_native.py --force says why)")
    return request.param


def _cache(spec: CacheSpec) -> list:
    return synthetic_cache(spec.kinds, TOKENS // 30, 30, window=32, seed=3)


def _persisted(spec: CacheSpec) -> KVStore:
    store = KVStore(128, 1 << 40, 0)
    store.persist("a", "fp", spec, IDS, _cache(spec), protect=set())
    return store


def _target(which: str) -> Path:
    index = KVIndex()
    try:
        return block_path(index.chain("a")[1]) if which == "block" else tails_dir() / index.tail("a").file
    finally:
        index.close()


# ---- crafted files: each returns the new (header, body) -------------------------
def _object_array(h: dict, body: bytes) -> tuple[dict, bytes]:
    """The issue's segfault: an extra array of numpy's object dtype."""
    h["arrays"].append({"name": "x", "dtype": "O", "shape": [1, 1, 1], "offset": len(body), "nbytes": 8})
    return h, body + bytes(8)


def _dtype_foo(h: dict, body: bytes) -> tuple[dict, bytes]:
    h["arrays"][0]["dtype"] = "foo"
    return h, body


def _negative_dim(h: dict, body: bytes) -> tuple[dict, bytes]:
    heads, n, dim = h["arrays"][0]["shape"]
    h["arrays"][0]["shape"] = [heads, n, -dim]  # the head dim, which once sized every buffer
    return h, body


def _nested_json(h: dict, body: bytes) -> tuple[bytes, bytes]:
    raw = json.dumps(h, separators=(",", ":"))
    return (raw[:-1] + ',"x":' + "[" * 5000 + "]" * 5000 + "}").encode(), body


def _more_heads(h: dict, body: bytes) -> tuple[dict, bytes]:
    """A self-consistent file of another geometry: 3 KV heads where the model has 2."""
    offset = 0
    for a in h["arrays"]:
        heads, n, dim = a["shape"]
        a["shape"], a["offset"], a["nbytes"] = [heads + 1, n, dim], offset, (heads + 1) * n * dim * 4
        offset += a["nbytes"]
    return h, bytes(offset)


def _kv_dtype(h: dict, body: bytes) -> tuple[dict, bytes]:
    h["kv_dtype"] = "float16"
    return h, body


def _swapped_offsets(h: dict, body: bytes) -> tuple[dict, bytes]:
    a, b = h["arrays"][0], h["arrays"][1]
    a["offset"], b["offset"] = b["offset"], a["offset"]
    return h, body


def _extra_layer(h: dict, body: bytes) -> tuple[dict, bytes]:
    h["arrays"].append(dict(h["arrays"][0], name="k7", offset=len(body)))
    return h, body + body[: h["arrays"][0]["nbytes"]]


def _not_an_object(h: dict, body: bytes) -> tuple[bytes, bytes]:
    return b'["arrays"]', body


def _arrays_not_a_list(h: dict, body: bytes) -> tuple[dict, bytes]:
    h["arrays"] = {"k0": 1}
    return h, body


def _huge_header_length(h: dict, body: bytes) -> tuple[bytes, bytes]:
    return json.dumps(h).encode() + b" " * (1 << 20), body


CRAFTED: dict[str, Callable] = {
    "object-dtype-array": _object_array,
    "dtype-foo": _dtype_foo,
    "negative-dimension": _negative_dim,
    "nested-json": _nested_json,
    "more-heads-than-the-model": _more_heads,
    "kv-dtype-not-the-models": _kv_dtype,
    "swapped-offsets": _swapped_offsets,
    "an-extra-layer": _extra_layer,
    "header-not-an-object": _not_an_object,
    "arrays-not-a-list": _arrays_not_a_list,
    "header-too-long": _huge_header_length,
}


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path, 0o600)


def _dev_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _one_byte_more(path: Path) -> None:  # the checksum vouches for it, the size in the index does not
    data = path.read_bytes() + b"\0"
    path.write_bytes(data)
    db = index_db()
    try:
        db.execute("UPDATE blocks SET checksum=? WHERE hash=?", (checksum(data), path.stem))
        db.execute("UPDATE tails SET checksum=? WHERE file=?", (checksum(data), path.name))
    finally:
        db.close()


REPLACED: dict[str, Callable[[Path], None]] = {
    "fifo": _fifo,
    "symlink-to-dev-zero": _dev_zero,
    "directory": _directory,
    "wrong-size": _one_byte_more,
}


def _within(seconds: float, fn: Callable, unblock: Callable[[], None] | None = None):
    """fn() in a thread; fails (after `unblock`, which frees a hung reader) if it takes longer."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(value=fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if unblock is not None:
            unblock()
        thread.join(10)
        pytest.fail(f"hung for more than {seconds} s")
    return out["value"]


def _unblock_fifo(path: Path) -> Callable[[], None]:
    def unblock() -> None:
        with contextlib.suppress(OSError):  # no reader waiting
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    return unblock


def _check_dropped_once(store: KVStore, spec: CacheSpec, which: str, victim: Path) -> None:
    def restore_in_a_new_process_state():  # the thread opens its own index (SQLite connections stay in their thread)
        fresh = KVStore(128, 1 << 40, 0)
        try:
            return fresh.restore("a", "fp", spec, IDS + [1], capacity=TOKENS + 1)
        finally:
            fresh.close()

    restored = _within(30, restore_in_a_new_process_state, _unblock_fifo(victim))
    assert [w for w in restored.warnings if "damaged" in w] == restored.warnings and len(restored.warnings) == 1, restored.warnings
    index = KVIndex()
    if which == "block":
        assert restored.matched == 128  # block 0 still serves
        assert victim.stem not in index.blocks([victim.stem]) and len(index.chain("a")) == 1
    else:
        assert restored.matched == 256 and index.tail("a") is None
    index.close()
    assert not os.path.lexists(victim) or victim.is_dir()  # dropped (a directory is not unlinked)
    again = store.restore("a", "fp", spec, IDS + [1], capacity=TOKENS + 1)
    assert again.warnings == [] and again.matched == restored.matched


@pytest.mark.parametrize("which", ["block", "tail"])
@pytest.mark.parametrize("how", sorted(CRAFTED))
def test_a_crafted_file_costs_one_warning_and_is_dropped(home, restore_code, how, which):
    store = _persisted(KV2)
    victim = _target(which)
    craft(victim, CRAFTED[how])
    _check_dropped_once(store, KV2, which, victim)


@pytest.mark.parametrize("which", ["block", "tail"])
@pytest.mark.parametrize("how", sorted(REPLACED))
def test_a_fifo_link_or_directory_in_place_of_a_file_is_damage_not_a_hang(home, restore_code, how, which):
    store = _persisted(KV2)
    victim = _target(which)
    REPLACED[how](victim)
    _check_dropped_once(store, KV2, which, victim)


def _snapshot_entry(h: dict) -> dict:
    return next(a for a in h["arrays"] if a["name"].startswith("s1:"))


def _huge_snapshot(h: dict, body: bytes) -> tuple[dict, bytes]:
    a = _snapshot_entry(h)
    a["shape"][2] = 1 << 40
    a["nbytes"] = 2 * (1 << 40) * 8 * 4
    return h, body


def _snapshot_dtype(h: dict, body: bytes) -> tuple[dict, bytes]:
    _snapshot_entry(h)["dtype"] = "int64"
    return h, body


def _snapshot_class(h: dict, body: bytes) -> tuple[dict, bytes]:
    h["snapshots"]["1"]["class"] = "ArraysCache"
    return h, body


def _snapshot_window(h: dict, body: bytes) -> tuple[dict, bytes]:
    h["snapshots"]["1"]["scalars"]["4"] = 4096
    return h, body


def _snapshot_scalar_type(h: dict, body: bytes) -> tuple[dict, bytes]:
    h["snapshots"]["1"]["scalars"]["5"] = "x"
    return h, body


def _snapshot_for_a_kv_layer(h: dict, body: bytes) -> tuple[dict, bytes]:
    h["snapshots"]["0"] = h["snapshots"]["1"]
    return h, body


def _snapshots_not_a_dict(h: dict, body: bytes) -> tuple[dict, bytes]:
    h["snapshots"] = [1]
    return h, body


SNAPSHOT_CRAFTED: dict[str, Callable] = {
    "object-dtype-array": _object_array,
    "huge-snapshot-shape": _huge_snapshot,
    "snapshot-dtype-not-the-models": _snapshot_dtype,
    "snapshot-class-not-the-models": _snapshot_class,
    "snapshot-window-not-the-models": _snapshot_window,
    "snapshot-scalar-not-an-int": _snapshot_scalar_type,
    "snapshot-for-a-kv-layer": _snapshot_for_a_kv_layer,
    "snapshots-not-a-dict": _snapshots_not_a_dict,
}


@pytest.mark.parametrize("how", sorted(SNAPSHOT_CRAFTED))
def test_snapshot_arrays_are_taken_only_as_the_model_has_them(home, restore_code, how):
    """Whole-layer snapshots (a sliding window here) must be the model's snapshot layers,
    of their class, dtype, window and bounded size; a tail that is not costs one warning."""
    store = _persisted(ROTATING)
    victim = _target("tail")
    craft(victim, SNAPSHOT_CRAFTED[how])
    restored = store.restore("a", "fp", ROTATING, IDS + [1], capacity=TOKENS + 1)
    assert restored.tier == "cold" and len(restored.warnings) == 1 and "damaged" in restored.warnings[0], restored.warnings
    assert KVIndex().tail("a") is None and not victim.exists()


def test_a_clean_snapshot_tail_is_accepted(home, restore_code):
    store = _persisted(ROTATING)
    restored = store.restore("a", "fp", ROTATING, IDS + [1], capacity=TOKENS + 1)
    assert restored.tier == "warm" and restored.matched == TOKENS and restored.warnings == []


def test_geometry_and_dtype_come_from_the_model(tiny):
    """The spec is traced from the model itself: KV heads, head dims, dtype, window."""
    from mlx_lm import load

    model, _ = load(str(tiny["gemma3_text"]))
    spec = cache_spec(model)
    assert spec.persistable and spec.dtype == "float32"
    args = model.args
    kv = spec.layers[spec.kv_layers[0]]
    assert (kv.heads, kv.k_dim, kv.v_dim) == (args.num_key_value_heads, args.head_dim, args.head_dim)
    rotating = spec.layers[spec.snapshot_layers[0]]
    assert rotating.kind == "RotatingKVCache" and rotating.window == args.sliding_window
    assert CacheSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_a_cache_that_does_not_match_the_spec_is_not_written(home):
    """Its files would only ever be found damaged: persisting it says why instead."""
    from semantic_cli.kv.failures import CacheUnavailable

    with pytest.raises(CacheUnavailable, match="cache spec"):
        KVStore(128, 1 << 40, 0).persist("a", "fp", CacheSpec.uniform(("kv", "kv"), heads=3, head_dim=8), IDS, _cache(KV2), protect=set())


@pytest.mark.parametrize("shape", [[2**31 - 1] * 4, [1 << 30, 1 << 30, 8], [-1, 4]])
def test_allocation_sizes_that_overflow_raise(restore_code, shape):
    with pytest.raises(ValueError):
        buffers.empty_arrays([(tuple(shape), "float32")])


def test_a_failed_native_allocation_raises_instead_of_a_buffer_at_address_zero(restore_code):
    if restore_code != "native":
        pytest.skip("MLX's Python loader here maps what it cannot allocate")
    with pytest.raises(MemoryError):
        buffers.empty_arrays([((1 << 30, 1 << 30, 1), "float32")])  # 4 EiB: no address space holds it


# ---- end to end: the next turn after each of the issue's findings ---------------
def _turn_after(tiny, monkeypatch, which: str, damage: Callable[[Path], None]) -> None:
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "32")
    with Session() as s:
        s.say("a", LONG, model=tiny["llama"])
    index = KVIndex()
    blocks_before = len(index.chain("a"))
    victim = {"first-block": block_path(index.chain("a")[0]), "block": block_path(index.chain("a")[3])}.get(which)
    victim = victim or tails_dir() / index.tail("a").file
    index.close()
    damage(victim)
    started = time.monotonic()
    with Session() as s:
        rec = s.say("a", "next question")
        assert [n for n in s.notices if "damaged" in n] == s.notices and len(s.notices) == 1, s.notices
    assert time.monotonic() - started < 30, "the turn waited on the file"
    cached_blocks = {"first-block": 0, "block": 3}.get(which, blocks_before)
    assert rec.tier == ("warm" if cached_blocks else "cold") and rec.done.stats.cached_tokens == cached_blocks * 32
    index = KVIndex()  # the damaged file is gone from the index; the turn wrote a sound one
    if which != "tail":
        row = index.blocks([victim.stem])[victim.stem]
        assert fileread.file_checksum(victim, row.nbytes) == row.checksum
    else:
        assert index.tail("a").file != victim.name or fileread.file_checksum(victim, index.tail("a").nbytes) == index.tail("a").checksum
    index.close()
    with Session() as s:  # and the agent is usable again without `cache verify --repair`
        again = s.say("a", "and again")
        assert s.notices == [] and again.tier == "warm"


ISSUE_FINDINGS: dict[str, Callable[[Path], None]] = {
    "dtype-foo": lambda p: craft(p, _dtype_foo) and None,
    "negative-dimension": lambda p: craft(p, _negative_dim) and None,
    "nested-json": lambda p: craft(p, _nested_json) and None,
    "fifo": _fifo,
    "symlink-to-dev-zero": _dev_zero,
}


@pytest.mark.parametrize("which", ["first-block", "block", "tail"])  # the first file once gave every buffer its geometry
@pytest.mark.parametrize("finding", sorted(ISSUE_FINDINGS))
def test_the_next_turn_after_a_crafted_file_succeeds_with_one_warning(tiny, home, monkeypatch, finding, which):
    done = threading.Event()

    def damage(p: Path) -> None:
        ISSUE_FINDINGS[finding](p)
        # A hang must fail the test (it takes too long), not hold it: after 40 s a
        # writer keeps freeing any reader blocked opening the FIFO.
        unblock = _unblock_fifo(p)

        def keep_unblocking() -> None:
            if not done.wait(40):
                while not done.wait(0.1):
                    unblock()

        threading.Thread(target=keep_unblocking, daemon=True).start()

    try:
        _turn_after(tiny, monkeypatch, which, damage)
    finally:
        done.set()


def test_an_object_dtype_array_in_a_tail_no_longer_crashes_every_turn(tiny, home):
    """The issue's segfault (exit 139 on every later turn), in a real `semantic chat`."""
    env = {"SEMANTIC_BLOCK_TOKENS": "32"}
    first = run_cli("chat", "-a", "o", "--model", str(tiny["llama"]), "--max-tokens", "5", "-m", LONG, env=env)
    assert first.returncode == 0, first.stderr
    craft(tails_dir() / KVIndex().tail("o").file, _object_array)
    turns = [run_cli("chat", "-a", "o", "--max-tokens", "2", "--json", "-m", f"turn {i}", env=env, timeout=120) for i in range(2)]
    assert [t.returncode for t in turns] == [0, 0], [t.stderr for t in turns]
    assert turns[0].stderr.count(b"damaged") == 1 and b"damaged" not in turns[1].stderr
    assert json.loads(turns[1].stdout)["cache_tier"] == "warm"


@pytest.mark.parametrize("scalar", ["x", 4096])  # a window size that crashes generation, or silently changes attention
def test_a_crafted_sliding_window_snapshot_costs_one_warning(tiny, home, monkeypatch, scalar):
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "16")
    with Session() as s:
        s.say("g", LONG, model=tiny["gemma3_text"])
    victim = tails_dir() / KVIndex().tail("g").file

    def window(h: dict, body: bytes) -> tuple[dict, bytes]:
        for snap in h["snapshots"].values():
            snap["scalars"]["4"] = scalar  # RotatingKVCache's max_size
        return h, body

    craft(victim, window)
    with Session() as s:
        rec = s.say("g", "continue")
        assert len(s.notices) == 1 and "damaged" in s.notices[0], s.notices
    assert rec.tier == "cold"
    with Session() as s:
        again = s.say("g", "and again")
        assert s.notices == [] and again.tier == "warm"


# ---- names, not paths ------------------------------------------------------------
def _point_tail_at_the_database(agent: str) -> None:
    db = index_db()
    try:
        db.execute("UPDATE tails SET file='../../data/semantic.db' WHERE agent=?", (agent,))
        assert db.total_changes == 1
    finally:
        db.close()


def _agents(home: Path) -> list[str]:
    db = sqlite3.connect(home / "data" / "semantic.db")
    try:
        return [r[0] for r in db.execute("SELECT name FROM agents ORDER BY name")]
    finally:
        db.close()


def test_a_tail_row_naming_a_path_never_reaches_the_file(tiny, home):
    """With tails.file = '../../data/semantic.db', `cache evict --yes` used to delete the
    transcript database. Evict, repair, a chat turn and `agents rm` must all leave it be."""
    env = {"SEMANTIC_BLOCK_TOKENS": "16"}
    for name in ("x", "y"):
        assert run_cli("chat", "-a", name, "--model", str(tiny["llama"]), "--max-tokens", "3", "-m", "hello " * 20, env=env).returncode == 0
    database = home / "data" / "semantic.db"

    _point_tail_at_the_database("x")
    assert run_cli("cache", "evict", "x", "--yes").returncode == 0
    assert database.exists() and _agents(home) == ["x", "y"]

    assert run_cli("chat", "-a", "x", "--max-tokens", "2", "-m", "again", env=env).returncode == 0  # a tail again
    _point_tail_at_the_database("x")
    report = json.loads(run_cli("cache", "verify", "--json").stdout)
    whats = [p["what"] for p in report["problems"]]
    assert whats.count("tail") == 1 and set(whats) == {"orphan", "tail"}  # the bad row, and the files it no longer names
    assert run_cli("cache", "verify", "--repair").returncode == 0
    assert run_cli("cache", "verify").returncode == 0 and database.exists()

    assert run_cli("chat", "-a", "x", "--max-tokens", "2", "-m", "again", env=env).returncode == 0
    _point_tail_at_the_database("x")
    turn = run_cli("chat", "-a", "x", "--max-tokens", "2", "-m", "and again", env=env)
    assert turn.returncode == 0 and turn.stderr.count(b"damaged") == 1, turn.stderr
    assert database.exists() and _agents(home) == ["x", "y"]

    _point_tail_at_the_database("x")
    assert run_cli("agents", "rm", "x", "--yes").returncode == 0
    assert database.exists() and _agents(home) == ["y"]
    listed = run_cli("agents", "ls")
    assert listed.returncode == 0 and b"y" in listed.stdout


def test_block_names_from_the_index_are_checked_before_use(home, tmp_path):
    """blocks/<hash[:2]>/<hash>.kv with hash '../../data/semantic' is tmp_path/data/semantic.kv."""
    _persisted(KV2)
    decoys = [tmp_path / "data" / name for name in ("semantic.kv", "semantic2.kv")]
    decoys[0].parent.mkdir()
    for decoy in decoys:
        decoy.write_bytes(b"keep me")
    db = index_db()
    try:
        for i, bad in enumerate(("../../data/semantic", "../../data/semantic2")):
            db.execute("UPDATE blocks SET hash=? WHERE hash=(SELECT hash FROM chains WHERE pos=?)", (bad, i))
        db.execute("UPDATE chains SET hash='../../data/semantic2' WHERE pos=1")  # named by a chain: gc keeps it
    finally:
        db.close()
    index = KVIndex()
    assert index.gc_unreferenced() > 0  # the first bad row: named by no chain now
    report = admin.verify(index, repair=True)  # the second: not a block's name
    assert any(p.what == "block" and "not a block" in p.reason for p in report.problems)
    assert [d.read_bytes() for d in decoys] == [b"keep me"] * 2
    assert [p.what for p in admin.verify(index).problems] == []


# ---- repair that cannot half-run -------------------------------------------------
def _temp(directory: Path, name: str, age_s: float) -> Path:
    path = directory / name
    path.write_bytes(b"partial")
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


def test_repair_leaves_files_being_written_alone_and_removes_orphans(home):
    _persisted(KV2)
    blocks = block_path(KVIndex().chain("a")[0]).parent
    dead = _dead_pid()
    young_unknown = _temp(blocks, ".tmp-abcdefgh.kv", 5)  # no pid in its name: its age decides
    old_unknown = _temp(tails_dir(), ".tmp-ijklmnop.kv", admin.GRACE_S + 60)
    live = _temp(blocks, f".tmp-{os.getpid()}-qrstuvwx.kv", admin.GRACE_S + 60)  # its writer runs: left alone at any age
    dead_young = _temp(tails_dir(), f".tmp-{dead}-yz012345.kv", 5)  # its writer is gone: an orphan at once
    index = KVIndex()
    report = admin.verify(index, repair=True)
    assert sorted(p.name for p in report.problems) == sorted([str(old_unknown), str(dead_young)])
    assert sorted(p.name for p in report.in_progress) == sorted([str(young_unknown), str(live)])
    assert young_unknown.exists() and live.exists() and not old_unknown.exists() and not dead_young.exists()
    assert admin.verify(index).problems == []


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_an_untracked_tail_of_a_busy_agent_is_in_progress(home):
    from semantic_cli.locks import AgentLock

    _persisted(KV2)
    untracked = tails_dir() / "b-0123456789abcdef.kv"
    untracked.write_bytes(b"being written")
    with AgentLock("b"):
        report = admin.verify(KVIndex(), repair=True)
        assert [p.name for p in report.in_progress] == [str(untracked)] and untracked.exists()
    report = admin.verify(KVIndex(), repair=True)
    assert [p.name for p in report.problems] == [str(untracked)] and not untracked.exists()


def test_an_untracked_block_is_in_progress_while_any_agent_is_busy(home):
    """A block is written before its index row, by whichever agent's turn: while any agent's
    lock is held a young one is left alone; with none held it is an orphan at any age."""
    from semantic_cli.locks import AgentLock

    _persisted(KV2)
    known = KVIndex().chain("a")[0]
    untracked = block_path(("f" if known[0] != "f" else "e") + known[1:])
    untracked.parent.mkdir(parents=True, exist_ok=True)
    untracked.write_bytes(b"being written")
    with AgentLock("someone-else"):
        report = admin.verify(KVIndex(), repair=True)
        assert [p.name for p in report.in_progress] == [str(untracked)] and report.problems == []
        assert untracked.exists()
    report = admin.verify(KVIndex(), repair=True)
    assert [p.name for p in report.problems] == [str(untracked)] and not untracked.exists()


def test_a_file_the_index_names_after_the_scan_is_not_removed(home, monkeypatch):
    """A turn may commit a block's row between the repair's scan and its execution: the
    repair looks again under the index's write lock, and keeps the file its plan meant to remove."""
    import dataclasses
    import shutil

    _persisted(KV2)
    row = KVIndex().blocks(KVIndex().chain("a")[:1]).popitem()[1]
    late = dataclasses.replace(row, hash=("f" if row.hash[0] != "f" else "e") + row.hash[1:])
    path = block_path(late.hash)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(block_path(row.hash), path)
    when = time.time() - admin.GRACE_S - 60
    os.utime(path, (when, when))  # old and untracked, no agent busy: an orphan to the scan
    real_plan = admin.plan_repair

    def plan_then_a_turn_commits(*args):
        actions = real_plan(*args)
        assert [a.name for a in actions if a.what == "remove-file"] == [str(path)]
        other = KVIndex()  # another process's turn
        with other.transaction():
            other.add_block(late)
        other.close()
        return actions

    monkeypatch.setattr(admin, "plan_repair", plan_then_a_turn_commits)
    report = admin.verify(KVIndex(), repair=True)
    assert [p.name for p in report.problems] == [str(path)]  # what the scan saw
    assert path.exists() and late.hash in {b.hash for b in KVIndex().all_blocks()}
    monkeypatch.setattr(admin, "plan_repair", real_plan)
    assert "orphan" not in {p.what for p in admin.verify(KVIndex()).problems}  # tracked now


def test_a_repair_whose_problems_overlap_completes(home):
    """Block 1 is damaged (its repair cuts the chain from 1) and block 2's row is gone
    (a chain problem at 2): the second repair finds its chain already cut. It used to
    raise StopIteration, roll back, and leave the first repair's unlinked file deleted."""
    store = KVStore(64, 1 << 40, 0)
    store.persist("c", "fp", KV2, IDS, _cache(KV2), protect=set())  # four 64-token blocks
    index = KVIndex()
    chain = index.chain("c")
    damaged = block_path(chain[1])
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 1
    damaged.write_bytes(bytes(data))
    index.db.execute("DELETE FROM blocks WHERE hash=?", (chain[2],))
    report = admin.verify(index, repair=True)
    assert {p.what for p in report.problems} == {"block", "chain", "orphan"}
    assert admin.verify(index).problems == [] and index.chain("c") == chain[:1]
    restored = store.restore("c", "fp", KV2, IDS + [1], capacity=TOKENS + 1)
    assert restored.matched == 64 and restored.warnings == []


def test_a_failed_repair_changes_nothing(home, monkeypatch):
    store = KVStore(64, 1 << 40, 0)
    store.persist("c", "fp", KV2, IDS, _cache(KV2), protect=set())
    index = KVIndex()
    chain = index.chain("c")
    damaged = block_path(chain[1])
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 1
    damaged.write_bytes(bytes(data))
    index.db.execute("DELETE FROM blocks WHERE hash=?", (chain[3],))  # a chain problem, repaired after the block
    orphan = _temp(tails_dir(), ".tmp-abcdefgh.kv", admin.GRACE_S + 60)
    rows_before = sorted(r.hash for r in index.all_blocks())
    real_cut = index.cut_chain
    calls: list[int] = []

    def failing_second(agent: str, pos: int) -> None:  # the block's repair cuts; the chain's fails
        calls.append(pos)
        if len(calls) > 1:
            raise RuntimeError("disk gone")
        real_cut(agent, pos)

    monkeypatch.setattr(index, "cut_chain", failing_second)
    with pytest.raises(RuntimeError):
        admin.verify(index, repair=True)
    assert sorted(r.hash for r in index.all_blocks()) == rows_before and index.chain("c") == chain
    assert damaged.exists() and orphan.exists()  # nothing unlinked: the transaction rolled back


@pytest.mark.parametrize("how", ["fifo", "symlink-to-dev-zero"])
def test_verify_hashing_a_fifo_or_dev_zero_ends(home, how):
    _persisted(KV2)
    victim = _target("block")
    REPLACED[how](victim)
    started = time.monotonic()
    report = json.loads(run_cli("cache", "verify", "--json", timeout=60).stdout)
    assert time.monotonic() - started < 60
    assert [p["what"] for p in report["problems"]] == ["block"]
    assert run_cli("cache", "verify", "--repair", timeout=60).returncode == 0
    assert run_cli("cache", "verify", timeout=60).returncode == 0


def test_the_crafting_helpers_round_trip(home):
    _persisted(KV2)
    victim = _target("tail")
    header, body = split(victim.read_bytes())
    data = build(header, body)
    assert data == victim.read_bytes()
    set_row(victim, data)
    assert admin.verify(KVIndex()).problems == []
    assert np.frombuffer(body, np.float32).size > 0
