"""Timing turns for the benchmarks: in this process, or as a real `semantic chat` process.

Benchmarks run in a scratch SEMANTIC_HOME (`scratch_home`). A turn in a new process
is timed end to end around the process and reports its own TTFT in its JSON; the KV
cache files can be dropped from the page cache first, for a read from disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .. import paths
from ..chat import Chat, GenSettings, TurnRecorded
from ..events import TokenEvent, TurnDone

QUESTION = "In one word: is this about caching?"


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
    """Wall time from the turn's start (restore included) to its first token, in this process."""
    agent = chat.open_agent(name, model, system)
    t0 = time.perf_counter()
    pending = chat.prepare(agent, text, GenSettings(max_tokens=max_tokens))
    first = None
    rec = None
    for ev in chat.run([pending]):
        if first is None and isinstance(ev, TokenEvent | TurnDone):
            first = time.perf_counter()
        if isinstance(ev, TurnRecorded):
            rec = ev
    assert first is not None and rec is not None
    return first - t0, rec


def semantic_command() -> list[str]:
    """How to start `semantic` in a new process with this interpreter."""
    return [sys.executable, "-m", "semantic_cli"]


def cli_turn(name: str, model: str) -> dict[str, Any]:
    """One greedy one-token turn as a new `semantic chat --json` process: its JSON plus `wall_s`."""
    command = [*semantic_command(), "chat", "-a", name, "--model", model, "-m", QUESTION, "--max-tokens", "1", "--temp", "0", "--json"]
    t = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, check=False, timeout=3600)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"semantic chat failed ({out.returncode}): {out.stderr.strip()[-400:]}")
    record = json.loads(out.stdout)
    record["wall_s"] = wall
    return record


def evict(name: str) -> None:
    out = subprocess.run([*semantic_command(), "cache", "evict", name, "--yes"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"semantic cache evict failed: {out.stderr.strip()}")


def _cache_files() -> list[str]:
    return [os.path.join(root, f) for root, _, files in os.walk(paths.cache_dir()) for f in files]


def drop_page_cache() -> tuple[bool, int]:
    """Ask the kernel to drop every KV cache file from the page cache, and check that it did
    (`resident_bytes`): (dropped, bytes named). False where the platform has no
    posix_fadvise, or the kernel kept the pages (a tmpfs home, say)."""
    if not hasattr(os, "posix_fadvise"):
        return False, 0
    total = 0
    for path in _cache_files():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    resident = resident_bytes()
    return resident is not None and resident <= total // 20, total


def resident_bytes() -> int | None:
    """How many bytes of the cache files are in the page cache now (mincore), or None where it cannot be asked."""
    import ctypes
    import ctypes.util
    import mmap

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mincore = libc.mincore
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    total = 0
    for path in _cache_files():
        size = os.path.getsize(path)
        if size == 0:
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
            pages = -(-size // page)
            vec = (ctypes.c_ubyte * pages)()
            anchor = ctypes.c_char.from_buffer(mapped)  # the mapping's address; touches no page
            try:
                if mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) != 0:
                    return None
            finally:
                del anchor
            total += sum(b & 1 for b in vec) * page
    return total


def disk_read_seconds() -> tuple[float, int] | None:
    """Read every cache file once from disk, after dropping them from the page cache: the
    seconds and bytes, the disk's speed here; None (nothing read) where the drop failed."""
    if not drop_page_cache()[0]:
        return None
    total = 0
    t = time.perf_counter()
    for root, _, files in os.walk(paths.cache_dir()):
        for f in files:
            with open(os.path.join(root, f), "rb", buffering=0) as fh:
                while chunk := fh.read(1 << 20):
                    total += len(chunk)
    return time.perf_counter() - t, total
