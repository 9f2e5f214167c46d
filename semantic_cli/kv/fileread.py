"""Reading a KV block or tail file (whose format and life are in kv/blockfile.py), trusting nothing.

A file is opened with O_NOFOLLOW | O_NONBLOCK and must be a regular file of exactly
the size the index records before a byte is read (a symlink, FIFO or device is
damage, never a hang); its header is parsed within a bound, and any failure to
parse it is a BlockFileError. Array bytes go from the file straight into the
caller's preallocated destination buffers, one copy, hashed on the way: natively, all of
a restore's files in one call, where backend/_native.cpp is built (`preadv` into fresh
memory; rows whose memory is mapped already are copied out of a mapping of the file, a
file cut short under it being a short read), else `preadv` from Python.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backend import buffers
from .blockfile import ALIGN, MAGIC, BlockFileError, hasher


def open_regular(path: Path, size: int | None) -> int:
    """A read descriptor of the cache file at `path`, which must be a regular file (of
    `size` bytes, where given): never through a symlink, never blocking on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise BlockFileError(f"cannot open ({exc.strerror})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BlockFileError("not a regular file")
        if size is not None and st.st_size != size:
            raise BlockFileError(f"{st.st_size} bytes, the index says {size}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def header_of(path: Path, size: int | None = None, limit: int | None = None) -> dict:
    """The header of the file at `path` (BlockFileError if it cannot be opened or parsed)."""
    fd = open_regular(path, size)
    try:
        return _read_header_at(fd, os.fstat(fd).st_size, limit)[0]
    finally:
        os.close(fd)


HEADER_LIMIT = 16 << 20  # no header is longer (a block of 256 tokens has ~5 KB)


def header_limit(n_tokens: int, n_layers: int) -> int:
    """The longest header a file of `n_tokens` tokens and `n_layers` layers can have: its
    token ids (<= 12 bytes each in JSON) and per layer its arrays and snapshot, with room."""
    return min(HEADER_LIMIT, (64 << 10) + 16 * max(0, n_tokens) + 2048 * max(0, n_layers))


def _read_header_at(fd: int, size: int, limit: int | None = None) -> tuple[dict, bytes]:
    """The header of an open file of `size` bytes, and the raw bytes before the first array
    (hashed too): one `pread` for a typical file, two for a long header. Any failure to
    parse it (deep nesting, bad UTF-8, a header longer than `limit`) is a BlockFileError."""
    data = os.pread(fd, min(_HEAD_READ, size), 0)
    if data[: len(MAGIC)] != MAGIC:
        raise BlockFileError("not a semantic KV file (bad magic)")
    if len(data) < len(MAGIC) + 4:
        raise BlockFileError("truncated header")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    if n > (HEADER_LIMIT if limit is None else limit) or start + n > size:
        raise BlockFileError("implausible header length")
    prefix_len = min(size, start + n + (-(start + n) % ALIGN))
    if len(data) < prefix_len:
        data = os.pread(fd, prefix_len, 0)
    head = data[start : start + n]
    if len(head) != n:
        raise BlockFileError("truncated header")
    try:
        header = json.loads(head)
    except Exception as exc:  # ValueError, RecursionError (deep nesting), MemoryError: a damaged file
        raise BlockFileError(f"corrupt header ({type(exc).__name__})") from exc
    if not isinstance(header, dict):
        raise BlockFileError("corrupt header (not an object)")
    return header, data[:prefix_len]  # short if the file ends in the padding: the size check says so


# Arrays are read in groups of about this many bytes, each hashed right after its
# read while still in cache (8K-token SmolLM2 restore, 2-core VM: 256 KB groups
# ~10% faster than 768 KB; per-array reads cost more syscalls).
GROUP_BYTES = 256 << 10
_HEAD_READ = 64 << 10  # one read covers the magic, header and padding of a typical file
# The kernel's copy out of the page cache scales with cores. (POSIX_FADV_WILLNEED on every
# file first, from a dropped page cache at 4K tokens, made the restore slower: 0.158 s
# against 0.123 s, p50 of 6 alternating. The native reads map fresh rows' pages first with
# MADV_POPULATE_WRITE, ~10% faster at 8K in a new process; from Python, via ctypes, it
# measured no faster.)
READERS = min(4, os.cpu_count() or 1)
_OPEN_AT_ONCE = 64  # files held open by one native Reader: well under any descriptor limit


@dataclass(frozen=True)
class FileRead:
    """A cache file to read straight into the caller's buffers: it must be a regular file
    of `size` bytes (what the index records) whose checksum is `checksum`; `plan(header)`
    checks the header is the one wanted (raising if not) and returns byte views whose
    lengths, in order, cover the file's arrays."""

    path: Path
    checksum: str
    size: int
    plan: Callable[[dict], list[memoryview]]
    limit: int | None = None  # the longest header it may have (header_limit)


def read_files(reads: Sequence[FileRead]) -> list[dict | Exception]:
    """Read each file into its planned views, checksum checked: its header, or the exception
    (from the file or its plan) that marks it damaged. The list ends at the first damaged
    file, whose views the caller must discard; the files after it are not read.

    Natively (backend/_native.cpp) each file's header is read and planned here, then its
    reads and hashing run on one of READERS threads without the GIL while the next file
    is planned; else a Python thread per file runs the same loop."""
    compiled = buffers.native()
    if compiled is None or not hasattr(compiled, "Reader"):
        with ThreadPoolExecutor(max_workers=READERS) as pool:
            results = list(pool.map(_read_one, reads))
        return _upto_damage(results)
    out: list[dict | Exception] = []
    for first in range(0, len(reads), _OPEN_AT_ONCE):
        batch = reads[first : first + _OPEN_AT_ONCE]
        reader = compiled.Reader(GROUP_BYTES, READERS)
        headers: list[dict] = []
        failure: Exception | None = None
        opened: list[int] = []
        try:
            for read in batch:
                try:
                    fd = open_regular(read.path, read.size)
                    opened.append(fd)
                    header, prefix, views = _planned(fd, read)
                    reader.submit(fd, len(prefix), views, prefix)  # read on a reader thread while the next is planned
                except Exception as exc:  # a damaged file may hold anything: whatever the plan raises, it is damaged
                    failure = exc
                    break
                headers.append(header)
            done = reader.finish()
        finally:
            reader.abort()  # finish() never reached: no thread reads a file after it is closed
            for fd in opened:
                os.close(fd)
        for read, header, (status, digest) in zip(batch, headers, done, strict=False):
            error = _status_error(status) or (BlockFileError("checksum mismatch") if digest != read.checksum else None)
            out.append(error or header)
            if error:
                return out
        if failure is not None:
            return [*out, failure]
    return out


def _read_one(read: FileRead) -> dict | Exception:
    try:
        fd = open_regular(read.path, read.size)
        try:
            header, prefix, views = _planned(fd, read)
            digest = _read_hashed(fd, views, prefix)
        finally:
            os.close(fd)
    except Exception as exc:  # whatever a damaged file (or its plan) raises, it is damaged
        return exc
    return header if digest == read.checksum else BlockFileError("checksum mismatch")


def _upto_damage(results: list[dict | Exception]) -> list[dict | Exception]:
    for i, result in enumerate(results):
        if isinstance(result, Exception):
            return results[: i + 1]
    return results


def _planned(fd: int, read: FileRead) -> tuple[dict, bytes, list[memoryview]]:
    """The open file's header, the bytes before its first array, and the views its plan
    gives, which must cover the rest of the file exactly."""
    header, prefix = _read_header_at(fd, read.size, read.limit)
    views = read.plan(header)
    if len(prefix) + sum(map(len, views)) != read.size:
        raise BlockFileError("arrays do not add up to the file")
    return header, prefix, views


def _status_error(status: int) -> BlockFileError | None:
    if status == -1:
        return BlockFileError("truncated data")
    return BlockFileError(f"cannot read ({os.strerror(status)})") if status else None


def _read_hashed(fd: int, views: list[memoryview], prefix: bytes) -> str:
    """Scatter-read groups of views, hashing each while it is still in cache; the checksum of prefix + views."""
    digest = hasher()
    digest.update(prefix)
    pos, first, group_bytes = len(prefix), 0, 0
    for i, v in enumerate(views):
        group_bytes += len(v)
        if group_bytes >= GROUP_BYTES or i + 1 - first == _IOV_MAX or i + 1 == len(views):
            pos = _read_group(fd, views[first : i + 1], pos, digest)
            first, group_bytes = i + 1, 0
    return digest.hexdigest()


_IOV_MAX = 1024


def _read_group(fd: int, views: list[memoryview], pos: int, digest: Any) -> int:
    want = sum(len(b) for b in views)
    got = os.preadv(fd, views, pos)
    if got < want and (got <= 0 or not _finish_short_read(fd, views, pos, got)):  # short reads: the file shrank, signals
        raise BlockFileError("truncated data")
    for b in views:
        digest.update(b)
    return pos + want


def _finish_short_read(fd: int, batch: list[memoryview], pos: int, done: int) -> bool:
    """Continue a short preadv buffer by buffer; False if the file ends first."""
    offset = 0
    for b in batch:
        end = offset + len(b)
        if end > done:
            start = max(0, done - offset)
            while start < len(b):
                n = os.preadv(fd, [b[start:]], pos + offset + start)
                if n <= 0:
                    return False
                start += n
        offset = end
    return True


def file_checksum(path: Path, size: int) -> str:
    """The checksum of the cache file at `path`, which must be a regular file of `size`
    bytes (BlockFileError if not): at most `size` bytes are read."""
    digest = hasher()
    fd = open_regular(path, size)
    try:
        left = size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 22))
            if not chunk:
                raise BlockFileError("truncated data")
            digest.update(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()
