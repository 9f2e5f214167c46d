"""`semantic cache ...`: what is cached, eviction (scan -> plan -> execute), verification."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING

import typer

from ..errors import CacheDamageError, NotFoundError, UsageError
from . import render
from .render import Column, fullness, human_age, human_bytes, plural, printable

if TYPE_CHECKING:
    from ..kv.admin import CacheScan
    from ..kv.index import KVIndex
    from ..store import Store

app = typer.Typer(help="Inspect and manage the persistent KV cache.", no_args_is_help=True)
DELETED = "(deleted agent)"  # the model scan names for a cache whose agent is gone


@app.callback()
def cover(
    rank: str | None = typer.Option(
        None, "--rank", metavar="LAYOUT", help="Act on another rank's shard of a run over several ranks (cache/ranks/LAYOUT)."
    ),
) -> None:
    """Which cache the commands act on: rank 0's and one-process runs' (said on stderr when other
    ranks' shards are here too), or with --rank one of those shards."""
    import re

    from .. import paths

    paths.rank_cache = None
    root = paths.cache_dir(create=False) / "ranks"
    shards = sorted(p.name for p in root.glob("*") if p.is_dir()) if root.is_dir() else []
    if rank is not None:
        here = f"this host has {', '.join(shards)}" if shards else "this host has none"
        if not re.fullmatch(r"[a-z]+-w\d+-r\d+", rank):
            raise UsageError(f"--rank {rank!r} is not a shard's name (LAYOUT-wN-rK, e.g. layers-w2-r1); {here}")
        if rank not in shards:
            raise NotFoundError(f"no shard {rank!r} under {root}: {here}")
        paths.rank_cache = rank
    elif shards:
        render.stderr().print(
            f"(rank 0's and one-process runs' cache; other ranks' shards here: {', '.join(shards)}: semantic cache --rank LAYOUT ...)",
            markup=False,
        )


def _open() -> tuple[KVIndex, Store]:
    from ..kv.index import open_index
    from ..store import Store

    return open_index(), Store()


@app.command("ls")
def ls(json_out: bool = typer.Option(False, "--json", metavar="", help="Print JSON.")) -> None:
    """One row per agent: tokens/context, cached tokens, blocks, bytes, tier, last use.

    On a terminal: a table, then a line of totals. Piped or redirected: tab-separated values, a header line and one complete
    line per agent (the model as given), each number in a column of its own (bytes as integers, `used` in ISO 8601): agent
    model tokens context cached blocks_own blocks_shared bytes_own bytes_shared tier used; the totals on stderr.

    tokens: transcript tokens / the model's context length ("812/8192"); the tokens alone until the model's files are here.
    """
    from ..export import iso
    from ..kv.admin import scan
    from ..model.loader import context_length

    index, store = _open()
    try:
        found = scan(index, store)
    finally:
        index.close()
        store.close()
    contexts = {spec: context_length(spec) for spec in {a.model for a in found.agents if a.model != DELETED}}
    if json_out:
        rows = [
            {**asdict(a), "context_length": contexts.get(a.model), "last_used": iso(a.last_used) if a.last_used else None}
            for a in found.agents
        ]
        print(
            json.dumps(
                {
                    "agents": rows,
                    "total_bytes": found.total_bytes,
                    "blocks": found.blocks,
                    "stale_blocks": len(found.stale_blocks),
                    "stale_bytes": found.stale_bytes,
                    "orphaned_files": len(found.orphaned_files),
                    "orphaned_bytes": found.orphaned_bytes,
                },
                indent=2,
            )
        )
        return
    terminal = render.is_terminal(sys.stdout)
    if not terminal:  # every value whole, each number in its own column
        headers = ["agent", "model", "tokens", "context", "cached", "blocks_own", "blocks_shared"]
        headers += ["bytes_own", "bytes_shared", "tier", "used"]
        records = [
            [a.agent, a.model, str(a.transcript_tokens), str(contexts.get(a.model) or ""),
             *(str(n) for n in (a.cached_tokens, a.blocks_own, a.blocks_shared, a.bytes_own, a.bytes_shared)),
             a.tier, iso(a.last_used) if a.last_used else ""]
            for a in found.agents
        ]  # fmt: skip
        render.table([Column(h) for h in headers], records)
        render.stderr().print(_totals(found), markup=False)
        return
    numbers = [Column(header, right=True) for header in ("tokens", "cached", "blocks", "own", "shared")]
    columns = [Column("agent"), Column("model", wrap=True), *numbers, Column("tier"), Column("used")]
    render.table(
        columns,
        [
            [
                a.agent,
                printable(os.path.basename(a.model.rstrip("/")) or a.model),
                fullness(a.transcript_tokens, contexts.get(a.model)),
                str(a.cached_tokens),
                f"{a.blocks_own}/{a.blocks_shared}",
                human_bytes(a.bytes_own),
                human_bytes(a.bytes_shared),
                a.tier,
                human_age(a.last_used),
            ]
            for a in found.agents
        ],
    )
    render.stdout().print(_totals(found), markup=False)


def _totals(found: CacheScan) -> str:
    return (
        f"total {human_bytes(found.total_bytes)} in {plural(found.blocks, 'block')}"
        f" · stale {human_bytes(found.stale_bytes)} ({plural(len(found.stale_blocks), 'block')})"
        f" · orphaned {human_bytes(found.orphaned_bytes)} ({plural(len(found.orphaned_files), 'file')})"
    )


@app.command("evict")
def evict(
    agents: list[str] = typer.Argument(None, help="Agents whose cache to drop (their transcripts stay)."),
    everything: bool = typer.Option(False, "--all", metavar="", help="Every agent's cache."),
    older_than: str | None = typer.Option(None, "--older-than", help="Agents unused for this long, e.g. 7d, 12h."),
    max_bytes: str | None = typer.Option(None, "--max-bytes", help="Evict least recently used agents until the cache fits, e.g. 2GB."),
    dry_run: bool = typer.Option(False, "--dry-run", metavar="", help="Show the plan; change nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", metavar="", help="Do not ask for confirmation."),
    json_out: bool = typer.Option(False, "--json", metavar="", help="Print the plan (and result) as JSON."),
) -> None:
    """Drop cached KV blocks: scan, show the plan and the bytes it frees, then do it."""
    from ..config import parse_bytes, parse_duration
    from ..kv.admin import execute_eviction, plan_eviction, scan
    from ..store import validate_name

    agents = agents or []
    for name in agents:
        validate_name(name)
    if not (agents or everything or older_than or max_bytes):
        raise UsageError("say what to evict: AGENT..., --all, --older-than 7d or --max-bytes 2GB")
    index, store = _open()
    found = scan(index, store)
    unknown = [a for a in agents if a not in {r.agent for r in found.agents}]
    if unknown:
        from ..errors import NotFoundError

        raise NotFoundError(f"no agent named {unknown[0]!r}; see `semantic cache ls`")
    plan = plan_eviction(
        index,
        found,
        agents,
        everything,
        parse_duration(older_than) if older_than else None,
        parse_bytes(max_bytes) if max_bytes else None,
    )
    err = render.stderr()
    summary = {
        "agents": plan.agents,
        "blocks": len(plan.blocks),
        "bytes_freed": plan.bytes_freed,
        "skipped_busy": plan.skipped_busy,
        "dry_run": dry_run,
    }
    if not json_out:
        who = ", ".join(plan.agents) or "no agents"
        err.print(f"plan: evict {who}; free {plural(len(plan.blocks), 'block')}, {human_bytes(plan.bytes_freed)}", markup=False)
        for b in plan.skipped_busy:
            err.print(f"skipped {b}: in use by another process", style="yellow", markup=False)
    if dry_run or (not plan.agents and not plan.blocks):
        if json_out:
            print(json.dumps(summary))
        return
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("not a terminal: pass --yes to evict without confirmation (or --dry-run to look)")
        if not typer.confirm("evict?", default=False, err=True):
            raise typer.Exit(1)
    freed = execute_eviction(index, plan)
    summary["bytes_freed"] = freed
    if json_out:
        print(json.dumps(summary))
    else:
        err.print(f"freed {human_bytes(freed)}", markup=False)


@app.command("verify")
def verify(
    repair: bool = typer.Option(False, "--repair", metavar="", help="Drop damaged entries and orphaned files."),
    json_out: bool = typer.Option(False, "--json", metavar="", help="Print JSON."),
) -> None:
    """Re-check every block's checksum and name, and the index against the files."""
    from ..kv.admin import verify as run_verify
    from ..kv.index import open_index

    index = open_index()  # the transcript database is not needed here
    try:
        report = run_verify(index, repair)
    finally:
        index.close()
    if json_out:
        print(
            json.dumps(
                {
                    "checked": report.checked,
                    "problems": [asdict(p) for p in report.problems],
                    "in_progress": [asdict(p) for p in report.in_progress],
                    "repaired": report.repaired,
                }
            )
        )
    else:
        out = render.stdout()
        for p in report.problems:
            out.print(f"{p.what} {p.name}: {p.reason}" + (" (dropped)" if repair else ""), markup=False)
        for p in report.in_progress:
            out.print(f"{p.what} {p.name}: {p.reason} (left alone: being written)", markup=False)
        repaired = ", repaired" if repair and report.problems else ""
        out.print(f"checked {plural(report.checked, 'file')}: {plural(len(report.problems), 'problem')}{repaired}", markup=False)
    if report.problems and not repair:
        problems = plural(len(report.problems), "problem")
        raise CacheDamageError(f"{problems} in the KV cache; run `semantic cache verify --repair` to drop them")
