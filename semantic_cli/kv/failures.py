"""How the KV layer fails: one `CacheUnavailable` error, with a short reason.

An OSError or SQLite error anywhere below `KVStore` (a full disk, bad
permissions, a damaged index) reaches the core as `CacheUnavailable`; the core
handles it in one place, as a re-prefill later, never a lost message. A
damaged block file is not a failure: the store drops it and re-prefills.
"""

from __future__ import annotations

import errno
import os
import sqlite3

from .. import paths
from ..errors import SemanticError

CACHE_ERRORS = (OSError, sqlite3.Error)  # what `KVStore` turns into CacheUnavailable


class CacheUnavailable(SemanticError):
    """The KV cache cannot be read or written. Costs a re-prefill, never a message:
    the transcript holds the conversation."""

    def __init__(self, reason: str, already_down: bool = False) -> None:
        super().__init__(f"the KV cache is unavailable ({reason})")
        self.reason = reason
        self.already_down = already_down  # the store failed earlier in this process, and said so then


def failure_reason(exc: Exception) -> str:
    """A short reason for a cache failure; SQLite reports a full disk as a mere I/O error."""
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not full:
        try:
            st = os.statvfs(paths.cache_dir(create=False))
            full = st.f_bavail * st.f_frsize < (1 << 20)
        except OSError:
            pass
    return "the disk is full" if full else getattr(exc, "strerror", None) or str(exc)
