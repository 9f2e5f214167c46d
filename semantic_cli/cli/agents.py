"""`semantic agents ...`: list, create, show, edit, reset, remove, rename, fork.

Nothing here loads a model: these commands work on the transcript store and the
KV index only, so they start fast and never import mlx. The transcript is
changed first (it is the truth); the cache, being derived, follows.

Output fits its medium (render.table): on a terminal, `ls` is an aligned table and
`show` renders Markdown wrapped to the terminal; piped or redirected, `ls` is
tab-separated values, one complete record per line, and `show` is plain text.
Stored text (personas, messages, model specs) reaches a terminal only through
`render.printable`; a pipe gets it byte for byte (`ls` escapes only tab, newline,
carriage return and backslash, so a record stays on its line).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

from .. import export, paths, takeback
from ..errors import BadInputError, UsageError
from ..store import validate_name
from . import render, transcript
from .agents_access import _locked, _must_be_free, _opened, _recover, _recover_free
from .render import Column, fullness, human_age, human_bytes, printable, turns_cell

app = typer.Typer(help="Manage agents: named personas with their own conversation and cache.", no_args_is_help=True)

NAME = typer.Argument(..., help="Agent name.")
SYSTEM = typer.Option(None, "--system", help="Persona (system prompt).")
SYSTEM_FILE = typer.Option(None, "--system-file", help="Read the persona from a file ('-' for stdin).")
MODEL = typer.Option(None, "--model", help="Model: mlx-lm directory, .gguf file or Hugging Face repo id.")
TEMP = typer.Option(None, "--temp", min=0.0, help="Sampling temperature (0: greedy).")
MAX_TOKENS = typer.Option(None, "--max-tokens", min=1, help="Maximum tokens per reply.")
TOP_P = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling threshold.")
TOP_K = typer.Option(None, "--top-k", min=0, help="Sample from the k likeliest tokens (0: off).")
MIN_P = typer.Option(None, "--min-p", min=0.0, max=1.0, help="Drop tokens below this share of the top one.")
REPEAT_PENALTY = typer.Option(None, "--repeat-penalty", help="Penalise repeating recent tokens (> 0; 1: off).")
REPEAT_LAST_N = typer.Option(None, "--repeat-last-n", min=0, help="How many recent tokens the penalty sees.")
YES = typer.Option(False, "--yes", "-y", metavar="", help="Do not ask for confirmation.")


# ---- helpers ----------------------------------------------------------
def _status(text: str) -> None:
    render.stderr().print(text, markup=False)


def _read_system(system: str | None, system_file: Path | None) -> str | None:
    if system is not None and system_file is not None:
        raise UsageError("pass either --system or --system-file, not both")
    if system_file is None:
        return system
    from .chat import read_input

    try:
        if str(system_file) == "-":
            data = read_input(sys.stdin.buffer, "--system-file -")
        else:
            with system_file.open("rb") as f:
                data = read_input(f, f"--system-file {system_file}")
    except OSError as exc:
        raise UsageError(f"cannot read --system-file {system_file}: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise BadInputError(f"--system-file {system_file} is not valid UTF-8 (bad byte at offset {exc.start})") from exc


def _check_model(spec: str) -> str:
    """Validate a model spec without loading it; local paths are stored absolute so
    the agent works from any directory."""
    from ..model.loader import DEFAULT, exists, resolve

    if spec == DEFAULT:
        return spec  # resolving it would download and convert the default model
    path = Path(spec).expanduser()
    if exists(path) and path.is_file() and path.suffix == ".gguf":
        return str(path.resolve())  # converted on first use, not here (that takes a while)
    resolve(spec)  # NotFoundError / ModelError for anything unusable
    return str(path.resolve()) if exists(path) else spec


def _settings(**given: Any) -> dict[str, Any]:
    """The sampling settings given, each checked as `config set` checks it."""
    from .. import config

    out = {}
    for key, value in given.items():
        if value is not None:
            try:
                out[key] = config.SETTINGS[key].parse(str(value))
            except ValueError as exc:
                raise UsageError(f"--{key.replace('_', '-')}: {value} {exc}") from None
    return out


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"{question.rstrip('?')}: refusing without a terminal; pass --yes to confirm")
    if not typer.confirm(question, default=False, err=True):
        _status("nothing changed")
        raise typer.Exit(1)


def _excerpt(text: str, width: int = 40) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _history(name: str) -> Path:
    return paths.history_dir() / f"{name}.history"


# ---- commands ---------------------------------------------------------
@app.command("ls")
def ls(json_out: bool = typer.Option(False, "--json", metavar="", help="Print a JSON list.")) -> None:
    """Every agent: model, persona, turns, tokens/context, cached tokens, last activity.

    On a terminal: a table; the persona is shortened, the name never cropped.

    Piped or redirected: tab-separated values, a header line, then one complete line per agent (the whole persona, the model as
    given), each number in a column of its own and LAST ACTIVE in ISO 8601: NAME MODEL PERSONA TURNS COMPACTED TOKENS CONTEXT CACHED
    LAST ACTIVE (CONTEXT is empty until the model's files are here).

    In a piped field, a backslash, tab, newline or carriage return is written \\\\, \\t, \\n or \\r.

    TURNS: every recorded turn; after a compaction, "12 (8 compacted)": 8 of them are in the summary (agents show marks them).

    TOKENS: transcript tokens / the model's context length ("812/8192"); the tokens alone until the model's files are here.
    """
    from ..model.loader import context_length

    with _opened() as (store, kv):
        _recover_free(store, kv)
        agents = store.list_agents()
        turns, tokens, cached = store.turn_counts(), store.token_counts(), kv.cached_tokens()
    contexts = {spec: context_length(spec) for spec in {a.model for a in agents}}
    rows = [
        {
            **export.agent_dict(a),
            "turns": turns.get(a.name, (0, 0))[0],
            "compacted_turns": turns.get(a.name, (0, 0))[1],
            "transcript_tokens": tokens.get(a.name, 0),
            "context_length": contexts[a.model],
            "cached_tokens": cached.get(a.name, 0),
        }
        for a in agents
    ]
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        _status("no agents yet; create one with `semantic agents new NAME` or `semantic chat --agent NAME`")
        return
    if not render.is_terminal(sys.stdout):  # every value whole, each number in its own column
        headers = ["NAME", "MODEL", "PERSONA", "TURNS", "COMPACTED", "TOKENS", "CONTEXT", "CACHED", "LAST ACTIVE"]
        keys = ["name", "model", "system", "turns", "compacted_turns", "transcript_tokens", "context_length", "cached_tokens"]
        records = [[*("" if row[k] is None else str(row[k]) for k in keys), row["last_active"]] for row in rows]
        render.table([Column(h) for h in headers], records)
        return
    columns = [Column("NAME"), Column("MODEL", wrap=True), Column("PERSONA", wrap=True), Column("TURNS", right=True),
               Column("TOKENS", right=True), Column("CACHED", right=True), Column("LAST ACTIVE", right=True)]  # fmt: skip
    cells = []
    for a, row in zip(agents, rows, strict=True):
        model = Path(a.model).name if os.sep in a.model and Path(a.model).exists() else a.model
        turns_text, full = turns_cell(row["turns"], row["compacted_turns"]), fullness(row["transcript_tokens"], row["context_length"])
        persona = printable(_excerpt(a.system)) or "-"
        cells.append([a.name, printable(model), persona, turns_text, full, str(row["cached_tokens"]), human_age(a.last_active)])
    render.table(columns, cells)


@app.command("new")
def new(
    name: str = NAME,
    system: str | None = SYSTEM,
    system_file: Path | None = SYSTEM_FILE,
    model: str | None = MODEL,
    temp: float | None = TEMP,
    max_tokens: int | None = MAX_TOKENS,
    top_p: float | None = TOP_P,
    top_k: int | None = TOP_K,
    min_p: float | None = MIN_P,
    repeat_penalty: float | None = REPEAT_PENALTY,
    repeat_last_n: int | None = REPEAT_LAST_N,
) -> None:
    """Create an agent with a persona, a model and sampling settings."""
    from ..model.loader import requested_spec

    validate_name(name)
    persona = _read_system(system, system_file) or ""
    spec = _check_model(requested_spec(model))
    with _opened() as (store, kv), _locked(name):
        if store.find_agent(name):
            raise UsageError(f"agent {name!r} already exists; change it with `semantic agents edit {name}`")
        kv.release_agent(name)  # an orphaned cache under this name must not be mistaken for the new agent's
        store.create_agent(
            name,
            spec,
            persona,
            _settings(
                temp=temp,
                max_tokens=max_tokens,
                top_p=top_p,
                top_k=top_k,
                min_p=min_p,
                repeat_penalty=repeat_penalty,
                repeat_last_n=repeat_last_n,
            ),
        )
    _status(f"created agent {name!r} (model {spec})")


@app.command("show")
def show(
    name: str = NAME,
    json_out: bool = typer.Option(False, "--json", metavar="", help="The agent and its messages as JSON."),
    markdown: bool = typer.Option(False, "--markdown", metavar="", help="Export the transcript as Markdown."),
) -> None:
    """The agent's transcript, rendered.

    On a terminal, replies are rendered as Markdown and wrapped to its width (never cropped).

    Piped or redirected: plain text, every message exactly as stored, unwrapped.

    --markdown and --json are the documents the REPL's /save writes.
    """
    if json_out and markdown:
        raise UsageError("pass either --json or --markdown, not both")
    with _opened() as (store, kv):
        agent = store.get_agent(name)
        _recover_free(store, kv, [name])
        if name in takeback.pending(store.db):
            _status(f"{name}: a /retry is running: its previous reply is set aside until it ends")
        messages = store.messages(name)
    if json_out:
        sys.stdout.write(printable(export.to_json(agent, messages), sys.stdout))  # still valid JSON: controls < 0x20 are escaped
    elif markdown:
        sys.stdout.write(printable(export.to_markdown(agent, messages), sys.stdout))
    else:
        if not transcript.show(agent, messages):
            _status("no messages yet")


@app.command("edit")
def edit(
    name: str = NAME,
    system: str | None = SYSTEM,
    system_file: Path | None = SYSTEM_FILE,
    model: str | None = MODEL,
    temp: float | None = TEMP,
    max_tokens: int | None = MAX_TOKENS,
    top_p: float | None = TOP_P,
    top_k: int | None = TOP_K,
    min_p: float | None = MIN_P,
    repeat_penalty: float | None = REPEAT_PENALTY,
    repeat_last_n: int | None = REPEAT_LAST_N,
) -> None:
    """Change an agent's persona, model or settings (persona/model changes drop its cache)."""
    validate_name(name)
    persona = _read_system(system, system_file)
    settings = _settings(
        temp=temp,
        max_tokens=max_tokens,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repeat_penalty=repeat_penalty,
        repeat_last_n=repeat_last_n,
    )
    if persona is None and model is None and not settings:
        raise UsageError("nothing to change: pass --system, --system-file, --model or a sampling setting (--temp, --top-p, ...)")
    spec = _check_model(model) if model is not None else None
    with _opened() as (store, kv):
        agent = store.get_agent(name)
        with _locked(name):
            _recover(store, kv, name)  # a new persona would forget it
            changes: dict[str, Any] = {}
            if persona is not None and persona != agent.system:
                changes["system"] = persona
            if spec is not None and spec != agent.model:
                changes["model"] = spec
            if settings and {**agent.settings, **settings} != agent.settings:
                changes["settings"] = {**agent.settings, **settings}
            if not changes:
                _status(f"agent {name!r} unchanged (same values)")
                return
            store.update_agent(agent, **changes)
            invalidated = "system" in changes or "model" in changes
            cached = kv.cached_tokens().get(name, 0) if invalidated else 0
            if invalidated:
                kv.release_agent(name)  # the old prefix no longer matches what the model will see
            had_turns = bool(store.messages(name))
    words = {"system": "persona", "model": "model", "settings": "settings"}
    _status(f"updated agent {name!r}: {', '.join(words[k] for k in changes)}")
    if invalidated and (had_turns or cached):
        what = "persona" if "system" in changes else "model"
        _status(f"the {what} changed: the cached prefix ({cached} tokens) was invalidated; the next turn re-reads the transcript")


@app.command("reset")
def reset(name: str = NAME, yes: bool = YES) -> None:
    """Empty the conversation; keep the persona and settings."""
    validate_name(name)
    with _opened() as (store, kv):
        store.get_agent(name)
        with _locked(name):
            _confirm(f"erase the conversation of agent {name!r}?", yes)
            store.reset_agent(name)
            freed = kv.release_agent(name)
    _status(f"reset agent {name!r}: conversation emptied, persona kept; {human_bytes(freed)} of KV cache freed")


@app.command("rm")
def rm(name: str = NAME, yes: bool = YES) -> None:
    """Delete an agent, its conversation and the cache blocks only it uses."""
    validate_name(name)
    with _opened() as (store, kv):
        store.get_agent(name)
        with _locked(name):
            _confirm(f"delete agent {name!r} and its conversation?", yes)
            rooms = store.delete_agent(name)
            freed = kv.release_agent(name)
            _history(name).unlink(missing_ok=True)
    left = f"; it left room{'s' if len(rooms) > 1 else ''} {', '.join(rooms)}" if rooms else ""
    _status(f"removed agent {name!r}; {human_bytes(freed)} of KV cache freed (blocks shared with other agents stay){left}")


@app.command("rename")
def rename(old: str = typer.Argument(..., help="Current name."), new: str = typer.Argument(..., help="New name.")) -> None:
    """Rename an agent; its conversation, cache and input history follow."""
    validate_name(old)
    validate_name(new)
    if old == new:
        raise UsageError("the new name is the same as the old one")
    with _opened() as (store, kv):
        store.get_agent(old)
        with _locked(old, new):
            _must_be_free(store, new)
            kv.release_agent(new)  # an orphaned cache under the new name would collide
            store.rename_agent(old, new)
            kv.rename_agent(old, new)
            if _history(old).exists():
                os.replace(_history(old), _history(new))
    _status(f"renamed agent {old!r} to {new!r}")
