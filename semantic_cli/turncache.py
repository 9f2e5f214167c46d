"""The KV side of a process's turns (a `Chat` holds one): a recorded turn's cache kept hot
and written to disk, at once or, for the server, once its reply is out (`write`), and
`guard`, the one place a KV cache failure is handled. Everything here runs after the
transcript holds the turn, or before a turn only to find its cache: a failure costs a
re-prefill and a warning, never a message."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .kv.failures import CacheUnavailable
from .kv.layers import CacheSpec, cache_spec
from .kv.stats import PersistStats
from .kv.store import KVStore
from .turn import CACHE_NOT_KEPT, CACHE_NOT_SAVED, PendingTurn, one_line, unanswered_tokens

if TYPE_CHECKING:
    from .engine import Engine
    from .events import TurnDone


class TurnCache:
    def __init__(self, kv: KVStore, held: Callable[[], set[str]]) -> None:
        self.kv = kv
        self._held = held  # the agents this process holds: a write never evicts their files
        self._specs: dict[str, CacheSpec] = {}
        self.unwritten: dict[str, PendingTurn] = {}  # agent -> its recorded turn whose cache `write` writes
        self.untold: dict[str, list[str]] = {}  # agent -> what writing its last cache ran into, said at its next turn

    def spec(self, engine: Engine) -> CacheSpec:
        fp = engine.lm.fingerprint
        if fp not in self._specs:
            self._specs[fp] = cache_spec(engine.lm.model)
        return self._specs[fp]

    @contextlib.contextmanager
    def guard(self, say: str | None = None, warnings: list[str] | None = None, recorded: str | None = None) -> Iterator[None]:
        """The one place a KV cache failure is handled: the turn goes on without the cache
        (a re-prefill, now or next time), and `say` tells the user why in `warnings`, unless
        the cache already failed earlier in this process and said so then. Once the turn of
        agent `recorded` is in the transcript, any error at all (a bug, MemoryError, a
        ValueError) is handled the same way, since nothing but the cache is at stake, and
        that agent's hot copy, suspect too, is dropped. KeyboardInterrupt and SystemExit
        still propagate (the caller records what is left)."""
        try:
            yield
        except CacheUnavailable as exc:
            if say is not None and warnings is not None and not exc.already_down:
                warnings.append(say.format(reason=exc.reason))
        except Exception as exc:
            if recorded is None:
                raise
            if say is not None and warnings is not None:
                warnings.append(say.format(reason=f"unexpected {one_line(exc)}"))
            with contextlib.suppress(Exception):
                self.kv.drop_hot(recorded)

    def keep(self, p: PendingTurn, done: TurnDone, write_later: bool = False) -> PersistStats | None:
        """A recorded turn's cache: hot, then on disk (its stats), or on disk by `write`
        (`write_later`: the caller runs it once the reply is out, holding the agent until then)."""
        if done.cache is None:
            return None
        name = p.agent.name
        with self.guard(CACHE_NOT_KEPT, p.warnings, recorded=name):
            self.kv.keep_hot(name, p.engine.lm.fingerprint, done.cached_log, done.cache)
        if write_later:
            self.unwritten[name] = p
            return None
        return self._persist(p, done, p.warnings)

    def write(self, name: str) -> None:
        """Write to disk the cache `keep(..., write_later=True)` left; what went wrong is said
        with the agent's next turn (its reply has gone out already)."""
        p = self.unwritten.pop(name, None)
        if p is None or p.done is None:
            return
        warnings: list[str] = []
        self._persist(p, p.done, warnings)
        if warnings and not p.stateless:  # an API slot has no next turn to say it with
            self.untold.setdefault(name, []).extend(f"after the last reply, {w}" for w in warnings)

    def _persist(self, p: PendingTurn, done: TurnDone, warnings: list[str]) -> PersistStats | None:
        name = p.agent.name
        if done.cache is None:
            return None
        with self.guard(CACHE_NOT_SAVED, warnings, recorded=name):
            return self.kv.persist(name, p.engine.lm.fingerprint, self.spec(p.engine), done.cached_log, done.cache, self._held())
        return None

    def keep_read(self, p: PendingTurn, cache: list[Any], tokens: list[int]) -> None:
        """Cache what a stopped prefill read, up to the user's message (not the assistant's opening)."""
        from .kv.layers import trim_cache

        keep = unanswered_tokens(p)
        if keep is None or tokens[: len(keep)] != keep[: len(tokens)]:
            return
        name, lm = p.agent.name, p.engine.lm
        with self.guard(CACHE_NOT_SAVED, p.warnings, recorded=name):
            if len(tokens) > len(keep) and not trim_cache(cache, len(tokens) - len(keep)):
                return
            tokens = tokens[: len(keep)]
            self.kv.keep_hot(name, lm.fingerprint, tokens, cache)
            self.kv.persist(name, lm.fingerprint, self.spec(p.engine), tokens, cache, self._held())

    def mark_used(self, p: PendingTurn) -> None:
        with self.guard(recorded=p.agent.name):  # only the eviction order is lost
            self.kv.mark_used(p.agent.name)
