"""Persisting agents' KV caches as content-addressed blocks, and restoring them.

Tiers: hot (caches held in this process, LRU under a byte budget), warm
(block files on disk), cold (transcript only). A block is named by a chain
hash of (model fingerprint, parent hash, its token ids), so equal prefixes
are stored once and a different model can never match. After a turn only new
full blocks and the agent's tail (partial block + whole-layer snapshots) are
written. Anything unreadable is dropped and re-prefilled: never trusted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .. import paths
from ..backend import runtime
from . import blockfile
from .blockfile import BlockFileError
from .index import BlockRow, KVIndex, TailRow, block_name, block_path, tails_dir
from .layers import CacheSpec, cache_nbytes, snapshot_state
from .restore import CacheFile, read_cache


def chain_hashes(model_fp: str, tokens: list[int], block_tokens: int) -> list[str]:
    out, parent = [], model_fp
    for i in range(len(tokens) // block_tokens):
        parent = block_name(model_fp, parent, tokens[i * block_tokens : (i + 1) * block_tokens])
        out.append(parent)
    return out


@dataclass
class Restored:
    cache: list[Any] | None
    matched: int
    tier: str  # "hot" | "warm" | "cold"
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PersistStats:
    bytes_written: int
    blocks_written: int
    blocks_reused: int


@dataclass
class _Hot:
    model: str
    tokens: list[int]
    cache: list[Any]
    nbytes: int


class KVStore:
    def __init__(self, block_tokens: int, disk_budget: int, hot_budget: int) -> None:
        self.block_tokens = block_tokens
        self.disk_budget = disk_budget
        self.hot_budget = hot_budget
        self._index: KVIndex | None = None
        self._hot: OrderedDict[str, _Hot] = OrderedDict()

    @property
    def index(self) -> KVIndex:
        # Opened on first use: a cache dir that cannot be opened (full disk, bad
        # permissions) must cost a re-prefill, not the conversation.
        if self._index is None:
            self._index = KVIndex()
        return self._index

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None

    # ---- hot tier -----------------------------------------------------
    def keep_hot(self, agent: str, model: str, tokens: list[int], cache: list[Any]) -> None:
        self._hot.pop(agent, None)
        self._hot[agent] = _Hot(model, list(tokens), cache, cache_nbytes(cache))
        while sum(h.nbytes for h in self._hot.values()) > self.hot_budget and len(self._hot) > 1:
            self._hot.popitem(last=False)

    def drop_hot(self, agent: str) -> None:
        self._hot.pop(agent, None)

    def hot_agents(self) -> dict[str, int]:
        return {a: len(h.tokens) for a, h in self._hot.items()}

    # ---- restore ------------------------------------------------------
    def restore(self, agent: str, model: str, spec: CacheSpec, prompt: list[int], capacity: int) -> Restored:
        """The longest usable cached prefix of `prompt` (always leaving one token to process)."""
        limit = len(prompt) - 1
        hot = self._hot.get(agent)
        if hot is not None and hot.model == model and 0 < len(hot.tokens) <= limit and prompt[: len(hot.tokens)] == hot.tokens:
            self._hot.move_to_end(agent)
            return Restored(hot.cache, len(hot.tokens), "hot")
        if limit <= 0 or not spec.persistable:
            return Restored(None, 0, "cold")
        warnings: list[str] = []
        stale = self.index.chain_model(agent)
        if stale is not None and stale != model:
            warnings.append("the model changed since this agent's cache was written: re-prefilling (old blocks are now evictable)")
        hashes = chain_hashes(model, prompt[:limit], self.block_tokens)
        rows = self.index.blocks(hashes)
        n_blocks = 0
        while n_blocks < len(hashes) and hashes[n_blocks] in rows:
            n_blocks += 1
        tail = self.index.tail(agent)
        start = n_blocks * self.block_tokens
        tail_ok = (
            tail is not None
            and tail.model == model
            and tail.start == start
            and start + tail.n_tokens <= limit
            and (tail.n_tokens > 0 or spec.snapshot_layers)
        )
        if tail_ok and not self._tail_matches(tail, prompt):  # type: ignore[arg-type]
            tail_ok = False  # the conversation moved on (persona change, reset): stale, not damaged
        if spec.snapshot_layers and not tail_ok:
            return Restored(None, 0, "cold", warnings)  # whole-layer snapshots only fit at the tail's end
        if n_blocks == 0 and not tail_ok:
            return Restored(None, 0, "cold", warnings)
        try:
            cache, matched, read_warnings = self._read(spec, hashes[:n_blocks], rows, tail if tail_ok else None, agent, capacity, prompt)
        except OSError as exc:
            return Restored(None, 0, "cold", warnings + [f"KV cache unreadable ({exc.strerror}): re-prefilling"])
        warnings += read_warnings
        if matched == 0:
            return Restored(None, 0, "cold", warnings)
        # Last use is recorded when the turn ends (`persist`, `mark_used`): a commit here
        # would sit between the restore and the first token.
        return Restored(cache, matched, "warm", warnings)

    def mark_used(self, agent: str) -> None:
        """Record a use of the agent's cache by a turn that ended without persisting (interrupted)."""
        self.index.touch(agent, self.index.chain(agent))

    def _tail_matches(self, tail: TailRow, prompt: list[int]) -> bool:
        """Whether the tail covers these tokens (its header says; damage is found on the full read)."""
        try:
            header = blockfile.header_of(tails_dir() / tail.file)
        except (OSError, BlockFileError):
            return True  # let the full read find it, drop it and say so
        return header.get("tokens") == prompt[tail.start : tail.start + tail.n_tokens]

    def _read(
        self,
        spec: CacheSpec,
        hashes: list[str],
        rows: dict[str, BlockRow],
        tail: TailRow | None,
        agent: str,
        capacity: int,
        prompt: list[int],
    ) -> tuple[list[Any] | None, int, list[str]]:
        B = self.block_tokens
        files = [CacheFile(block_path(h), rows[h].checksum, i * B, B, h) for i, h in enumerate(hashes)]
        if tail is not None:
            files.append(CacheFile(tails_dir() / tail.file, tail.checksum, tail.start, tail.n_tokens, None))
        cache, matched, damage = read_cache(spec, files, prompt, capacity)
        if damage is None:
            return cache, matched, []
        if damage.file.block_hash is not None:
            self._drop_block(damage.file.block_hash)
        else:
            self.index.drop_tail(agent)
        return cache, matched, [f"a cached KV block was damaged ({damage.reason}) and was dropped: re-prefilling from there"]

    def _drop_block(self, block_hash: str) -> None:
        with self.index.transaction():
            self.index.drop_block(block_hash)

    # ---- persist ------------------------------------------------------
    def persist(self, agent: str, model: str, spec: CacheSpec, tokens: list[int], cache: list[Any], protect: set[str]) -> PersistStats:
        """Write the new full blocks and the tail of `cache` (which covers `tokens`)."""
        mx = runtime.mx()
        import numpy as np

        if not spec.persistable:
            return PersistStats(0, 0, 0)
        B = self.block_tokens
        hashes = chain_hashes(model, tokens, B)
        existing = self.index.blocks(hashes)
        arrays_np: dict[int, tuple[Any, Any]] = {}
        kv_dtype = runtime.dtype_name(cache[spec.kv_layers[0]].keys.dtype) if spec.kv_layers else None
        for layer in spec.kv_layers:
            c = cache[layer]
            if c.offset != len(tokens):
                raise ValueError(f"cache covers {c.offset} tokens, log has {len(tokens)}")
            k, v = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
            mx.eval(k, v)
            arrays_np[layer] = (_as_numpy(np, mx, k)[0], _as_numpy(np, mx, v)[0])

        def kv_arrays(start: int, end: int) -> list[tuple[str, str, tuple[int, ...], list[memoryview]]]:
            out = []
            for layer, (k, v) in arrays_np.items():
                for name, a in ((f"k{layer}", k), (f"v{layer}", v)):
                    out.append(
                        (
                            name,
                            a.dtype.name,
                            (a.shape[0], end - start, a.shape[2]),
                            [memoryview(a[h, start:end]) for h in range(a.shape[0])],
                        )
                    )
            return out

        written = reused = nbytes = 0
        parent = model
        paths.blocks_dir()  # private (0700) before any block file is written under it
        for i, h in enumerate(hashes):
            if h in existing and block_path(h).exists():
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
                size, checksum = blockfile.write(block_path(h), header, kv_arrays(start, start + B))
                with self.index.transaction():
                    self.index.add_block(BlockRow(h, model, parent, B, size, checksum, time.time()))
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
                snap_arrays.append((f"s{layer}:{key}", npa.dtype.name, npa.shape, [memoryview(npa).cast("B")]))
        old_tail = self.index.tail(agent)
        tail_row = None
        if start < len(tokens) or snap_arrays:
            header = {
                "kind": "tail",
                "agent": agent,
                "model": model,
                "start": start,
                "tokens": tokens[start:],
                "snapshots": snap_headers,
                "kv_dtype": kv_dtype,
            }
            probe_name = f"{agent}-{time.time_ns()}.kv"
            size, checksum = blockfile.write(tails_dir() / probe_name, header, kv_arrays(start, len(tokens)) + snap_arrays)
            final = f"{agent}-{checksum}.kv"
            (tails_dir() / probe_name).rename(tails_dir() / final)
            tail_row = TailRow(agent, model, start, len(tokens) - start, final, size, checksum, time.time())
            nbytes += size
        with self.index.transaction():
            self.index.set_chain(agent, model, hashes)
            self.index.db.execute("DELETE FROM tails WHERE agent=?", (agent,))
            if tail_row:
                self.index.set_tail(tail_row)
            self.index.touch(agent, hashes)
        if old_tail and (tail_row is None or old_tail.file != tail_row.file):
            with contextlib.suppress(FileNotFoundError):
                (tails_dir() / old_tail.file).unlink()
        self.enforce_budget(protect | {agent})
        return PersistStats(nbytes, written, reused)

    def enforce_budget(self, protect: set[str]) -> list[str]:
        """Evict down to the disk budget: stale blocks first, then least recently used agents."""
        evicted: list[str] = []
        with self.index.transaction():
            if self.index.total_bytes() <= self.disk_budget:
                return evicted
            self.index.gc_unreferenced()
            tails = {t.agent: t.last_used for t in self.index.all_tails()}
            agents = sorted(set(self.index.chains()) | set(tails), key=lambda a: tails.get(a, 0.0))
            for a in agents:
                if self.index.total_bytes() <= self.disk_budget:
                    break
                if a in protect:
                    continue
                self.index.drop_agent(a)
                self.index.gc_unreferenced()
                self.drop_hot(a)
                evicted.append(a)
        return evicted


def _as_numpy(np: Any, mx: Any, a: Any) -> Any:
    if a.dtype == mx.bfloat16:  # numpy has no bfloat16: move the raw bits
        a = a.view(mx.uint16)
        mx.eval(a)
    return np.asarray(a)


def failure_reason(exc: Exception) -> str:
    """A short reason for a cache failure; SQLite reports a full disk as a mere I/O error."""
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not full:
        try:
            st = os.statvfs(paths.cache_dir(create=False))
            full = st.f_bavail * st.f_frsize < (1 << 20)
        except OSError:
            pass
    return "the disk is full" if full else getattr(exc, "strerror", None) or str(exc)
