"""The server's access log: one line per request on stderr (through `logging`)."""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("semantic.serve")


class AccessLog:
    """One line per request on stderr (through `logging`): who, what, status, time."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def sending(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            client = scope.get("client")
            who = f"{client[0]}:{client[1]}" if client else "socket"
            log.info("%s %s %s %d %.0f ms", who, scope["method"], scope["path"], status, (time.perf_counter() - started) * 1000)
