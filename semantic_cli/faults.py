"""Fault injection for tests: `SEMANTIC_FAULT=POINT` makes the process SIGKILL itself there.

The points are the moments of a turn's writes where a crash could leave the
stores half-updated (tests/test_fault_points.py kills a real `semantic chat` at each
and checks what the next turn finds). The variable is read at each point, not
at import, and an unset or unknown value does nothing.
"""

from __future__ import annotations

import os
import signal

POINTS = (  # in the order a turn reaches them
    "after-transcript-commit",  # the turn is in the transcript; nothing cached yet
    "after-block-temp-write",  # a new block's temp file is written and synced, not yet renamed
    "after-block-rename",  # a new block file is in place; its index row is not
    "after-tail-rename",  # the new blocks are indexed; the new tail file is in place, not yet indexed
    "before-index-commit",  # the same moment, seen from the index: the chain and tail rows are not committed
    "after-index-commit",  # the index names the new chain and tail; the old tail file is not yet removed
)

RANK_POINTS = (  # a run over several ranks (semantic_cli.distributed)
    "rank-step",  # a rank other than 0, at its first generation step: it dies mid-turn
)

EVICTION_POINTS = (  # an index transaction that lets files go (eviction, rm, repair)
    "eviction-before-commit",  # the rows are deleted but not committed: a kill rolls them back
    "eviction-after-commit",  # committed; the files are not yet deleted (they become orphans)
)


def point(name: str) -> None:
    """Die here, as SIGKILL would, when SEMANTIC_FAULT names this point."""
    if os.environ.get("SEMANTIC_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
