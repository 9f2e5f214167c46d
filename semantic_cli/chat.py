"""One chat turn, or a room's concurrent turns: the core behind `semantic chat`.

prepare (transcript -> token ids) -> restore (hot/warm KV) -> generate (engine)
-> record (transcript, one transaction) -> keep hot -> persist (KV blocks).
The transcript is written before the cache: a failure while caching costs a
re-prefill later, never a message (`TurnCache.guard` is the one place the KV
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
from collections.abc import Callable, Generator, Iterator
from typing import Any

from . import config, faults, opening, prompting
from .engine import Engine, get_engine
from .errors import PromptTooLongError
from .events import Event, TokenEvent, TurnDone, TurnRequest
from .history import recover_retry, too_long_advice
from .kv.store import KVStore, Restored
from .locks import GRACE_S, AgentLock
from .model.loader import ModelRef, Progress, resolve
from .store import Agent, Store
from .turn import (
    CACHE_UNAVAILABLE,
    GenSettings,
    Notice,
    PendingTurn,
    TurnEvent,
    TurnNotSaved,
    TurnRecorded,
    check_room,
    interrupted,
    note,
    one_line,
    sampling,
    transcript_rows,
)
from .turncache import TurnCache


def make_kvstore() -> KVStore:
    from .config import parse_bytes

    return KVStore(config.get("block_tokens"), parse_bytes(config.get("cache_budget")), parse_bytes(config.get("hot_budget")))


class Chat:
    """A process's conversations: holds the agents' locks, the hot tier and the engines."""

    def __init__(self, store: Store, kv: KVStore | None = None, lock_grace: float = GRACE_S) -> None:
        self.store = store
        self.kv = kv if kv is not None else make_kvstore()
        self.lock_grace = lock_grace  # how long a busy agent's lock is waited for without `wait`
        self.locks: dict[str, AgentLock] = {}
        self._model_defaults: dict[str, dict[str, Any]] = {}  # model fingerprint -> its generation_config sampling
        self._warned: set[tuple[str, str]] = set()
        self._stored: dict[str, bool] = {}  # agent -> whether the transcript store has it (we hold its lock)
        self.recovered: dict[str, str] = {}  # agent -> what `recover` did when it was opened, not yet said
        self.cache = TurnCache(self.kv, lambda: set(self.locks))

    # ---- agents -------------------------------------------------------
    def open_agent(
        self,
        name: str,
        model_flag: str | None = None,
        system: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
        busy_hint: str = "wait for it to finish, then try again",
    ) -> Agent:
        """Lock an agent for this process (with `wait`, for at most `timeout` seconds if given;
        busy: BusyError ending with `busy_hint`, which names only options the caller has) and
        return it with the flags that apply to it (`opening.with_flags`): an unknown name is
        created, and a flag's change saved, by its first recorded turn, never before. A
        /retry a killed process left unfinished is resolved first (`recover`)."""
        if name not in self.locks:
            lock = AgentLock(name).acquire(wait=wait, timeout=timeout, hint=busy_hint, grace=self.lock_grace)
            try:
                said = self.recover(name)
            except BaseException:  # not held on a failure: the next opening recovers again
                lock.release()
                raise
            self.locks[name] = lock
            if said:  # for the command to say, or else the agent's next turn (a Notice: a server's client sees it)
                self.recovered[name] = said
                self._warned.discard((name, said))  # each recovery is said, not only a process's first
        agent = self.store.find_agent(name)
        self._stored[name] = agent is not None
        return opening.with_flags(name, agent, model_flag, system, agent is not None and self.store.has_messages(name))

    def recover(self, name: str) -> str | None:
        """Resolve a /retry a killed process left unfinished, the caller holding the agent
        (`history.recover_retry`): the line that says what it did, or None."""
        said = recover_retry(self.store, lambda: self.kv.index, name, self.kv.block_tokens)
        if said:
            self.kv.drop_hot(name)  # it may cover the cut reply
        return said

    def peek_agent(self, name: str, model_flag: str | None = None, system: str | None = None) -> Agent:
        """The agent as `open_agent` returns it, taking no lock (a REPL whose turns a server runs)."""
        agent = self.store.find_agent(name)
        return opening.with_flags(name, agent, model_flag, system, agent is not None and self.store.has_messages(name))

    def release(self, name: str) -> None:
        """Give an agent's lock back (the server, between turns): another process may change
        it now, so whether the store has it is asked again next time. Its hot copy stays: a
        restore uses it only when it is a prefix of the next prompt."""
        lock = self.locks.pop(name, None)
        if lock is not None:
            lock.release()
        self._stored.pop(name, None)

    def close(self) -> None:
        for lock in self.locks.values():
            lock.release()
        self.locks.clear()
        self.kv.close()

    def engine_for(self, agent: Agent, on_progress: Progress | None = None) -> Engine:
        return get_engine(self._ref(agent.model, on_progress))

    def _ref(self, spec: str, on_progress: Progress | None) -> ModelRef:
        return resolve(spec, on_progress)

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
        stored = None if is_new else self.store.find_agent(agent.name)
        changes = {k: getattr(agent, k) for k in ("model", "system") if stored is not None and getattr(agent, k) != getattr(stored, k)}
        history = [] if is_new else self.store.messages(agent.name)
        msgs = prompting.chat_messages(agent, history)
        log = self.store.token_log(agent.name, lm.tokenizer_fingerprint) if history and not changes else None
        vocab = getattr(getattr(lm.model, "args", None), "vocab_size", None)
        if log and isinstance(vocab, int) and max(log) >= vocab:  # a damaged log: the model would read past its embeddings
            log = None
        delta = None
        if log:
            delta = prompting.turn_delta(tok, msgs, user_text, log_ends_with_eos=log[-1] in tok.eos_token_ids)
        if log and delta is not None:
            prompt, new_log = log + delta, False
        else:
            prompt, new_log = prompting.full_prompt(tok, msgs + [{"role": "user", "content": user_text}]), True
            log = []
        if len(prompt) >= lm.context_length:
            what = "conversation with this message" if history else "message"
            advice = f"shorten it, or {too_long_advice(agent.name)}" if history else "shorten it"
            raise PromptTooLongError(f"the {what} is {len(prompt)} tokens but {lm.name} has a context of {lm.context_length}; {advice}")
        request, tier, warnings = self._request(agent, engine, prompt, settings, started)
        warnings[:0] = ([self.recovered.pop(agent.name)] if agent.name in self.recovered else []) + self.cache.untold.pop(agent.name, [])
        opens = prompting.opening_len(tok, msgs + [{"role": "user", "content": user_text}], prompt)
        return PendingTurn(
            agent, user_text, engine, request, new_log, len(log), tier, is_new, warnings, started=started, changes=changes, opening=opens
        )

    def prepare_stateless(self, slot: str, engine: Engine, messages: list[dict[str, str]], settings: GenSettings) -> PendingTurn:
        """A turn that is not any agent's (the API with a model name): the whole conversation
        comes with it and nothing is recorded. Its cache is found by content (blocks) and kept
        under `slot` (the tail and the hot copy, for that slot's next request)."""
        started = time.perf_counter()
        lm = engine.lm
        prompt = prompting.full_prompt(lm.tokenizer, messages)
        if len(prompt) >= lm.context_length:
            raise PromptTooLongError(f"the messages are {len(prompt)} tokens but {lm.name} has a context of {lm.context_length} tokens")
        slot_agent = Agent(slot, lm.name, "", {}, time.time(), time.time())
        request, tier, warnings = self._request(slot_agent, engine, prompt, settings, started)
        return PendingTurn(slot_agent, "", engine, request, True, 0, tier, False, warnings, started=started, stateless=True)

    def _request(
        self, agent: Agent, engine: Engine, prompt: list[int], settings: GenSettings, started: float
    ) -> tuple[TurnRequest, str, list[str]]:
        """The engine request for a prompt: settings (flag, else the agent's, else config) and
        the longest cached prefix that can be restored."""
        lm = engine.lm
        value = self._sampling(agent, engine, settings)
        max_tokens = min(int(value("max_tokens")), lm.context_length - len(prompt), settings.max_tokens_limit or lm.context_length)
        restored = Restored(None, 0, "cold")
        t = time.perf_counter()
        with self.cache.guard(CACHE_UNAVAILABLE, restored.warnings):
            spec = self.cache.spec(engine)  # traced once per model and Chat: in the TTFT, not in the restore's time
            t = time.perf_counter()
            restored = self.kv.restore(agent.name, lm.fingerprint, spec, prompt, capacity=len(prompt) + max_tokens)
        restore_s = time.perf_counter() - t
        request = TurnRequest(
            agent.name,
            prompt,
            restored.cache,
            restored.matched,
            max_tokens,
            float(value("temp")),
            float(value("top_p")),
            started,
            top_k=int(value("top_k")),
            min_p=float(value("min_p")),
            repeat_penalty=float(value("repeat_penalty")),
            repeat_last_n=min(int(value("repeat_last_n")), lm.context_length),  # no further back than the context: the same penalty
            restore_s=restore_s,
        )
        return request, restored.tier, list(restored.warnings)

    def _sampling(self, agent: Agent, engine: Engine, settings: GenSettings) -> Callable[[str], Any]:
        from pathlib import Path

        from .model.generation import sampling_defaults

        fp = engine.lm.fingerprint
        if fp not in self._model_defaults:
            self._model_defaults[fp] = sampling_defaults(Path(engine.lm.ref.path))
        return sampling(settings, agent, self._model_defaults[fp])

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
        yield from self.notices(pendings)
        reading: dict[str, tuple[list[Any], list[int]]] = {}  # what a stopped prefill had read: kept as cache
        events = pendings[0].engine.generate([p.request for p in pendings], seed=seed, reading=reading)
        try:
            for ev in events:
                p = by_key[ev.key]
                try:
                    yield from self.take(p, ev)
                except TurnNotSaved as exc:  # this reply only: the others are still recorded
                    not_saved[p.agent.name] = exc.errors[p.agent.name]
        except BaseException as exc:
            with contextlib.suppress(Exception):
                events.close()  # the engine drops the unfinished sequences
            left = [p for p in pendings if not p.recorded and p.agent.name not in not_saved]
            self.record_unfinished(left, exc, reading)
            for name, err in not_saved.items():
                note(exc, f"{name}'s reply could not be saved to the transcript ({one_line(err)})")
            raise
        finally:
            events.close()
        if not_saved:
            raise TurnNotSaved(not_saved, others=len(pendings) > len(not_saved))

    def take(self, p: PendingTurn, ev: Event, write_later: bool = False) -> Iterator[TurnEvent]:
        """One engine event of `p`'s sequence, for any driver (`run`, the server's loop):
        tokens are collected on `p`; a `TurnDone` is recorded and cached, then followed by its
        `TurnRecorded`. A failed transcript write raises `TurnNotSaved` for this agent alone.
        `write_later`: the cache is kept hot now and written to disk by `self.cache.write`,
        which the caller runs once the reply is out, holding the agent's lock until then."""
        if isinstance(ev, TokenEvent):
            if ev.token is not None:
                if not p.tokens:
                    p.first_token_at = time.perf_counter()
                p.tokens.append(ev.token)
            p.text.append(ev.text)
        elif isinstance(ev, TurnDone):
            p.done = ev
            yield ev
            self._record_or_raise(p, ev)
            yield self._cache_turn(p, ev, write_later)
            return
        yield ev

    def interrupt(self, p: PendingTurn, reading: dict[str, tuple[list[Any], list[int]]] | None = None) -> TurnRecorded:
        """Stop one turn from outside the engine (Ctrl-C, its client left, the server stops):
        its partial reply is recorded as interrupted (`TurnNotSaved` if it cannot be). Stopped
        before its first token, only the user's message is recorded, unanswered, and what
        the prefill had read of it (`reading`, from the engine) is kept as cache."""
        read = None  # a reply under way: the whole prompt was read
        if not p.tokens:  # stopped in the prefill: what the engine says it had read, else only the cache
            read = len(reading[p.agent.name][1]) if reading and p.agent.name in reading else p.request.cached
        done = p.done = p.done or interrupted(p, read)
        self._record_or_raise(p, done)
        if not done.generated and reading and p.agent.name in reading:
            self.cache.keep_read(p, *reading[p.agent.name])
        else:
            self.cache.mark_used(p)
        return TurnRecorded(p.agent.name, p.engine.lm.name, done, p.tier, None, [w for w in p.warnings if self._first(p.agent.name, w)])

    def record_unfinished(
        self, pendings: list[PendingTurn], cause: BaseException, reading: dict[str, tuple[list[Any], list[int]]] | None = None
    ) -> None:
        """Record the replies a stopped run leaves behind: a finished one as it finished, the
        others as interrupted. Each on its own: one failure does not cost the rest."""
        for p in pendings:
            try:
                self.interrupt(p, reading)
            except TurnNotSaved as exc:
                note(cause, f"{p.agent.name}'s reply could not be saved to the transcript ({one_line(exc.errors[p.agent.name])})")
            if not isinstance(cause, KeyboardInterrupt | GeneratorExit):
                self.drop_hot(p.agent.name)

    def drop_hot(self, name: str) -> None:
        """Forget an agent's hot cache when it can no longer be trusted; the next turn restores
        from disk. After an engine error, too: a turn alone writes into its hot cache's own
        buffers (backend/compat.py `_adopted`), and a step that failed may have left them
        holding its unevaluated writes."""
        with contextlib.suppress(Exception):
            self.kv.drop_hot(name)

    def _record_or_raise(self, p: PendingTurn, done: TurnDone) -> None:
        """`_record`, or, when the transcript write fails, clean up and raise `TurnNotSaved`
        for this agent alone (the caller's other turns go on)."""
        try:
            self._record(p, done)
        except Exception as exc:
            self._not_recorded(p)
            raise TurnNotSaved({p.agent.name: exc}, others=False) from exc

    def _not_recorded(self, p: PendingTurn) -> None:
        """After a failed transcript write: no transaction left open for the next record,
        and no hot cache that might now cover more than the transcript holds."""
        with contextlib.suppress(Exception):
            if self.store.db.in_transaction:
                self.store.db.rollback()
        self.drop_hot(p.agent.name)

    def _record(self, p: PendingTurn, done: TurnDone) -> None:
        """Commit the turn to the transcript: one transaction, the truth."""
        if p.stateless:  # nothing to record: the client keeps the conversation
            p.recorded = True
            return
        lm = p.engine.lm
        if p.is_new:
            a = p.agent
            self.store.create_agent(a.name, a.model, a.system, a.settings)
            self._stored[a.name] = True
            p.is_new = False
        messages, log, replace_log = transcript_rows(p, done, lm.name)
        self.store.record_turn(
            p.agent.name,
            messages,
            lm.tokenizer_fingerprint,
            log if replace_log else log[p.log_len :],
            replace_log=replace_log,
            changes=p.changes,
        )
        p.recorded = True
        faults.point("after-transcript-commit")

    def _cache_turn(self, p: PendingTurn, done: TurnDone, write_later: bool = False) -> TurnRecorded:
        """Cache a recorded turn (`TurnCache.keep`). Nothing there can cost the reply: it is in
        the transcript already, so a failure is a warning and a re-prefill next time."""
        persisted = self.cache.keep(p, done, write_later)
        warnings = [w for w in p.warnings if self._first(p.agent.name, w)]
        return TurnRecorded(p.agent.name, p.engine.lm.name, done, p.tier, persisted, warnings)

    def notices(self, pendings: list[PendingTurn]) -> Iterator[Notice]:
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
