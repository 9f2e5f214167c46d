"""Looking after the KV cache: scan -> plan -> execute eviction, and verification.

Like huggingface_hub's cache tools: a scan describes what is there, a plan
says exactly what would go and how many bytes it frees (`--dry-run` stops
there), and execution re-checks before deleting. Transcripts are never touched.
The index (kv/index.py) does every change; the files are found and checked
through kv/blockfile.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..locks import holder
from ..store import Store
from . import blockfile
from .blockfile import BlockFileError, block_path, tail_path
from .index import KVIndex, block_name


@dataclass(frozen=True)
class AgentCache:
    agent: str
    model: str
    transcript_tokens: int
    cached_tokens: int
    blocks_own: int
    blocks_shared: int
    bytes_own: int  # what evicting this agent alone frees (own blocks + tail)
    bytes_shared: int  # blocks this agent shares with others
    tier: str  # "warm" (on disk) or "cold" (transcript only)
    last_used: float | None


@dataclass(frozen=True)
class CacheScan:
    agents: list[AgentCache]
    total_bytes: int
    blocks: int
    stale_blocks: list[str]  # in the index, named by no agent (e.g. after a model change)
    stale_bytes: int
    orphaned_files: list[str]  # on disk, not in the index (a write killed midway)
    orphaned_bytes: int


def scan(index: KVIndex, store: Store) -> CacheScan:
    blocks = {b.hash: b for b in index.all_blocks()}
    tails = {t.agent: t for t in index.all_tails()}
    chains = index.chains()
    refs = index.refcounts()
    transcript = store.token_counts()
    agents = {a.name: a for a in store.list_agents()}
    rows = []
    for name in sorted(set(agents) | set(chains) | set(tails)):
        chain = [h for h in chains.get(name, []) if h in blocks]
        own = [h for h in chain if refs.get(h, 0) == 1]
        shared = [h for h in chain if refs.get(h, 0) > 1]
        tail = tails.get(name)
        cached = sum(blocks[h].n_tokens for h in chain) + (tail.n_tokens if tail else 0)
        used = [blocks[h].last_used for h in chain] + ([tail.last_used] if tail else [])
        rows.append(
            AgentCache(
                agent=name,
                model=agents[name].model if name in agents else "(deleted agent)",
                transcript_tokens=transcript.get(name, 0),
                cached_tokens=cached,
                blocks_own=len(own),
                blocks_shared=len(shared),
                bytes_own=sum(blocks[h].nbytes for h in own) + (tail.nbytes if tail else 0),
                bytes_shared=sum(blocks[h].nbytes for h in shared),
                tier="warm" if chain or tail else "cold",
                last_used=max(used) if used else None,
            )
        )
    stale = [h for h in blocks if h not in refs]
    orphans = blockfile.orphans(blocks, [t.file for t in tails.values()])
    return CacheScan(
        agents=rows,
        total_bytes=index.total_bytes(),
        blocks=len(blocks),
        stale_blocks=stale,
        stale_bytes=sum(blocks[h].nbytes for h in stale),
        orphaned_files=sorted(orphans),
        orphaned_bytes=sum(orphans.values()),
    )


@dataclass(frozen=True)
class EvictionPlan:
    agents: list[str]  # moved down to cold
    blocks: list[str]  # freed: used by no agent that stays (stale ones included)
    bytes_freed: int
    skipped_busy: list[str] = field(default_factory=list)


def plan_eviction(
    index: KVIndex,
    found: CacheScan,
    agents: list[str] | None = None,
    everything: bool = False,
    older_than_s: float | None = None,
    max_bytes: int | None = None,
) -> EvictionPlan:
    warm = {a.agent: a for a in found.agents if a.tier == "warm"}
    chosen: list[str] = []
    if everything:
        chosen = list(warm)
    for name in agents or []:
        if name in warm and name not in chosen:
            chosen.append(name)
    if older_than_s is not None:
        cutoff = time.time() - older_than_s
        chosen += [a for a, row in warm.items() if (row.last_used or 0) < cutoff and a not in chosen]
    busy = [a for a in chosen if holder(a) is not None]
    chosen = [a for a in chosen if a not in busy]
    blocks = {b.hash: b for b in index.all_blocks()}
    chains = index.chains()
    tails = {t.agent: t for t in index.all_tails()}

    def freed_by(evicted: list[str]) -> tuple[list[str], int]:
        staying = {h for a, chain in chains.items() if a not in evicted for h in chain}
        gone = [h for h in blocks if h not in staying]
        return gone, sum(blocks[h].nbytes for h in gone) + sum(tails[a].nbytes for a in evicted if a in tails)

    if max_bytes is not None:
        for name in sorted(warm, key=lambda a: warm[a].last_used or 0):
            if found.total_bytes - freed_by(chosen)[1] <= max_bytes:
                break
            if name not in chosen and holder(name) is None:
                chosen.append(name)
    gone, freed = freed_by(chosen)
    return EvictionPlan(chosen, gone, freed, busy)


def execute_eviction(index: KVIndex, plan: EvictionPlan) -> int:
    """Carry out a plan; blocks that gained a user since the scan are kept."""
    freed = 0
    with index.transaction():
        for name in plan.agents:
            tail = index.tail(name)
            freed += tail.nbytes if tail else 0
            index.drop_agent(name)
        freed += index.free_blocks(plan.blocks)
    return freed


@dataclass(frozen=True)
class Problem:
    what: str  # "block", "tail", "orphan"
    name: str
    reason: str


@dataclass(frozen=True)
class VerifyReport:
    checked: int
    problems: list[Problem]
    repaired: bool


def verify(index: KVIndex, repair: bool = False) -> VerifyReport:
    problems: list[Problem] = []
    blocks = index.all_blocks()
    for row in blocks:
        reason = _check_block(row.hash, row.model, row.parent, row.checksum)
        if reason:
            problems.append(Problem("block", row.hash, reason))
    tails = index.all_tails()
    for t in tails:
        reason = _check_file(tail_path(t.file), t.checksum)
        if reason:
            problems.append(Problem("tail", t.agent, reason))
    known = {h.hash for h in blocks}
    for agent, chain in index.chains().items():
        missing = [h for h in chain if h not in known]
        if missing:
            problems.append(Problem("chain", agent, f"names {len(missing)} block(s) not in the index"))
    found_files = blockfile.orphans([b.hash for b in blocks], [t.file for t in tails])
    problems += [Problem("orphan", p, "file not in the index (a write was interrupted)") for p in sorted(found_files)]
    if repair:
        with index.transaction():
            for p in problems:
                if p.what == "block":
                    index.drop_block(p.name)
                elif p.what == "tail":
                    index.drop_tail(p.name)
                elif p.what == "chain":
                    chain = index.chain(p.name)
                    index.cut_chain(p.name, next(i for i, h in enumerate(chain) if h not in known))
                else:
                    blockfile.remove_file(Path(p.name))
    return VerifyReport(len(blocks) + len(tails), problems, repair)


def _check_file(path: Path, checksum: str) -> str | None:
    try:
        actual = blockfile.file_checksum(path)
    except FileNotFoundError:
        return "file missing"
    return None if actual == checksum else "checksum mismatch (file damaged)"


def _check_block(block_hash: str, model: str, parent: str, checksum: str) -> str | None:
    path = block_path(block_hash)
    reason = _check_file(path, checksum)
    if reason:
        return reason
    try:
        header = blockfile.header_of(path)
    except BlockFileError as exc:
        return str(exc)
    if header.get("hash") != block_hash or block_name(model, parent, header.get("tokens") or []) != block_hash:
        return "content does not match its name"
    return None
