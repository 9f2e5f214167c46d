"""Taking KV cache files apart and putting crafted ones together, as someone with write
access to the cache directory could: the file and its index row (size, checksum) both."""

from __future__ import annotations

import json
import sqlite3
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import xxhash

from semantic_cli import paths
from semantic_cli.backend import runtime
from semantic_cli.kv import blockfile


def split(data: bytes) -> tuple[dict, bytes]:
    """(header, array bytes) of a well-formed file."""
    (n,) = struct.unpack_from("<I", data, len(blockfile.MAGIC))
    start = len(blockfile.MAGIC) + 4
    prefix = start + n + (-(start + n) % blockfile.ALIGN)
    return json.loads(data[start : start + n]), data[prefix:]


def build(header: dict | bytes, body: bytes) -> bytes:
    """A file of this header (a dict, or raw JSON bytes) and array bytes."""
    head = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    prefix = blockfile.MAGIC + struct.pack("<I", len(head)) + head
    return prefix + b"\0" * (-len(prefix) % blockfile.ALIGN) + body


def checksum(data: bytes) -> str:
    return xxhash.xxh3_64(data).hexdigest()


def index_db() -> sqlite3.Connection:
    return sqlite3.connect(paths.cache_dir(create=False) / "index.db", isolation_level=None)


def set_row(path: Path, data: bytes) -> None:
    """Make the index row of the block or tail file at `path` vouch for `data` (size and checksum)."""
    db = index_db()
    try:
        if path.parent.name == "tails":
            db.execute("UPDATE tails SET nbytes=?, checksum=? WHERE file=?", (len(data), checksum(data), path.name))
        else:
            db.execute("UPDATE blocks SET nbytes=?, checksum=? WHERE hash=?", (len(data), checksum(data), path.stem))
    finally:
        db.close()


def craft(path: Path, edit: Callable[[dict, bytes], tuple[dict | bytes, bytes]]) -> bytes:
    """Rewrite the file at `path` as `edit(header, body)` says, with an index row that vouches for it."""
    header, body = split(path.read_bytes())
    data = build(*edit(header, body))
    path.write_bytes(data)
    set_row(path, data)
    return data


def synthetic_cache(kinds: Iterable[str], chunks: int, chunk: int, window: int, seed: int) -> list[Any]:
    """A random cache for these layer kinds ("kv" or a sliding window of `window`), filled
    `chunk` tokens at a time, `chunks` times: 2 KV heads, head dim 8."""
    mx = runtime.mx()
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    mx.random.seed(seed)
    out: list[Any] = []
    for kind in kinds:
        c = KVCache() if kind == "kv" else RotatingKVCache(max_size=window)
        for _ in range(chunks):
            c.update_and_fetch(mx.random.normal((1, 2, chunk, 8)), mx.random.normal((1, 2, chunk, 8)))
        out.append(c)
    return out
