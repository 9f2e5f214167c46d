"""Reading an agent's block files straight into fresh KV cache buffers.

One buffer per layer for keys and one for values, allocated uninitialised with
room to grow; every block's bytes land in place with one copy out of the page
cache, hashed on the way (blockfile). What a damaged file leaves behind is
reported, never trusted: the caller drops it and re-prefills from there.

Where the time goes (SmolLM2, 2-core dev VM, new process): ~80% of the CPU is
the kernel (page faults on fresh memory, the copy out of the page cache), as in
mlx-lm's own load; the rest is mostly the checksum mlx-lm does not have.
Where semantic_cli/backend/_native.cpp is built, the 60 buffers are allocated in ~0.3 ms
(~7 ms from Python: see buffers.empty_arrays), and each file's reads and xxh3 run
without the GIL (blockfile.read_into): ~7% less wall time at 8K tokens.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backend import buffers, compat, runtime
from . import blockfile
from .blockfile import BlockFileError
from .layers import CacheSpec, from_snapshot

_READERS = min(4, os.cpu_count() or 1)
STEP = 256  # KVCache's growth step: restored buffers get spare capacity in these units


@dataclass(frozen=True)
class CacheFile:
    path: Path
    checksum: str
    start: int  # the first token it covers
    n_tokens: int
    block_hash: str | None  # None for the agent's tail


@dataclass(frozen=True)
class Damage:
    file: CacheFile
    reason: str


@dataclass(frozen=True)
class _Read:
    header: dict | None
    snapshots: dict[str, Any]  # "s{layer}:{key}" -> numpy array, for whole-layer snapshots
    error: str | None = None


def read_cache(spec: CacheSpec, files: list[CacheFile], prompt: list[int], capacity: int) -> tuple[list[Any] | None, int, Damage | None]:
    """The cache the files rebuild (or None), the tokens it covers, and the first damaged file."""
    mx = runtime.mx()
    import numpy as np

    # The buffers' geometry and dtype, from the first file (every read checks its own against them).
    try:
        first = blockfile.header_of(files[0].path)
        geometry = {a["name"]: (a["shape"][0], a["shape"][2], a["dtype"]) for a in first["arrays"]}
    except OSError as exc:
        return None, 0, Damage(files[0], f"cannot open ({exc.strerror})")
    except (BlockFileError, KeyError, TypeError, IndexError, AttributeError) as exc:
        return None, 0, Damage(files[0], f"corrupt header ({exc})")
    names = [f"{kv}{layer}" for layer in spec.kv_layers for kv in "kv"]
    if any(name not in geometry for name in names):
        return None, 0, Damage(files[0], "unexpected layout")
    total = files[-1].start + files[-1].n_tokens
    cap = -(-max(capacity, total) // STEP) * STEP
    # Uninitialised: every byte up to `total` is read into. The spare capacity is left
    # as it is (no page faults now for room a reply may never use): caches never read
    # past their offset, and a test fills it with NaNs to prove it.
    allocated = buffers.empty_arrays([((1, geometry[name][0], cap, geometry[name][1]), geometry[name][2]) for name in names])
    kv_arrays = dict(zip(names, allocated, strict=True))
    token_bytes = {name: geometry[name][1] * np.dtype(geometry[name][2]).itemsize for name in names}
    rows = {name: _head_rows(kv_arrays[name], geometry[name][0], cap * token_bytes[name]) for name in names}  # per head, its bytes

    def read_one(file: CacheFile) -> _Read:
        snapshots: dict[str, Any] = {}
        n, start = file.n_tokens, file.start

        def plan(header: dict) -> list[memoryview]:
            if file.block_hash is not None and header.get("hash") != file.block_hash:
                raise BlockFileError("block name does not match its content")
            if header.get("tokens") != prompt[start : start + n] or header.get("start") != start:
                raise BlockFileError("block tokens do not match")
            views: list[memoryview] = []
            for a in header.get("arrays", []):
                name, shape = a.get("name"), a.get("shape")
                dest = rows.get(name)
                if dest is None:  # a whole-layer snapshot, in the tail
                    dtype = np.dtype(a["dtype"])
                    if int(np.prod(shape)) * dtype.itemsize != a.get("nbytes"):
                        raise BlockFileError(f"array {name} has an unexpected size")
                    buf = np.empty(shape, dtype=dtype)
                    snapshots[name] = buf
                    views.append(buf.data.cast("B"))
                    continue
                heads, dim, dtype = geometry[name]
                # Never let a header steer bytes outside this file's slice of the buffers.
                if shape != [heads, n, dim] or a.get("dtype") != dtype:
                    raise BlockFileError(f"array {name} has an unexpected shape")
                lo, hi = start * token_bytes[name], (start + n) * token_bytes[name]
                views += [row[lo:hi] for row in dest]
            return views

        try:
            return _Read(blockfile.read_into(file.path, file.checksum, plan), snapshots)
        except (BlockFileError, TypeError, ValueError, KeyError, AttributeError) as exc:  # a damaged header may hold anything
            return _Read(None, snapshots, str(exc))

    # Reads and hashing release the GIL: a few threads fault in fresh pages and
    # copy out of the page cache side by side. (The native reads map fresh rows'
    # pages first with MADV_POPULATE_WRITE, ~10% faster at 8K in a new process;
    # from Python, via ctypes, it measured no faster.)
    with ThreadPoolExecutor(max_workers=_READERS) as pool:
        results = list(pool.map(read_one, files))
    snapshots: dict[int, tuple[str, dict[str, Any], dict[str, Any]]] = {}
    matched = 0
    damage = None
    for file, read in zip(files, results, strict=True):
        if read.header is None:
            damage = Damage(file, read.error or "unreadable")
            break
        matched = file.start + file.n_tokens
        for layer_s, snap in (read.header.get("snapshots") or {}).items():
            dtypes = snap.get("dtypes") or {}
            arrays = {}
            for name, v in read.snapshots.items():
                prefix, _, key = name.partition(":")
                if prefix == f"s{layer_s}":
                    arrays[key] = as_dtype(mx, mx.array(v), dtypes.get(key))
            snapshots[int(layer_s)] = (snap["class"], arrays, snap["scalars"])
    if matched == 0 or (spec.snapshot_layers and (matched != total or len(snapshots) != len(spec.snapshot_layers))):
        return None, 0, damage  # whole-layer snapshots only fit at the tail's end
    # The cache's own dtype, where the file holds other bits (bfloat16 is stored as uint16).
    kv_dtype = first.get("kv_dtype")
    cache: list[Any] = []
    for layer, kind in enumerate(spec.kinds):
        if kind == "kv":
            keys, values = (as_dtype(mx, kv_arrays[f"{kv}{layer}"], kv_dtype) for kv in "kv")
            cache.append(compat.restored_kv_cache(keys, values, matched))
        else:
            cache.append(from_snapshot(*snapshots[layer]))
    return cache, matched, damage


def _head_rows(buffer: Any, heads: int, row_bytes: int) -> list[memoryview]:
    whole = memoryview(buffer).cast("B")
    return [whole[h * row_bytes : (h + 1) * row_bytes] for h in range(heads)]


def as_dtype(mx: Any, a: Any, name: Any) -> Any:
    """Reinterpret restored bits as the dtype they were saved from (numpy has no bfloat16)."""
    dtype = getattr(mx, name, None) if isinstance(name, str) else None
    if isinstance(dtype, mx.Dtype) and dtype != a.dtype and dtype.size == a.dtype.size:
        return a.view(dtype)
    return a
