"""`semantic agents fork | trim | compact`: the ways out of a full context.

fork and trim work on the transcript store and the KV index only (no model is loaded);
compact loads the agent's model, since the agent writes its own summary. Each holds the
agent's lock while it changes it, and keeps the cache honest (history.py): what an agent's
token log and cache chain claim is exactly what its kept turns hold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from .. import config, history
from ..store import validate_name
from . import render
from .agents import NAME, YES, _confirm, _status
from .agents import app as app
from .agents_access import _locked, _must_be_free, _opened, _recover, _recover_free
from .render import plural

if TYPE_CHECKING:  # the core loads mlx: imported when compact runs
    from ..compact import Compacted

DRY_RUN = typer.Option(False, "--dry-run", metavar="", help="Say what would change, and change nothing.")


@app.command("fork")
def fork(
    name: str = NAME,
    new: str = typer.Argument(..., help="Name of the copy."),
    at_turn: int | None = typer.Option(None, "--at-turn", min=1, metavar="N", help="Keep turns 1..N only (default: every turn)."),
) -> None:
    """Copy an agent's conversation (or its turns 1..N); the copy shares the cached blocks of what it keeps (instant, free on disk)."""
    validate_name(name)
    validate_name(new)
    with _opened() as (store, kv):
        store.get_agent(name)
        with _locked(new):
            _must_be_free(store, new)
            kv.release_agent(new)  # an orphaned cache under the new name would collide
            _recover_free(store, kv, [name])  # the copy gets the conversation as the source's next opening would
            turns = len(history.exchanges(store.messages(name)))
            if at_turn is None or at_turn == turns:
                store.fork_agent(name, new)
                kv.fork_agent(name, new)
                blocks = len(kv.chain(new))
                note = ""
            else:
                with _locked(name):  # the plan reads the log before the copy: no turn of the source in between
                    cut = history.plan_fork(store, name, at_turn)
                    blocks = history.fork(store, kv, name, new, cut, config.get("block_tokens"))
                note = "; its next turn re-reads the kept turns" if cut.reprefill else ""
            kept = len(history.exchanges(store.messages(new)))
    _status(f"forked {name!r} as {new!r}: {plural(kept, 'turn')}, sharing {plural(blocks, 'cached block')}{note}")


@app.command("trim")
def trim(
    name: str = NAME,
    keep_last: int = typer.Option(..., "--keep-last", min=0, metavar="N", help="How many of the latest turns to keep."),
    dry_run: bool = DRY_RUN,
    yes: bool = YES,
) -> None:
    """Delete all but the last N turns (the persona stays); the next turn re-reads what is left."""
    validate_name(name)
    with _opened() as (store, kv):
        store.get_agent(name)
        with _locked(name):
            _recover(store, kv, name)
            cut = history.plan_trim(store, name, keep_last)
            turns = len(history.exchanges(store.messages(name)))
            gone = turns - len(cut.keep)
            if not cut.drop_ids:
                _status(f"nothing to trim: {name!r} has {plural(turns, 'turn')}")
                return
            what = f"{plural(gone, 'turn')} ({plural(len(cut.drop_ids), 'message')}) of {name!r}, keeping the last {len(cut.keep)}"
            if dry_run:
                _status(f"would delete {what}; the next turn would re-read the rest (nothing changed)")
                return
            _confirm(f"delete {what}?", yes)
            kept = history.apply_cut(store, cut)
            history.keep_blocks(kv, name, name, kept, config.get("block_tokens"))
    _status(f"trimmed {what}; the next turn re-reads the rest")


@app.command("compact")
def compact(
    name: str = NAME,
    keep_last: int = typer.Option(0, "--keep-last", min=0, metavar="N", help="Turns to keep verbatim after the summary."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="Longest summary, in tokens (default 384)."),
    dry_run: bool = DRY_RUN,
) -> None:
    """Have the agent summarise its older turns; later turns see the persona, the summary and the turns after it.

    The full transcript is kept (`agents show` marks the compacted turns). The next turn re-reads the new, shorter prefix once.
    """
    from .. import compact as compaction
    from ..chat import Chat
    from ..store import Store
    from ..turn import GenSettings

    validate_name(name)
    store = Store()
    session = Chat(store)
    try:
        store.get_agent(name)
        agent = session.open_agent(name)
        render.say_recovered(session.recovered)
        p = compaction.plan(session, name, keep_last)
        if dry_run:
            _status(f"would summarise {plural(len(p.older), 'turn')} of {name!r} and keep {p.kept} verbatim (nothing changed)")
            return
        with render.progress(render.stderr()) as progress:
            done = compaction.compact(session, agent, GenSettings(max_tokens=max_tokens), keep_last, progress)
    finally:
        session.close()
        store.close()
    _status(summary_line(done))


def summary_line(done: Compacted) -> str:
    """One line on what a compaction did (for `agents compact` and /compact)."""
    p = done.plan
    cut = " (cut at its length limit)" if done.finish_reason == "length" else ""
    left = f"; the oldest {plural(done.left_out, 'turn')} did not fit its prompt" if done.left_out else ""
    return (
        f"compacted {p.agent!r}: {plural(len(p.older), 'turn')} summarised in {len(done.summary.content.split())} words{cut}{left}, "
        f"{p.kept} kept verbatim; the transcript keeps every message; the next turn re-reads the shorter prefix once"
    )
