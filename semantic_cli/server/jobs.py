"""What passes between the HTTP handlers and the engine loop: a `Job` per request, the
markers a job emits around its events, and the errors only the server raises."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import SemanticError
from ..turn import GenSettings, PendingTurn


class Saturated(SemanticError):
    """Too many requests waiting (HTTP 503)."""


class ShuttingDown(SemanticError):
    """The server is stopping (HTTP 503)."""


class OtherModel(SemanticError):
    """The agent uses another model than the server's: the CLI runs it in-process."""


STARTED = object()  # a job's turns are in the batch: what it emits after this is the response's body
END = object()  # the last item a job emits


@dataclass
class Job:
    """One request. Agent turns: `targets` (agent, user text), a room when several. A
    stateless turn: `messages` (the whole conversation) and `slot`."""

    emit: Callable[[object], None]  # thread-safe; receives TurnEvents, then an error or END
    settings: GenSettings
    targets: list[tuple[str, str]] = field(default_factory=list)
    messages: list[dict[str, str]] | None = None
    slot: str | None = None
    history: list[dict[str, str]] | None = None  # the API's messages before the new one (agent mode)
    model: str | None = None  # the CLI's --model (must be the server's model)
    system: str | None = None
    create: bool = False  # unknown agents are created (the CLI); the API answers 404
    wait_until: float | None = 0.0  # monotonic deadline for busy agents; None: as long as it takes
    stop: list[str] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    pendings: dict[str, PendingTurn] = field(default_factory=dict)
    left: set[str] = field(default_factory=set)
    failed: dict[str, BaseException] = field(default_factory=dict)
    shown: dict[str, int] = field(default_factory=dict)  # with stop sequences: characters of each reply sent so far
