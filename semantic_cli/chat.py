"""One chat turn, or a room's concurrent turns: the core behind `semantic chat`.

prepare (transcript -> token ids) -> restore (hot/warm KV) -> generate (engine)
-> record (transcript, one transaction) -> persist (KV blocks) -> keep hot.
The transcript is written before the cache: a failure while caching costs a
re-prefill later, never a message (`Chat._caching` is the one place the KV
layer's `CacheUnavailable` is handled).

The boundary to the UI: `Chat.prepare` returns a `PendingTurn`, `Chat.run`
yields `TurnEvent`s (`Notice`, `PromptProgress`, `TokenEvent`, `TurnDone`,
`TurnRecorded`); `check_room` refuses a room whose agents use different models.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import config, faults, prompting
from .engine import Engine, PromptProgress, TokenEvent, TurnDone, TurnRequest, TurnStats, get_engine
from .errors import PromptTooLongError, UsageError
from .kv.failures import CacheUnavailable
from .kv.layers import CacheSpec, cache_spec
from .kv.store import KVStore, PersistStats, Restored
from .locks import AgentLock
from .model.loader import ModelRef, requested_spec, resolve
from .store import Agent, Store


@dataclass(frozen=True)
class GenSettings:
    max_tokens: int | None = None
    temp: float | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Notice:
    key: str
    text: str


@dataclass(frozen=True)
class TurnRecorded:
    key: str
    model: str
    done: TurnDone  # finish_reason "interrupted" for a reply cut short by Ctrl-C
    tier: str  # where the reused prefix came from: hot, warm or cold
    persisted: PersistStats | None
    warnings: list[str]  # said after the turn (e.g. the cache could not be saved)


TurnEvent = Notice | PromptProgress | TokenEvent | TurnDone | TurnRecorded
"""What `Chat.run` yields: warnings first, then each turn's progress and tokens, and per
turn its `TurnDone` followed by its `TurnRecorded` (once it is in the transcript)."""

# Said when the cache fails ({reason}: `failure_reason`); a failure while caching costs a re-prefill, never a message.
CACHE_UNAVAILABLE = "KV cache unavailable ({reason}): re-prefilling, and not caching this turn"
CACHE_NOT_SAVED = "KV cache not saved ({reason}); the conversation is saved and will re-prefill next time"


@dataclass
class PendingTurn:
    """A prepared turn: `Chat.prepare` makes it and `Chat.run` generates and records it.
    Not frozen: while it runs, the core collects its tokens and text here (what an
    interrupted turn records) and notes its warnings and whether the agent is stored yet."""

    agent: Agent
    user_text: str
    engine: Engine
    request: TurnRequest
    new_log: bool
    log_len: int
    tier: str
    is_new: bool
    warnings: list[str]
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


def make_kvstore() -> KVStore:
    from .config import parse_bytes

    return KVStore(config.get("block_tokens"), parse_bytes(config.get("cache_budget")), parse_bytes(config.get("hot_budget")))


class Chat:
    """A process's conversations: holds the agents' locks, the hot tier and the engines."""

    def __init__(self, store: Store, kv: KVStore | None = None) -> None:
        self.store = store
        self.kv = kv if kv is not None else make_kvstore()
        self.locks: dict[str, AgentLock] = {}
        self._specs: dict[str, CacheSpec] = {}
        self._warned: set[tuple[str, str]] = set()
        self._stored: dict[str, bool] = {}  # agent -> whether the transcript store has it (we hold its lock)

    # ---- agents -------------------------------------------------------
    def open_agent(self, name: str, model_flag: str | None = None, system: str | None = None, wait: bool = False) -> Agent:
        """Lock an agent for this process; an unknown name is created on its first turn."""
        if name not in self.locks:
            self.locks[name] = AgentLock(name).acquire(wait=wait)
        agent = self.store.find_agent(name)
        self._stored[name] = agent is not None
        if agent is None:
            return Agent(name, requested_spec(model_flag), system or "", {}, time.time(), time.time())
        if model_flag and model_flag != agent.model:
            agent = self.store.update_agent(agent, model=model_flag)
        if system is not None and agent.system == "" and not self.store.messages(name):
            agent = self.store.update_agent(agent, system=system)
        return agent

    def close(self) -> None:
        for lock in self.locks.values():
            lock.release()
        self.locks.clear()
        self.kv.close()

    def engine_for(self, agent: Agent, on_progress: Any = None) -> Engine:
        return get_engine(self._ref(agent.model, on_progress))

    def _ref(self, spec: str, on_progress: Any) -> ModelRef:
        return resolve(spec, on_progress)

    def spec(self, engine: Engine) -> CacheSpec:
        fp = engine.lm.fingerprint
        if fp not in self._specs:
            self._specs[fp] = cache_spec(engine.lm.model)
        return self._specs[fp]

    def _is_stored(self, name: str) -> bool:
        """Whether the store has the agent: known since `open_agent` (its lock keeps other
        processes from creating or deleting it), asked once otherwise."""
        if name not in self._stored:
            self._stored[name] = self.store.find_agent(name) is not None
        return self._stored[name]

    # ---- turns --------------------------------------------------------
    def prepare(self, agent: Agent, user_text: str, settings: GenSettings, on_progress: Any = None) -> PendingTurn:
        engine = self.engine_for(agent, on_progress)
        started = time.perf_counter()  # the turn's clock (TTFT) starts once the model is loaded
        lm = engine.lm
        tok = lm.tokenizer
        is_new = not self._is_stored(agent.name)
        history = [] if is_new else self.store.messages(agent.name)
        msgs = prompting.chat_messages(agent, history)
        log = self.store.token_log(agent.name, lm.tokenizer_fingerprint) if history else None
        delta = None
        if log:
            delta = prompting.turn_delta(tok, msgs, user_text, log_ends_with_eos=log[-1] in tok.eos_token_ids)
        if log and delta is not None:
            prompt, new_log = log + delta, False
        else:
            prompt, new_log = prompting.full_prompt(tok, msgs + [{"role": "user", "content": user_text}]), True
            log = []
        context = lm.context_length
        if len(prompt) >= context:
            what = "message" if not history else "conversation with this message"
            raise PromptTooLongError(
                f"the {what} is {len(prompt)} tokens but {lm.name} has a context of {context} tokens; "
                + ("shorten it" if not history else f"shorten it or start over with `semantic agents reset {agent.name}`")
            )
        max_tokens = settings.max_tokens or agent.settings.get("max_tokens") or config.get("max_tokens")
        max_tokens = min(int(max_tokens), context - len(prompt))
        temp = settings.temp if settings.temp is not None else agent.settings.get("temp", config.get("temp"))
        top_p = settings.top_p if settings.top_p is not None else agent.settings.get("top_p", config.get("top_p"))
        restored = Restored(None, 0, "cold")
        with self._caching(CACHE_UNAVAILABLE, restored.warnings):
            restored = self.kv.restore(agent.name, lm.fingerprint, self.spec(engine), prompt, capacity=len(prompt) + max_tokens)
        request = TurnRequest(agent.name, prompt, restored.cache, restored.matched, max_tokens, float(temp), float(top_p), started)
        return PendingTurn(
            agent, user_text, engine, request, new_log, len(log), restored.tier, is_new, list(restored.warnings), started=started
        )

    def run(self, pendings: list[PendingTurn], seed: int | None = None) -> Generator[TurnEvent, None, None]:
        """Generate all pending turns concurrently (one engine), recording each as it finishes.
        An iterator of `TurnEvent`s; closing it early (Ctrl-C) records the partial replies."""
        check_room([p.agent for p in pendings], [p.engine for p in pendings])
        by_key = {p.agent.name: p for p in pendings}
        yield from self._notices(pendings)
        events = pendings[0].engine.generate([p.request for p in pendings], seed=seed)
        try:
            for ev in events:
                if isinstance(ev, TokenEvent):
                    p = by_key[ev.key]
                    if ev.token is not None:
                        p.tokens.append(ev.token)
                    p.text.append(ev.text)
                elif isinstance(ev, TurnDone):
                    yield ev
                    yield self._finish(by_key.pop(ev.key), ev)
                    continue
                yield ev
        except (KeyboardInterrupt, GeneratorExit):
            events.close()
            for p in list(by_key.values()):
                self._record(p, self._interrupted(p))
                self._mark_used(p)
            by_key.clear()
            raise
        finally:
            events.close()

    @contextlib.contextmanager
    def _caching(self, say: str | None = None, warnings: list[str] | None = None) -> Iterator[None]:
        """The one place a KV cache failure is handled: the turn goes on without the cache
        (a re-prefill, now or next time), and `say` tells the user why in `warnings`, unless
        the cache already failed earlier in this process and said so then."""
        try:
            yield
        except CacheUnavailable as exc:
            if say is not None and warnings is not None and not exc.already_down:
                warnings.append(say.format(reason=exc.reason))

    def _mark_used(self, p: PendingTurn) -> None:
        with self._caching():  # only the eviction order is lost
            self.kv.mark_used(p.agent.name)

    def _interrupted(self, p: PendingTurn) -> TurnDone:
        req = p.request
        elapsed = time.perf_counter() - p.started
        stats = TurnStats(elapsed, len(req.prompt), req.cached, len(req.prompt) - req.cached, len(p.tokens), 0.0, 0.0)
        return TurnDone(req.key, "interrupted", "".join(p.text), list(p.tokens), None, req.prompt + p.tokens, stats)

    def _record(self, p: PendingTurn, done: TurnDone) -> None:
        """Commit the turn to the transcript: one transaction, the truth."""
        lm = p.engine.lm
        if p.is_new:
            a = p.agent
            self.store.create_agent(a.name, a.model, a.system, a.settings)
            self._stored[a.name] = True
            p.is_new = False
        status = "interrupted" if done.finish_reason == "interrupted" else "complete"
        meta = {"finish_reason": done.finish_reason, "model": lm.name, **done.stats.__dict__}
        new_tokens = done.all_tokens if p.new_log else done.all_tokens[p.log_len :]
        self.store.record_turn(
            p.agent.name,
            [("user", p.user_text, "complete", {}), ("assistant", done.text, status, meta)],
            lm.tokenizer_fingerprint,
            new_tokens,
            replace_log=p.new_log,
        )
        faults.point("after-transcript-commit")

    def _finish(self, p: PendingTurn, done: TurnDone) -> TurnRecorded:
        self._record(p, done)
        lm = p.engine.lm
        persisted = None
        if done.cache is not None:
            self.kv.keep_hot(p.agent.name, lm.fingerprint, done.all_tokens, done.cache)
            with self._caching(CACHE_NOT_SAVED, p.warnings):
                persisted = self.kv.persist(p.agent.name, lm.fingerprint, self.spec(p.engine), done.all_tokens, done.cache, set(self.locks))
        return TurnRecorded(p.agent.name, lm.name, done, p.tier, persisted, [w for w in p.warnings if self._first(p.agent.name, w)])

    def _notices(self, pendings: list[PendingTurn]) -> Iterator[Notice]:
        for p in pendings:
            for w in p.warnings:
                if self._first(p.agent.name, w):
                    yield Notice(p.agent.name, w)

    def _first(self, agent: str, warning: str) -> bool:
        """Say each warning once per agent per process."""
        if (agent, warning) in self._warned:
            return False
        self._warned.add((agent, warning))
        return True


def check_room(agents: Sequence[Agent], engines: Sequence[Engine] = ()) -> None:
    """A room's agents must share one model, since one engine generates their turns together
    (UsageError if not): before loading, the same model spec; once loaded (`engines`, one per
    agent), the same engine, which two specs naming the same files share."""
    shared = len({id(e) for e in engines}) <= 1 if engines else len({a.model for a in agents}) <= 1
    if not shared:
        detail = ", ".join(f"{a.name}: {a.model}" for a in agents)
        raise UsageError(f"a room's agents must share one model ({detail}); pass --model to switch them all, or chat with them separately")
