"""The on-disk format of a KV block or agent tail, written atomically and read in place.

    b"SMKV1\\n" | u32 header length | header JSON | zero pad to 64 | array bytes...

The header names the block (its chain hash, model fingerprint and token ids)
and lists each array's dtype, shape and offset. A checksum (xxh3-64 of header
and data) lives in the SQLite index, so a file is trusted only if it matches
what the index says it should be. No pickling anywhere.

Reading is direct: array bytes go from the file straight into the caller's
preallocated destination buffers (`preadv`), one copy, hashed on the way.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..backend import buffers

MAGIC = b"SMKV1\n"
ALIGN = 64


class BlockFileError(Exception):
    """A block file is missing, truncated, corrupt or not the one expected."""


def _hasher() -> Any:
    import xxhash

    return xxhash.xxh3_64()


def write(path: Path, header: dict, arrays: Iterable[tuple[str, str, tuple[int, ...], Iterable[memoryview]]]) -> tuple[int, str]:
    """Write atomically (temp file, fsync, rename). Each array is given as
    (name, dtype, shape, chunks) where the chunks' bytes concatenate to it.
    Returns (bytes written, checksum)."""
    specs = []
    chunks_all: list[list[memoryview]] = []
    offset = 0
    for name, dtype, shape, chunks in arrays:
        chunks = [memoryview(c).cast("B") for c in chunks]
        nbytes = sum(len(c) for c in chunks)
        specs.append({"name": name, "dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": nbytes})
        chunks_all.append(chunks)
        offset += nbytes
    header = dict(header, arrays=specs)
    head = json.dumps(header, separators=(",", ":")).encode()
    prefix = MAGIC + struct.pack("<I", len(head)) + head
    prefix += b"\0" * (-len(prefix) % ALIGN)
    digest = _hasher()
    digest.update(prefix)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".kv")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(prefix)
            for chunks in chunks_all:
                for c in chunks:
                    f.write(c)
                    digest.update(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return len(prefix) + offset, digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def header_of(path: Path) -> dict:
    """The header of the file at `path` (OSError if it cannot be opened)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _read_header_at(fd)[0]
    finally:
        os.close(fd)


def _read_header_at(fd: int) -> tuple[dict, bytes]:
    """The header of an open file, and the raw bytes before the first array (hashed
    too): one `pread` for a typical file, two for a long header."""
    data = os.pread(fd, _HEAD_READ, 0)
    if data[: len(MAGIC)] != MAGIC:
        raise BlockFileError("not a semantic KV file (bad magic)")
    if len(data) < len(MAGIC) + 4:
        raise BlockFileError("truncated header")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    if n > 16 << 20:
        raise BlockFileError("implausible header length")
    start = len(MAGIC) + 4
    prefix_len = start + n + (-(start + n) % ALIGN)
    if len(data) < prefix_len:
        data = os.pread(fd, prefix_len, 0)
    head = data[start : start + n]
    if len(head) != n:
        raise BlockFileError("truncated header")
    try:
        header = json.loads(head)
    except ValueError as exc:
        raise BlockFileError(f"corrupt header ({exc})") from exc
    if not isinstance(header, dict):
        raise BlockFileError("corrupt header (not an object)")
    return header, data[:prefix_len]  # short if the file ends in the padding: read_into's size check says so


# Arrays are read in groups of about this many bytes: one syscall (one GIL
# release) per group, small enough that its bytes are still in cache when
# hashed. Per-array reads cost ~15% more on the 2-core dev VM, whole-block
# reads (hashed from RAM) ~20% more: GIL hand-offs between reader threads.
GROUP_BYTES = 768 << 10
_HEAD_READ = 64 << 10  # one read covers the magic, header and padding of a typical file


def read_into(path: Path, checksum: str, plan: Callable[[dict], list[memoryview]]) -> dict:
    """Read a file straight into the caller's buffers: `plan(header)` checks the
    header is the one wanted (raising BlockFileError if not) and returns byte
    views whose lengths, in order, cover the file's arrays. The checksum is
    checked last; on any mismatch BlockFileError is raised and the caller must
    discard what was written into its buffers."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise BlockFileError(f"cannot open ({exc.strerror})") from exc
    try:
        size = os.fstat(fd).st_size
        header, prefix = _read_header_at(fd)
        try:
            declared = sum(int(a["nbytes"]) for a in header.get("arrays", []))
        except (KeyError, TypeError, ValueError) as exc:
            raise BlockFileError(f"corrupt header ({exc!r})") from exc
        expected = len(prefix) + declared
        if size != expected:
            raise BlockFileError("truncated data" if size < expected else "trailing bytes")
        views = plan(header)
        if sum(len(v) for v in views) != declared:
            raise BlockFileError("arrays do not add up to the file")
        compiled = buffers.native()
        if compiled is not None and hasattr(compiled, "read_hashed"):
            status, digest = compiled.read_hashed(fd, len(prefix), views, prefix, GROUP_BYTES)  # the same loop, without the GIL
            if status == -1:
                raise BlockFileError("truncated data")
            if status:
                raise OSError(status, os.strerror(status), str(path))
        else:
            digest = _read_hashed(fd, views, prefix)
    finally:
        os.close(fd)
    if digest != checksum:
        raise BlockFileError("checksum mismatch")
    return header


def _read_hashed(fd: int, views: list[memoryview], prefix: bytes) -> str:
    """Scatter-read groups of views, hashing each while it is still in cache; the checksum of prefix + views."""
    digest = _hasher()
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


def file_checksum(path: Path) -> str:
    digest = _hasher()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
