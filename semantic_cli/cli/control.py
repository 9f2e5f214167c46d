"""REPL commands that take a turn back or change what the next one runs on: /undo, /retry,
/edit, /compact and /model NAME (slash.py lists them in COMMANDS).

Each changes the current agent under its lock (`Repl.holding`), transcript first; the
cache follows, and a cache that cannot be updated costs a re-prefill, never the change
(restores check every block and tail by content, so a stale chain is never used).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import SemanticError, UsageError
from . import render
from .render import printable

MAX_WHOLE = 2**63 - 1  # as --seed: what SQLite and mlx take


def whole_number(text: str, usage: str, low: int = 0, high: int = MAX_WHOLE) -> int:
    """A slash command's whole-number argument: the one parser /compact, /round and /set
    seed share. ASCII digits only (str.isdigit() accepts '²', which int() refuses, and int()
    refuses a number of 5,000 digits), from `low` to `high`; anything else is a UsageError
    saying `usage` and what was given, and the REPL goes on."""
    if re.fullmatch(r"[0-9]{1,19}", text) is None or not low <= int(text) <= high:
        raise UsageError(f"{usage} (got {given(text)})")
    return int(text)


def given(text: str) -> str:
    """An argument as an error message quotes it: repr'd, a long one shortened."""
    return repr(text if len(text) <= 40 else text[:40] + "…")


def _stored(repl: Any, what: str) -> bool:
    if repl.session.store.find_agent(repl.current) is None:
        repl.info(f"{repl.current} has no conversation yet: nothing to {what}")
        return False
    return True


def undo_last(repl: Any, journal: bool = False) -> str:
    """Remove the current agent's last exchange from the transcript and its token log (with
    `journal`, a /retry's cut: `put_back` restores it); the cache keeps the whole blocks of
    what is left. Returns the removed user message."""
    from .. import history

    name = repl.current
    store = repl.session.store
    with repl.holding(name):
        cut = history.plan_undo(store, name)
        removed_text = history.exchanges(store.messages(name))[-1].user.content
        _cache_follows(repl, name, history.apply_cut(store, cut, journal))
    repl.last.pop(name, None)
    return removed_text


def put_back(repl: Any, name: str) -> None:
    """Undo a /retry's cut (`takeback.put_back`): whatever was recorded since goes and the
    exchange comes back, with its token log; the cache keeps the blocks of that log that
    are still stored."""
    from .. import takeback

    with repl.holding(name):
        takeback.put_back(repl.session.store.db, name)
        _cache_follows(repl, name, repl.session.store.log_tokens(name))


def _cache_follows(repl: Any, name: str, log: list[int]) -> None:
    from .. import history
    from ..kv.failures import CacheUnavailable

    kv = repl.session.kv
    kv.drop_hot(name)  # it covers what was just taken back (or put back over)
    with contextlib.suppress(CacheUnavailable):
        history.keep_blocks(kv.index, name, name, log, kv.block_tokens)


def undo(repl: Any, arg: str) -> None:
    if not _stored(repl, "undo"):
        return
    from .agents import _excerpt

    removed = undo_last(repl)
    repl.info(f"{repl.current}: removed the last turn (you: {printable(_excerpt(removed))!r}) from the transcript and the token log")


def retry(repl: Any, arg: str) -> None:
    """Regenerate the last reply: the last exchange is removed and its message sent again.
    All or nothing: when the new reply is not recorded whole (an error, Ctrl-C, a server
    that goes away), the old exchange is put back as it was and the cut new one goes. The
    cut exchange waits in the journal (takeback.py) meanwhile, so a process killed mid-retry
    loses nothing either: the agent's next opening puts it back (history.recover_retry)."""
    from .. import takeback
    from ..locks import retrying

    if not _stored(repl, "retry"):
        return
    if repl.remote is None:  # the model loads before the turn is taken back: a model that fails costs nothing
        with render.progress(repl.err) as progress:
            repl.session.engine_for(repl.agent(), progress)
    name = repl.current
    with retrying(name):  # until the retry ends, its journal entry is this process's, recovered by no one
        text = undo_last(repl, journal=True)
        try:
            recorded = repl.turn([(repl.agent(), text)])
        except BaseException:
            _put_back_after_retry(repl, name)  # the retry's own error is the one to report
            raise
        if not recorded or any(r.done.finish_reason == "interrupted" for r in recorded):
            _put_back_after_retry(repl, name)
            return
        # An entry this fails to drop is dropped at the next opening: the new reply is recorded whole.
        with contextlib.suppress(Exception):
            takeback.settle(repl.session.store.db, name)


def _put_back_after_retry(repl: Any, name: str) -> None:
    from ..turn import one_line

    try:
        put_back(repl, name)
    except Exception as exc:
        why = exc.message if isinstance(exc, SemanticError) else one_line(exc)
        repl.info(f"{name}: the previous reply could not be put back ({why}); `agents show` has what is left")
        return
    repl.info(f"{name}: the previous reply is back (the retry did not finish)")


def edit(repl: Any, arg: str) -> None:
    """Compose the next message in $VISUAL or $EDITOR (vi if neither), then send it."""
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    fd, name = tempfile.mkstemp(prefix="semantic-", suffix=".md")  # 0600
    path = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(arg)
        try:
            rc = subprocess.run([*shlex.split(editor), str(path)], check=False).returncode
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot run the editor {editor!r} ({exc}); set EDITOR to one that exists") from None
        if rc != 0:
            repl.info(f"the editor exited with {rc}: nothing sent")
            return
        try:
            text = path.read_text(encoding="utf-8").rstrip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SemanticError(f"cannot read what the editor wrote ({exc}); nothing sent") from None
    finally:
        path.unlink(missing_ok=True)
    if not text.strip():
        repl.info("empty message: nothing sent")
        return
    repl.send(text)


def compact(repl: Any, arg: str) -> None:
    """/compact [N]: summarise all but the last N turns (default 0) into the prefix."""
    from .. import compact as compaction
    from .agents_context import summary_line

    keep = whole_number(arg, "/compact [N]: N is how many of the latest turns to keep verbatim (default 0)") if arg else 0
    if not _stored(repl, "compact"):
        return
    agent = repl.agent()
    with repl.holding(agent.name), render.progress(repl.err) as progress:
        done = compaction.compact(repl.session, agent, repl.settings, keep, progress)
    repl.last.pop(agent.name, None)
    repl.info(summary_line(done))


def switch_model(repl: Any, spec: str) -> None:
    """/model NAME: the current agent's model from now on. The model is loaded first (a name
    that does not load changes nothing); then the token log and the cache are dropped: the
    old model's blocks are never used for the new one, and the next turn re-prefills."""
    from ..kv.failures import CacheUnavailable
    from .agents import _check_model

    if repl.room:
        raise UsageError("a room's agents share one model: leave the room to switch one, or reopen it with --model NAME")
    agent = repl.agent()
    resolved = _check_model(spec)
    if resolved == agent.model:
        repl.info(f"{agent.name} already uses {printable(resolved)}")
        return
    with render.progress(repl.err) as progress:
        lm = repl.session.engine_for(replace(agent, model=resolved), progress).lm
    store = repl.session.store
    with repl.holding(agent.name):
        # A new agent is created with this model on its first turn; a stored one's token log is dropped.
        stored = store.find_agent(agent.name) is not None
        agent = store.update_agent(agent, model=resolved) if stored else replace(agent, model=resolved)
        with contextlib.suppress(CacheUnavailable):  # blocks are named by model: the old ones never match
            repl.session.kv.release_agent(agent.name)
    if repl.flags[0] is not None or repl.remote is not None:
        repl.flags = (resolved, repl.flags[1])  # the server applies --model as given: this one now
    repl.replace_agent(agent)
    repl.contexts.pop(agent.model, None)
    repl.info(f"{agent.name} now uses {lm.name} (context {lm.context_length:,} tokens); the next turn re-reads the conversation")


def context(repl: Any, name: str) -> int | None:
    """The context length of an agent's model (read from its config.json once per model),
    for the fullness in the footer and /stats."""
    from ..model.loader import context_length

    spec = repl.agents[name].model if name in repl.agents else ""
    if spec not in repl.contexts:
        repl.contexts[spec] = context_length(spec) if spec else None
    return repl.contexts[spec]


def suggest(word: str, names: list[str]) -> str:
    """ " — did you mean /x?" for a near name, else ""."""
    import difflib

    near = difflib.get_close_matches(word.lower(), names, n=1, cutoff=0.6)
    return f" — did you mean /{near[0]}?" if near else ""
