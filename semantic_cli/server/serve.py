"""Starting and stopping the server: the lock, the engine thread, the sockets, uvicorn.

SIGINT or SIGTERM: stop accepting, let running turns finish for a few seconds, interrupt
what is left (recorded as interrupted, as Ctrl-C does), and exit 0 within 10 s. A SIGKILL
loses no completed turn: each is in the transcript before its reply's last byte is sent.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..model.loader import resolve
from . import runtime
from .app import Limits, Settings, build
from .worker import Worker

GRACE_S = 5.0  # running turns may finish this long after SIGTERM; then they are interrupted


@dataclass(frozen=True)
class ServeOptions:
    model: str | None
    host: str | None  # None: no TCP listener
    port: int
    socket_path: Path | None  # None: no Unix socket
    api_key: str | None
    limits: Limits


def serve(opts: ServeOptions, on_ready: Callable[[runtime.ServerInfo], None]) -> None:
    """Run until SIGINT/SIGTERM. Raises BusyError when a server already runs for this home."""
    import uvicorn

    if opts.host is not None:
        runtime.check_host(opts.host, opts.api_key)
        runtime.check_address(opts.host, opts.port)  # before the model loads: a typo fails at once
    lock = runtime.ServerLock().acquire()
    sockets: list[socket.socket] = []
    remove_info: Callable[[], None] | None = None
    made_socket = False  # only a socket this server created is removed: a refused path is left as it was
    worker = Worker(resolve(opts.model), opts.limits.max_queue)
    try:
        worker.start()  # loads the model: errors here are the command's
        if opts.socket_path is not None:
            sockets.append(runtime.unix_socket(opts.socket_path))
            made_socket = True
        url = None
        if opts.host is not None:
            tcp = runtime.tcp_socket(opts.host, opts.port)
            sockets.append(tcp)
            host, port = tcp.getsockname()[:2]
            url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        info = runtime.ServerInfo(os.getpid(), str(opts.socket_path) if opts.socket_path else None, url, worker.ref.spec, worker.ref.path)
        app = build(worker, Settings(opts.api_key, opts.limits, __version__))
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=int(GRACE_S) + 3, access_log=False)
        server = _Server(config, worker)
        remove_info = runtime.publish(info)
        on_ready(info)
        server.run(sockets=sockets)
    finally:
        worker.stop(0.0)
        worker.join(10)
        if remove_info is not None:
            remove_info()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        if made_socket and opts.socket_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(opts.socket_path)
        lock.release()


class _Server:
    """uvicorn's Server, told about the signal first: the engine stops taking jobs and
    bounds the running turns, so the connections uvicorn waits for end in time."""

    def __init__(self, config: Any, worker: Worker) -> None:
        import uvicorn

        worker_ref = worker

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                worker_ref.stop(GRACE_S)
                super().handle_exit(sig, frame)

        self._server = Server(config)

    def run(self, sockets: list[socket.socket]) -> None:
        # uvicorn re-raises the signal it caught once it has shut down, to the handler that
        # was there before it; that handler is this no-op, so a clean stop exits 0. It stays
        # until the process exits: a second signal must not cut the recording of the turns
        # still running (the engine thread's join is bounded).
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        self._server.run(sockets=sockets)
