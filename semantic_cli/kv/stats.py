"""What a turn's persist wrote: a record the UI and the server's wire carry, kept apart from
`KVStore` so that they need not import the cache machinery to name it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PersistStats:
    bytes_written: int
    blocks_written: int
    blocks_reused: int
