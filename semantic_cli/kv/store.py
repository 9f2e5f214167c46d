"""Persisting agents' KV caches as content-addressed blocks, and restoring them:
`KVStore`, the KV layer's one entry point for the core and the REPL.

Tiers: hot (caches held in this process, LRU under a byte budget), warm
(block files on disk), cold (transcript only). A block is named by a chain
hash of (model fingerprint, parent hash, its token ids), so equal prefixes
are stored once and a different model can never match. After a turn only new
full blocks and the agent's tail (partial block + whole-layer snapshots) are
written. Anything unreadable is dropped and re-prefilled: never trusted. Cache
files and index rows are data, never instructions: geometry and dtypes come from
the model's `CacheSpec`, a file that disagrees with it (or raises anything while
it is read) is dropped with one warning, and a tail row whose file is not a tail's
name is dropped without its file being touched (kv/restore.py, kv/blockfile.py).

Failures: the public methods turn an OSError or SQLite error into one
`CacheUnavailable` (with a short reason). A failed restore marks the store
down for the rest of the process: later persists and uses write nothing (the
user was told this turn is not cached) and raise `CacheUnavailable` with
`already_down` set. The transcript is the truth, so a caller treats the error
as "re-prefill next time", never as a lost message.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import blockfile, fileread
from .blockfile import block_paths, tail_path
from .failures import CACHE_ERRORS, CacheUnavailable, failure_reason
from .index import BlockRow, KVIndex, TailRow, chain_hashes
from .layers import CacheSpec, cache_nbytes
from .persist import write_cache
from .restore import CacheFile, read_cache
from .stats import PersistStats


@dataclass
class Restored:
    cache: list[Any] | None
    matched: int
    tier: str  # "hot" | "warm" | "cold"
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AgentUsage:
    """One agent's cache, for `/cache`: what is in memory and on disk."""

    hot_tokens: int | None  # in this process's memory, if it is there
    blocks: int  # in the agent's chain
    shared_blocks: int  # of those, named by other agents too
    tail_tokens: int | None  # in its tail, if it has one
    disk_tokens: int
    disk_bytes: int

    @property
    def tier(self) -> str:
        return "hot" if self.hot_tokens else "warm" if self.on_disk else "cold"

    @property
    def on_disk(self) -> bool:
        return bool(self.blocks) or self.tail_tokens is not None


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
        self._down: str | None = None  # why the cache is unusable in this process, if it is

    @property
    def index(self) -> KVIndex:
        # Opened on first use: a cache dir that cannot be opened (full disk, bad
        # permissions) must cost a re-prefill, not the conversation.
        if self._index is None:
            try:
                self._index = KVIndex()
            except CACHE_ERRORS as exc:
                raise CacheUnavailable(failure_reason(exc)) from exc
        return self._index

    @property
    def down(self) -> str | None:
        """Why the cache is unusable in this process (a restore failed), or None."""
        return self._down

    @contextlib.contextmanager
    def _failures(self, marks_down: bool = False) -> Iterator[None]:
        """OSError and SQLite errors become CacheUnavailable; with `marks_down`, the store is down from now on."""
        try:
            yield
        except CacheUnavailable as exc:
            if marks_down:
                self._down = exc.reason
            raise
        except CACHE_ERRORS as exc:
            reason = failure_reason(exc)
            if marks_down:
                self._down = reason
            raise CacheUnavailable(reason) from exc

    def _check_up(self) -> None:
        if self._down is not None:
            raise CacheUnavailable(self._down, already_down=True)

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

    # ---- one agent's cache --------------------------------------------
    def usage(self, agent: str) -> AgentUsage:
        with self._failures():
            chain = self.index.chain(agent)
            rows = self.index.blocks(chain)
            tail = self.index.tail(agent)
            refs = self.index.refcounts() if chain else {}
        return AgentUsage(
            hot_tokens=self.hot_agents().get(agent),
            blocks=len(chain),
            shared_blocks=sum(1 for h in chain if refs.get(h, 0) > 1),
            tail_tokens=tail.n_tokens if tail else None,
            disk_tokens=sum(r.n_tokens for r in rows.values()) + (tail.n_tokens if tail else 0),
            disk_bytes=sum(r.nbytes for r in rows.values()) + (tail.nbytes if tail else 0),
        )

    def release_agent(self, agent: str) -> int:
        """Drop an agent's cache from every tier, freeing the blocks only it used; returns disk bytes freed."""
        self.drop_hot(agent)
        with self._failures():
            return self.index.release_agent(agent)

    # ---- restore ------------------------------------------------------
    def restore(self, agent: str, model: str, spec: CacheSpec, prompt: list[int], capacity: int) -> Restored:
        """The longest usable cached prefix of `prompt` (always leaving one token to process).
        A file that cannot be read costs its blocks (with a warning); CacheUnavailable if the
        cache as a whole cannot be used, and then the store is down for this process."""
        with self._failures(marks_down=True):
            return self._restore(agent, model, spec, prompt, capacity)

    def _restore(self, agent: str, model: str, spec: CacheSpec, prompt: list[int], capacity: int) -> Restored:
        limit = len(prompt) - 1
        hot = self._hot.get(agent)
        if hot is not None and not (hot.model == model and 0 < len(hot.tokens) <= limit and prompt[: len(hot.tokens)] == hot.tokens):
            hot = None
        # The hot copy, unless the files go further: another process (`--no-server`, a second
        # REPL) recorded a later turn since, and reading it back beats re-reading its tokens.
        if hot is not None and not self._disk_passes(agent, model, hot):
            self._hot.move_to_end(agent)
            return Restored(hot.cache, len(hot.tokens), "hot")
        if hot is None:
            return self._from_disk(agent, model, spec, prompt, capacity)
        try:
            warm = self._from_disk(agent, model, spec, prompt, capacity)
        except (CacheUnavailable, *CACHE_ERRORS):  # the files cannot be read now: the hot copy still serves
            warm = Restored(None, 0, "cold")
        if warm.matched <= len(hot.tokens):  # the files diverge earlier
            self._hot.move_to_end(agent)
            return Restored(hot.cache, len(hot.tokens), "hot", warm.warnings)
        return warm

    def _disk_passes(self, agent: str, model: str, hot: _Hot) -> bool:
        """Whether the agent's files cover more tokens than its hot copy (their index rows say)."""
        if self._down is not None:
            return False
        try:
            tail = self.index.tail(agent)
            if tail is not None:
                return tail.model == model and int(tail.start) + int(tail.n_tokens) > len(hot.tokens)
            return self.index.chain_model(agent) == model and len(self.index.chain(agent)) * self.block_tokens > len(hot.tokens)
        except Exception:  # an index that cannot be read, or rows that make no sense: the hot copy serves
            return False

    def _from_disk(self, agent: str, model: str, spec: CacheSpec, prompt: list[int], capacity: int) -> Restored:
        limit = len(prompt) - 1
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
        if tail is not None and not blockfile.is_tail_name(tail.file):  # a path, not a name: never opened
            with self.index.transaction():
                self.index.drop_tail(agent)
            warnings.append(_damaged("its file name in the index is not a tail's"))
            tail = None
        start = n_blocks * self.block_tokens
        tail_ok = tail is not None and tail.model == model and tail.start == start and (tail.n_tokens > 0 or bool(spec.snapshot_layers))
        parent = hashes[n_blocks - 1] if n_blocks else model
        whole = bool(spec.snapshot_layers)
        keep = self._tail_keep(tail, prompt, len(spec.layers), limit, parent, whole) if tail_ok else 0  # type: ignore[arg-type]
        # keep 0: the conversation moved on (persona change, reset): stale, not damaged.
        tail_ok = tail_ok and (keep > 0 or bool(spec.snapshot_layers))
        if spec.snapshot_layers and not tail_ok:
            return Restored(None, 0, "cold", warnings)  # whole-layer snapshots only fit at the tail's end
        if n_blocks == 0 and not tail_ok:
            return Restored(None, 0, "cold", warnings)
        try:
            used_tail = tail if tail_ok else None
            cache, matched, read_warnings = self._read(spec, hashes[:n_blocks], rows, used_tail, keep, agent, capacity, prompt)
        except OSError as exc:
            return Restored(None, 0, "cold", warnings + [f"KV cache unreadable ({exc.strerror}): re-prefilling"])
        except MemoryError as exc:  # the buffers the model's spec asks for (never a file's numbers)
            return Restored(None, 0, "cold", warnings + [f"KV cache not restored ({exc}): re-prefilling"])
        warnings += read_warnings
        if matched == 0:
            return Restored(None, 0, "cold", warnings)
        # Last use is recorded when the turn ends (`persist`, `mark_used`): a commit here
        # would sit between the restore and the first token.
        return Restored(cache, matched, "warm", warnings)

    def mark_used(self, agent: str) -> None:
        """Record a use of the agent's cache by a turn that ended without persisting (interrupted)."""
        self._check_up()
        with self._failures():
            self.index.touch(agent, self.index.chain(agent))

    def _tail_keep(self, tail: TailRow, prompt: list[int], n_layers: int, limit: int, parent: str, whole: bool) -> int:
        """How many of the tail's tokens continue `prompt` within `limit` (its header says; damage
        is found on the full read). Its KV holds only after the same prefix: the header's
        `parent` must be the prompt's chain hash at the tail's start. A tail that runs past the
        prompt (the same request again, an undone or edited last message) gives the tokens they
        share, unless it must be used `whole` (whole-layer snapshots fit only at its end): then
        all of them or none."""
        try:
            header = fileread.header_of(tail_path(tail.file), tail.nbytes, fileread.header_limit(tail.n_tokens, n_layers))
        except Exception:  # whatever a damaged file raises
            return tail.n_tokens if whole else min(tail.n_tokens, limit - tail.start)  # the full read finds it, drops it, says so
        tokens = header.get("tokens")
        if not isinstance(tokens, list):
            return tail.n_tokens  # damaged: the full read says so
        if header.get("parent") != parent:
            return 0  # written after another prefix (or by a release that did not record it): stale
        wanted = prompt[tail.start : limit]
        if whole:
            return tail.n_tokens if tokens == wanted[: tail.n_tokens] and len(tokens) <= len(wanted) else 0
        shared = 0
        for have, want in zip(tokens, wanted, strict=False):
            if have != want:
                break
            shared += 1
        return shared

    def _read(
        self,
        spec: CacheSpec,
        hashes: list[str],
        rows: dict[str, BlockRow],
        tail: TailRow | None,
        keep: int,
        agent: str,
        capacity: int,
        prompt: list[int],
    ) -> tuple[list[Any] | None, int, list[str]]:
        B = self.block_tokens
        located = zip(hashes, block_paths(hashes), strict=True)
        files = [CacheFile(path, rows[h].checksum, rows[h].nbytes, i * B, B, h) for i, (h, path) in enumerate(located)]
        if tail is not None:
            files.append(CacheFile(tail_path(tail.file), tail.checksum, tail.nbytes, tail.start, tail.n_tokens, None, keep))
        cache, matched, damage = read_cache(spec, files, prompt, capacity)
        if damage is None:
            return cache, matched, []
        with self.index.transaction():
            if damage.file.block_hash is not None:
                self.index.drop_block(damage.file.block_hash)
            else:
                self.index.drop_tail(agent)
        return cache, matched, [_damaged(damage.reason)]

    # ---- persist ------------------------------------------------------
    def persist(self, agent: str, model: str, spec: CacheSpec, tokens: list[int], cache: list[Any], protect: set[str]) -> PersistStats:
        """Write the new full blocks and the tail of `cache` (which covers `tokens`), then
        evict down to the disk budget, sparing the agents in `protect`."""
        self._check_up()
        with self._failures():
            stats = write_cache(self.index, self.block_tokens, agent, model, spec, tokens, cache)
            self.enforce_budget(protect | {agent})
            return stats

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


def _damaged(reason: str) -> str:
    return f"a cached KV block was damaged ({reason}) and was dropped: re-prefilling from there"
