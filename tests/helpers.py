"""Driving the chat core in-process, as the CLI does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from semantic_cli.chat import Chat, GenSettings, Notice, TurnRecorded
from semantic_cli.store import Store


class Session:
    """One 'process' worth of state: a store, a chat (hot tier, locks)."""

    def __init__(self) -> None:
        self.store = Store()
        self.chat = Chat(self.store)
        self.notices: list[str] = []

    def say(self, agent: str, text: str, model: Path | str | None = None, max_tokens: int = 12, system: str | None = None) -> TurnRecorded:
        [rec] = self.room({agent: text}, model=model, max_tokens=max_tokens, system=system)
        return rec

    def room(
        self, messages: dict[str, str], model: Path | str | None = None, max_tokens: int = 12, system: str | None = None
    ) -> list[TurnRecorded]:
        settings = GenSettings(max_tokens=max_tokens)
        pendings = []
        for name, text in messages.items():
            agent = self.chat.open_agent(name, str(model) if model else None, system)
            pendings.append(self.chat.prepare(agent, text, settings))
        out: list[Any] = []
        for ev in self.chat.run(pendings):
            if isinstance(ev, TurnRecorded):
                out.append(ev)
                self.notices += ev.warnings
            elif isinstance(ev, Notice):
                self.notices.append(ev.text)
        return out

    def close(self) -> None:
        self.chat.close()
        self.store.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def edited_copy(model: Path, dest: Path, file: str, **changes: Any) -> Path:
    """A copy of the model directory `model` at `dest`, with `changes` merged into its JSON `file`."""
    import json
    import shutil

    shutil.copytree(model, dest)
    config = json.loads((dest / file).read_text())
    (dest / file).write_text(json.dumps({**config, **changes}))
    return dest


def uncached_reply_end() -> int:
    """How many of a finished turn's last tokens its cache leaves out: 1 on the CPU, where no
    forward pass reads a reply's last token (backend/compat.py), 0 on a GPU."""
    from semantic_cli.backend import runtime

    mx = runtime.mx()
    return 1 if mx.default_device().type == mx.cpu else 0
