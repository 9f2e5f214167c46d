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
        digest = _hasher()
        digest.update(prefix)
        for spec in header.get("arrays", []):
            spec = ArraySpec(spec["name"], spec["dtype"], tuple(spec["shape"]), spec["offset"], spec["nbytes"])
            got = 0
            for buf in sink(spec):
                buf = buf.cast("B") if buf.format != "B" else buf
                n = f.readinto(buf)
                if n != len(buf):
                    raise BlockFileError("truncated data")
                digest.update(buf)
                got += n
            if got != spec.nbytes:
                raise BlockFileError(f"array {spec.name} size mismatch")
        if f.read(1):
            raise BlockFileError("trailing bytes")
    if digest.hexdigest() != checksum:
        raise BlockFileError("checksum mismatch")
    return header


def file_checksum(path: Path) -> str:
    digest = _hasher()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
