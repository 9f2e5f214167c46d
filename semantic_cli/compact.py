"""Compaction: the agent summarises its older turns, and the summary becomes part of the
prefix the following turns see (persona, then summary, then the turns it did not cover).

The summary is one generation with a fixed instruction over the turns it covers, run on
the agent's model without being recorded as a turn; its prompt finds the agent's cached
blocks by content, as any turn's does. The full transcript is kept (history.py: the
summary names the last message it covers). The new prefix is not a prefix of the old
token log, so the log and the agent's cache are dropped: the next turn pays one
re-prefill, of the persona, the summary and the turns kept verbatim. The caller holds the
agent's lock. Nothing here prints.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

from . import history, prompting
from .chat import Chat
from .errors import SemanticError, UsageError
from .events import TurnDone
from .kv.failures import CacheUnavailable
from .model.loader import Progress
from .store import Agent, Message
from .turn import GenSettings

INSTRUCTION = (
    "Summarise our conversation so far for your own later reference: the facts, decisions, names, numbers "
    "and open questions that matter, in at most 200 words. Reply with the summary only."
)
SUMMARY_TOKENS = 384  # the summary's default length cap (and the room kept for it in the prompt)


@dataclass(frozen=True)
class Plan:
    agent: str
    older: list[history.Exchange]  # the exchanges the summary will cover
    kept: int  # exchanges kept verbatim after it


@dataclass(frozen=True)
class Compacted:
    plan: Plan
    summary: Message
    left_out: int  # oldest exchanges that did not fit the summarisation prompt (covered, but not summarised)
    finish_reason: str


def plan(chat: Chat, name: str, keep_last: int) -> Plan:
    if keep_last < 0:
        raise UsageError("--keep-last must be 0 or more")
    turns = history.exchanges(history.live(chat.store.messages(name)))
    older = turns[: max(0, len(turns) - keep_last)]
    if not older:
        raise UsageError(f"nothing to compact: {name} has {len(turns)} turns since the last compaction, and {keep_last} are to be kept")
    return Plan(name, older, len(turns) - len(older))


def compact(chat: Chat, agent: Agent, settings: GenSettings, keep_last: int = 0, on_progress: Progress | None = None) -> Compacted:
    """Summarise the agent's older turns (all but the last `keep_last` since the last
    compaction) and record the summary. A failure or Ctrl-C before the record changes nothing."""
    p = plan(chat, agent.name, keep_last)
    engine = chat.engine_for(agent, on_progress)
    lm = engine.lm
    system = history.persona(agent, chat.store.messages(agent.name))
    head = [{"role": "system", "content": system}] if system else []
    cap = settings.max_tokens or SUMMARY_TOKENS
    # The oldest turns that do not fit beside the instruction and the summary are left out of
    # its prompt (a conversation that filled the context would otherwise never compact).
    for left_out in range(len(p.older)):
        body = [{"role": m.role, "content": m.content} for ex in p.older[left_out:] for m in (ex.user, ex.reply) if m]
        messages = head + body + [{"role": "user", "content": INSTRUCTION}]
        if len(prompting.full_prompt(lm.tokenizer, messages)) + min(cap, SUMMARY_TOKENS) <= lm.context_length:
            break
    # No repetition penalty unless asked for: a summary must repeat the conversation's names and
    # facts, which a penalty over the recent tokens (the conversation) pushes away from (SmolLM2
    # wrote "Sommelà de l'enfant, Aujourd'halee, ..." under the default 1.15; on topic under 1).
    penalty = settings.repeat_penalty if settings.repeat_penalty is not None else 1.0
    pending = chat.prepare_stateless(agent.name, engine, messages, replace(settings, max_tokens=cap, repeat_penalty=penalty))
    done: TurnDone | None = None
    events = engine.generate([pending.request], seed=settings.seed)
    try:
        for ev in events:
            if isinstance(ev, TurnDone):
                done = ev
    finally:
        events.close()
    text = done.text.strip() if done else ""
    if not text:
        raise SemanticError(f"{lm.name} gave an empty summary; nothing changed (try again with another --temp, or trim instead)")
    meta = {"through": p.older[-1].last_id, "turns": len(p.older), "left_out": left_out, "model": lm.name}
    summary = chat.store.add_summary(agent.name, text, {**meta, "finish_reason": done.finish_reason if done else "stop"})
    with contextlib.suppress(CacheUnavailable):  # stale blocks are never matched: only disk is at stake
        chat.kv.release_agent(agent.name)  # the prefix changed: no block of the old one is this agent's any more
    return Compacted(p, summary, left_out, done.finish_reason if done else "stop")
