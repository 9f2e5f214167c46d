"""The CLI's own stream from the server: each `TurnEvent` (and an error or the end) as
one JSON object per line, and back into the same records, so `semantic chat` renders a
turn the server ran exactly as one it ran itself.

Only what the CLI shows travels: a `TurnDone` carries no cache or token ids here.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from ..engine import PromptProgress, TokenEvent, TurnDone, TurnStats
from ..errors import SemanticError
from ..kv.stats import PersistStats
from ..turn import GenSettings, Notice, TurnEvent, TurnRecorded

WIRE_VERSION = 1  # bumped when a field changes meaning; the client refuses another


def encode(ev: TurnEvent) -> dict[str, Any]:
    if isinstance(ev, Notice):
        return {"event": "notice", "key": ev.key, "text": ev.text}
    if isinstance(ev, PromptProgress):
        return {"event": "progress", "key": ev.key, "done": ev.done, "total": ev.total}
    if isinstance(ev, TokenEvent):
        return {"event": "token", "key": ev.key, "text": ev.text}
    if isinstance(ev, TurnDone):
        return {"event": "done", "key": ev.key}
    return {
        "event": "recorded",
        "key": ev.key,
        "model": ev.model,
        "tier": ev.tier,
        "warnings": ev.warnings,
        "finish_reason": ev.done.finish_reason,
        "text": ev.done.text,
        "stats": asdict(ev.done.stats),
        "persisted": asdict(ev.persisted) if ev.persisted is not None else None,
    }


def error(exc: SemanticError, kind: str = "error", names: list[str] | None = None) -> dict[str, Any]:
    return {"event": "error", "kind": kind, "message": exc.message, "exit_code": exc.exit_code, "names": names or []}


def line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def decode(obj: dict[str, Any]) -> TurnEvent | None:
    """The record for one line (None for lines that carry no event: `done`)."""
    kind = obj.get("event")
    if kind == "notice":
        return Notice(obj["key"], obj["text"])
    if kind == "progress":
        return PromptProgress(obj["key"], int(obj["done"]), int(obj["total"]))
    if kind == "token":
        return TokenEvent(obj["key"], None, obj["text"])
    if kind == "recorded":
        stats = TurnStats(**obj["stats"])
        done = TurnDone(obj["key"], obj["finish_reason"], obj["text"], [], None, [], stats)
        persisted = PersistStats(**obj["persisted"]) if obj.get("persisted") else None
        return TurnRecorded(obj["key"], obj["model"], done, obj["tier"], persisted, list(obj["warnings"]))
    return None


def settings(obj: dict[str, Any]) -> GenSettings:
    """The CLI's settings, checked as its flags check them (a bad one: ValueError)."""
    from .. import config

    values: dict[str, Any] = {}
    for key in GenSettings.__dataclass_fields__:
        value = obj.get(key)
        if value is None:
            continue
        if key == "seed":
            values[key] = int(value)
        elif key in config.SETTINGS:
            values[key] = config.SETTINGS[key].parse(str(value))
        else:
            raise ValueError(f"unknown setting {key!r}")
    return GenSettings(**values)
