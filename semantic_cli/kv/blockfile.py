"""A KV block or agent tail file, its whole life: where it lives, its format,
writing it, linking, deleting, and finding the files on disk (reading it, which
trusts nothing, is kv/fileread.py).

    b"SMKV1\\n" | u32 header length | header JSON | zero pad to 64 | array bytes...

The header names the block (its chain hash, model fingerprint and token ids)
and lists each array's dtype, shape and offset; a tail's also names its `parent`, the
chain hash of every token before it, since its KV holds only after that prefix (a tail
written before that key existed is not used: its tokens are re-prefilled once). A checksum (xxh3-64 of header
and data) lives in the SQLite index, so a file is trusted only if it matches
what the index says it should be. No pickling anywhere.

Where files live (under the cache dir, private to the user):

    blocks/<hash[:2]>/<hash>.kv     a full block, named by its chain hash (32 hex digits)
    tails/<agent>-<checksum>.kv     an agent's tail, named by its content (a fork's
                                    hard link has its own name, so neither can
                                    overwrite or unlink the other's)
    .tmp-<pid>-*.kv                 a file being written by process <pid>, beside its final name

Names, not paths: every name that comes from the index (a block hash, a tail's
file) or from a directory listing must match one of these patterns before it
is joined to a directory (`BadName` otherwise): nothing outside the cache can be
named, opened, linked or unlinked through the index.

Writing is atomic (temp file, fsync, rename, fsync of the directory): a kill
leaves at most a `.tmp-` file, which `listing` finds. Only this module creates,
renames or unlinks cache files; the index (kv/index.py) decides when.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import faults, paths
from ..store import NAME_RE

MAGIC = b"SMKV1\n"
ALIGN = 64
TEMP_PREFIX = ".tmp-"  # a file still being written (an orphan, if its writer was killed)

# The only names a cache file can have.
BLOCK_RE = re.compile(r"[0-9a-f]{32}")  # a block's chain hash (blake2b, 16 bytes)
TAIL_RE = re.compile(rf"(~?{NAME_RE.pattern})-[0-9a-f]{{16}}\.kv")  # agent name (~name: an API slot), xxh3-64 checksum
TEMP_RE = re.compile(r"\.tmp-(?:([0-9]{1,10})-)?[a-z0-9_]{8}\.kv")  # the writer's pid (older releases wrote none), mkstemp's 8


class BlockFileError(Exception):
    """A block file is missing, truncated, corrupt or not the one expected."""


class BadName(BlockFileError):
    """A name from the index that is not a cache file's name: never joined to a directory."""


def hasher() -> Any:
    import xxhash

    return xxhash.xxh3_64()


Arrays = Iterable[tuple[str, str, tuple[int, ...], Iterable[memoryview]]]  # (name, dtype, shape, chunks)


# ---- where files live ---------------------------------------------------------
def is_block_name(block_hash: Any) -> bool:
    return isinstance(block_hash, str) and BLOCK_RE.fullmatch(block_hash) is not None


def is_tail_name(name: Any) -> bool:
    return isinstance(name, str) and TAIL_RE.fullmatch(name) is not None


def block_path(block_hash: str) -> Path:
    """The path of a block named `block_hash` (BadName if that is not a block's name)."""
    return block_paths([block_hash])[0]


def block_paths(block_hashes: list[str]) -> list[Path]:
    """The paths of these blocks (BadName for a name that is not a block's): a restore names
    dozens, so the directory is looked up once. Creates nothing; `write_block` creates the directories."""
    for block_hash in block_hashes:
        if not is_block_name(block_hash):
            raise BadName(f"not a block name: {block_hash!r}")
    blocks = paths.blocks_dir(create=False)
    return [blocks / block_hash[:2] / f"{block_hash}.kv" for block_hash in block_hashes]


def tails_dir(create: bool = True) -> Path:
    path = paths.cache_dir(create) / "tails"
    if create:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def tail_path(name: str) -> Path:
    """The path of the tail file the index names `name` (BadName if that is not a tail's name)."""
    if not is_tail_name(name):
        raise BadName(f"not a tail file name: {name!r}")
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
    digest = hasher()
    digest.update(prefix)
    # The writer's pid in the name: `cache verify --repair` leaves a live writer's file alone.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=".kv")
    try:
        try:
            views = [memoryview(prefix)] + [c for views in chunks_all for c in views]
            for c in views[1:]:
                digest.update(c)
            _write_all(fd, views)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _discard(tmp)
        raise
    return tmp, len(prefix) + offset, digest.hexdigest()


# Most iovecs one writev takes (POSIX guarantees 16; Linux and macOS take 1,024).
_IOV_MAX = max(16, min(1024, os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 16))


def _write_all(fd: int, views: list[memoryview]) -> None:
    """Write the views in order in as few system calls as the OS allows: a block file in one
    `writev`, so that the page cache holds it in large folios, which read back faster
    (exp-006's 8K restore, 2-core VM: ~48 against ~53 ms; 64 KB writes left 4 KB pages)."""
    pending = [v for v in views if len(v)]
    first = 0
    while first < len(pending):
        written = os.writev(fd, pending[first : first + _IOV_MAX])
        if written == 0:
            raise OSError(errno.EIO, "the write made no progress")
        while written:  # a short write (a signal, a full disk's last bytes): go on after it
            if written >= len(pending[first]):
                written -= len(pending[first])
                first += 1
            else:
                pending[first] = pending[first][written:]
                written = 0


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


# ---- linking, deleting, finding ------------------------------------------------
def link_tail(name: str, agent: str, checksum: str) -> str | None:
    """Give `agent` a hard link to the tail file `name` (instant, no bytes copied):
    the new file name, or None if the file cannot be linked (gone, not a tail's name, or
    a filesystem without hard links)."""
    link = tail_name(agent, checksum)
    try:
        os.link(tail_path(name), tail_path(link), follow_symlinks=False)
    except FileExistsError:
        pass
    except (OSError, BadName):
        return None
    return link


def tail_links(name: str) -> int:
    """How many names the tail file `name` has (a fork's hard links count); 0 if it is gone
    (or `name` is not a tail's name)."""
    try:
        return os.lstat(tail_path(name)).st_nlink
    except (FileNotFoundError, BadName):
        return 0


def remove_block(block_hash: str) -> None:
    """Delete a block's file; nothing if `block_hash` is not a block's name (the index row was damaged)."""
    if is_block_name(block_hash):
        remove_file(block_path(block_hash))


def remove_tail(name: str) -> None:
    """Delete a tail file; nothing if `name` is not a tail's name (the index row was damaged)."""
    if is_tail_name(name):
        remove_file(tail_path(name))


def remove_file(path: Path) -> None:
    """Delete a cache file the index let go; gone already is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@dataclass(frozen=True)
class DiskFile:
    """A directory entry under blocks/ or tails/, found by `listing`."""

    path: str
    kind: str  # "block", "tail", "temp" or "foreign" (a name no cache file has)
    name: str  # the block's hash, the tail's file name, or the entry's name
    size: int
    mtime: float
    pid: int | None  # a temp file's writer, where its name says
    agent: str | None  # a tail's agent
    dir_id: tuple[int, int]  # (st_dev, st_ino) of the directory it was found in
    file_id: tuple[int, int]


def listing() -> list[DiskFile]:
    """Every file under the block and tail directories, classified by its name. Symlinked
    directories are not followed; nothing is opened."""
    out: list[DiskFile] = []
    for root, is_blocks in ((paths.blocks_dir(create=False), True), (tails_dir(create=False), False)):
        if not root.is_dir() or root.is_symlink():
            continue
        for dirpath, _, files, dir_fd in os.fwalk(root, follow_symlinks=False):
            dir_st = os.fstat(dir_fd)
            depth = len(Path(dirpath).relative_to(root).parts)
            for f in files:
                try:
                    st = os.lstat(f, dir_fd=dir_fd)
                except FileNotFoundError:
                    continue
                kind, pid, agent = _classify(f, Path(dirpath).name, depth, is_blocks)
                name = f[:-3] if kind == "block" else f
                out.append(
                    DiskFile(
                        os.path.join(dirpath, f),
                        kind,
                        name,
                        st.st_size,
                        st.st_mtime,
                        pid,
                        agent,
                        (dir_st.st_dev, dir_st.st_ino),
                        (st.st_dev, st.st_ino),
                    )
                )
    return out


def _classify(name: str, parent: str, depth: int, is_blocks: bool) -> tuple[str, int | None, str | None]:
    temp = TEMP_RE.fullmatch(name)
    if temp is not None and depth == (1 if is_blocks else 0):
        return "temp", int(temp.group(1)) if temp.group(1) else None, None
    if is_blocks:
        if depth == 1 and name.endswith(".kv") and is_block_name(name[:-3]) and name[:2] == parent:
            return "block", None, None
    elif depth == 0:
        tail = TAIL_RE.fullmatch(name)
        if tail is not None:
            return "tail", None, tail.group(1)
    return "foreign", None, None


def remove_listed(f: DiskFile) -> None:
    """Unlink a file `listing` found, by its name in the directory it was found in (opened
    without following links, and checked to be that directory), if it is still that file."""
    directory, name = os.path.split(f.path)
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != f.dir_id:
            return
        try:
            entry = os.lstat(name, dir_fd=fd)
        except FileNotFoundError:
            return
        if (entry.st_dev, entry.st_ino) == f.file_id and not stat.S_ISDIR(entry.st_mode):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)


def untracked(block_hashes: Iterable[str], tail_names: Iterable[str]) -> list[DiskFile]:
    """Files on disk that are none of these blocks and tails: temp files, files written
    before the index named them (a write killed midway, or one in progress), and foreign ones."""
    blocks, tails = set(block_hashes), set(tail_names)
    return [f for f in listing() if not ((f.kind == "block" and f.name in blocks) or (f.kind == "tail" and f.name in tails))]


def orphans(block_hashes: Iterable[str], tail_names: Iterable[str]) -> dict[str, int]:
    """Files on disk (path -> size) that are none of these blocks and tails (e.g. a write killed midway)."""
    return {f.path: f.size for f in untracked(block_hashes, tail_names)}
