"""The engine loop: one thread owns the model, the transcript store, the KV store and the
agents' locks. HTTP handlers (on the asyncio loop) hand it `Job`s through a queue and get
the turn's events back through the job's `emit`; the loop never waits on a client.

Each pass of the loop: take new jobs, start those whose agents are free (lock, prepare,
restore, `Batch.add`: a request that arrives while others decode joins the running batch),
cancel what clients gave up on, run one engine step and hand out its events. A finished
turn is recorded and cached by `Chat.take`, exactly as `semantic chat` does in-process.

An agent's lock is held only while its turn runs, so the CLI without the server, and the
server's own other requests, wait for it (turns of one agent are serialized); the hot tier
keeps the agent's cache in memory between requests under `hot_budget`. A finished turn's
cache is written to disk after its reply has gone out (at the top of the next pass, before
any other turn starts), and the agent's lock released then: a client's wait for its reply
never includes that write.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
import time
from typing import Any

from ..chat import Chat, check_room
from ..engine import Engine, get_engine
from ..errors import BusyError, NotFoundError, SemanticError
from ..events import TokenEvent, TurnDone
from ..model.loader import ModelRef
from ..store import Agent, Store
from ..turn import Notice, PendingTurn, TurnNotSaved, ended, one_line
from .jobs import END, STARTED, Job, OtherModel, Saturated, ShuttingDown
from .openai_api import check_history
from .stops import stop_at, stop_prefix

SLOT_PREFIX = "~"  # stateless API slots in the KV index: never an agent name (those start with a-z or 0-9)
ANON_SLOTS = 8  # requests naming no slot share this many, so they need not wait for each other


class Worker:
    def __init__(self, ref: ModelRef, max_waiting: int = 64) -> None:
        self.ref = ref
        self.max_waiting = max_waiting
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.failure: BaseException | None = None
        self.model_name = ""
        self._thread = threading.Thread(target=self._main, name="semantic-engine", daemon=True)
        self._waiting: list[Job] = []
        self._running: dict[str, Job] = {}  # engine key -> its job
        self._grace_until: float | None = None

    # ---- the handlers' side (any thread) -------------------------------------
    def start(self) -> None:
        self._thread.start()
        self.ready.wait()
        if self.failure is not None:
            raise self.failure

    def submit(self, job: Job) -> None:
        if self.stopping.is_set():
            raise ShuttingDown("the server is shutting down; retry in a moment")
        if self.inbox.qsize() + len(self._waiting) >= self.max_waiting:
            raise Saturated(f"more than {self.max_waiting} requests are waiting; retry later")
        self.inbox.put(job)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting; turns still running after `grace_s` are interrupted (recorded as such)."""
        self._grace_until = time.monotonic() + grace_s
        self.stopping.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # ---- the engine thread ---------------------------------------------------
    def _main(self) -> None:
        try:
            self.chat = Chat(Store(), lock_grace=0.0)  # the loop never waits on a lock: it polls between steps
            self.engine: Engine = get_engine(self.ref)
            self.model_name = self.engine.lm.name
            self.batch = self.engine.batch()
            self._warm_up()
        except BaseException as exc:
            self.failure = exc
            self.ready.set()
            return
        self.ready.set()
        try:
            self._loop()
        finally:
            with contextlib.suppress(Exception):
                self.batch.close()
            try:
                self._write_caches()
            finally:
                self.chat.close()
                self.chat.store.close()

    def _warm_up(self) -> None:
        """One short throwaway generation at start, so that the first request does not pay
        the engine's one-time costs (first kernels, buffers) in its time to first token."""
        from ..events import TurnRequest

        tokens = list(self.engine.lm.tokenizer.encode("warm up", add_special_tokens=False)) or [0]
        self.batch.add(TurnRequest(f"{SLOT_PREFIX}warm-up", tokens * 8, None, 0, 2))
        while self.batch.live:
            self.batch.step()
        self.batch.close()

    def _loop(self) -> None:
        while True:
            self._write_caches()
            self._take(block=not self._running and not self._waiting)
            if self.stopping.is_set():
                for job in self._waiting:
                    self._fail(job, ShuttingDown("the server is shutting down; retry in a moment"))
                self._waiting.clear()
                if not self._running:
                    return
                if self._grace_until is not None and time.monotonic() >= self._grace_until:
                    for key in list(self._running):
                        self._interrupt(key)
                    continue
            self._start_waiting()
            for key, job in list(self._running.items()):
                if job.cancelled.is_set():
                    self._interrupt(key)
            if self.batch.live:
                try:
                    events = self.batch.step()
                except Exception as exc:  # the engine failed: every running turn ends (recorded as interrupted)
                    for key in list(self._running):
                        self._interrupt(key, SemanticError(f"the engine failed: {one_line(exc)}"))
                        self.chat.drop_hot(key)
                    self.batch = self.engine.batch()
                    self.batch.seed(int.from_bytes(os.urandom(4), "little"))  # the failed step may have left the random state unusable
                    continue
                for ev in events:
                    self._deliver(ev)
                if not self.batch.live:
                    self.batch.close()  # idle: split matmuls off until two sequences run again
            elif self._waiting and not self._running:
                time.sleep(0.05)  # only busy agents are waiting: poll their locks

    def _write_caches(self) -> None:
        """The caches of the turns that ended since the last pass, their replies gone out: written
        now, each agent's lock released after its own. (A turn's cache waits in `chat.cache`
        from its `TurnDone` on, and the turn is finished in that same `_deliver`.)"""
        for name in list(self.chat.cache.unwritten):
            try:
                self.chat.cache.write(name)  # a failure is a warning for the agent's next turn
            finally:
                self.chat.release(name)

    def _take(self, block: bool) -> None:
        try:
            job = self.inbox.get(timeout=0.1) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        self._waiting.append(job)
        while True:
            try:
                self._waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                return

    def _start_waiting(self) -> None:
        still = []
        for job in self._waiting:
            if job.cancelled.is_set():
                self._end(job)
                continue
            try:
                started = self._start(job)
            except Exception as exc:
                self._fail(job, exc)
                continue
            if not started:
                still.append(job)
        self._waiting = still

    def _start(self, job: Job) -> bool:
        """Lock the job's agents (or slot) and add its turns to the batch; False to retry later."""
        if job.messages is not None:
            return self._start_stateless(job)
        names = [name for name, _ in job.targets]
        free = self._lock(job, names)
        if free is None:
            return False
        try:
            agents = {name: self._open(job, name) for name in free}
            room = [agents[n] for n in names if n in agents]
            check_room(room)
            for agent in room:
                self._check_model(agent)
            if job.history is not None:
                check_history(room[0], self.chat.store.messages(room[0].name), job.history)
            texts = dict(job.targets)
            pendings = [self.chat.prepare(agent, texts[agent.name], job.settings) for agent in room]
            self._run(job, pendings)
        except BaseException:
            for name in free:
                self.batch.cancel(name)
                self._running.pop(name, None)
                self.chat.release(name)
            raise
        return True

    def _lock(self, job: Job, names: list[str]) -> list[str] | None:
        """The agents locked for this job (sorted order, as `open_room`); None to wait longer.
        Past its deadline a room goes on without its busy agents (with a warning), and a
        single agent is busy."""
        taken: list[str] = []
        busy: dict[str, BusyError] = {}
        for name in sorted(names):
            try:
                if name in self.chat.locks:  # one of this server's turns holds it
                    raise BusyError(f"agent {name!r} is busy (another request to it is running)")
                self.chat.open_agent(name)
                taken.append(name)
            except BusyError as exc:
                busy[name] = exc
        if not busy:
            return taken
        expired = job.wait_until is not None and time.monotonic() >= job.wait_until
        if not expired:
            for name in taken:
                self.chat.release(name)
            return None
        if len(names) == 1 or not taken:
            for name in taken:
                self.chat.release(name)
            first = busy[sorted(busy)[0]]
            if len(names) == 1:
                raise first
            raise BusyError("every agent in this room is busy in another process; try again later or pass --wait")
        for refused in busy.values():
            job.emit(Notice("", f"{refused.message}; the room continues without it"))
        return taken

    def _open(self, job: Job, name: str) -> Agent:
        known = self.chat.store.find_agent(name)
        if known is None and not job.create:
            raise NotFoundError(f"no agent or model named {name!r}: GET /v1/models lists them")
        return self.chat.open_agent(name, job.model, job.system)

    def _check_model(self, agent: Agent) -> None:
        if not self._same_model(agent.model):
            raise OtherModel(f"agent {agent.name!r} uses model {agent.model!r}, and this server runs {self.ref.spec!r}")

    def _same_model(self, spec: str) -> bool:
        if spec == self.ref.spec:
            return True
        from pathlib import Path

        local = Path(spec).expanduser()
        return local.is_dir() and str(local.resolve()) == self.ref.path

    def _start_stateless(self, job: Job) -> bool:
        slot = self._slot(job)
        if slot is None:
            return False
        try:
            pending = self.chat.prepare_stateless(slot, self.engine, job.messages or [], job.settings)
            self._run(job, [pending])
        except BaseException:
            self.batch.cancel(slot)
            self._running.pop(slot, None)
            self.chat.release(slot)
            raise
        return True

    def _slot(self, job: Job) -> str | None:
        """The slot's lock taken (its tail and hot copy are one request's at a time), or None
        to wait. A request naming no slot takes the first free one of ANON_SLOTS."""
        if job.slot is not None:
            names = [SLOT_PREFIX + hashlib.sha256(job.slot.encode()).hexdigest()[:24]]
        else:
            names = [f"{SLOT_PREFIX}anon-{i}" for i in range(ANON_SLOTS)]
        for name in names:
            if name in self.chat.locks:
                continue
            try:
                self.chat.open_agent(name)
            except BusyError:
                continue
            return name
        if job.wait_until is not None and time.monotonic() >= job.wait_until:
            raise Saturated("every API slot for this request is busy; retry later (or name your own with prompt_cache_key)")
        return None

    def _run(self, job: Job, pendings: list[PendingTurn]) -> None:
        if job.settings.seed is not None:
            self.batch.seed(job.settings.seed)  # the engine's one random state: shared by the sequences running now
        for p in pendings:
            self.batch.add(p.request)
            self._running[p.agent.name] = job
        for p in pendings:
            job.pendings[p.agent.name] = p
            job.left.add(p.agent.name)
        job.emit(STARTED)
        for notice in self.chat.notices(pendings):
            job.emit(notice)

    def _deliver(self, ev: Any) -> None:
        job = self._running.get(ev.key)
        if job is None:
            return
        p = job.pendings[ev.key]
        if isinstance(ev, TokenEvent) and job.stop:
            text = "".join(p.text) + ev.text
            cut = stop_at(job.stop, text)
            if cut is not None:
                self._stop_string(job, p, text, cut)
                return
            # Text that may be the start of a stop sequence is held back until it is not.
            safe = len(text) - stop_prefix(job.stop, text)
            shown = job.shown.get(ev.key, 0)
            try:
                list(self.chat.take(p, ev, write_later=True))  # collects the token on p
            except TurnNotSaved as exc:
                job.failed.update(exc.errors)
            if safe > shown:
                job.emit(TokenEvent(ev.key, ev.token, text[shown:safe]))
                job.shown[ev.key] = safe
            return
        if isinstance(ev, TurnDone) and job.stop:  # the engine ended it: what was held back is the reply's end
            shown = job.shown.get(ev.key, 0)
            if len(ev.text) > shown:
                job.emit(TokenEvent(ev.key, None, ev.text[shown:]))
        try:
            for out in self.chat.take(p, ev, write_later=True):
                if not isinstance(out, TurnDone) and not (job.stop and isinstance(out, TokenEvent)):  # held-back text went above
                    job.emit(out)
        except TurnNotSaved as exc:
            job.failed.update(exc.errors)
        if isinstance(ev, TurnDone):
            self._finish(job, ev.key)

    def _stop_string(self, job: Job, p: PendingTurn, text: str, cut: int) -> None:
        """A stop sequence appeared: the reply ends before it (finish_reason "stop"). Its cache
        is given up (it covers the tokens past the cut); the transcript keeps the cut text."""
        shown = job.shown.get(p.agent.name, 0)
        if cut > shown:
            job.emit(TokenEvent(p.agent.name, None, text[shown:cut]))
        self.batch.cancel(p.agent.name)
        done = ended(p, "stop", text[:cut])
        try:
            for out in self.chat.take(p, done, write_later=True):
                if not isinstance(out, TurnDone):
                    job.emit(out)
        except TurnNotSaved as exc:
            job.failed.update(exc.errors)
        self._finish(job, p.agent.name)

    def _interrupt(self, key: str, why: SemanticError | None = None) -> None:
        """Stop one turn now (its client went away, or the server stops): the partial reply
        is recorded as interrupted, as Ctrl-C does in the CLI."""
        job = self._running.get(key)
        if job is None:
            return
        self.batch.cancel(key)
        p = job.pendings[key]
        try:
            job.emit(self.chat.interrupt(p))  # the client (if still there) sees finish_reason "interrupted"
        except TurnNotSaved as exc:
            job.failed.update(exc.errors)
        if why is not None:
            job.failed[key] = why
        self._finish(job, key)

    def _finish(self, job: Job, key: str) -> None:
        self._running.pop(key, None)
        job.left.discard(key)
        if key not in self.chat.cache.unwritten:  # else released once its cache is written (`_write_caches`)
            self.chat.release(key)
        if not job.left:
            if job.failed:
                errors = {k: e for k, e in job.failed.items() if not isinstance(e, SemanticError) or isinstance(e, TurnNotSaved)}
                first = next(iter(job.failed.values()))
                if isinstance(first, SemanticError) and not errors:
                    self._fail(job, first)
                    return
                self._fail(job, TurnNotSaved(job.failed, others=len(job.pendings) > len(job.failed)))
                return
            self._end(job)

    def _fail(self, job: Job, exc: BaseException) -> None:
        if not isinstance(exc, SemanticError):
            exc = SemanticError(f"unexpected {one_line(exc)}")
        job.emit(exc)
        self._end(job)

    def _end(self, job: Job) -> None:
        job.emit(END)
