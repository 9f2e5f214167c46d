"""The on-disk format of a KV block or agent tail, written atomically and read in place.

    b"SMKV1\\n" | u32 header length | header JSON | zero pad to 64 | array bytes...

The header names the block (its chain hash, model fingerprint and token ids)
and lists each array's dtype, shape and offset. A checksum (xxh3-64 of header
and data) lives in the SQLite index, so a file is trusted only if it matches
what the index says it should be. No pickling anywhere.

Reading is direct: array bytes go from the file straight into the caller's
preallocated destination buffers (`readinto`), one copy, hashed on the way.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

MAGIC = b"SMKV1\n"
ALIGN = 64


class BlockFileError(Exception):
    """A block file is missing, truncated, corrupt or not the one expected."""


@dataclass(frozen=True)
class ArraySpec:
    name: str
    dtype: str  # numpy dtype string, e.g. "float32", "bfloat16" stored as "uint16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


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
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return len(prefix) + offset, digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_header(f: Any) -> tuple[dict, bytes]:
    magic = f.read(len(MAGIC))
    if magic != MAGIC:
        raise BlockFileError("not a semantic KV file (bad magic)")
    raw_len = f.read(4)
    if len(raw_len) != 4:
        raise BlockFileError("truncated header")
    (n,) = struct.unpack("<I", raw_len)
    if n > 16 << 20:
        raise BlockFileError("implausible header length")
    head = f.read(n)
    if len(head) != n:
        raise BlockFileError("truncated header")
    try:
        header = json.loads(head)
    except ValueError as exc:
        raise BlockFileError(f"corrupt header ({exc})")
    prefix = MAGIC + raw_len + head
    pad = -len(prefix) % ALIGN
    prefix += f.read(pad)
    return header, prefix


Sink = Callable[[ArraySpec], Iterable[memoryview]]


def read_into(path: Path, checksum: str, expect: Callable[[dict], None], sink: Sink) -> dict:
    """Read a file, sending each array's bytes into the buffers `sink(spec)`
    returns (whose lengths add up to the array's nbytes). `expect(header)`
    raises BlockFileError if the header is not the block wanted. The checksum
    is checked last; on any mismatch BlockFileError is raised and the caller
    must discard what was written into its buffers."""
    try:
        f = open(path, "rb", buffering=0)
    except OSError as exc:
        raise BlockFileError(f"cannot open ({exc.strerror})")
    with f:
        header, prefix = read_header(f)
        expect(header)
        # Scatter-read each array straight into its destination buffers, one
        # syscall per array, hashing it while it is still in the L2 cache
        # (hashing a whole file after reading it costs 4x as much).
        digest = _hasher()
        digest.update(prefix)
        fd, pos = f.fileno(), len(prefix)
        for raw in header.get("arrays", []):
            spec = ArraySpec(raw["name"], raw["dtype"], tuple(raw["shape"]), raw["offset"], raw["nbytes"])
            views = [b if b.format == "B" else b.cast("B") for b in sink(spec)]
            want = sum(len(b) for b in views)
            if want != spec.nbytes or len(views) > _IOV_MAX:
                raise BlockFileError(f"array {spec.name} size mismatch")
            got = os.preadv(fd, views, pos)
            if got < want and (got <= 0 or not _finish_short_read(fd, views, pos, got)):  # short reads: near EOF, signals
                raise BlockFileError("truncated data")
            for b in views:
                digest.update(b)
            pos += want
        if os.pread(fd, 1, pos):
            raise BlockFileError("trailing bytes")
    if digest.hexdigest() != checksum:
        raise BlockFileError("checksum mismatch")
    return header


_IOV_MAX = 1024


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
