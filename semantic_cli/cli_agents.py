"""`semantic agents ...`: list, create, show, edit, reset, remove, rename, fork."""

from __future__ import annotations

import typer

app = typer.Typer(help="Manage agents: named personas with their own conversation and cache.", no_args_is_help=True)
