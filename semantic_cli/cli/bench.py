"""`semantic bench ...`: benchmarks that write a results JSON and print tables."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..errors import UsageError
from . import render

app = typer.Typer(help="Benchmarks: exactness (exp-005), block gather (exp-006), resume, batch, serve, distributed.", no_args_is_help=True)


def _writable_out(path: Path | None) -> Path | None:
    """--out is checked before the benchmark runs, not after it (when its results would be lost)."""
    import os

    if path is None:
        return None
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a directory: name a file, e.g. {path / 'results.json'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise typer.BadParameter(f"{path} cannot be written")
    existing = path.parent.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise typer.BadParameter(f"cannot write under {existing}")
    return path


OUT = typer.Option(None, "--out", callback=_writable_out, help="Where to write the results JSON (default: the data dir's bench/).")
JSON = typer.Option(False, "--json", metavar="", help="Print the results JSON on stdout instead of a table.")
MODEL = typer.Option(None, "--model", help="Model to benchmark (default: the configured model).")


def _engine(model: str | None) -> Any:
    from ..engine import get_engine
    from ..model.loader import resolve

    err = render.stderr()
    with render.progress(err if err.is_terminal else None) as progress:
        return get_engine(resolve(model, progress))


def _progress() -> Any:
    """A benchmark's progress bar on stderr, drawn only on a terminal."""
    err = render.stderr()
    return render.progress(err if err.is_terminal else None)


def _counts(text: str, option: str, minimum: int) -> tuple[int, ...]:
    """A comma-separated list of whole numbers, each at least `minimum`."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"{option} takes whole numbers separated by commas, e.g. {option} 1024,2048 (got {text!r})") from None
    if any(v < minimum for v in values):
        raise UsageError(f"every {option} value must be at least {minimum} (got {text!r})")
    return values


def _finish(
    res: Any, rows: Sequence[tuple[str, ...]], out: Path | None, json_out: bool, extra: Callable[[Any], None] | None = None
) -> None:
    path = res.write(out)
    if json_out:
        print(json.dumps(res.to_json(), indent=2))
    else:
        table = Table(*rows[0], box=None, header_style="bold")
        for row in rows[1:]:
            table.add_row(*row)
        console = render.stdout()
        console.print(table)
        if extra:
            extra(console)
    render.stderr().print(f"results: {path}", style="dim", markup=False)


@app.command("exp-005")
def exp005(model: str | None = MODEL, out: Path | None = OUT, json_out: bool = JSON) -> None:
    """Exactness: engine (BatchGenerator), fresh and resumed from 1, 2 and 8 restored blocks, vs mlx_lm.generate, greedy."""
    from ..bench import exactness as b
    from ..bench.turns import scratch_home

    engine = _engine(model)
    with scratch_home():  # the resumed runs write and read real block files, never the user's
        res = b.run(engine)
    _finish(res, b.table(res), out, json_out)
    if not res.results["all_identical"]:
        raise typer.Exit(1)


@app.command("exp-006")
def exp006(
    runs: int = typer.Option(50, "--runs", min=5, help="Timed reconstructions."),
    tokens: int = typer.Option(8192, "--tokens", min=256, help="Cache length in tokens."),
    out: Path | None = OUT,
    json_out: bool = JSON,
) -> None:
    """Block gather: rebuild an 8K-token cache of the default model's geometry from blocks (p50/p95/p99)."""
    from ..backend import runtime
    from ..bench import gather as b
    from ..bench.turns import scratch_home

    runtime.mx()
    with scratch_home(), _progress() as progress:
        res = b.run(tokens=tokens, runs=runs, on_progress=progress)
    r = res.results
    ms = lambda s: f"{s * 1000:.1f} ms"  # noqa: E731
    rows = [("", "p50", "p95", "p99", "page faults")]
    for label, key in (
        ("restore, reused memory", "restore"),
        ("plain copy, reused buffer", "copy_reused"),
        ("restore, fresh memory", "restore_fresh"),
        ("plain copy, fresh buffer", "copy_fresh"),
    ):
        t = r[f"{key}_s"]
        rows.append((label, ms(t["p50"]), ms(t["p95"]), ms(t["p99"]), f"{r['minor_faults_p50'][key]:,}"))

    def extra(console: Any) -> None:
        console.print(
            f"{r['bytes'] / 1e6:.0f} MB in {r['blocks']} blocks · p95 / copy, both in reused memory = {r['p95_over_copy']:.2f}"
            f" (target <= {r['target_p95_over_copy']}) · both in fresh memory = {r['p95_fresh_over_fresh_copy']:.2f}",
            markup=False,
        )
        for line in b.histogram(res.samples["restore_s"]):
            console.print(line, markup=False)

    _finish(res, rows, out, json_out, extra)


@app.command("resume")
def resume(
    model: str | None = MODEL,
    sizes: str = typer.Option("1024,2048,4096,8192", "--sizes", help="History lengths in tokens."),
    repeats: int = typer.Option(
        4, "--repeats", min=2, help="Rounds per size of one warm (in each page-cache state) and one hot turn; even: their order alternates."
    ),
    cold_repeats: int = typer.Option(3, "--cold-repeats", min=1, help="Cold (re-prefill) measurements per size."),
    pairs: int = typer.Option(12, "--pairs", min=2, help="Restore vs mlx-lm load pairs, in this process and in fresh ones."),
    out: Path | None = OUT,
    json_out: bool = JSON,
) -> None:
    """Time to first token with 1K-8K tokens of history: cold vs warm (new processes) vs hot; write cost; dedup."""
    from ..bench import resume as b

    history_sizes = _counts(sizes, "--sizes", minimum=64)
    if repeats % 2:
        raise UsageError(f"--repeats must be even: the rounds alternate their order, so no kind runs later in the history (got {repeats})")
    engine = _engine(model)
    with _progress() as progress:
        res = b.run(engine, history_sizes, repeats, progress, cold_repeats=cold_repeats, pairs=pairs)

    def extra(console: Any) -> None:
        wc, dd = res.results["write_cost"], res.results["dedup"]
        worst = max(t["bytes_written"] / t["bound"] for t in wc["turns"])
        console.print(
            f"write cost: {len(wc['turns'])} turns, bytes written <= bound on every turn: {wc['all_within_bound']}"
            f" (worst {worst:.2f} of bound)",
            markup=False,
        )
        console.print(
            f"dedup: {dd['agents']} agents, {dd['system_tokens']}-token shared system prompt: {dd['shared_blocks']} shared blocks;"
            f" every file (blocks and tails): {dd['bytes_stored'] / 1e6:.1f} MB stored vs {dd['bytes_without_sharing'] / 1e6:.1f} MB"
            f" unshared ({dd['saving']:.1f}x)",
            markup=False,
        )

    _finish(res, b.table(res), out, json_out, extra)


@app.command("batch")
def batch(
    model: str | None = MODEL,
    agents: str = typer.Option("1,2,4,8", "--agents", help="Agent counts to try."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="Tokens per reply."),
    out: Path | None = OUT,
    json_out: bool = JSON,
) -> None:
    """Aggregate tokens/s and TTFT for N agents at once vs the same N turns one after another."""
    from ..bench import batch as b

    agent_counts = _counts(agents, "--agents", minimum=1)
    engine = _engine(model)
    with _progress() as progress:
        res = b.run(engine, agent_counts, max_tokens, progress)
    _finish(res, b.table(res), out, json_out)


@app.command("serve")
def serve(
    model: str | None = MODEL,
    rounds: int = typer.Option(6, "--rounds", min=2, help="Piped turns per mode (with and without the server, alternating)."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="Tokens per reply in the concurrency test."),
    tokens: int = typer.Option(2048, "--tokens", min=256, help="Length of the conversation resent after a restart."),
    repeats: int = typer.Option(2, "--repeats", min=1, help="Cold and warm restarts."),
    mlx_lm: bool = typer.Option(True, "--mlx-lm/--no-mlx-lm", metavar="", help="Time mlx_lm.server on the same request too."),
    out: Path | None = OUT,
    json_out: bool = JSON,
) -> None:
    """The resident engine: piped chat with vs without a server, 4 concurrent chats, a resend after a restart."""
    from ..bench import serve as b

    engine = _engine(model)
    with _progress() as progress:
        res = b.run(engine, rounds, max_tokens, tokens, repeats, mlx_lm, progress)
    _finish(res, b.table(res), out, json_out)


@app.command("distributed")
def distributed(
    model: str | None = MODEL,
    tokens: int = typer.Option(2048, "--tokens", min=64, help="Length of the conversation whose next turn is timed."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Cold and warm turns per mode."),
    decode: int = typer.Option(64, "--decode", min=2, help="Tokens in the decode measurement."),
    out: Path | None = OUT,
    json_out: bool = JSON,
) -> None:
    """2 ranks on loopback (mlx.launch, ring) vs 1 process: warm/cold TTFT and the decode cost of the collectives."""
    from ..bench import distributed as b

    engine = _engine(model)
    with _progress() as progress:
        res = b.run(engine, tokens, rounds, decode, progress)
    _finish(res, b.table(res), out, json_out)
