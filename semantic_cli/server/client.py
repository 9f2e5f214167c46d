"""The CLI's side of the server: is one running for this home, and one turn (or a room's
turns) through it as the same `TurnEvent`s `Chat.run` yields in-process.

`Unavailable` means "run it in-process instead": no server, one that is stopping, one
that runs another model than the agent's, or a socket that refuses the connection.
Once a turn has started, a server that goes away is `ServerGoneError` (exit code 11).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from ..errors import SemanticError, ServerGoneError, error_for
from ..turn import TurnEvent, TurnNotSaved
from . import runtime, wire


class Unavailable(Exception):
    """No usable server for this turn: the caller runs it in-process."""


def find_socket() -> str | None:
    info = runtime.find()
    return info.socket if info is not None else None


def turn_events(socket_path: str, payload: dict[str, Any]) -> Iterator[TurnEvent]:
    """POST the turn and yield its events; closing the iterator (Ctrl-C) closes the
    connection, and the server records the partial replies as interrupted."""
    import httpx

    payload = {"wire": wire.WIRE_VERSION, **payload}
    transport = httpx.HTTPTransport(uds=socket_path)
    started = False
    try:
        with (
            httpx.Client(transport=transport, base_url="http://semantic", timeout=httpx.Timeout(None, connect=5.0)) as client,
            client.stream("POST", "/semantic/v1/turns", json=payload) as response,
        ):
            if response.status_code != 200:
                _raise(_json(response.read()))
            started = True
            for text in response.iter_lines():
                if not text:
                    continue
                obj = json.loads(text)
                if obj.get("event") == "error":
                    _raise(obj)
                if obj.get("event") == "end":
                    return
                ev = wire.decode(obj)
                if ev is not None:
                    yield ev
    except httpx.TransportError as exc:
        if not started:
            raise Unavailable(str(exc)) from exc
        raise ServerGoneError(f"the semantic server stopped answering mid-turn ({exc}); the reply may be incomplete") from None
    except ValueError as exc:
        raise ServerGoneError(f"the semantic server sent something unreadable ({exc})") from None
    raise ServerGoneError("the semantic server closed the stream before the turn ended; the reply may be incomplete")


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
