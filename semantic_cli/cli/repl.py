"""The interactive chat loop: prompt-toolkit input, rich live output, slash commands.

This is UI code and prints; the core (`chat.Chat`) never does. A reply streams
into a rich Live region (Markdown unless --no-markdown); a room shows one
labelled panel per agent, all streaming at once. Ctrl-C during a reply stops
it: the core records the partial reply as "interrupted" and we return to the
prompt. Ctrl-C at an empty prompt, Ctrl-D or /quit leave with exit code 0.

The REPL survives any recoverable error: a `SemanticError` is one red line, any
other exception one line too (a traceback only with SEMANTIC_DEBUG=1), and the
prompt comes back; the core has recorded what it could. Stored and generated
text reaches the terminal only through `render.printable`.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import interrupts, paths
from ..errors import SemanticError
from ..rooms import address
from . import render, slash
from .live import ResizableLive
from .render import printable
from .repl_input import _key_bindings, _quiet_tty, unblock
from .turnview import PREFILL_BAR_MIN, Reply, TurnView

if TYPE_CHECKING:  # types only: the core is imported when a turn runs
    from ..chat import Chat, GenSettings, TurnRecorded
    from ..store import Agent


@dataclass
class Totals:
    """Session figures for /stats."""

    turns: int = 0
    interrupted: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0


class Repl:
    def __init__(
        self,
        session: Chat,
        agents: list[Agent],
        settings: GenSettings,
        markdown: bool = True,
        remote: str | None = None,
        flags: tuple[str | None, str | None] = (None, None),
    ) -> None:
        self.session = session
        self.remote = remote  # the server's socket: its engine runs the turns, and this REPL holds no agent
        self.flags = flags  # --model and --system, for the server to apply as `open_agent` would
        self.agents: dict[str, Agent] = {a.name: a for a in agents}
        self.current = agents[0].name
        self.settings = settings
        self.markdown = markdown
        self.console = render.stdout()
        self.console.soft_wrap = False  # rich must wrap itself, or Live miscounts lines to redraw
        self.err = render.stderr()
        self.last: dict[str, TurnRecorded] = {}  # agent -> its last turn
        self.last_reply: tuple[str, str] | None = None  # (agent, text) of the latest reply, for /round
        self.totals = Totals()
        self.cut_shown = False  # the last Ctrl-C's cut replies said "interrupted" in their view
        self._prompts: dict[str, Any] = {}
        self.contexts: dict[str, int | None] = {}  # model spec -> its context length (read from config.json)

    @property
    def room(self) -> bool:
        return len(self.agents) > 1

    def agent(self, name: str | None = None) -> Agent:
        return self.agents[name or self.current]

    def replace_agent(self, agent: Agent) -> None:
        self.agents[agent.name] = agent

    def open_agent(self, name: str, model: str | None) -> Agent:
        """An agent joining the room: locked for this REPL's life, or (with a server) only read."""
        if self.remote is not None:
            return self.session.peek_agent(name, model)
        return self.session.open_agent(name, model)

    @contextlib.contextmanager
    def holding(self, name: str) -> Iterator[None]:
        """The agent's lock while a slash command changes it: the REPL's own (held for its
        life without a server), or taken for the change (a server's turn may hold it: wait)."""
        if name in self.session.locks:
            yield
            return
        from ..locks import AgentLock

        lock = AgentLock(name).acquire(wait=True, timeout=30)
        try:
            said = self.session.recover(name)  # a /retry a killed process left, resolved before this change
            if said:
                self.info(f"{name}: {said}")
            yield
        finally:
            lock.release()

    def _go_local(self, why: str) -> None:
        """The server cannot take turns any more: lock the room's agents and run them here."""
        self.info(f"the server is not available ({why}): running turns in this process from now on")
        for name in list(self.agents):
            self.agents[name] = self.session.open_agent(name, self.flags[0] if not self.session.store.find_agent(name) else None)
        self.remote = None

    # ---- input ----------------------------------------------------------
    def _prompt(self) -> Any:
        """One prompt-toolkit session per agent: each has its own history file."""
        if self.current not in self._prompts:
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import FileHistory
            from prompt_toolkit.output import ColorDepth

            self._prompts[self.current] = PromptSession(
                history=FileHistory(str(paths.history_dir() / f"{self.current}.history")),
                completer=slash.Completer(self),
                complete_while_typing=True,
                key_bindings=_key_bindings(),
                prompt_continuation=lambda width, line, wrap: "." * (width - 1) + " ",
                color_depth=ColorDepth.DEPTH_1_BIT if self.console.no_color else None,
                reserve_space_for_menu=4,
            )
        return self._prompts[self.current]

    def read(self) -> str:
        session = self._prompt()

        def leave() -> None:  # SIGTERM or SIGHUP at the prompt: it returns as for Ctrl-D
            app = session.app
            if app.is_running and app.loop is not None:
                app.loop.call_soon_threadsafe(lambda: app.exit(exception=EOFError()) if app.is_running else None)

        with interrupts.waking(leave):
            return session.prompt([("bold", self.current), ("", "> ")])

    # ---- the loop -------------------------------------------------------
    def run(self) -> None:
        model = self.agent().model
        who = (
            f"room {', '.join(self.agents)} · @name or @all to address"
            if self.room
            else f"chatting with {self.current} ({printable(model)})"
        )
        self.err.print(f"{who} · /help for commands · Ctrl-D to leave", style="dim", markup=False, highlight=False)
        while interrupts.terminating() is None:  # SIGTERM or SIGHUP: the cut turn is kept, then the REPL ends
            try:
                raw = self.read()
            except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at an empty prompt
                return
            text, quoted = unblock(raw)
            if not text.strip():
                continue
            if not quoted and text.strip().lower() in ("exit", "quit"):
                return  # the lone word leaves, as in a shell; """exit""" sends it
            try:
                if text.startswith("//"):
                    self.send(text[1:])  # `//x` sends a message that starts with a slash
                elif text.startswith("/") and not quoted:
                    if not slash.dispatch(self, text.strip()):
                        return
                else:
                    self.send(text)
            except SemanticError as exc:
                self.error(exc.message)
            except KeyboardInterrupt:  # a cut reply says so in its own status line: said once
                if not self.cut_shown:
                    self.err.print("interrupted", style="yellow", markup=False, highlight=False)
                self.cut_shown = False
            except Exception as exc:  # a bug or an exhausted resource: this turn failed, the session goes on
                self.unexpected(exc)

    def error(self, message: str) -> None:
        self.err.print(f"error: {printable(message)}", style="red", markup=False, highlight=False)

    def unexpected(self, exc: Exception) -> None:
        """One line for an exception nobody expected (a traceback first with SEMANTIC_DEBUG=1)."""
        first = str(exc).strip().splitlines()
        what = f"unexpected {type(exc).__name__}" + (f": {first[0]}" if first else "")
        if os.environ.get("SEMANTIC_DEBUG") == "1":
            self.err.file.write("".join(traceback.format_exception(exc)))
            self.err.file.flush()
            self.error(what)
        else:
            self.error(f"{what} (rerun with SEMANTIC_DEBUG=1 for a traceback and please report it)")

    def info(self, message: str) -> None:
        self.err.print(printable(message), style="dim", markup=False, highlight=False)

    def send(self, text: str) -> None:
        targets, body = address(text, list(self.agents), self.current)
        self.turn([(self.agents[n], body) for n in targets])

    # ---- one turn (or a room's concurrent turns) ------------------------
    def turn(self, targets: list[tuple[Agent, str]], titles: dict[str, str] | None = None) -> list[TurnRecorded]:
        """Run the turns, streaming them live; returns their TurnRecorded events.
        Ctrl-C: the core keeps the partial replies; KeyboardInterrupt is re-raised. Any other
        error is re-raised too, once the core has recorded what it could: replies it could not
        save (`TurnNotSaved`) show as failed, the others left unfinished as interrupted."""
        from ..chat import Notice, TurnNotSaved, TurnRecorded
        from ..engine import PromptProgress, TokenEvent

        events: Generator[Any, None, None] | None = None
        if self.remote is not None:
            events = self._remote_events(targets)
        if events is None:
            with render.progress(self.err) as progress:  # model download/conversion, loading
                pendings = [self.session.prepare(a, body, self.settings, progress) for a, body in targets]
            events = self.session.run(pendings, seed=self.settings.seed)
        names = [a.name for a, _ in targets]
        replies = {n: Reply(n, (titles or {}).get(n, n)) for n in names}
        view = TurnView(list(replies.values()), self.markdown, panels=self.room)
        recorded: list[TurnRecorded] = []
        started = time.perf_counter()
        with _quiet_tty(), ResizableLive(view, self.console) as live:
            try:
                for ev in events:
                    r = replies.get(ev.key)
                    if r is None:
                        continue
                    if isinstance(ev, TokenEvent):
                        r.text += ev.text
                        r.tokens += ev.token is not None
                        r.state = "streaming"
                    elif isinstance(ev, PromptProgress):
                        r.prefill = (ev.done, ev.total)
                        if ev.total >= PREFILL_BAR_MIN:
                            live.refresh()  # a fast prefill may end before the next tick
                    elif isinstance(ev, Notice):
                        r.notes.append(f"warning: {ev.text}")
                    elif isinstance(ev, TurnRecorded):
                        r.state, r.text = "done", ev.done.text
                        r.footer = render.footer(
                            ev.done.stats, ev.tier, ev.done.finish_reason, slash.control.context(self, ev.key), ev.key, repl=True
                        )
                        r.notes += [f"warning: {w}" for w in ev.warnings]
                        recorded.append(ev)
                        self._count(ev)
            except BaseException as exc:
                events.close()  # the core records the partial replies now, not at garbage collection
                failed = set(exc.errors) if isinstance(exc, TurnNotSaved) else set()
                self.cut_shown = any(r.state != "done" for r in replies.values())  # their status lines say it
                for r in replies.values():
                    if r.state == "done":
                        continue
                    if r.name in failed:
                        r.state = "failed"
                    else:
                        r.state = "interrupted"
                        self.totals.interrupted += 1
                        self.totals.generated_tokens += r.tokens
                raise
            finally:
                view.final = True
                live.refresh()
                self.totals.seconds += time.perf_counter() - started
                if self.remote is not None:  # the server may have created or changed them
                    for n in names:
                        self.agents[n] = self.session.store.find_agent(n) or self.agents[n]
        return recorded

    def _remote_events(self, targets: list[tuple[Agent, str]]) -> Generator[Any, None, None] | None:
        """The turns as the server runs them; None (after saying so) when it cannot, and the
        REPL then runs this turn and the next ones itself."""
        from dataclasses import asdict

        from ..server import client

        payload = {
            "targets": [(a.name, body) for a, body in targets],
            "model": self.flags[0],
            "system": self.flags[1],
            "settings": asdict(self.settings),
            "wait": True,
            "wait_timeout": 30,
        }
        try:
            return client.start_turn(self.remote or "", payload)
        except client.Unavailable as exc:
            self._go_local(str(exc))
            return None

    def _count(self, rec: TurnRecorded) -> None:
        s = rec.done.stats
        t = self.totals
        t.turns += 1
        t.prompt_tokens += s.prompt_tokens
        t.cached_tokens += s.cached_tokens
        t.prefilled_tokens += s.prefilled_tokens
        t.generated_tokens += s.generated_tokens
        self.last[rec.key] = rec
        self.last_reply = (rec.key, rec.done.text)

    # ---- /round ---------------------------------------------------------
    def round(self, rounds: int, topic: str) -> None:
        """Agents answer each other in turn; each sees the others' replies as user
        messages attributed by name ("[critic]: ..."). Ctrl-C stops; finished turns stay."""
        names = list(self.agents)
        inbox: dict[str, list[str]] = {n: [] for n in names}
        if topic:
            for n in names:
                inbox[n].append(topic)
        elif self.last_reply is not None:
            speaker, said = self.last_reply
            for n in names:
                if n != speaker:
                    inbox[n].append(f"[{speaker}]: {said.strip() or '(no reply)'}")
        else:
            self.error("what should they discuss? /round N TOPIC")
            return
        done = 0
        try:
            for i in range(rounds):
                for name in names:
                    message = "\n\n".join(inbox[name]) or "(your turn: continue the discussion)"
                    inbox[name] = []
                    recs = self.turn([(self.agents[name], message)], titles={name: f"{name} · round {i + 1}/{rounds}"})
                    said = recs[0].done.text.strip() if recs else ""
                    for other in names:
                        if other != name:
                            inbox[other].append(f"[{name}]: {said or '(no reply)'}")
                    done += 1
        except KeyboardInterrupt:
            why = f"round stopped after {render.plural(done, 'complete turn')}; they are kept (the cut reply is marked interrupted)"
            self.err.print(why, style="yellow", markup=False, highlight=False)
            return
        self.info(f"round over: {render.plural(done, 'turn')}")
