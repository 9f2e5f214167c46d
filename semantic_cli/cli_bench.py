"""`semantic bench ...`: benchmarks that write a results JSON and print tables."""

from __future__ import annotations

import typer

app = typer.Typer(help="Benchmarks: exactness, resume, block gather, batching.", no_args_is_help=True)
