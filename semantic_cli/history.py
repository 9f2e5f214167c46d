"""Ways out of a full context, and taking a turn back: fork at a turn, trim, undo, the
compacted view of a transcript, and resolving a /retry a killed process left unfinished
(`recover_retry`; its journal is takeback.py's). The core: nothing here prints.

A transcript is a list of exchanges (a user message and the reply recorded with it) and,
after a compaction, summaries (role "summary"). A summary's meta names the last message
it covers (`through`); the model then sees the persona, the latest summary and the
exchanges after `through`. The compacted messages stay in the transcript (`agents show`
marks them): nothing is deleted by a compaction.

The KV cache stays honest: a cut conversation keeps only the token-log chunks that cover
exactly the turns it keeps (`log_cut`; `record_turn` writes one chunk per turn), and its
cache chain only the blocks that hash those tokens. When the kept prefix is not a run of
whole chunks (the log was re-rendered after those turns, or the prefix itself changed:
trim, compaction) the log is dropped and the next turn re-renders the transcript, finding
whatever blocks still match by content.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from . import takeback
from .errors import UsageError
from .kv.index import KVIndex
from .store import Agent, Message, Store

SUMMARY_ROLE = "summary"
SUMMARY_HEADER = "Summary of the earlier conversation:\n"


@dataclass(frozen=True)
class Exchange:
    number: int  # 1-based, in transcript order
    user: Message
    reply: Message | None  # None only in a transcript written by hand

    @property
    def ids(self) -> list[int]:
        return [self.user.id] + ([self.reply.id] if self.reply else [])

    @property
    def last_id(self) -> int:
        return self.ids[-1]


def exchanges(messages: list[Message]) -> list[Exchange]:
    out: list[Exchange] = []
    for m in messages:
        if m.role == "user":
            out.append(Exchange(len(out) + 1, m, None))
        elif m.role == "assistant" and out and out[-1].reply is None:
            out[-1] = Exchange(out[-1].number, out[-1].user, m)
    return out


def latest_summary(messages: list[Message]) -> Message | None:
    return next((m for m in reversed(messages) if m.role == SUMMARY_ROLE), None)


def compacted_through(messages: list[Message]) -> int:
    """The id of the last message the latest summary covers (-1: nothing is compacted)."""
    summary = latest_summary(messages)
    return int(summary.meta.get("through", summary.id)) if summary else -1


def compacted(messages: list[Message]) -> set[int]:
    """The ids of the messages a summary covers (older summaries included): kept, not seen."""
    through = compacted_through(messages)
    latest = latest_summary(messages)
    return {m.id for m in messages if m.id <= through or (m.role == SUMMARY_ROLE and m is not latest)}


def turn_counts(messages: list[Message]) -> tuple[int, int]:
    """How many turns (user messages) a transcript holds, and how many of them the latest
    summary covers: `agents ls` and the REPL's /agents show both (`agents show` marks the
    covered ones "(compacted)")."""
    through = compacted_through(messages)
    users = [m.id for m in messages if m.role == "user"]
    return len(users), sum(1 for i in users if i <= through)


def live(messages: list[Message]) -> list[Message]:
    """The messages the model sees after the persona (and summary): those after the latest
    summary's `through`, summaries left out."""
    through = compacted_through(messages)
    return [m for m in messages if m.role != SUMMARY_ROLE and m.id > through]


def persona(agent: Agent, messages: list[Message]) -> str:
    """The system prompt the model sees: the persona, then the latest summary if any."""
    summary = latest_summary(messages)
    if summary is None:
        return agent.system
    return (agent.system + "\n\n" if agent.system else "") + SUMMARY_HEADER + summary.content


def log_cut(chunks: list[int], total: int, keep: int) -> int:
    """How many leading log chunks cover exactly the first `keep` of `total` exchanges: the
    last chunk ends at exchange `total`, each earlier one an exchange before, and the first
    covers everything from the log's start. 0 when no run of whole chunks ends there (drop
    the log: the next turn re-renders)."""
    if not chunks or len(chunks) > total:
        return 0
    first = total - len(chunks) + 1  # the exchange the first chunk ends at
    return keep - first + 1 if keep >= first else 0


def keep_blocks(index: KVIndex, agent: str, source: str, tokens: list[int], block_tokens: int) -> int:
    """Give `agent` the cache chain of `source`'s blocks that hash `tokens` (in order, up to
    the first one not stored). Returns how many blocks it keeps. Blocks are content-addressed,
    so this is exact. A new agent gets no tail; `source` itself keeps its own (undo): a restore
    takes only the tokens the tail shares with the next prompt, so /retry's resend of the same
    message restores it nearly whole."""
    from .kv.index import chain_hashes

    model = index.chain_model(source)
    hashes: list[str] = []
    if model is not None:
        wanted = chain_hashes(model, tokens, block_tokens)
        stored = index.blocks(wanted)
        for h in wanted:
            if h not in stored:
                break
            hashes.append(h)
    with index.transaction():
        if hashes:
            index.set_chain(agent, model or "", hashes)
        else:
            index.drop_agent(agent)
    return len(hashes)


@dataclass(frozen=True)
class Cut:
    """A planned change to a conversation: which messages go, how much of the log stays."""

    agent: str
    keep: list[Exchange]
    drop_ids: list[int]  # messages deleted (trim, undo) or left behind (fork)
    chunks: int  # leading token-log chunks kept (0: re-render)
    log_tokens: int  # the tokens those chunks hold

    @property
    def reprefill(self) -> bool:
        return self.chunks == 0


def _cut(store: Store, name: str, keep: list[Exchange], total: int, drop_ids: list[int]) -> Cut:
    sizes = store.chunk_sizes(name)
    chunks = log_cut(sizes, total, keep[-1].number) if keep else 0
    return Cut(name, keep, drop_ids, chunks, sum(sizes[:chunks]))


def plan_fork(store: Store, name: str, at_turn: int) -> Cut:
    """Keep turns 1..at_turn (and any summary recorded before the last of them)."""
    messages = store.messages(name)
    turns = exchanges(messages)
    if not 1 <= at_turn <= len(turns):
        raise UsageError(f"--at-turn must be between 1 and {len(turns)} (agent {name!r} has {len(turns)} turns)" if turns
                         else f"agent {name!r} has no turns to fork at; fork it whole without --at-turn")  # fmt: skip
    through = turns[at_turn - 1].last_id
    return _cut(store, name, turns[:at_turn], len(turns), [m.id for m in messages if m.id > through])


def plan_trim(store: Store, name: str, keep_last: int) -> Cut:
    """Keep the persona and the last `keep_last` exchanges; every earlier message (summaries
    too) goes. The prefix changes, so the log always goes: the next turn re-prefills."""
    if keep_last < 0:
        raise UsageError("--keep-last must be 0 or more")
    messages = store.messages(name)
    turns = exchanges(messages)
    if keep_last >= len(turns):  # nothing to trim (dropping just a summary would bring back every turn it covers)
        return Cut(name, turns, [], 0, 0)
    kept = turns[max(0, len(turns) - keep_last) :] if keep_last else []
    first = kept[0].user.id if kept else None
    drop = [m.id for m in messages if first is None or m.id < first or m.role == SUMMARY_ROLE]
    return Cut(name, kept, drop, 0, 0)


def plan_undo(store: Store, name: str) -> Cut:
    """Remove the last exchange (not one a compaction already covers)."""
    messages = store.messages(name)
    turns = exchanges(messages)
    if not turns:
        raise UsageError("nothing to undo: the conversation is empty")
    last = turns[-1]
    if last.last_id <= compacted_through(messages):
        raise UsageError("nothing to undo since the last compaction (its summary covers the last turn)")
    return _cut(store, name, turns[:-1], len(turns), last.ids)


def apply_cut(store: Store, cut: Cut, journal: bool = False) -> list[int]:
    """Delete the cut's messages and log chunks (one transaction; with `journal`, a /retry's:
    `takeback.put_back` restores them); returns the kept log, whose blocks `keep_blocks`
    then keeps (none, and no tail, when the log went)."""
    takeback.cut(store.db, cut.agent, cut.drop_ids, cut.chunks, journal)
    return store.log_tokens(cut.agent, cut.chunks)


RECOVERED = {
    "restored": "the previous reply is back: a /retry did not finish (its process ended)",
    "finished": "a /retry finished just before its process ended: the new reply stays",
    "overtaken": "a /retry did not finish (its process ended) and turns were recorded since: they stay, the previous reply is gone",
}


def recover_retry(store: Store, index: Callable[[], KVIndex], name: str, block_tokens: int) -> str | None:
    """Resolve a /retry a killed process left unfinished (`takeback.recover`), the caller
    holding the agent's lock; the one line that says what happened, or None (no entry, or
    the process that runs the retry is alive: a REPL whose turns a server runs holds the
    agent's lock only between them, and its retry lock throughout). After a put-back the
    cache chain keeps only the blocks of the restored log (`index` opens the KV index: only
    then); the caller drops its hot copy."""
    from .kv.failures import CacheUnavailable
    from .locks import retry_running

    if name not in takeback.pending(store.db) or retry_running(name):
        return None
    outcome = takeback.recover(store.db, name)
    if outcome is None:
        return None
    if outcome == "restored":
        with contextlib.suppress(CacheUnavailable):  # a cache that cannot follow costs a re-prefill
            keep_blocks(index(), name, name, store.log_tokens(name), block_tokens)
    return RECOVERED[outcome]


def fork(store: Store, index: KVIndex, source: str, new: str, cut: Cut, block_tokens: int) -> int:
    """`new` gets the cut's turns and log chunks; its cache chain only the blocks of that log."""
    through = cut.keep[-1].last_id if cut.keep else -1
    store.fork_agent(source, new, through=through, chunks=cut.chunks)
    return keep_blocks(index, new, source, store.log_tokens(new, cut.chunks), block_tokens)


def too_long_advice(name: str) -> str:
    """What to do when a conversation no longer fits its model's context."""
    return (
        f"make room: `semantic agents compact {name}` (summarise older turns; /compact in the REPL), "
        f"`semantic agents trim {name} --keep-last N`, `semantic agents fork {name} NEW --at-turn N`, "
        f"or `semantic agents reset {name}`"
    )
