"""`semantic cache ...`: what is cached, eviction (scan -> plan -> execute), verification."""

from __future__ import annotations

import typer

app = typer.Typer(help="Inspect and manage the persistent KV cache.", no_args_is_help=True)
