"""Keeping the ranks in step: rank 0's engine sends every batch operation to the others.

Rank 0 runs the ordinary core (chat, serve) on a `LockstepEngine`: each `Batch` call
(a new batch, add, step, cancel, close, seed) is first broadcast over the `Link`, and
`follow` replays it on the other ranks, so every rank runs the same `BatchGenerator`
steps with the same shapes (the model's collectives pair up). Sampling is seeded the
same on every rank, so every rank draws the same tokens.

Each rank restores and persists its own shard's KV blocks (other ranks under
cache/ranks/LAYOUT). Before a sequence starts, the ranks agree on the restored token
count (the minimum over ranks); a rank that has less (a missing or damaged block) makes
every rank trim to it and re-prefill the same tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from .. import faults
from ..backend import runtime
from ..engine import Batch, Engine
from ..events import Event, TurnDone, TurnRequest
from ..kv.failures import CacheUnavailable
from ..model.loader import LoadedModel
from .link import ADD, BATCH, CANCEL, CLOSE, LOAD, QUIT, SEED, STEP, Link, rank_gone

_SETTINGS = ("max_tokens", "temp", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n")


class LockstepEngine(Engine):
    """Rank 0's engine: its batches take the other ranks along."""

    def __init__(self, lm: LoadedModel, link: Link) -> None:
        super().__init__(lm)
        self.link = link

    def batch(self) -> Batch:
        return LockstepBatch(self)


class LockstepBatch(Batch):
    def __init__(self, engine: LockstepEngine) -> None:
        super().__init__(engine)
        self.mid_step_stop = False  # the other ranks are in the same pass: a step is whole or not at all
        self.link = engine.link
        seed = int.from_bytes(os.urandom(4), "little") >> 1  # the same draws on every rank
        self.link.send(BATCH, {"seed": seed})
        runtime.mx().random.seed(seed)

    def seed(self, seed: int) -> None:
        self.link.send(SEED, {"seed": seed})
        super().seed(seed)

    def add(self, req: TurnRequest) -> None:
        if req.cached >= len(req.prompt) or req.key in self.live:
            super().add(req)  # raises, before any rank hears of it
        self.link.send(ADD, {"key": req.key, "prompt": req.prompt, **{k: getattr(req, k) for k in _SETTINGS}})
        super().add(agree(self.link, req))

    def cancel(self, key: str) -> None:
        self.link.send(CANCEL, {"key": key})
        super().cancel(key)

    def step(self) -> list[Event]:
        if not self._live:
            return []
        self.link.send(STEP)
        with _sigint_deferred() as hit, rank_gone():  # a half-done step would leave the other ranks mid-collective
            events = super().step()
        if hit:  # as Batch.step does: the step's events stand, the caller stops after them
            self.stop_requested = True
        return events

    def close(self) -> None:
        self.link.send(CLOSE)
        super().close()


def agree(link: Link, req: TurnRequest) -> TurnRequest:
    """`req` with the cached prefix every rank has: the minimum over ranks, then (if some rank
    cannot trim its cache to that) none."""
    [common] = link.agree_min([req.cached])
    cache = req.cache if common == req.cached else _trimmed(req.cache, common)
    [final] = link.agree_min([common if cache is not None or common == 0 else 0])
    if final != common:
        cache = None
    return dataclasses.replace(req, cache=cache if final else None, cached=final)


def _trimmed(cache: list[Any] | None, n: int) -> list[Any] | None:
    """A copy of `cache` cut to its first `n` tokens (the original may be the hot tier's); None
    when a layer cannot be cut (only plain KV layers can)."""
    from mlx_lm.models.cache import KVCache

    if cache is None or n <= 0 or not all(isinstance(c, KVCache) for c in cache):
        return None
    out = []
    for c in cache:
        t = KVCache()
        t.keys, t.values, t.offset = c.keys[..., :n, :], c.values[..., :n, :], n
        out.append(t)
    return out


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[list[bool]]:
    """Ctrl-C around a whole lockstep step (its broadcast included) is noted in the list it
    yields, never raised mid-step."""
    hit: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield hit
        return
    previous = signal.signal(signal.SIGINT, lambda *_: hit.append(True))
    try:
        yield hit
    finally:
        signal.signal(signal.SIGINT, previous)


def follow(link: Link, load: Any) -> None:
    """A rank other than 0: replay rank 0's operations until it says QUIT. `load(spec)`
    loads this rank's shard of a model and returns it (the same split as rank 0's)."""
    from ..chat import make_kvstore
    from ..kv.layers import cache_spec

    engine: Engine | None = None
    batch: Batch | None = None
    kv = make_kvstore()
    spec: Any = None
    while True:
        msg = link.recv()
        if msg.op == QUIT:
            return
        if msg.op == LOAD:
            engine = Engine(load(msg.payload["spec"]))
            spec = cache_spec(engine.lm.model)
        elif engine is None:
            raise RuntimeError(f"operation {msg.op} before a model was loaded")
        elif msg.op == BATCH:
            batch = engine.batch()
            runtime.mx().random.seed(msg.payload["seed"])
        elif msg.op == SEED:
            runtime.mx().random.seed(msg.payload["seed"])
        elif batch is None:
            raise RuntimeError(f"operation {msg.op} outside a batch")
        elif msg.op == ADD:
            p = msg.payload
            req = TurnRequest(p["key"], list(p["prompt"]), None, 0, **{k: p[k] for k in _SETTINGS})
            try:
                restored = kv.restore(req.key, engine.lm.fingerprint, spec, req.prompt, capacity=len(req.prompt) + req.max_tokens)
                req = dataclasses.replace(req, cache=restored.cache, cached=restored.matched)
            except CacheUnavailable:
                pass  # re-prefill: the others trim to what this rank has
            batch.add(agree(link, req))
        elif msg.op == STEP:
            faults.point("rank-step")
            for ev in batch.step():
                if isinstance(ev, TurnDone) and ev.cache is not None:
                    _persist(kv, engine, spec, ev)
        elif msg.op == CANCEL:
            batch.cancel(msg.payload["key"])
        elif msg.op == CLOSE:
            batch.close()  # it stays usable, as rank 0's does (the server keeps one batch)


def _persist(kv: Any, engine: Engine, spec: Any, done: TurnDone) -> None:
    with contextlib.suppress(CacheUnavailable):  # costs a re-prefill next time, like rank 0's
        kv.keep_hot(done.key, engine.lm.fingerprint, done.cached_log, done.cache)
        kv.persist(done.key, engine.lm.fingerprint, spec, done.cached_log, done.cache, set())


__all__ = ["LockstepEngine", "follow", "agree", "LOAD", "QUIT"]
