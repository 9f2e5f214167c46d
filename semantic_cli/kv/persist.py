"""Writing a turn's KV cache: the new content-addressed blocks and the agent's tail
(`KVStore.persist` calls it, then enforces the disk budget). Blocks already on disk
are shared, never rewritten; each file is written to a temp name and renamed
(kv/blockfile.py) before its index row commits."""

from __future__ import annotations

import time
from typing import Any

from ..backend import runtime
from . import blockfile
from .blockfile import block_paths
from .failures import CacheUnavailable
from .index import BlockRow, KVIndex, TailRow, chain_hashes
from .layers import CacheSpec, cache_mismatch, snapshot_state
from .stats import PersistStats


def write_cache(
    index: KVIndex, block_tokens: int, agent: str, model: str, spec: CacheSpec, tokens: list[int], cache: list[Any]
) -> PersistStats:
    """Write the full blocks of `cache` (which covers `tokens`) not on disk yet, and its tail
    (the partial block and whole-layer snapshots), and point the agent's index rows at them."""
    mx = runtime.mx()
    import numpy as np

    if not spec.persistable:
        return PersistStats(0, 0, 0)
    mismatch = cache_mismatch(spec, cache, len(tokens))
    if mismatch is not None:  # its files would only ever be found damaged
        raise CacheUnavailable(f"the cache does not match the model's cache spec: {mismatch}")
    B = block_tokens
    hashes = chain_hashes(model, tokens, B)
    existing = index.blocks(hashes)
    on_disk = [h in existing and path.exists() for h, path in zip(hashes, block_paths(hashes), strict=True)]
    # Only the tokens from the first block to write on are copied out of the cache (a
    # turn adds a few tokens to a conversation of thousands: not a copy of all of it).
    first = on_disk.index(False) * B if False in on_disk else len(hashes) * B
    arrays_np: dict[int, tuple[Any, Any]] = {}
    kv_dtype = spec.dtype if spec.kv_layers else None
    for layer in spec.kv_layers:
        c = cache[layer]
        if c.offset != len(tokens):
            raise ValueError(f"cache covers {c.offset} tokens, log has {len(tokens)}")
        k, v = c.keys[..., first : c.offset, :], c.values[..., first : c.offset, :]
        mx.eval(k, v)
        arrays_np[layer] = (_as_numpy(np, mx, k)[0], _as_numpy(np, mx, v)[0])

    def kv_arrays(start: int, end: int) -> list[tuple[str, str, tuple[int, ...], list[memoryview]]]:
        out: list[tuple[str, str, tuple[int, ...], list[memoryview]]] = []
        for layer, (k, v) in arrays_np.items():
            for name, a in ((f"k{layer}", k), (f"v{layer}", v)):
                out.append(
                    (
                        name,
                        a.dtype.name,
                        (a.shape[0], end - start, a.shape[2]),
                        [memoryview(a[h, start - first : end - first]) for h in range(a.shape[0])],
                    )
                )
        return out

    written = reused = nbytes = 0
    parent = model
    for i, h in enumerate(hashes):
        if on_disk[i]:
            reused += 1
        else:
            start = i * B
            header = {
                "kind": "block",
                "hash": h,
                "model": model,
                "parent": parent,
                "start": start,
                "tokens": tokens[start : start + B],
                "kv_dtype": kv_dtype,
            }
            size, checksum = blockfile.write_block(h, header, kv_arrays(start, start + B))
            with index.transaction():
                index.add_block(BlockRow(h, model, parent, B, size, checksum, time.time()))
            written += 1
            nbytes += size
        parent = h
    # The tail: the partial block plus whole-layer snapshots, always rewritten.
    start = len(hashes) * B
    snap_headers: dict[str, dict] = {}
    snap_arrays: list[tuple[str, str, tuple[int, ...], list[memoryview]]] = []
    for layer in spec.snapshot_layers:
        cls, arrays, scalars = snapshot_state(cache[layer])
        snap_headers[str(layer)] = {"class": cls, "scalars": scalars, "dtypes": {key: runtime.dtype_name(a.dtype) for key, a in arrays}}
        for key, a in arrays:
            mx.eval(a)
            npa = np.ascontiguousarray(_as_numpy(np, mx, a))
            snap_arrays.append((f"s{layer}:{key}", npa.dtype.name, npa.shape, [npa.data.cast("B")]))
    tail_row = None
    if start < len(tokens) or snap_arrays:
        header = {
            "kind": "tail",
            "agent": agent,
            "model": model,
            "parent": parent,  # the chain hash of every token before `start`: its KV depends on them
            "start": start,
            "tokens": tokens[start:],
            "snapshots": snap_headers,
            "kv_dtype": kv_dtype,
        }
        name, size, checksum = blockfile.write_tail(agent, header, kv_arrays(start, len(tokens)) + snap_arrays)
        tail_row = TailRow(agent, model, start, len(tokens) - start, name, size, checksum, time.time())
        nbytes += size
    index.set_agent_cache(agent, model, hashes, tail_row)
    return PersistStats(nbytes, written, reused)


def _as_numpy(np: Any, mx: Any, a: Any) -> Any:
    if a.dtype == mx.bfloat16:  # numpy has no bfloat16: move the raw bits
        a = a.view(mx.uint16)
        mx.eval(a)
    return np.asarray(a)
