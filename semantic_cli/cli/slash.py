"""Slash commands in the REPL (/help, /agent, /system, /stats, /cache, /save, ...),
their tab completion, and `@name` completion in rooms.

`COMMANDS` is the one table: /help prints it and scripts/gen_docs.py puts it
in the man page.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prompt_toolkit.completion import Completer as _PTCompleter
from prompt_toolkit.completion import Completion, PathCompleter
from prompt_toolkit.document import Document
from rich.table import Table

from ..errors import SemanticError, UsageError
from ..history import turn_counts
from . import control, render
from .render import printable, turns_cell


@dataclass(frozen=True)
class Command:
    name: str
    args: str
    help: str
    run: Callable[[Any, str], bool | None]  # returns False to leave the REPL
    aliases: tuple[str, ...] = ()


# ---- the commands ---------------------------------------------------------
def _help(repl: Any, arg: str) -> None:
    table = Table.grid(padding=(0, 2))
    for c in COMMANDS:
        table.add_row(f"/{c.name}" + (f" {c.args}" if c.args else ""), c.help)
    repl.console.print(table)
    repl.console.print(KEYS_HELP, style="dim", markup=False, highlight=False)


def _agent(repl: Any, arg: str) -> None:
    if not arg:
        raise UsageError("which agent? /agent NAME (/agents lists them)")
    from ..store import validate_name

    name = validate_name(arg.split()[0])
    if name not in repl.agents:
        # Another agent joins the room; a new one uses the room's model so it can answer with the others.
        known = repl.session.store.find_agent(name) is not None
        agent = repl.open_agent(name, None if known else repl.agent().model)
        repl.replace_agent(agent)
        repl.info(f"{name} joins the room ({', '.join(repl.agents)})" + ("" if known else "; created on its first turn"))
    repl.current = name
    repl.info(f"talking to {name}")


def _agents(repl: Any, arg: str) -> None:
    store = repl.session.store
    table = Table(box=None, padding=(0, 2), header_style="bold")
    for col in ("", "agent", "model", "turns", "persona"):
        table.add_column(col)
    for name, agent in repl.agents.items():
        turns = turns_cell(*turn_counts(store.messages(name)))
        table.add_row("*" if name == repl.current else "", name, printable(agent.model), turns, printable(_excerpt(agent.system)) or "-")
    repl.console.print(table)
    others = [a.name for a in store.list_agents() if a.name not in repl.agents]
    if others:
        repl.info(f"not in this room: {', '.join(others)} (/agent NAME brings one in)")


def _system(repl: Any, arg: str) -> None:
    from .repl_input import unblock

    agent = repl.agent()
    arg = unblock(arg)[0].strip()
    if not arg:
        repl.console.print(printable(agent.system) or "(no persona: the model's default system prompt)", markup=False, highlight=False)
        return
    store = repl.session.store
    with repl.holding(agent.name):
        if store.find_agent(agent.name) is None:
            from dataclasses import replace

            agent = replace(agent, system=arg)  # created with this persona on its first turn
            if repl.remote is not None:
                repl.flags = (repl.flags[0], arg)  # the server creates it, with this persona
        else:
            agent = store.update_agent(agent, system=arg)  # drops the token log: the old prefix is not reused
        # The old persona's cache is a prefix nothing will ask for again: free it now, so the
        # next turn does not trip over a tail that no longer matches.
        repl.session.kv.release_agent(agent.name)
    repl.replace_agent(agent)
    repl.info(f"{agent.name}: persona set; the next turn re-reads the conversation under it")


def _reset(repl: Any, arg: str) -> None:
    name = repl.current
    store = repl.session.store
    if store.find_agent(name) is None:
        repl.info(f"{name} has no conversation yet")
        return
    n = len(store.messages(name))
    if not _confirm(f"empty {name}'s conversation ({n} messages; the persona stays)? [y/N] "):
        repl.info("kept")
        return
    with repl.holding(name):
        store.reset_agent(name)
        freed = repl.session.kv.release_agent(name)
    repl.last.pop(name, None)
    repl.info(f"{name}: conversation emptied, {_bytes(freed)} of cache freed")


def _stats(repl: Any, arg: str) -> None:
    if not repl.last and not repl.totals.turns and not repl.totals.interrupted:
        repl.info("no turns yet in this session")
        return
    for name, rec in repl.last.items():
        s = rec.done.stats
        repl.console.print(
            f"last turn ({name}): {render.footer(s, rec.tier, rec.done.finish_reason, control.context(repl, name), name, repl=True)}",
            markup=False,
            highlight=False,
        )
        repl.console.print(f"  {s.generated_tokens} tokens generated, finish: {rec.done.finish_reason}", markup=False, highlight=False)
    t = repl.totals
    hit = f", {100 * t.cached_tokens / t.prompt_tokens:.0f}% from cache" if t.prompt_tokens else ""
    cut = f" ({t.interrupted} interrupted)" if t.interrupted else ""
    repl.console.print(
        f"session: {render.plural(t.turns, 'turn')}{cut} · {t.generated_tokens:,} tokens generated · "
        f"{t.prompt_tokens:,} prompt tokens{hit}, "
        f"{t.prefilled_tokens:,} prefilled · {t.seconds:.1f}s generating",
        markup=False,
        highlight=False,
    )


def _cache(repl: Any, arg: str) -> None:
    from ..store import validate_name

    name = validate_name(arg.split()[0]) if arg else repl.current
    u = repl.session.kv.usage(name)
    transcript = repl.session.store.token_counts().get(name, 0)
    lines = [f"{name}: tier {u.tier} · transcript {transcript:,} tokens"]
    lines.append(f"  in memory: {u.hot_tokens:,} tokens" if u.hot_tokens else "  in memory: -")
    if u.on_disk:
        tail_part = f" + a {u.tail_tokens:,}-token tail" if u.tail_tokens is not None else ""
        lines.append(
            f"  on disk: {u.disk_tokens:,} tokens in {render.plural(u.blocks, 'block')} ({u.shared_blocks} shared){tail_part}, "
            f"{_bytes(u.disk_bytes)}"
        )
    else:
        lines.append("  on disk: - (the next turn re-reads the transcript)")
    for line in lines:
        repl.console.print(line, markup=False, highlight=False)


def _model(repl: Any, arg: str) -> None:
    if arg:
        control.switch_model(repl, arg)
        return
    agent = repl.agent()
    with render.progress(repl.err) as progress:
        lm = repl.session.engine_for(agent, progress).lm
    for line in (
        f"{agent.name}: {lm.name}",
        f"  from: {printable(agent.model)}",
        f"  path: {printable(str(lm.ref.path))}",
        f"  dtype {lm.dtype} · context {lm.context_length:,} tokens",
    ):
        repl.console.print(line, markup=False, highlight=False)


def _save(repl: Any, arg: str) -> None:
    if not arg:
        raise UsageError("where to? /save FILE.md or /save FILE.json")
    if "\x00" in arg:
        raise UsageError("a file name cannot hold a NUL character: /save FILE.md or /save FILE.json")
    path = Path(arg).expanduser()
    if path.suffix.lower() not in (".md", ".markdown", ".json"):
        raise UsageError(f"say the format by the extension: {path.stem}.md (Markdown) or {path.stem}.json")
    from .. import export

    agent = repl.agent()
    messages = repl.session.store.messages(agent.name) if repl.session.store.find_agent(agent.name) else []
    data = export.to_json(agent, messages) if path.suffix.lower() == ".json" else export.to_markdown(agent, messages)
    try:
        export.write_file(path, data)  # never through a symbolic link: one there is refused
    except OSError as exc:
        raise SemanticError(f"cannot write {path}: {exc.strerror}") from None
    repl.info(f"saved {len(messages)} messages of {agent.name} to {path}")


def _round(repl: Any, arg: str) -> None:
    if not repl.room:
        raise UsageError("a round needs a room: open one with --agent a --agent b, or bring an agent in with /agent NAME")
    words = arg.split(None, 1)
    usage = "/round N [topic], with N a number of rounds, e.g. /round 2 is this plan sound?"
    rounds = control.whole_number(words[0] if words else "", usage, low=1)
    if not _round_allowed(rounds, len(repl.agents)):
        repl.info("no round")
        return
    repl.round(rounds, words[1].strip() if len(words) > 1 else "")


def _round_allowed(rounds: int, agents: int) -> bool:
    """Up to `round_cap` rounds (config) run at once; more are asked for at a terminal,
    refused without one (a UsageError naming the setting)."""
    import sys

    from .. import config

    cap = int(config.get("round_cap"))
    if rounds <= cap:
        return True
    if not sys.stdin.isatty():
        raise UsageError(f"/round {rounds} is over round_cap ({cap}); raise it with `semantic config set round_cap {rounds}`")
    return _confirm(f"{rounds} rounds is over round_cap ({cap}): {rounds * agents} turns. Run them? [y/N] ")


SET_KEYS = ("temp", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n", "max_tokens", "seed")


def _set(repl: Any, arg: str) -> None:
    """Sampling for the rest of this REPL (every agent in it), as Ollama's /set parameter:
    checked as the flags and `config set` check it; not saved (`agents edit` saves)."""
    import dataclasses

    from .. import config

    parts = arg.split()
    if not parts:
        current = {k: v for k, v in dataclasses.asdict(repl.settings).items() if v is not None}
        shown = ", ".join(f"{k} {v}" for k, v in current.items()) or "none"
        repl.info(f"set for this session: {shown}; /set KEY VALUE ({', '.join(SET_KEYS)}), /set KEY to unset")
        return
    key = parts[0].replace("-", "_")
    if key not in SET_KEYS:
        raise UsageError(f"/set takes one of {', '.join(SET_KEYS)} (got {control.given(parts[0])})")
    if len(parts) == 1:
        value = None
    elif key == "seed":
        value = control.whole_number(parts[1], f"/set seed takes a whole number from 0 to {control.MAX_WHOLE}")
    else:
        try:
            value = config.SETTINGS[key].parse(parts[1])
        except ValueError as exc:
            raise UsageError(f"/set {key}: {control.given(parts[1])} {exc}") from None
    repl.settings = dataclasses.replace(repl.settings, **{key: value})
    repl.info(f"{key} = {value}" if value is not None else f"{key}: back to the agent's, the config's or the model's value")


def _quit(repl: Any, arg: str) -> bool:
    return False


COMMANDS: list[Command] = [
    Command("help", "", "this list", _help, ("?",)),
    Command("agent", "NAME", "talk to NAME (another agent joins the room if needed)", _agent),
    Command("agents", "", "the room's agents, and the others", _agents),
    Command("system", "[TEXT]", 'show or set the persona; /system """ starts a multi-line one, """ ends it', _system),
    Command("undo", "", "remove the last turn from the transcript (the cache keeps what is left)", control.undo),
    Command("retry", "", "regenerate the last reply", control.retry),
    Command("edit", "[TEXT]", "compose the next message in $EDITOR, then send it", control.edit),
    Command("compact", "[N]", "summarise all but the last N turns into the prefix (the transcript keeps them)", control.compact),
    Command("reset", "", "empty this agent's conversation and cache (the persona stays)", _reset, ("clear",)),
    Command("stats", "", "last turn's figures (context fullness too) and this session's totals", _stats),
    Command("cache", "[NAME]", "this agent's cache: tier, tokens, blocks, bytes", _cache),
    Command("model", "[NAME]", "the model this agent uses; NAME switches to another (its cache is dropped)", _model),
    Command("save", "FILE", "export the transcript: FILE.md (Markdown) or FILE.json", _save),
    Command("set", "[KEY [VALUE]]", "sampling for this session: temp, top_p, top_k, min_p, repeat_penalty, ...", _set),
    Command("round", "N [TOPIC]", "in a room: agents answer each other for N rounds (Ctrl-C stops)", _round),
    Command("quit", "", "leave (so do Ctrl-D and Ctrl-C at an empty prompt)", _quit, ("exit", "bye")),
]
_BY_NAME = {n: c for c in COMMANDS for n in (c.name, *c.aliases)}

KEYS_HELP = (
    'Enter sends · Esc Enter adds a line · """ starts and ends a multi-line message · exit or quit alone leaves · Ctrl-R: history · '
    "Tab completes · Ctrl-C stops a reply (kept, marked interrupted) · Ctrl-D leaves · in a room: @name or @all first · "
    "//text sends a message starting with /"
)


def dispatch(repl: Any, line: str) -> bool:
    """Run a slash command; False means leave the REPL."""
    word, _, arg = line[1:].partition(" ")
    cmd = _BY_NAME.get(word.lower())
    if cmd is None:
        hint = control.suggest(word, list(_BY_NAME))
        raise UsageError(f"unknown command /{word}{hint}{' ' if hint else '; '}/help lists them (// starts a message that begins with /)")
    return cmd.run(repl, arg.strip()) is not False


# ---- completion -------------------------------------------------------------
class Completer(_PTCompleter):
    """`/command` names, `/agent NAME`, `/save PATH`, and leading `@name` mentions in a room."""

    def __init__(self, repl: Any) -> None:
        self.repl = repl
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, event: Any) -> Iterable[Completion]:
        text = document.text_before_cursor
        if text.startswith("/") and "\n" not in text:
            word, space, arg = text.partition(" ")
            if not space:
                for c in COMMANDS:
                    if c.name.startswith(word[1:].lower()):
                        yield Completion(f"/{c.name}", -len(word), display_meta=c.help)
            elif word in ("/agent", "/cache") and " " not in arg:
                for name in self._agent_names():
                    if name.startswith(arg):
                        yield Completion(name, -len(arg))
            elif word == "/save":
                yield from self.paths.get_completions(Document(arg, len(arg)), event)
            return
        words = text.split(" ")
        if self.repl.room and words[-1].startswith("@") and all(w.startswith("@") for w in words[:-1] if w):
            stem = words[-1][1:]
            for name in [*self.repl.agents, "all"]:
                if name.startswith(stem):
                    yield Completion(f"@{name} ", -len(words[-1]))

    def _agent_names(self) -> list[str]:
        names = list(self.repl.agents)
        with contextlib.suppress(Exception):  # completion must never break typing
            names += [a.name for a in self.repl.session.store.list_agents() if a.name not in names]
        return names


def _confirm(question: str) -> bool:
    from prompt_toolkit import prompt

    try:
        return prompt(question).strip().lower() in ("y", "yes")
    except (EOFError, KeyboardInterrupt):
        return False


def _excerpt(text: str, width: int = 48) -> str:
    one = " ".join(text.split())
    return one if len(one) <= width else one[: width - 1] + "…"


_bytes = render.human_bytes  # the CLI's one byte formatter
