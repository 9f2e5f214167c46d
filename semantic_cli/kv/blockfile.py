"""A KV block or agent tail file, its whole life: where it lives, its format,
writing it, reading it, linking, deleting, and finding the files on disk.

    b"SMKV1\\n" | u32 header length | header JSON | zero pad to 64 | array bytes...

The header names the block (its chain hash, model fingerprint and token ids)
and lists each array's dtype, shape and offset. A checksum (xxh3-64 of header
and data) lives in the SQLite index, so a file is trusted only if it matches
what the index says it should be. No pickling anywhere.

Where files live (under the cache dir, private to the user):

    blocks/<hash[:2]>/<hash>.kv     a full block, named by its chain hash
    tails/<agent>-<checksum>.kv     an agent's tail, named by its content (a fork's
                                    hard link has its own name, so neither can
                                    overwrite or unlink the other's)
    .tmp-*.kv                       a file being written, beside its final name

Writing is atomic (temp file, fsync, rename, fsync of the directory): a kill
leaves at most a `.tmp-` file, which `orphans` finds. Reading is direct: array
bytes go from the file straight into the caller's preallocated destination
buffers (`preadv`), one copy, hashed on the way. Only this module creates,
renames or unlinks cache files; the index (kv/index.py) decides when.
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

from .. import faults, paths
from ..backend import buffers

MAGIC = b"SMKV1\n"
ALIGN = 64
TEMP_PREFIX = ".tmp-"  # a file still being written (an orphan, if its writer was killed)


class BlockFileError(Exception):
    """A block file is missing, truncated, corrupt or not the one expected."""


def _hasher() -> Any:
    import xxhash

    return xxhash.xxh3_64()


Arrays = Iterable[tuple[str, str, tuple[int, ...], Iterable[memoryview]]]  # (name, dtype, shape, chunks)


# ---- where files live ---------------------------------------------------------
def block_path(block_hash: str) -> Path:
    # Creates nothing (a restore names dozens of blocks); `write_block` creates the directories.
    return paths.blocks_dir(create=False) / block_hash[:2] / f"{block_hash}.kv"


def tails_dir() -> Path:
    path = paths.cache_dir() / "tails"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def tail_path(name: str) -> Path:
    """The path of the tail file the index names `name`."""
    return tails_dir() / name


def tail_name(agent: str, checksum: str) -> str:
    return f"{agent}-{checksum}.kv"


# ---- writing ------------------------------------------------------------------
def write_block(block_hash: str, header: dict, arrays: Arrays) -> tuple[int, str]:
    """Write a full block under its name; returns (bytes written, checksum)."""
    paths.blocks_dir()  # private (0700) before any block file is written under it
    path = block_path(block_hash)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp, size, checksum = _write_temp(path.parent, header, arrays)
    faults.point("after-block-temp-write")
    _commit(tmp, path)
    faults.point("after-block-rename")
    return size, checksum


def write_tail(agent: str, header: dict, arrays: Arrays) -> tuple[str, int, str]:
    """Write an agent's tail under a name its checksum completes; returns (file name, bytes, checksum).
    A tail of the same agent and content is replaced by an identical file."""
    tmp, size, checksum = _write_temp(tails_dir(), header, arrays)
    name = tail_name(agent, checksum)
    _commit(tmp, tail_path(name))
    faults.point("after-tail-rename")
    return name, size, checksum


def write(path: Path, header: dict, arrays: Arrays) -> tuple[int, str]:
    """Write atomically (temp file, fsync, rename). Each array is given as
    (name, dtype, shape, chunks) where the chunks' bytes concatenate to it.
    Returns (bytes written, checksum)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp, size, checksum = _write_temp(path.parent, header, arrays)
    _commit(tmp, path)
    return size, checksum


def _write_temp(directory: Path, header: dict, arrays: Arrays) -> tuple[str, int, str]:
    """The file written and fsynced under a temp name in `directory`: (temp path, bytes, checksum)."""
    specs = []
    chunks_all: list[list[memoryview]] = []
    offset = 0
    for name, dtype, shape, chunks in arrays:
        views = [_byte_view(c) for c in chunks]
        nbytes = sum(len(c) for c in views)
        specs.append({"name": name, "dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": nbytes})
        chunks_all.append(views)
        offset += nbytes
    header = dict(header, arrays=specs)
    head = json.dumps(header, separators=(",", ":")).encode()
    prefix = MAGIC + struct.pack("<I", len(head)) + head
    prefix += b"\0" * (-len(prefix) % ALIGN)
    digest = _hasher()
    digest.update(prefix)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix=".kv")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(prefix)
            for views in chunks_all:
                for c in views:
                    f.write(c)
                    digest.update(c)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _discard(tmp)
        raise
    return tmp, len(prefix) + offset, digest.hexdigest()


def _byte_view(chunk: Any) -> memoryview:
    """The chunk's bytes in C order: a view where one exists, else a copy (`cast` refuses a
    transposed view, as a plain prefill's values are, and an empty slice, as a tail with no
    partial tokens beside its whole-layer snapshots has)."""
    view = memoryview(chunk)
    try:
        return view.cast("B")
    except TypeError:
        return memoryview(view.tobytes())


def _commit(tmp: str, path: Path) -> None:
    """Rename a written temp file into place, durably."""
    try:
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    _fsync_dir(path.parent)


def _discard(tmp: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


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


# ---- linking, deleting, finding ------------------------------------------------
def link_tail(name: str, agent: str, checksum: str) -> str | None:
    """Give `agent` a hard link to the tail file `name` (instant, no bytes copied):
    the new file name, or None if the file cannot be linked (gone, or a filesystem
    without hard links)."""
    link = tail_name(agent, checksum)
    try:
        os.link(tail_path(name), tail_path(link))
    except FileExistsError:
        pass
    except OSError:
        return None
    return link


def tail_links(name: str) -> int:
    """How many names the tail file `name` has (a fork's hard links count); 0 if it is gone."""
    try:
        return os.stat(tail_path(name)).st_nlink
    except FileNotFoundError:
        return 0


def remove_block(block_hash: str) -> None:
    remove_file(block_path(block_hash))


def remove_tail(name: str) -> None:
    remove_file(tail_path(name))


def remove_file(path: Path) -> None:
    """Delete a cache file (an orphan found by `orphans`, or one the index let go); gone already is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def disk_files() -> dict[str, int]:
    """Every file under the block and tail directories: path -> size."""
    out: dict[str, int] = {}
    for root in (paths.blocks_dir(), tails_dir()):
        for dirpath, _, files in os.walk(root):
            for f in files:
                p = os.path.join(dirpath, f)
                with contextlib.suppress(FileNotFoundError):
                    out[p] = os.stat(p).st_size
    return out


def orphans(block_hashes: Iterable[str], tail_names: Iterable[str]) -> dict[str, int]:
    """Files on disk (path -> size) that are none of these blocks and tails (e.g. a write killed midway)."""
    known = {str(block_path(h)) for h in block_hashes} | {str(tail_path(n)) for n in tail_names}
    return {p: n for p, n in disk_files().items() if p not in known}
