"""KVStore against real files, without a model: dtypes survive the round trip,
restored buffers hold exactly what was saved, and uninitialised allocation works,
natively (semantic_cli/backend/_native.cpp) and from Python."""

from __future__ import annotations

import mmap
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from semantic_cli.backend import buffers, runtime
from semantic_cli.kv import blockfile, fileread
from semantic_cli.kv.blockfile import block_path
from semantic_cli.kv.fileread import file_checksum
from semantic_cli.kv.index import KVIndex
from semantic_cli.kv.layers import CacheSpec
from semantic_cli.kv.store import KVStore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import build_native  # noqa: E402  (where the build looks for xxhash.h)

KV2 = CacheSpec.uniform(("kv", "kv"), heads=2, head_dim=8)  # the geometry `_kv_cache` makes


@pytest.fixture(params=["native", "python"])
def restore_code(request, monkeypatch) -> str:
    """Runs a test with the compiled restore loops and with Python's."""
    if request.param == "python":
        monkeypatch.setenv("SEMANTIC_NATIVE", "0")
    elif buffers.restore_code() != "native":
        pytest.skip("the native restore loops are not built here (scripts/build_native.py --force says why)")
    assert buffers.restore_code() == request.param
    return request.param


def _kv_cache(mx, tokens: int, dtype):
    from mlx_lm.models.cache import KVCache

    c = KVCache()
    c.update_and_fetch(mx.random.normal((1, 2, tokens, 8)).astype(dtype), mx.random.normal((1, 2, tokens, 8)).astype(dtype))
    return c


@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
def test_kv_and_snapshot_layers_come_back_in_their_own_dtype(home, restore_code, dtype_name):
    """numpy has no bfloat16: its bits are stored as uint16 and must come back as bfloat16
    (GPU backends run models, and so caches, in bfloat16)."""
    mx = runtime.mx()
    from mlx_lm.models.cache import RotatingKVCache

    dtype = getattr(mx, dtype_name)
    mx.random.seed(1)
    tokens = 300
    rotating = RotatingKVCache(max_size=32)
    for _ in range(tokens // 30):  # 30 at a time: the window wraps
        rotating.update_and_fetch(mx.random.normal((1, 2, 30, 8)).astype(dtype), mx.random.normal((1, 2, 30, 8)).astype(dtype))
    cache = [_kv_cache(mx, tokens, dtype), rotating, _kv_cache(mx, tokens, dtype)]
    spec = CacheSpec.uniform(("kv", "RotatingKVCache", "kv"), heads=2, head_dim=8, dtype=dtype_name, window=32)
    ids = [(7 * i) % 101 for i in range(tokens)]
    store = KVStore(128, 1 << 40, 0)
    store.persist("a", "fp", spec, ids, cache, protect=set())

    restored = store.restore("a", "fp", spec, ids + [1], capacity=tokens + 1)
    assert restored.tier == "warm" and restored.matched == tokens and restored.warnings == []
    for before, after in zip(cache, restored.cache, strict=False):
        arrays = [(a, b) for a, b in zip(before.state, after.state, strict=False) if isinstance(a, mx.array)]
        assert len(arrays) == 2
        for a, b in arrays:
            assert b.dtype == dtype
            if not isinstance(before, RotatingKVCache):  # past its offset a KVCache's buffer is unused room
                a, b = a[..., :tokens, :], b[..., :tokens, :]
            assert mx.array_equal(a, b).item()
    assert (restored.cache[1].offset, restored.cache[1]._idx, restored.cache[1].max_size) == (
        rotating.offset,
        rotating._idx,
        rotating.max_size,
    )


def test_restored_buffers_hold_the_saved_tokens_and_room_to_grow(home, restore_code):
    mx = runtime.mx()
    cache = [_kv_cache(mx, 300, mx.float32) for _ in range(2)]
    ids = list(range(300))
    store = KVStore(128, 1 << 40, 0)
    store.persist("a", "fp", KV2, ids, cache, protect=set())
    restored = store.restore("a", "fp", KV2, ids + [1], capacity=400)
    for before, after in zip(cache, restored.cache, strict=False):
        assert after.keys.shape[2] >= 400  # room to grow without a copy
        assert mx.array_equal(after.keys[..., :300, :], before.keys[..., :300, :]).item()
        assert after.offset == 300 and mx.array_equal(after.values[..., :300, :], before.values[..., :300, :]).item()


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_a_later_turn_writes_its_new_blocks_from_the_right_tokens(home, dtype_name):
    """A persist copies out only the tokens from the first block it writes (not the whole
    conversation): the blocks a later turn adds must still hold their own tokens' KV."""
    from mlx_lm.models.cache import KVCache

    mx = runtime.mx()
    spec = CacheSpec.uniform(("kv", "kv"), heads=2, head_dim=8, dtype=dtype_name)
    cache = [_kv_cache(mx, 600, getattr(mx, dtype_name)) for _ in range(2)]
    earlier = []  # the same conversation 300 tokens ago
    for c in cache:
        earlier.append(KVCache())
        earlier[-1].update_and_fetch(c.keys[..., :300, :], c.values[..., :300, :])
    ids = list(range(600))
    store = KVStore(128, 1 << 40, 0)
    store.persist("a", "fp", spec, ids[:300], earlier, protect=set())
    stats = store.persist("a", "fp", spec, ids, cache, protect=set())
    assert (stats.blocks_reused, stats.blocks_written) == (2, 2)  # blocks 0-1 were on disk; 2-3 start at token 256
    restored = KVStore(128, 1 << 40, 0).restore("a", "fp", spec, ids + [1], capacity=700)
    assert restored.matched == 600
    for before, after in zip(cache, restored.cache, strict=True):
        assert mx.array_equal(after.keys[..., :600, :], before.keys[..., :600, :]).item()
        assert mx.array_equal(after.values[..., :600, :], before.values[..., :600, :]).item()


def test_empty_arrays_are_separate_writable_buffers_of_the_asked_shapes(restore_code):
    mx = runtime.mx()
    specs = [((2, 3, 5), dtype) for dtype in ("float32", "float16", "int32", "bfloat16", "uint16")] + [((4, 6), "float32")] * 2
    arrays = buffers.empty_arrays(specs)
    assert [(a.shape, a.dtype) for a in arrays] == [(shape, getattr(mx, dtype)) for shape, dtype in specs]
    a, b = arrays[-2:]
    np.asarray(a)[...] = np.arange(24, dtype=np.float32).reshape(4, 6)  # the numpy view is MLX's own buffer
    memoryview(b).cast("B")[:] = bytes(96)
    assert mx.array_equal(a * 2, mx.arange(24, dtype=mx.float32).reshape(4, 6) * 2).item()
    assert mx.array_equal(b, mx.zeros((4, 6))).item()  # each array its own allocation (MLX can update it in place)


def test_setup_builds_the_native_restore_loops_wherever_it_can():
    """`make setup` builds them wherever a C++ compiler, nanobind and xxhash.h are
    installed; `scripts/build_native.py --force` says why it did not."""
    pytest.importorskip("nanobind")
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler here")
    assert buffers.native() is not None
    if build_native.xxhash_include_dir() is not None:
        assert buffers.restore_code() == "native"


def test_native_loops_built_for_another_mlx_are_not_used(monkeypatch):
    native = buffers.native()
    if native is None:
        pytest.skip("the native restore loops are not built here")
    monkeypatch.setattr(native, "mlx_version", "0.0.1")  # as after `pip install -U mlx` without `make native`
    assert buffers.native() is None and buffers.restore_code() == "python"
    assert buffers.empty_arrays([((2, 3), "float32")])[0].shape == (2, 3)


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
def test_a_damaged_block_ends_the_restore_just_before_it(home, restore_code, how):
    mx = runtime.mx()
    cache = [_kv_cache(mx, 300, mx.float32) for _ in range(2)]
    ids = list(range(300))
    store = KVStore(128, 1 << 40, 0)
    store.persist("a", "fp", KV2, ids, cache, protect=set())
    victim = block_path(KVIndex().chain("a")[1])
    data = bytearray(victim.read_bytes())
    if how == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) - 100] ^= 0x40  # in the last array's bytes
        victim.write_bytes(bytes(data))
    restored = store.restore("a", "fp", KV2, ids + [1], capacity=301)
    assert restored.tier == "warm" and restored.matched == 128
    assert any("damaged" in w for w in restored.warnings)
    for before, after in zip(cache, restored.cache, strict=False):
        assert mx.array_equal(after.keys[..., :128, :], before.keys[..., :128, :]).item()
        assert mx.array_equal(after.values[..., :128, :], before.values[..., :128, :]).item()


def _reading(path: Path, read):
    """read(fd) on the file, opened for this call only."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return read(fd)
    finally:
        os.close(fd)


def test_native_reads_match_pythons_bytes_checksum_and_end_of_file(tmp_path):
    native = buffers.native()
    if native is None or not hasattr(native, "Reader"):
        pytest.skip("the native restore loops are not built here")
    payload = np.random.default_rng(3).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()
    path = tmp_path / "f"
    path.write_bytes(b"prefix" + payload)
    sizes = [65536] * 40 + [3_000_000 - 65536 * 40]  # several read groups, one long view

    def read_native(views, streamed_rows=-1):
        def read(fd):
            reader = native.Reader(fileread.GROUP_BYTES, 2, streamed_rows)
            reader.submit(fd, 6, views, b"prefix")
            (result,) = reader.finish()
            return result

        return _reading(path, read)

    views = [memoryview(bytearray(n)) for n in sizes]
    status, native_digest = read_native(views)
    assert status == 0 and b"".join(views) == payload
    views = [memoryview(bytearray(n)) for n in sizes]
    python_digest = _reading(path, lambda fd: fileread._read_hashed(fd, views, b"prefix"))
    assert b"".join(views) == payload
    assert native_digest == python_digest == file_checksum(path, path.stat().st_size)
    # Rows of one big buffer, as a restore hands them over: page-unaligned, with
    # gaps that belong to other blocks, in memory already written (recycled: its rows
    # are copied out of a mapping of the file, where the CPU can) and in fresh
    # anonymous memory (whose pages are mapped before each read); each way forced
    # too (0: always read, 1: always from the mapping). Nothing outside the views may change.
    size = sum(sizes) + 4096 * len(sizes) + 16
    starts = [16 + i * 4096 + sum(sizes[:i]) for i in range(len(sizes))]
    for streamed_rows in (-1, 0, 1):
        recycled = bytearray(b"\xa5" * size)
        fresh = mmap.mmap(-1, size)
        for whole, filler in ((recycled, 0xA5), (fresh, 0)):
            rows = memoryview(whole)
            row_views = [rows[s : s + n] for s, n in zip(starts, sizes, strict=False)]
            assert read_native(row_views, streamed_rows) == (0, python_digest)
            del row_views
            rows.release()
            assert b"".join(whole[s : s + n] for s, n in zip(starts, sizes, strict=False)) == payload
            gaps = [whole[:16]] + [whole[s + n : s + n + 4096] for s, n in zip(starts, sizes, strict=False)]
            assert all(set(gap) == {filler} for gap in gaps)
        fresh.close()
    path.write_bytes(b"prefix" + payload[:-1])  # a file that ends one byte early
    assert read_native([memoryview(bytearray(n)) for n in sizes])[0] == -1
    assert read_native([memoryview(bytearray(n)) for n in sizes], 0)[0] == -1
    with pytest.raises(blockfile.BlockFileError, match="truncated"):
        _reading(path, lambda fd: fileread._read_hashed(fd, [memoryview(bytearray(n)) for n in sizes], b"prefix"))


_CUT_UNDER_THE_MAPPING = """
import faulthandler, mmap, os, sys
faulthandler.enable()  # as under pytest: a SIGBUS handler was there first
from semantic_cli.backend import buffers, runtime
runtime.mx()
native = buffers.native()
fds = []
for i in range(4):
    path = os.path.join(sys.argv[1], str(i))
    with open(path, "wb") as f:
        f.write(b"p" * (1 << 20))
    fds.append(os.open(path, os.O_RDWR))
# Files 1 and 3 end 64 KB into the 1 MB their views want. Their rows are copied out of a
# mapping (forced) on two threads, so a row past the end faults on a reader thread: the
# reader reports those files short, reads the others whole, and the process goes on.
os.ftruncate(fds[1], 64 << 10)
os.ftruncate(fds[3], 64 << 10)
reader = native.Reader(1 << 18, 2, 1)
views = [[memoryview(bytearray(1 << 18)) for _ in range(4)] for _ in fds]
for fd, rows in zip(fds, views):
    reader.submit(fd, 0, rows, b"")
print("reader", [status for status, _ in reader.finish()], flush=True)
print("whole", all(bytes(v) == b"p" * (1 << 18) for i in (0, 2) for v in views[i]), flush=True)
# A SIGBUS that is not the reader's still ends the process (faulthandler, then the default).
m = mmap.mmap(fds[0], 1 << 20, prot=mmap.PROT_READ)
os.ftruncate(fds[0], 0)
m[(1 << 20) - 1]
print("survived", flush=True)
"""


def test_a_file_cut_short_under_its_mapping_is_a_short_read_and_other_faults_still_kill(tmp_path):
    """A file truncated while its rows are copied out of a mapping raises SIGBUS in the
    copy: the reader's handler turns it into "the file ended first" (status -1) on whichever
    thread it lands, and hands every other SIGBUS on, so a real fault elsewhere still ends
    the process."""
    native = buffers.native()
    if native is None or not hasattr(native, "Reader"):
        pytest.skip("the native restore loops are not built here")
    if not native.streamed_reads:
        pytest.skip("rows are never copied out of a mapping here (Linux on x86-64 with AVX2 only)")
    out = subprocess.run([sys.executable, "-c", _CUT_UNDER_THE_MAPPING, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert "reader [0, -1, 0, -1]" in out.stdout, out.stderr[-2000:]
    assert "whole True" in out.stdout
    assert "survived" not in out.stdout
    assert out.returncode == -signal.SIGBUS, (out.returncode, out.stderr[-2000:])
    assert "Bus error" in out.stderr  # faulthandler's report: the handler before ours was called


_KILL_BUS = """
import os, signal, sys
from semantic_cli.backend import buffers, runtime
runtime.mx()
native = buffers.native()
path = os.path.join(sys.argv[1], "f")
with open(path, "wb") as f:
    f.write(b"p" * (1 << 16))
reader = native.Reader(1 << 18, 1, 1)  # the handler is installed over the default one
reader.submit(os.open(path, os.O_RDONLY), 0, [memoryview(bytearray(1 << 16))], b"")
print("reader", reader.finish()[0][0], flush=True)
os.kill(os.getpid(), signal.SIGBUS)
print("survived", flush=True)
"""


def test_a_sigbus_sent_to_the_process_still_ends_it(tmp_path):
    """`kill -BUS` is no fault: returning from the handler would run nothing again, so the
    handler, finding the default action before it, sends the signal again to end the process."""
    native = buffers.native()
    if native is None or not hasattr(native, "Reader") or not native.streamed_reads:
        pytest.skip("rows are never copied out of a mapping here")
    out = subprocess.run([sys.executable, "-c", _KILL_BUS, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert "reader 0" in out.stdout, out.stderr[-2000:]
    assert "survived" not in out.stdout
    assert out.returncode == -signal.SIGBUS


def test_the_native_module_says_whether_it_can_copy_rows_out_of_a_mapping():
    native = buffers.native()
    if native is None:
        pytest.skip("the native restore loops are not built here")
    import platform

    avx2 = "avx2" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    assert native.streamed_reads == (sys.platform == "linux" and platform.machine() == "x86_64" and avx2)


def test_a_block_file_is_written_in_one_writev_and_survives_short_writes(tmp_path, monkeypatch):
    """One writev for a typical block file: the page cache then holds it in large folios,
    which read back faster. A short write (a signal, a disk's last bytes) goes on after
    what it wrote, and a write that makes no progress is an error, not a hang."""
    rows = [np.random.default_rng(i).standard_normal((3, 256, 64)).astype(np.float32) for i in range(60)]
    arrays = [(f"a{i}", "float32", r.shape, [r[h] for h in range(3)]) for i, r in enumerate(rows)]
    calls: list[int] = []
    real = os.writev

    def counted(fd, buffers):
        calls.append(len(buffers))
        return real(fd, buffers)

    monkeypatch.setattr(os, "writev", counted)
    size, checksum = blockfile.write(tmp_path / "one.kv", {"kind": "test"}, arrays)
    assert calls == [181]  # the header and 180 rows, in one call
    assert file_checksum(tmp_path / "one.kv", size) == checksum

    def short(fd, buffers):  # at most 100,000 bytes a call, cut anywhere
        calls.append(len(buffers))
        data = b"".join(bytes(b) for b in buffers)[:100_000]
        return os.write(fd, data)

    calls.clear()
    monkeypatch.setattr(os, "writev", short)
    size2, checksum2 = blockfile.write(tmp_path / "short.kv", {"kind": "test"}, arrays)
    assert len(calls) > 100
    assert (size2, checksum2) == (size, checksum)
    assert (tmp_path / "short.kv").read_bytes() == (tmp_path / "one.kv").read_bytes()
    monkeypatch.setattr(os, "writev", lambda fd, buffers: 0)
    with pytest.raises(OSError, match="no progress"):
        blockfile.write(tmp_path / "stuck.kv", {"kind": "test"}, arrays)
    assert not list(tmp_path.glob("*stuck*")) and sorted(p.name for p in tmp_path.iterdir()) == ["one.kv", "short.kv"]


def test_arrays_without_a_plain_byte_view_are_written_in_c_order(tmp_path):
    """A transposed view (a plain prefill's values) and an empty slice (a tail with no
    partial tokens beside its whole-layer snapshots) are written as their C-order bytes."""
    transposed = np.arange(12, dtype=np.float32).reshape(3, 4).T
    empty = np.arange(8, dtype=np.float32).reshape(2, 4)[2:2]
    path = tmp_path / "odd.kv"
    arrays = [("t", "float32", transposed.shape, [transposed]), ("e", "float32", empty.shape, [empty])]
    _, checksum = blockfile.write(path, {"kind": "test"}, arrays)
    back = np.empty(transposed.shape, np.float32)
    (header,) = fileread.read_files(
        [fileread.FileRead(path, checksum, path.stat().st_size, lambda header: [back.data.cast("B"), memoryview(bytearray())])]
    )
    assert np.array_equal(back, transposed)
    assert [(a["name"], a["shape"], a["nbytes"]) for a in header["arrays"]] == [("t", [4, 3], 48), ("e", [0, 4], 0)]


@pytest.mark.parametrize("damage", [False, True])
def test_a_tail_that_runs_past_the_prompt_gives_the_tokens_they_share(home, restore_code, damage):
    """The same request again, or an undone last message: the tail covers more than the
    prompt. Its shared first tokens are restored; the bytes past them are still checked."""
    from semantic_cli.kv.blockfile import tail_path

    mx = runtime.mx()
    cache = [_kv_cache(mx, 300, mx.float32) for _ in range(2)]
    ids = list(range(300))
    store = KVStore(128, 1 << 40, 0)
    store.persist("a", "fp", KV2, ids, cache, protect=set())  # blocks 0-255, tail 256-299
    if damage:  # a flipped byte in the last array's tokens past the cut: the checksum still sees it
        victim = tail_path(KVIndex().tail("a").file)
        data = bytearray(victim.read_bytes())
        data[len(data) - 4] ^= 0x40
        victim.write_bytes(bytes(data))
    prompt = ids[:280] + [999, 998]  # shares 280 tokens with the cache, then goes its own way
    restored = store.restore("a", "fp", KV2, prompt, capacity=300)
    if damage:
        assert restored.matched == 256 and any("damaged" in w for w in restored.warnings)
        return
    assert restored.tier == "warm" and restored.matched == 280 and restored.warnings == []
    for before, after in zip(cache, restored.cache, strict=False):
        assert after.offset == 280
        assert mx.array_equal(after.keys[..., :280, :], before.keys[..., :280, :]).item()
        assert mx.array_equal(after.values[..., :280, :], before.values[..., :280, :]).item()
    # A prompt that leaves the tail's tokens before their end restores the blocks only up to there.
    moved = ids[:260] + [5] + ids[261:290]
    assert store.restore("a", "fp", KV2, moved, capacity=300).matched == 260


def test_a_tail_is_used_only_after_the_prefix_it_was_computed_on(home, restore_code):
    """A tail's KV depends on every token before it. Another agent's blocks can give a new
    prompt a different prefix of the same length (a persona edit, say) followed by the very
    tokens the tail holds: those must be re-prefilled, not restored."""
    mx = runtime.mx()
    store = KVStore(128, 1 << 40, 0)
    first, other, rest = list(range(128)), list(range(500, 628)), list(range(200, 240))
    store.persist("a", "fp", KV2, first + rest, [_kv_cache(mx, 168, mx.float32) for _ in range(2)], protect=set())
    store.persist("b", "fp", KV2, other + [7], [_kv_cache(mx, 129, mx.float32) for _ in range(2)], protect=set())
    assert store.restore("a", "fp", KV2, first + rest + [1], capacity=200).matched == 168  # its own prefix: the tail serves
    swapped = store.restore("a", "fp", KV2, other + rest + [1], capacity=200)
    assert swapped.matched == 128 and swapped.warnings == []  # b's block, then a re-prefill of the tail's tokens


def test_the_hot_tier_keeps_the_most_recently_used_caches_within_its_budget(home):
    """In-process caches beyond `hot_budget` bytes go least recently used first; one cache
    larger than the whole budget still stays, as the only one."""
    from semantic_cli.kv.layers import cache_nbytes

    mx = runtime.mx()
    caches = {name: [_kv_cache(mx, 40, mx.float32), _kv_cache(mx, 40, mx.float32)] for name in "abcxy"}
    each = cache_nbytes(caches["a"])
    assert each > 0 and all(cache_nbytes(c) == each for c in caches.values())
    store = KVStore(16, 1 << 40, hot_budget=2 * each)
    for name in ("a", "b", "a", "c"):  # "a" used again after "b": "b" is the least recent when "c" comes
        store.keep_hot(name, "fp", list(range(40)), caches[name])
    assert list(store.hot_agents()) == ["a", "c"]
    small = KVStore(16, 1 << 40, hot_budget=each // 2)
    small.keep_hot("x", "fp", list(range(40)), caches["x"])
    assert list(small.hot_agents()) == ["x"]
    small.keep_hot("y", "fp", list(range(40)), caches["y"])
    assert list(small.hot_agents()) == ["y"]
