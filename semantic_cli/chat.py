"""One chat turn, or a room's concurrent turns: the core behind `semantic chat`.

prepare (transcript -> token ids) -> restore (hot/warm KV) -> generate (engine)
-> record (transcript, one transaction) -> keep hot -> persist (KV blocks).
The transcript is written before the cache: a failure while caching costs a
re-prefill later, never a message (`Chat._caching` is the one place the KV
layer's `CacheUnavailable` is handled; after the transcript commit, any error
at all from the cache is handled there the same way).

No reply is lost: every finished reply of a turn or a room is recorded,
whatever fails after generation. An exception that stops a run (Ctrl-C, an
engine error, a KeyboardInterrupt while caching) first records the replies
still in flight as interrupted, then propagates. A failed transcript write
for one agent does not stop the others: they finish and are recorded, and
then `Chat.run` raises `TurnNotSaved` naming the agents whose replies could
not be written (the one error, reported after every other record is safe).

The boundary to the UI: `Chat.prepare` returns a `PendingTurn`, `Chat.run`
yields `TurnEvent`s (`Notice`, `PromptProgress`, `TokenEvent`, `TurnDone`,
`TurnRecorded`); `check_room` refuses a room whose agents use different models.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field

from . import config, faults, prompting
from .engine import Engine, PromptProgress, TokenEvent, TurnDone, TurnRequest, TurnStats, get_engine
from .errors import PromptTooLongError, SemanticError, UsageError
from .kv.failures import CacheUnavailable
from .kv.layers import CacheSpec, cache_spec
from .kv.store import KVStore, PersistStats, Restored
from .locks import AgentLock
from .model.loader import ModelRef, Progress, requested_spec, resolve
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
CACHE_NOT_KEPT = "KV cache not kept in memory ({reason}); the conversation is saved and will re-read it next time"


class TurnNotSaved(SemanticError):
    """Raised by `Chat.run` once every other reply is recorded: the transcript write of
    these agents' replies failed, so those replies (shown, but not saved) are not in
    their conversations. `errors` maps each such agent to what went wrong."""

    def __init__(self, errors: dict[str, BaseException], others: bool) -> None:
        names = ", ".join(errors)
        reasons = "; ".join(dict.fromkeys(_one_line(e) for e in errors.values()))
        if len(errors) == 1:
            lost = f"{names}'s reply could not be saved to the transcript ({reasons}): it is not in the conversation"
        else:
            lost = f"the replies of {names} could not be saved to the transcript ({reasons}): they are not in their conversations"
        super().__init__(lost + ("; the other agents' replies are saved" if others else ""))
        self.errors = errors


def _note(exc: BaseException, text: str) -> None:
    """Say on an exception that propagates anyway what else went wrong (shown with SEMANTIC_DEBUG=1)."""
    add = getattr(exc, "add_note", None)  # Python >= 3.11
    if add is not None:
        add(text)


def _one_line(exc: BaseException) -> str:
    """`Type: message` on one line (the message's first line), for a warning or an error."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


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
    started: float = field(default_factory=time.perf_counter)  # the turn's clock: set by prepare before the restore
    first_token_at: float | None = None
    done: TurnDone | None = None  # set when generation ends: what is recorded, even if the run stops before
    recorded: bool = False  # the transcript holds this turn: never record it twice


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
    def open_agent(
        self, name: str, model_flag: str | None = None, system: str | None = None, wait: bool = False, timeout: float | None = None
    ) -> Agent:
        """Lock an agent for this process (with `wait`, for at most `timeout` seconds if given);
        an unknown name is created on its first turn. A room locks its agents in sorted order."""
        if name not in self.locks:
            self.locks[name] = AgentLock(name).acquire(wait=wait, timeout=timeout)
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

    def engine_for(self, agent: Agent, on_progress: Progress | None = None) -> Engine:
        return get_engine(self._ref(agent.model, on_progress))

    def _ref(self, spec: str, on_progress: Progress | None) -> ModelRef:
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
    def prepare(self, agent: Agent, user_text: str, settings: GenSettings, on_progress: Progress | None = None) -> PendingTurn:
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
        An iterator of `TurnEvent`s; closing it early (Ctrl-C) records the partial replies.

        Whatever fails, no finished reply is lost: an exception that stops the run
        (KeyboardInterrupt, GeneratorExit, SystemExit, an engine error, a KeyboardInterrupt
        while caching) first records every reply not yet recorded (finished ones as they
        finished, the others as interrupted), then propagates. A failure while caching
        costs only the cache and a warning. A failed transcript write costs that one
        reply: the others go on and are recorded, and then `TurnNotSaved` is raised."""
        check_room([p.agent for p in pendings], [p.engine for p in pendings])
        by_key = {p.agent.name: p for p in pendings}
        not_saved: dict[str, BaseException] = {}
        yield from self._notices(pendings)
        events = pendings[0].engine.generate([p.request for p in pendings], seed=seed)
        try:
            for ev in events:
                if isinstance(ev, TokenEvent):
                    p = by_key[ev.key]
                    if ev.token is not None:
                        if not p.tokens:
                            p.first_token_at = time.perf_counter()
                        p.tokens.append(ev.token)
                    p.text.append(ev.text)
                elif isinstance(ev, TurnDone):
                    p = by_key[ev.key]
                    p.done = ev
                    yield ev
                    try:
                        self._record(p, ev)
                    except Exception as exc:  # this reply only: the others are still recorded
                        not_saved[p.agent.name] = exc
                        self._not_recorded(p)
                        continue
                    yield self._cache_turn(p, ev)
                    continue
                yield ev
        except BaseException as exc:
            with contextlib.suppress(Exception):
                events.close()  # the engine drops the unfinished sequences
            left = [p for p in pendings if not p.recorded and p.agent.name not in not_saved]
            self._record_unfinished(left, exc)
            for name, err in not_saved.items():
                _note(exc, f"{name}'s reply could not be saved to the transcript ({_one_line(err)})")
            raise
        finally:
            events.close()
        if not_saved:
            raise TurnNotSaved(not_saved, others=len(pendings) > len(not_saved))

    def _record_unfinished(self, pendings: list[PendingTurn], cause: BaseException) -> None:
        """Record the replies a stopped run leaves behind: a finished one as it finished, the
        others as interrupted. Each on its own: one failure does not cost the rest."""
        for p in pendings:
            try:
                self._record(p, p.done or self._interrupted(p))
            except Exception as exc:
                self._not_recorded(p)
                _note(cause, f"{p.agent.name}'s reply could not be saved to the transcript ({_one_line(exc)})")
                continue
            self._mark_used(p)

    def _not_recorded(self, p: PendingTurn) -> None:
        """After a failed transcript write: no transaction left open for the next record,
        and no hot cache that might now cover more than the transcript holds."""
        with contextlib.suppress(Exception):
            if self.store.db.in_transaction:
                self.store.db.rollback()
        with contextlib.suppress(Exception):
            self.kv.drop_hot(p.agent.name)

    @contextlib.contextmanager
    def _caching(self, say: str | None = None, warnings: list[str] | None = None, recorded: str | None = None) -> Iterator[None]:
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
                warnings.append(say.format(reason=f"unexpected {_one_line(exc)}"))
            with contextlib.suppress(Exception):
                self.kv.drop_hot(recorded)

    def _mark_used(self, p: PendingTurn) -> None:
        with self._caching(recorded=p.agent.name):  # only the eviction order is lost
            self.kv.mark_used(p.agent.name)

    def _interrupted(self, p: PendingTurn) -> TurnDone:
        req = p.request
        # TTFT as for a finished turn (0 when it was stopped before its first token).
        ttft = p.first_token_at - p.started if p.first_token_at is not None else 0.0
        stats = TurnStats(ttft, len(req.prompt), req.cached, len(req.prompt) - req.cached, len(p.tokens), 0.0, 0.0)
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
        p.recorded = True
        faults.point("after-transcript-commit")

    def _cache_turn(self, p: PendingTurn, done: TurnDone) -> TurnRecorded:
        """Cache a recorded turn (hot, then on disk). Nothing here can cost the reply: it is
        in the transcript already, so a failure is a warning and a re-prefill next time."""
        lm = p.engine.lm
        persisted = None
        if done.cache is not None:
            name = p.agent.name
            with self._caching(CACHE_NOT_KEPT, p.warnings, recorded=name):
                self.kv.keep_hot(name, lm.fingerprint, done.all_tokens, done.cache)
            with self._caching(CACHE_NOT_SAVED, p.warnings, recorded=name):
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
