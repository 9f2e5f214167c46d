"""How the `semantic agents` commands reach an agent: the transcript store and the KV index
opened together, the agents' locks held while a command changes them, and a /retry that a
killed process left resolved first.

Apart from cli/agents.py, which keeps the commands themselves; cli/agents_context.py's
commands reach agents the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from .. import takeback
from ..errors import UsageError
from ..kv.index import KVIndex, open_index
from ..locks import GRACE_S, AgentLock
from ..store import Store
from . import render


@contextmanager
def _opened() -> Iterator[tuple[Store, KVIndex]]:
    store = Store()
    try:
        kv = open_index()
    except BaseException:
        store.close()
        raise
    try:
        yield store, kv
    finally:
        kv.close()
        store.close()


@contextmanager
def _locked(*names: str) -> Iterator[None]:
    """Hold the agents' locks: a chat running them elsewhere makes us refuse (BusyError), after
    the grace a server's cache write may need (`GRACE_S`)."""
    with ExitStack() as stack:
        for name in names:
            stack.callback(AgentLock(name).acquire(grace=GRACE_S).release)
        yield


def _recover(store: Store, kv: KVIndex, name: str) -> None:
    """Under the agent's lock, before a command changes it: resolve a /retry a killed process
    left unfinished (history.recover_retry), saying what it did."""
    from .. import config, history

    said = history.recover_retry(store, lambda: kv, name, config.get("block_tokens"))
    if said:
        render.say_recovered({name: said})


def _recover_free(store: Store, kv: KVIndex, names: list[str] | None = None) -> None:
    """`_recover` for reading commands, for each of these agents (None: every agent) with an
    entry no process runs any more (left by a killed one) and no holder: only then is the
    agent's lock taken, so a read never makes a starting chat fail as busy, except right
    after such a crash. A busy one is shown as it is: its holder recovers it, or runs the retry."""
    from ..errors import BusyError
    from ..locks import holder, retry_running

    for name in takeback.pending(store.db) if names is None else set(takeback.pending(store.db)) & set(names):
        if retry_running(name) or holder(name) is not None:
            continue
        try:
            with AgentLock(name):
                _recover(store, kv, name)
        except BusyError:
            continue


def _must_be_free(store: Store, name: str) -> None:
    """Checked under the name's lock, so no chat can create it between check and write."""
    if store.find_agent(name):
        raise UsageError(f"agent {name!r} already exists; pick another name or `semantic agents rm {name}`")
