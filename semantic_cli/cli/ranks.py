"""`--hosts`, `--hostfile`, `--backend` on `semantic chat` and `semantic serve`: the same
command over several ranks (semantic_cli.distributed)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ..errors import UsageError
from . import render

HOSTS = typer.Option(
    None, "--hosts", help="Run over several ranks with mlx.launch: comma-separated hosts (127.0.0.1,127.0.0.1: two ranks here)."
)
HOSTFILE = typer.Option(None, "--hostfile", help="Run over the ranks an mlx.launch hostfile (JSON) names.")
BACKEND = typer.Option("any", "--backend", help="Distributed backend: ring, jaccl, mpi, nccl or any (mlx.launch picks).")


def relaunch(hosts: str | None, hostfile: Path | None, backend: str, message: str | None = None, needs_message: bool = False) -> None:
    """With --hosts or --hostfile: run this command on every rank through mlx.launch, then exit
    with rank 0's code. Piped input becomes rank 0's message (mlx.launch keeps its ranks' stdin open)."""
    if not hosts and hostfile is None:
        if backend != "any":
            raise UsageError("--backend goes with --hosts or --hostfile")
        return
    from ..distributed import launch

    argv = launch.strip_launch_options(sys.argv[1:])
    if needs_message and message is None:
        if sys.stdin.isatty():
            raise UsageError(
                "the REPL needs a terminal, which ranks started by mlx.launch do not have: pass -m TEXT or pipe the message in, "
                "or run `semantic serve --hosts ...` and chat with it from a plain `semantic chat`"
            )
        from .chat import read_message

        argv += ["-m", read_message(None)]
    raise SystemExit(launch.run(launch.command(hosts, hostfile, backend, argv), launch.shared_host_env(hosts)))


def join() -> bool:
    """Under mlx.launch: the ranks after 0 follow rank 0 and exit here; rank 0 says in one line
    how the model was split and returns True. False in a plain process."""
    from .. import distributed

    return distributed.start(lambda line: render.stderr().print(f"semantic: {line}", markup=False))
