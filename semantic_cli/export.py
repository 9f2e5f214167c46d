"""Transcript export: an agent and its messages as Markdown or as JSON.

The one exporter behind `semantic agents show --markdown/--json` and the REPL's
`/save FILE.md|FILE.json`, so both write the same documents. Times are ISO 8601
in UTC; a message cut short is marked in Markdown ("*(interrupted)*", "*(cut off at the
token limit)*", "*(unanswered: ...)*", `cut_mark`) and in JSON by its `status`
(`interrupted`, `unanswered`) or its `meta.finish_reason` (`length`). Nothing here prints: `write_file` puts a document in a file
without ever writing through a symbolic link.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import paths
from .history import compacted
from .store import Agent, Message


def iso(ts: float) -> str:
    """A Unix time as ISO 8601 in UTC, to the second: 2024-05-01T12:00:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def agent_dict(agent: Agent) -> dict[str, Any]:
    """An agent's persona, model and settings, as JSON values."""
    return {
        "name": agent.name,
        "model": agent.model,
        "system": agent.system,
        "settings": agent.settings,
        "created_at": iso(agent.created_at),
        "last_active": iso(agent.last_active),
    }


def message_dict(message: Message) -> dict[str, Any]:
    return {
        "id": message.id,
        "role": message.role,
        "content": message.content,
        "status": message.status,
        "created_at": iso(message.created_at),
        "meta": message.meta,
    }


def to_dict(agent: Agent, messages: Iterable[Message]) -> dict[str, Any]:
    """The JSON document: {"agent": {...}, "messages": [...]}, messages in order; `compacted`
    is true for a message a compaction summary covers (kept, no longer seen by the model)."""
    listed = list(messages)
    covered = compacted(listed)
    return {"agent": agent_dict(agent), "messages": [{**message_dict(m), "compacted": m.id in covered} for m in listed]}


def to_json(agent: Agent, messages: Iterable[Message]) -> str:
    """`to_dict` as indented JSON text (non-ASCII kept as is), ending in a newline."""
    return json.dumps(to_dict(agent, messages), indent=2, ensure_ascii=False) + "\n"


def to_markdown(agent: Agent, messages: Iterable[Message]) -> str:
    """A heading with the agent's name, its model and settings, the persona quoted,
    then one "## You" / "## NAME" section per message."""
    parts = [f"# {agent.name}\n", f"- model: `{agent.model}`"]
    parts += [f"- {k}: {v}" for k, v in sorted(agent.settings.items())]
    if agent.system:
        parts.append("\n## Persona\n\n" + "\n".join(f"> {line}" if line else ">" for line in agent.system.splitlines()))
    listed = list(messages)
    covered = compacted(listed)
    for m in listed:
        who = "You" if m.role == "user" else agent.name if m.role == "assistant" else m.role.capitalize()
        parts.append(f"\n## {who}\n\n{m.content.strip()}")
        mark = cut_mark(m)
        if mark:
            parts.append(f"\n*({mark})*")
        if m.id in covered:
            parts.append("\n*(compacted)*")
    return "\n".join(parts) + "\n"


def cut_mark(m: Message) -> str:
    """How a message was cut short, for a reader: "interrupted" (Ctrl-C during the reply),
    "cut off at the token limit" (max_tokens), "unanswered" (stopped before the reply);
    "" for a whole one."""
    if m.status == "interrupted":
        return "interrupted"
    if m.status == "unanswered":
        return "unanswered: stopped before the reply"
    if m.role == "assistant" and m.meta.get("finish_reason") == "length":
        return "cut off at the token limit"
    return ""


def write_file(path: Path, text: str) -> None:
    """Write an export to `path`, private to the user (0600). A symbolic link there is
    refused (UnsafePathError, one line); otherwise a unique temp file beside it is
    written, fsync-ed and renamed over it, so no link (even one planted meanwhile) is
    ever written through, and a reader never sees half a file."""
    paths.refuse_link(path, "export file")
    paths.atomic_write(path, text.encode("utf-8"))
