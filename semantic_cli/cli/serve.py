"""`semantic serve`: the resident engine (see semantic_cli/server)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from . import ranks, render

if TYPE_CHECKING:
    from ..server.runtime import ServerInfo


def serve(
    model: str | None = typer.Option(None, "--model", help="Model to serve (default: as `semantic chat` resolves it)."),
    host: str = typer.Option("127.0.0.1", "--host", help="TCP address to listen on (loopback unless --api-key)."),
    port: int = typer.Option(8377, "--port", min=0, max=65535, help="TCP port (0: any free port, written to server.json)."),
    no_tcp: bool = typer.Option(False, "--no-tcp", metavar="", help="Listen on the Unix socket only."),
    socket_path: Path | None = typer.Option(None, "--socket", help="Unix socket path (default: in the runtime dir)."),
    no_socket: bool = typer.Option(False, "--no-socket", metavar="", help="Listen on TCP only (the CLI then runs in-process)."),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="SEMANTIC_API_KEY", help="Require `Authorization: Bearer KEY` on TCP (needed off loopback)."
    ),
    max_body: int = typer.Option(4 << 20, "--max-body", min=1024, help="Largest request body, in bytes (413 above)."),
    max_tokens: int = typer.Option(8192, "--max-tokens", min=1, help="Largest max_tokens a request may ask for."),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="Requests that may wait for the engine (503 beyond)."),
    body_timeout: float = typer.Option(
        30.0, "--body-timeout", min=0.1, max=3600, help="Seconds a client may take to send its request body (408 beyond)."
    ),
    hosts: str | None = ranks.HOSTS,
    hostfile: Path | None = ranks.HOSTFILE,
    backend: str = ranks.BACKEND,
) -> None:
    """Serve the agents and the model over an OpenAI-compatible API; `semantic chat` uses it too."""
    ranks.relaunch(hosts, hostfile, backend)
    ranks.join()  # under mlx.launch: the ranks after 0 follow rank 0's engine and exit there
    from .. import paths
    from ..errors import UsageError
    from ..server.app import Limits
    from ..server.serve import ServeOptions
    from ..server.serve import serve as run

    if no_tcp and no_socket:
        raise UsageError("--no-tcp and --no-socket leave nothing to listen on")
    if api_key and not api_key.strip():
        raise UsageError("--api-key: a key of only spaces would refuse every request; give a real key")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log = logging.getLogger("semantic.serve")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    opts = ServeOptions(
        model=model,
        host=None if no_tcp else host,
        port=port,
        socket_path=None if no_socket else (socket_path or paths.server_socket()),
        api_key=api_key.strip() if api_key else None,  # as a client's key is compared: stripped
        limits=Limits(max_body=max_body, max_tokens=max_tokens, max_queue=max_queue, body_timeout=body_timeout),
    )
    err = render.stderr()

    def ready(info: ServerInfo) -> None:
        where = [f"{info.url}/v1"] if info.url else []
        where += [f"unix:{info.socket}"] if info.socket else []
        err.print(f"semantic serve: {info.model} on {' and '.join(where)} (pid {os.getpid()}); Ctrl-C stops", markup=False)

    run(opts, ready)
