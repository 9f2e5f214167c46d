"""Addressing messages in a room: `@name text`, `@all text`, or the current agent."""

from __future__ import annotations

import re

from .errors import UsageError
from .store import NAME_RE

# `@` and an agent name (the store's rule), ending at a word boundary.
_MENTION = re.compile(rf"@({NAME_RE.pattern})\b")


def address(text: str, room: list[str], current: str | None) -> tuple[list[str], str]:
    """Which agents a message goes to, and the message without the leading mentions."""
    body = text.lstrip()
    names: list[str] = []
    while body.startswith("@"):
        match = _MENTION.match(body)
        if not match:
            raise UsageError(f"bad mention in {text.strip()[:40]!r}; write @name message (agents here: {', '.join(room)})")
        name = match.group(1)
        if name == "all":
            names += [n for n in room if n not in names]
        elif name in room:
            if name not in names:
                names.append(name)
        else:
            raise UsageError(f"no agent @{name} in this room; agents here: {', '.join(room)} (or @all)")
        body = body[match.end() :].lstrip()
    if not names:
        if current is None:
            raise UsageError(f"say who should answer: start with @name or @all (agents here: {', '.join(room)}), or pass --all")
        names = [current]
    if not body.strip():
        raise UsageError("empty message: write something after the @mention")
    return names, body
