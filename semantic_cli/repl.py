"""The interactive chat loop (prompt-toolkit input, rich live output)."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.text import Text

from . import paths, render
from .errors import SemanticError
from .rooms import address


class Repl:
    def __init__(self, session: Any, agents: list[Any], settings: Any, markdown: bool = True) -> None:
        self.session = session
        self.agents = {a.name: a for a in agents}
        self.current = agents[0].name
        self.settings = settings
        self.markdown = markdown
        self.console = render.stdout()
        self.err = render.stderr()
        self.last: dict[str, Any] = {}

    def _prompt_session(self) -> Any:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory

        return PromptSession(history=FileHistory(str(paths.history_dir() / f"{self.current}.history")))

    def run(self) -> None:
        names = ", ".join(self.agents)
        self.err.print(f"chatting with {names} · /help for commands · Ctrl-D to leave", style="dim", markup=False)
        prompt = self._prompt_session()
        while True:
            try:
                text = prompt.prompt(f"{self.current}> ")
            except (EOFError, KeyboardInterrupt):
                return
            if not text.strip():
                continue
            if text.strip() == "/quit":
                return
            try:
                targets, body = address(text, list(self.agents), self.current)
                self.turn([(self.agents[n], body) for n in targets])
            except SemanticError as exc:
                self.err.print(f"error: {exc.message}", style="red", markup=False)
            except KeyboardInterrupt:
                self.err.print("interrupted: the partial reply is kept, marked as interrupted", style="yellow", markup=False)

    def turn(self, targets: list[tuple[Any, str]]) -> None:
        from .chat import Notice, TurnRecorded
        from .engine import PromptProgress, TokenEvent

        with render.progress(self.err) as progress:
            pendings = [self.session.prepare(a, body, self.settings, progress) for a, body in targets]
        texts = {p.agent.name: "" for p in pendings}
        status = {p.agent.name: "" for p in pendings}
        room = len(pendings) > 1

        def view() -> Any:
            parts = []
            for name, text in texts.items():
                body = Markdown(text) if self.markdown and text else Text(text)
                extra = Text(status[name], style="dim") if status[name] else None
                content = Group(body, extra) if extra else body
                parts.append(Panel(content, title=name, title_align="left") if room else content)
            return Group(*parts)

        with Live(view(), console=self.console, refresh_per_second=12, transient=False) as live:
            for ev in self.session.run(pendings, seed=self.settings.seed):
                if isinstance(ev, TokenEvent):
                    texts[ev.key] += ev.text
                    status[ev.key] = ""
                elif isinstance(ev, PromptProgress) and ev.total > 256:
                    status[ev.key] = f"reading the conversation: {ev.done}/{ev.total} tokens"
                elif isinstance(ev, Notice):
                    self.err.print(f"warning: {ev.key}: {ev.text}", style="yellow", markup=False)
                elif isinstance(ev, TurnRecorded):
                    self.last[ev.key] = ev
                    status[ev.key] = render.footer(ev.done.stats, ev.tier)
                    for w in ev.warnings:
                        self.err.print(f"warning: {ev.key}: {w}", style="yellow", markup=False)
                live.update(view())
