"""The CLI's own stream from the server: each `TurnEvent` (and an error or the end) as
one JSON object per line, and back into the same records, so `semantic chat` renders a
turn the server ran exactly as one it ran itself.

Only what the CLI shows travels: a `TurnDone` carries no cache or token ids here.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from ..errors import SemanticError
from ..events import PromptProgress, TokenEvent, TurnDone, TurnStats
from ..kv.stats import PersistStats
from ..turn import GenSettings, Notice, PendingTurn, TurnEvent, TurnRecorded

# Bumped when an event or field is added, dropped or changes meaning. A server answers a
# client of another version with kind "wire_version" (HTTP 409), and the client runs the turn
# in-process, saying so. 2: the "started" event, which Ctrl-C's output is made of.
WIRE_VERSION = 2


def encode(ev: TurnEvent) -> dict[str, Any]:
    if isinstance(ev, Notice):
        return {"event": "notice", "key": ev.key, "text": ev.text}
    if isinstance(ev, PromptProgress):
        return {"event": "progress", "key": ev.key, "done": ev.done, "total": ev.total}
    if isinstance(ev, TokenEvent):
        return {"event": "token", "key": ev.key, "text": ev.text, "token": ev.token}
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


def started(p: PendingTurn) -> dict[str, Any]:
    """What the client needs, with the tokens it receives, to show a turn Ctrl-C cuts as
    the CLI shows one it cut in-process (`client.Received`): sent once per turn, first."""
    req = p.request
    return {
        "event": "started",
        "key": p.agent.name,
        "model": p.engine.lm.name,
        "tier": p.tier,
        "prompt_tokens": len(req.prompt),
        "cached_tokens": req.cached,
        "restore_s": req.restore_s,
        "context_length": p.engine.lm.context_length,
    }


def error(exc: SemanticError, kind: str = "error", names: list[str] | None = None) -> dict[str, Any]:
    return {"event": "error", "kind": kind, "message": exc.message, "exit_code": exc.exit_code, "names": names or []}


def other_version(theirs: object, pid: int) -> dict[str, Any]:
    """The answer to a client of another wire version: a server left running across an upgrade."""
    message = _restart(f"the running semantic server (pid {pid}) is from another release", WIRE_VERSION, theirs)
    return {"event": "error", "kind": "wire_version", "message": message, "exit_code": 1, "names": []}


def older_server(its_version: str) -> str:
    """What the CLI says of a server from before `other_version` (it refused in its own words)."""
    return _restart("the running semantic server is from an older release", its_version, WIRE_VERSION)


def _restart(what: str, server: object, client: object) -> str:
    return f"{what} (wire version {server}, this client's {client}); restart it (stop it, then `semantic serve`) to use it again"


def line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def decode(obj: dict[str, Any]) -> TurnEvent | None:
    """The record for one line (None for lines that carry no event: `done`, `started`)."""
    kind = obj.get("event")
    if kind == "notice":
        return Notice(obj["key"], obj["text"])
    if kind == "progress":
        return PromptProgress(obj["key"], int(obj["done"]), int(obj["total"]))
    if kind == "token":
        token = obj.get("token")
        return TokenEvent(obj["key"], token if isinstance(token, int) else None, obj["text"])
    if kind == "recorded":
        stats = TurnStats(**obj["stats"])
        done = TurnDone(obj["key"], obj["finish_reason"], obj["text"], [], None, [], stats)
        persisted = PersistStats(**obj["persisted"]) if obj.get("persisted") else None
        return TurnRecorded(obj["key"], obj["model"], done, obj["tier"], persisted, list(obj["warnings"]))
    return None


def check_seed(seed: int) -> int:
    if not 0 <= seed < 2**63:
        raise ValueError("seed: a whole number from 0 to 2**63 - 1")
    return seed


def settings(obj: dict[str, Any]) -> GenSettings:
    """The CLI's settings, checked as its flags check them (a bad one: ValueError)."""
    from .. import config

    values: dict[str, Any] = {}
    for key in GenSettings.__dataclass_fields__:
        value = obj.get(key)
        if value is None:
            continue
        if key == "seed":
            values[key] = check_seed(int(value))
        elif key in config.SETTINGS:
            values[key] = config.SETTINGS[key].parse(str(value))
        else:
            raise ValueError(f"unknown setting {key!r}")
    return GenSettings(**values)


def turn_job(body: dict[str, Any]) -> dict[str, Any]:
    """A `worker.Job`'s fields from the CLI's request, checked as `semantic chat` checks its
    arguments (ValueError, TypeError or a UsageError when they are not)."""
    import math
    import time

    from ..store import validate_name

    raw_targets, raw_settings = body["targets"], body.get("settings")
    raw_settings = {} if raw_settings is None else raw_settings
    pairs = isinstance(raw_targets, list) and all(isinstance(p, list) and len(p) == 2 for p in raw_targets)
    if not pairs or not all(isinstance(x, str) for p in raw_targets for x in p):
        raise TypeError("targets: a list of [agent, message] pairs of strings")
    if not isinstance(raw_settings, dict):
        raise TypeError("settings: an object of `semantic chat`'s settings")
    targets = [(validate_name(a), t) for a, t in raw_targets]
    names = [a for a, _ in targets]
    if not targets or len(set(names)) != len(names) or any(not t.strip() for _, t in targets):
        raise ValueError("targets: one or more distinct agents, each with a non-empty message")
    wait = body.get("wait_timeout")
    if wait is not None and (not isinstance(wait, (int, float)) or not math.isfinite(wait) or wait < 0):
        raise ValueError("wait_timeout: a number of seconds >= 0")
    model, system = body.get("model"), body.get("system")
    if not isinstance(model, (str, type(None))) or not isinstance(system, (str, type(None))):
        raise TypeError("model and system are strings")
    return {
        "settings": settings(raw_settings),
        "targets": targets,
        "model": model,
        "system": system,
        "create": True,
        "wait_until": (None if wait is None else time.monotonic() + float(wait)) if body.get("wait") else 0.0,
    }
