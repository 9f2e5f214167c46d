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
from collections.abc import Generator, Iterator
from typing import Any

from ..errors import SemanticError, ServerGoneError, error_for
from ..turn import TurnEvent, TurnNotSaved
from . import runtime, wire


class Unavailable(Exception):
    """No usable server for this turn: the caller runs it in-process."""


def find_socket() -> str | None:
    info = runtime.find()
    return info.socket if info is not None else None


def start_turn(socket_path: str, payload: dict[str, Any]) -> Generator[TurnEvent, None, None]:
    """`turn_events` with the request sent and its first event read: `Unavailable` (run it
    in-process instead) is raised here, before the caller has shown anything."""
    events = turn_events(socket_path, payload)
    first = next(events, None)
    return _prepend(first, events)


def _prepend(first: TurnEvent | None, rest: Iterator[TurnEvent]) -> Generator[TurnEvent, None, None]:
    if first is not None:
        yield first
    yield from rest  # closing this closes `rest`: the connection, and the server records the partial reply


def turn_events(socket_path: str, payload: dict[str, Any]) -> Generator[TurnEvent, None, None]:
    """POST the turn and yield its events; closing the iterator (Ctrl-C) closes the
    connection, and the server records the partial replies as interrupted."""
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


def _raise(obj: dict[str, Any]) -> None:
    if "event" not in obj:  # not the wire's: an HTTP error of the app (e.g. 413)
        raise SemanticError(str(obj.get("error", {}).get("message", obj)))
    kind = obj.get("kind")
    message = str(obj.get("message", "the server reported an error"))
    if kind in ("other_model", "shutting_down"):
        raise Unavailable(message)
    if kind == "not_saved":
        exc = TurnNotSaved({name: SemanticError(message) for name in obj.get("names", [])}, others=False)
        exc.message = message
        raise exc
    raise error_for(int(obj.get("exit_code", 1)), message)
