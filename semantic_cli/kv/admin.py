"""Looking after the KV cache: scan -> plan -> execute eviction, and verification.

Like huggingface_hub's cache tools: a scan describes what is there, a plan
says exactly what would go and how many bytes it frees (`--dry-run` stops
there), and execution re-checks before deleting. Transcripts are never touched.
The index (kv/index.py) does every change; the files are found and checked
through kv/blockfile.py.

`verify` checks every file the index names (opened as blockfile opens them: a
regular file of the recorded size, never through a link, never blocking) and
lists the files the index does not name. `--repair` plans first (one action per
problem, computed from what was found, so one repair cutting a chain that
another also names is harmless) and then runs the plan in one index
transaction; files go only after it commits, so a failed repair changes
nothing. A file another process may still be writing is left alone and reported
as in progress: a temp file whose writer (the pid in its name) is alive, an
untracked tail whose agent is locked, or, where its writer cannot be told, one
younger than `GRACE_S`.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import paths
from ..locks import holder, pid_alive
from ..store import NAME_RE, Store
from . import blockfile, fileread
from .blockfile import BadName, BlockFileError, DiskFile, block_path, tail_path
from .index import BlockRow, KVIndex, TailRow, block_name

GRACE_S = 600.0  # an untracked file younger than this, whose writer cannot be told dead, is left alone


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
                model=agents[name].model if name in agents else "(API slot)" if name.startswith("~") else "(deleted agent)",
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
    what: str  # "block", "tail", "chain", "orphan" ("in progress" in VerifyReport.in_progress)
    name: str
    reason: str


@dataclass(frozen=True)
class VerifyReport:
    checked: int
    problems: list[Problem]
    repaired: bool
    in_progress: list[Problem] = field(default_factory=list)  # files a live writer may still be writing: left alone


@dataclass(frozen=True)
class RepairAction:
    what: str  # "drop-block", "drop-tail", "cut-chain" or "remove-file"
    name: str  # a block hash, an agent, or a path
    pos: int = 0  # "cut-chain": the first position to go
    file: DiskFile | None = None  # "remove-file": the file as it was found


def verify(index: KVIndex, repair: bool = False) -> VerifyReport:
    blocks = index.all_blocks()
    tails = index.all_tails()
    chains = index.chains()
    problems: list[Problem] = []
    for row in blocks:
        reason = _check_block(row)
        if reason:
            problems.append(Problem("block", row.hash, reason))
    for t in tails:
        reason = _check_tail(t)
        if reason:
            problems.append(Problem("tail", t.agent, reason))
    known = {b.hash for b in blocks}
    for agent, chain in chains.items():
        missing = [h for h in chain if h not in known]
        if missing:
            problems.append(Problem("chain", agent, f"names {len(missing)} block(s) not in the index"))
    orphans, in_progress = _untracked(blockfile.untracked(known, [t.file for t in tails]), time.time())
    problems += [Problem("orphan", f.path, reason) for f, reason in orphans]
    if repair:
        execute_repair(index, plan_repair(problems, chains, known, [f for f, _ in orphans]))
    return VerifyReport(len(blocks) + len(tails), problems, repair, [Problem("in progress", f.path, why) for f, why in in_progress])


def plan_repair(problems: list[Problem], chains: dict[str, list[str]], known: set[str], orphans: list[DiskFile]) -> list[RepairAction]:
    """What `--repair` does about each problem, decided before anything changes."""
    files = {f.path: f for f in orphans}
    actions = []
    for p in problems:
        if p.what == "block":
            actions.append(RepairAction("drop-block", p.name))
        elif p.what == "tail":
            actions.append(RepairAction("drop-tail", p.name))
        elif p.what == "chain":
            chain = chains.get(p.name, [])
            actions.append(RepairAction("cut-chain", p.name, next((i for i, h in enumerate(chain) if h not in known), len(chain))))
        elif p.name in files:
            actions.append(RepairAction("remove-file", p.name, file=files[p.name]))
    return actions


def execute_repair(index: KVIndex, actions: list[RepairAction]) -> None:
    """Carry out a repair plan in one index transaction; files are removed after it commits
    (a failure rolls everything back and removes nothing). Each action is harmless where an
    earlier one already did its work (a chain cut shorter, a row gone)."""
    with index.transaction():
        named: tuple[set[str], set[str]] | None = None
        for a in actions:
            if a.what == "drop-block":
                index.drop_block(a.name)
            elif a.what == "drop-tail":
                index.drop_tail(a.name)
            elif a.what == "cut-chain":
                index.cut_chain(a.name, a.pos)
            elif a.what == "remove-file" and a.file is not None:
                if named is None:  # under the index's write lock: a file named since the scan stays
                    named = ({b.hash for b in index.all_blocks()}, {t.file for t in index.all_tails()})
                if (a.file.kind == "block" and a.file.name in named[0]) or (a.file.kind == "tail" and a.file.name in named[1]):
                    continue
                index.after_commit(functools.partial(blockfile.remove_listed, a.file))


def _untracked(files: list[DiskFile], now: float) -> tuple[list[tuple[DiskFile, str]], list[tuple[DiskFile, str]]]:
    """Untracked files split into orphans (to remove) and in-progress ones (left alone), each with why."""
    orphans, in_progress = [], []
    writing: bool | None = None  # whether some agent's lock is held (a turn may be writing blocks)
    for f in files:
        if f.kind == "foreign":
            orphans.append((f, "not a cache file (its name matches no cache file's)"))
            continue
        alive: bool | None  # the writer: alive, dead, or cannot be told
        if f.kind == "temp":
            alive = None if f.pid is None else pid_alive(f.pid)
        elif f.kind == "tail":
            alive = _locked(f.agent or "")
        else:  # a block written before its index row: by whichever agent's turn
            if writing is None:
                writing = _any_locked()
            alive = None if writing else False
        young = now - f.mtime < GRACE_S
        if alive or (alive is None and young):
            why = "its writer is running" if alive else f"written {now - f.mtime:.0f} s ago, perhaps by a running turn"
            in_progress.append((f, f"{why}: left alone"))
        else:
            orphans.append((f, "file not in the index (a write was interrupted)"))
    return orphans, in_progress


def _locked(agent: str) -> bool | None:
    """Whether a process holds the agent's lock (None if that cannot be told)."""
    try:
        return holder(agent) is not None
    except Exception:
        return None


def _any_locked() -> bool:
    """Whether any agent's lock is held (or cannot be told)."""
    try:
        names = [p.name[: -len(".lock")] for p in paths.locks_dir().iterdir() if p.name.endswith(".lock")]
    except Exception:  # an unreadable or unsafe locks directory: assume a writer
        return True
    return any(_locked(n) is not False for n in names if NAME_RE.fullmatch(n))


def _check_file(path: Path, checksum: str, nbytes: int) -> str | None:
    try:
        actual = fileread.file_checksum(path, nbytes)
    except BlockFileError as exc:
        return "file missing" if isinstance(exc.__cause__, FileNotFoundError) else str(exc)
    return None if actual == checksum else "checksum mismatch (file damaged)"


def _check_tail(t: TailRow) -> str | None:
    try:
        path = tail_path(t.file)
    except BadName:
        return "the index names a file that is not a tail's (the row is dropped, no file touched)"
    return _check_file(path, t.checksum, t.nbytes)


def _check_block(row: BlockRow) -> str | None:
    try:
        path = block_path(row.hash)
    except BadName:
        return "not a block's name (the row is dropped, no file touched)"
    reason = _check_file(path, row.checksum, row.nbytes)
    if reason:
        return reason
    try:
        header = fileread.header_of(path, row.nbytes, fileread.header_limit(row.n_tokens, 1 << 10))
        tokens = header.get("tokens")
        ok = header.get("hash") == row.hash and isinstance(tokens, list) and block_name(row.model, row.parent, tokens) == row.hash
    except BlockFileError as exc:
        return str(exc)
    except (TypeError, ValueError, OverflowError):  # token ids that are not token ids
        ok = False
    return None if ok else "content does not match its name"
