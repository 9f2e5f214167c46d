"""Stop sequences (the API's `stop`): where a reply ends, and how much of its end to hold
back while it might still become one."""

from __future__ import annotations


def stop_at(stops: list[str], text: str) -> int | None:
    """Where the earliest stop sequence starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def stop_prefix(stops: list[str], text: str) -> int:
    """How many characters at the end of `text` could begin a stop sequence."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)
