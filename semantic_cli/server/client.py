"""The CLI's side of the server: is one running for this home, and one turn (or a room's
turns) through it as the same `TurnEvent`s `Chat.run` yields in-process.

`Unavailable` means "run it in-process instead": no server, one that is stopping, one
that runs another model than the agent's, or a socket that refuses the connection.
Once a turn has started, a server that goes away is `ServerGoneError` (exit code 11).
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import SemanticError, ServerGoneError, error_for
from ..events import TokenEvent, TurnDone, TurnStats
from ..turn import TurnEvent, TurnNotSaved, TurnRecorded
from . import runtime, wire


class Unavailable(Exception):
    """No usable server for this turn: the caller runs it in-process. `tell`: the user should
    hear why (a server left running across an upgrade), not just find the turn slower."""

    def __init__(self, message: str, tell: bool = False) -> None:
        super().__init__(message)
        self.tell = tell


def find_socket() -> str | None:
    info = runtime.find()
    return info.socket if info is not None else None


@dataclass
class _Partial:
    model: str
    tier: str
    prompt_tokens: int
    cached_tokens: int
    restore_s: float
    text: list[str] = field(default_factory=list)
    generated: int = 0
    ttft_s: float = 0.0  # on the client's clock, from the request (0: no token yet, as in-process)
    recorded: bool = False


class Received:
    """What the client has received of each turn of a request: enough to show a turn that
    Ctrl-C cut before the server's record of it arrived, as the CLI shows one it cut in
    process (`stopped`: finish_reason "interrupted", no rates). The server records the same
    turn as interrupted once the connection closes; its text may run a little further."""

    def __init__(self) -> None:
        self.turns: dict[str, _Partial] = {}
        self.contexts: dict[str, int] = {}  # each agent's model's context length
        self.began = time.perf_counter()

    def see(self, obj: dict[str, Any], ev: TurnEvent | None) -> None:
        if obj.get("event") == "started":
            keys = ("model", "tier", "prompt_tokens", "cached_tokens", "restore_s")
            self.turns[str(obj["key"])] = _Partial(**{k: obj[k] for k in keys})
            self.contexts[str(obj["key"])] = int(obj["context_length"])
            return
        turn = self.turns.get(ev.key) if ev is not None else None
        if turn is None:
            return
        if isinstance(ev, TokenEvent):
            if ev.token is not None:
                turn.generated += 1
                if turn.generated == 1:
                    turn.ttft_s = time.perf_counter() - self.began
            turn.text.append(ev.text)
        elif isinstance(ev, TurnRecorded):
            turn.recorded = True

    def stopped(self) -> list[TurnRecorded]:
        """The turns not yet recorded when the stream stopped, as interrupted."""
        out = []
        for key, t in self.turns.items():
            if t.recorded:
                continue
            prefilled = t.prompt_tokens - t.cached_tokens
            stats = TurnStats(t.ttft_s, t.prompt_tokens, t.cached_tokens, prefilled, t.generated, 0.0, 0.0, t.restore_s)
            done = TurnDone(key, "interrupted", "".join(t.text), [], None, [], stats)
            out.append(TurnRecorded(key, t.model, done, t.tier, None, []))
        return out


def start_turn(socket_path: str, payload: dict[str, Any], seen: Received | None = None) -> Generator[TurnEvent, None, None]:
    """`turn_events` with the request sent and its first event read: `Unavailable` (run it
    in-process instead) is raised here, before the caller has shown anything."""
    events = turn_events(socket_path, payload, seen)
    first = next(events, None)
    return _prepend(first, events)


def _prepend(first: TurnEvent | None, rest: Iterator[TurnEvent]) -> Generator[TurnEvent, None, None]:
    if first is not None:
        yield first
    yield from rest  # closing this closes `rest`: the connection, and the server records the partial reply


def turn_events(socket_path: str, payload: dict[str, Any], seen: Received | None = None) -> Generator[TurnEvent, None, None]:
    """POST the turn and yield its events (each noted on `seen` first); closing the iterator
    (Ctrl-C) closes the connection, and the server records the partial replies as interrupted."""
    body = json.dumps({"wire": wire.WIRE_VERSION, **payload}).encode()
    conn = _UnixConnection(socket_path)
    started = False
    try:
        try:
            conn.request("POST", "/semantic/v1/turns", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
        except OSError as exc:
            raise Unavailable(str(exc)) from exc
        if response.status != 200:
            _raise(_json(response.read()))
        started = True
        while line := response.readline():
            if not line.strip():
                continue
            obj = json.loads(line)
            if obj.get("event") == "error":
                _raise(obj)
            if obj.get("event") == "end":
                return
            ev = wire.decode(obj)
            if seen is not None:
                seen.see(obj, ev)
            if ev is not None:
                yield ev
    except (OSError, http.client.HTTPException) as exc:
        if not started:
            raise Unavailable(str(exc)) from exc
        raise ServerGoneError(f"the semantic server stopped answering mid-turn ({exc}); the reply may be incomplete") from None
    except ValueError as exc:
        raise ServerGoneError(f"the semantic server sent something unreadable ({exc})") from None
    finally:
        conn.close()
    raise ServerGoneError("the semantic server stopped answering mid-turn (the stream ended early); the reply may be incomplete")


class _UnixConnection(http.client.HTTPConnection):
    """http.client over a Unix socket: the standard library's HTTP/1.1 client (chunked
    responses included), only connected to a path. The CLI's one request needs nothing
    more, and a ~50 ms lighter import than an HTTP library matters on every invocation."""

    def __init__(self, path: str) -> None:
        super().__init__("semantic", timeout=None)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5.0)  # connecting; the turn itself may take as long as it takes
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        sock.settimeout(None)
        self.sock = sock


def _json(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        raise Unavailable(f"unexpected answer from the server: {body[:200]!r}")
    return obj


_OLD_SERVERS_REFUSAL = "this server speaks wire version "  # how wire-1 servers refused another version


def _raise(obj: dict[str, Any]) -> None:
    if "event" not in obj:  # not the wire's: an HTTP error of the app (e.g. 413)
        raise SemanticError(str(obj.get("error", {}).get("message", obj)))
    kind = obj.get("kind")
    message = str(obj.get("message", "the server reported an error"))
    if kind in ("other_model", "shutting_down", "wire_version"):
        raise Unavailable(message, tell=kind == "wire_version")
    if message.startswith(_OLD_SERVERS_REFUSAL):  # a server from before "wire_version" (wire 1), still running
        theirs = message[len(_OLD_SERVERS_REFUSAL) :].split(";")[0]
        raise Unavailable(wire.older_server(theirs), tell=True)
    if kind == "not_saved":
        exc = TurnNotSaved({name: SemanticError(message) for name in obj.get("names", [])}, others=False)
        exc.message = message
        raise exc
    raise error_for(int(obj.get("exit_code", 1)), message)
