"""`semantic rooms ...`: the saved rooms (named groups of agents that
`semantic chat --agent a --agent b --save-room NAME` saves and `--room NAME` opens).

Nothing here loads a model or touches an agent: removing a room forgets the group,
never its agents, their conversations or their caches.
"""

from __future__ import annotations

import json

import typer

from ..store import Store
from . import render
from .render import Column

app = typer.Typer(help="List and remove saved rooms (named groups of agents).", no_args_is_help=True)


@app.command("ls")
def ls(json_out: bool = typer.Option(False, "--json", metavar="", help="Print a JSON list: name, agents.")) -> None:
    """Every saved room and its agents, in room order.

    On a terminal: a table. Piped or redirected: tab-separated values, a header line
    (NAME, AGENTS) and one line per room, the agents joined by commas.
    """
    store = Store()
    try:
        rooms = store.list_rooms()
    finally:
        store.close()
    if json_out:
        print(json.dumps([{"name": name, "agents": agents} for name, agents in rooms], indent=2))
        return
    if not rooms:
        render.stderr().print("no saved rooms; save one with `semantic chat --agent a --agent b --save-room NAME`", markup=False)
        return
    render.table(
        [Column("NAME"), Column("AGENTS", wrap=True)],
        [[name, ", ".join(agents)] for name, agents in rooms],  # names of the store's rule: no control characters
    )


@app.command("rm")
def rm(name: str = typer.Argument(..., help="Room name.")) -> None:
    """Forget a saved room; its agents, their conversations and caches stay."""
    store = Store()
    try:
        agents = store.delete_room(name)
    finally:
        store.close()
    render.stderr().print(f"removed room {name!r}; its agents stay ({', '.join(agents)})", markup=False)
