"""`semantic chat`: one-shot (pipe or -m) and interactive (REPL) chat with one agent or a room."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import typer

from ..errors import BadInputError, PromptTooLongError, UsageError
from . import ranks, render
from .render import printable
from .turnprint import show_turns

if TYPE_CHECKING:  # types only: `--help` and other commands must not import the core (nor, through it, numpy or mlx)
    from ..chat import Chat, GenSettings, TurnRecorded
    from ..store import Agent, Store


class ColorMode(str, Enum):
    """--color's choices (shell completion offers them)."""

    auto = "auto"
    always = "always"
    never = "never"


MAX_INPUT = 8 << 20  # bytes of a message or persona read from stdin or a file: more than any context holds


def read_input(stream: BinaryIO, what: str = "input") -> bytes:
    """At most MAX_INPUT bytes of `stream`: an endless or huge input (`yes |`, /dev/zero) is
    refused at once instead of filling memory."""
    data = stream.read(MAX_INPUT + 1)
    if len(data) > MAX_INPUT:
        raise PromptTooLongError(f"{what} is over {MAX_INPUT >> 20} MiB, more than a model's context holds: send less")
    return data


def decode_message(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"input is not valid UTF-8 (bad byte at offset {exc.start}); convert it first, e.g. with iconv") from exc
    if not text.strip():
        raise BadInputError("empty message: nothing to send (pipe some text in or pass -m TEXT)")
    # `echo` and editors end input with a newline that is not part of the message.
    return text.rstrip()


def room_agents(agents: list[str], room: str | None, store: Store) -> list[str]:
    from ..store import validate_name

    names = list(agents)
    if room:
        names = store.get_room(room) + names
    if not names:
        raise UsageError("name an agent: semantic chat --agent NAME (or --room NAME)")
    for n in names:
        validate_name(n)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"agent {dupes[0]!r} is named twice; a room needs distinct agents")
    return names


def chat(
    agent: list[str] = typer.Option([], "--agent", "-a", help="Agent to talk to; repeat for a room. Created on first use."),
    room: str | None = typer.Option(None, "--room", help="Open a saved room (a named group of agents)."),
    save_room: str | None = typer.Option(None, "--save-room", help="Save these agents as a room with this name."),
    message: str | None = typer.Option(None, "--message", "-m", help="Send this message and print the reply (no REPL)."),
    to_all: bool = typer.Option(False, "--all", metavar="", help="In a room without a terminal: every agent answers the message."),
    json_out: bool = typer.Option(False, "--json", metavar="", help="Print one JSON object per reply instead of text."),
    system: str | None = typer.Option(None, "--system", help="Persona (system prompt) for a new agent."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="Maximum tokens per reply."),
    temp: float | None = typer.Option(None, "--temp", min=0.0, help="Sampling temperature (default 0: greedy)."),
    top_p: float | None = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling threshold."),
    seed: int | None = typer.Option(None, "--seed", min=0, max=2**63 - 1, help="Random seed for sampling."),
    top_k: int | None = typer.Option(None, "--top-k", min=0, help="Sample from the k likeliest tokens (0: off)."),
    min_p: float | None = typer.Option(None, "--min-p", min=0.0, max=1.0, help="Drop tokens below this share of the top one."),
    repeat_penalty: float | None = typer.Option(
        None, "--repeat-penalty", min=0.0, help="Penalise repeating recent tokens (1: off; default 1.15)."
    ),
    repeat_last_n: int | None = typer.Option(None, "--repeat-last-n", min=0, help="How many recent tokens the penalty sees."),
    model: str | None = typer.Option(None, "--model", help="Model: mlx-lm directory, .gguf file or Hugging Face repo id."),
    wait: bool = typer.Option(False, "--wait", metavar="", help="Wait for an agent another process is using instead of failing."),
    wait_timeout: float | None = typer.Option(
        None, "--wait-timeout", min=0.0, metavar="SECONDS", help="Wait (as --wait) at most SECONDS, then fail as busy (exit 4)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", metavar="", help="Status and figures on stderr in one-shot mode."),
    no_markdown: bool = typer.Option(False, "--no-markdown", metavar="", help="Show replies as plain text in the REPL."),
    color: ColorMode = typer.Option(ColorMode.auto, "--color", case_sensitive=False, help="When to colour (NO_COLOR is respected)."),
    no_server: bool = typer.Option(False, "--no-server", metavar="", help="Run in this process even when `semantic serve` is running."),
    hosts: str | None = ranks.HOSTS,
    hostfile: Path | None = ranks.HOSTFILE,
    backend: str = ranks.BACKEND,
) -> None:
    """Chat with one agent, or a room of agents answering concurrently. One-shot and piped
    turns go to a running `semantic serve` of this home when there is one (--no-server: never)."""
    ranks.relaunch(hosts, hostfile, backend, message, needs_message=True)
    if ranks.join():  # rank 0 of several: the turns run here, on every rank at once
        no_server = True
        if message is None:
            raise UsageError("under mlx.launch, pass the message with -m TEXT (the ranks have no terminal and never see the end of stdin)")
    from ..store import Store
    from ..turn import GenSettings

    render.set_color(ColorMode(color).value)
    _check_numbers({"--temp": temp, "--top-p": top_p, "--min-p": min_p, "--repeat-penalty": repeat_penalty}, wait_timeout)
    sampling = GenSettings(max_tokens, temp, top_p, seed, top_k, min_p, repeat_penalty, repeat_last_n)
    waits = wait or wait_timeout is not None
    interactive = message is None and sys.stdin.isatty()
    if interactive and json_out:
        raise UsageError("--json is for one-shot turns: pass -m TEXT or pipe the message in (the REPL shows replies as text)")
    socket_path = None
    if not no_server:
        from ..server import client

        socket_path = client.find_socket()
    store = Store()
    said = False  # the lines of `say_opened` are out
    try:
        names = room_agents(agent, room, store)
        if save_room:  # refused before any turn runs: a failed command changes nothing
            from ..store import validate_name

            validate_name(save_room, "room")
        if socket_path is not None and not interactive:
            text = read_message(message)
            turn = {"settings": asdict(sampling), "wait": waits, "wait_timeout": wait_timeout}
            _targets(names, text, to_all)  # a bad @mention is refused before anything else is said

            def announce() -> None:  # once the server has taken the turn: a refused one changes nothing
                nonlocal said
                say_opened(store, names, model, system)
                said = True

            try:
                remote_one_shot(socket_path, names, text, to_all, model, system, turn, json_out, verbose, announce)
            except client.Unavailable as exc:
                if exc.tell:
                    render.stderr().print(f"warning: {exc}; running this turn in-process", style="yellow", markup=False)
                message = text  # the server cannot run this turn (another model, stopping): run it here instead
            else:
                if save_room:
                    store.save_room(save_room, names)
                store.close()
                render.exit_now()
        _in_process(
            store,
            names,
            message,
            interactive,
            save_room,
            model,
            system,
            waits,
            wait_timeout,
            to_all,
            json_out,
            verbose,
            no_markdown,
            sampling,
            socket_path if interactive else None,
            said,
        )
    finally:
        store.close()


def _check_numbers(sampling: dict[str, float | None], wait_timeout: float | None) -> None:
    """The float flags as `config set` checks the same settings: NaN and infinity pass a
    flag's range check (every comparison with NaN is false) and would reach the sampler."""
    import math

    from .. import config

    for flag, value in sampling.items():
        if value is not None:
            try:
                config.SETTINGS[flag[2:].replace("-", "_")].parse(repr(value))
            except ValueError as exc:
                raise UsageError(f"{flag} {exc}") from None
    if wait_timeout is not None and not math.isfinite(wait_timeout):
        raise UsageError("--wait-timeout must be a finite number of seconds")


def read_message(message: str | None) -> str:
    """The turn's message: -m TEXT, else stdin (at most MAX_INPUT bytes), decoded and checked."""
    if message is not None:
        return decode_message(message.encode("utf-8", "surrogateescape"))
    return decode_message(read_input(sys.stdin.buffer, "the message"))


def _in_process(
    store: Store,
    names: list[str],
    message: str | None,
    interactive: bool,
    save_room: str | None,
    model: str | None,
    system: str | None,
    wait: bool,
    wait_timeout: float | None,
    to_all: bool,
    json_out: bool,
    verbose: bool,
    no_markdown: bool,
    settings: GenSettings,
    remote: str | None = None,
    said: bool = False,
) -> None:
    """The turns in this process; or a REPL whose turns the server at `remote` runs (it then
    holds no agent: the server locks each turn's agents, so other commands are never busy)."""
    from ..chat import Chat, check_room

    session = Chat(store)
    try:
        if remote is not None:
            opened = [session.peek_agent(n, model, system) for n in names]
            check_room(opened)
        else:
            opened = open_room(session, names, model, system, wait, wait_timeout)
            render.say_recovered(session.recovered)  # said now, not with the next turn
        if interactive:
            from .repl import Repl

            if not said:
                say_opened(store, [a.name for a in opened], model, system)
            if save_room:
                store.save_room(save_room, names)
            Repl(session, opened, settings, markdown=not no_markdown, remote=remote, flags=(model, system)).run()
            return
        text = read_message(message)
        by_name = {a.name: a for a in opened}
        targets = [(by_name[n], t) for n, t in _targets([a.name for a in opened], text, to_all)]
        announce = None if said else lambda: say_opened(store, [a.name for a in opened], model, system)
        if len(names) > 1 and not json_out:  # the room keeps its shape: a header, and why, for an agent left out
            for name in (n for n in names if n not in by_name):
                sys.stdout.write(f"[{name}]\n(no reply: busy in another process)\n\n")
        one_shot(session, targets, settings, json_out, verbose, room=len(names) > 1, announce=announce)
        if save_room:  # a command-line setting is saved once its command has succeeded
            store.save_room(save_room, names)
    finally:
        session.close()


def open_room(
    session: Chat, names: list[str], model: str | None, system: str | None, wait: bool, wait_timeout: float | None = None
) -> list[Agent]:
    """Lock and load the agents, in room order. In a room, a busy agent is left out (with a
    warning) rather than failing the others; a room must share one model.

    The locks are taken in one global order (sorted names), whatever order the agents
    were named in: two rooms waiting for the same agents can never each hold one that the
    other waits for. `wait_timeout` bounds the whole wait, not each agent's."""
    import math
    import time

    from ..chat import check_room
    from ..errors import BusyError

    if wait_timeout is not None and math.isnan(wait_timeout):
        raise UsageError("--wait-timeout must be a number of seconds")
    deadline = None if wait_timeout is None else time.monotonic() + wait_timeout
    opened: dict[str, Agent] = {}
    for name in sorted(names):
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            opened[name] = session.open_agent(name, model, system, wait, left, busy_hint="wait for it to finish or pass --wait")
        except BusyError as exc:
            if len(names) == 1:
                raise
            render.stderr().print(f"warning: {exc.message}; the room continues without it", style="yellow", markup=False)
    if not opened:
        raise BusyError("every agent in this room is busy in another process; try again later or pass --wait")
    room = [opened[name] for name in names if name in opened]
    check_room(room)
    return room


def say_opened(store: Store, names: list[str], model: str | None, system: str | None) -> None:
    """One stderr line for each thing this command does to an agent (`opening.describe`):
    a new agent (with the near names it may have meant), a model switched by --model,
    a persona set or left by --system."""
    from ..opening import describe, with_flags

    err = functools.cache(render.stderr)  # most turns have nothing to say: no console then
    for name in names:
        stored = store.find_agent(name)
        agent = with_flags(name, stored, model, system, stored is not None and store.has_messages(name))
        near = store.near_names(name) if stored is None else []
        for line in describe(agent, stored, system, near):
            err().print(printable(line), style="dim" if stored is not None else "yellow", markup=False, highlight=False)


def _targets(names: list[str], text: str, to_all: bool) -> list[tuple[str, str]]:
    """Who answers the message: the one agent, everyone (--all), or those it @-addresses."""
    from ..rooms import address

    if len(names) == 1 and not text.lstrip().startswith("@"):
        return [(names[0], text)]
    if to_all:
        return [(n, text) for n in names]
    chosen, body = address(text, names, current=None)
    return [(n, body) for n in names if n in chosen]


def one_shot(
    session: Chat,
    targets: list[tuple[Agent, str]],
    settings: GenSettings,
    json_out: bool,
    verbose: bool,
    room: bool = False,
    announce: Callable[[], None] | None = None,
) -> None:
    """Run the turns in this process and print them (`show_turns`); `announce` says what they
    do to their agents once they are ready to run (the model loaded, the messages fit): a
    command refused before that says only why."""
    from ..chat import TurnRecorded

    def stopped() -> list[TurnRecorded]:  # the turns Ctrl-C cut, as the core recorded them
        return [TurnRecorded(p.agent.name, p.engine.lm.name, p.done, p.tier, None, []) for p in pendings if p.recorded and p.done]

    with render.progress(render.stderr() if verbose else None) as progress:
        pendings = [session.prepare(a, text, settings, progress) for a, text in targets]
        if announce is not None:
            announce()
        events = session.run(pendings, seed=settings.seed)
        contexts = {p.agent.name: p.engine.lm.context_length for p in pendings}
        show_turns(events, [p.agent.name for p in pendings], json_out, verbose, progress, stopped, room, contexts)


def remote_one_shot(
    socket_path: str,
    names: list[str],
    text: str,
    to_all: bool,
    model: str | None,
    system: str | None,
    turn: dict[str, Any],
    json_out: bool,
    verbose: bool,
    announce: Callable[[], None],
) -> None:
    """The same turn through a running `semantic serve`: raises `client.Unavailable` when the
    server cannot take it (the caller runs it in-process), before anything is printed;
    `announce` runs once it has taken it. Ctrl-C prints the cut turns as in-process, from
    what the server has sent of them (it records them as interrupted when we hang up)."""
    from ..server import client

    targets = _targets(names, text, to_all)
    payload = {"targets": targets, "model": model, "system": system, **turn}
    seen = client.Received()  # what Ctrl-C's output is made of: the turns as received so far
    with render.progress(render.stderr() if verbose else None) as progress:
        events = client.start_turn(socket_path, payload, seen)  # Unavailable is raised here, before any output
        announce()
        show_turns(events, [a for a, _ in targets], json_out, verbose, progress, seen.stopped, contexts=seen.contexts)
