"""The `semantic` command: Typer app assembly and the one error boundary.

Command modules parse arguments, call the core and render; they raise
`SemanticError`s, which become one stderr line and an exit code here.
Tracebacks only with SEMANTIC_DEBUG=1.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

from .. import __version__
from ..errors import EXIT_INTERRUPTED, SemanticError


class _Group(TyperGroup):
    """typer prints `<bool>` beside every -h/--help; a flag takes no value, so no type."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    def get_command(self, ctx: Any, name: str) -> Any:
        command = super().get_command(ctx, name)
        _untyped_help(command, ctx)
        return command


def _untyped_help(command: Any, ctx: Any) -> None:
    """The same for a subcommand and everything under it (their help options are made once)."""
    if command is None:
        return
    option = command.get_help_option(ctx)
    if option is not None:
        option.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _untyped_help(sub, ctx)


app = typer.Typer(
    name="semantic",
    cls=_Group,
    help="Chat with named local-LLM agents whose conversations and KV caches persist between runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"semantic {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", metavar="", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Chat with named local-LLM agents whose conversations and KV caches persist between runs."""


def _add_chat() -> None:
    from . import chat

    app.command("chat")(chat.chat)


def _add_serve() -> None:
    from . import serve

    app.command("serve")(serve.serve)


def _add_doctor() -> None:
    from . import config

    app.command("doctor")(config.doctor)


def _add_group(name: str) -> Callable[[], None]:
    def add() -> None:
        from importlib import import_module

        # agents: agents.app, with fork, trim and compact (agents_context)
        module = import_module(f"{__package__}.{'agents_context' if name == 'agents' else name}")
        app.add_typer(module.app, name=name)

    return add


# Each command's module is imported only when that command runs (or for help and
# suggestions, all of them): `semantic chat` imports in 0.08 s here, not 0.10 s.
_COMMANDS: dict[str, Callable[[], None]] = {
    "chat": _add_chat,
    "serve": _add_serve,
    "doctor": _add_doctor,
    **{name: _add_group(name) for name in ("agents", "cache", "config", "bench", "rooms", "models")},
}
_registered: set[str] = set()


def register(argv: list[str] | None = None) -> None:
    """Add the command `argv` names to the app, or every command when it names none that
    exists (no arguments, --help, --version, a typo to suggest a near name for)."""
    first = argv[0] if argv else None
    names = [first] if first in _COMMANDS else list(_COMMANDS)
    for name in names:
        if name not in _registered:
            _COMMANDS[name]()
            _registered.add(name)
    # Help and completion list them in one order, whatever ran first in this process.
    order = list(_COMMANDS)
    app.registered_commands.sort(key=lambda c: order.index(c.name or ""))
    app.registered_groups.sort(key=lambda g: order.index(g.name or ""))


def _click_errors() -> tuple[tuple[type[Exception], ...], tuple[type[Exception], ...], tuple[type[BaseException], ...]]:
    """(usage errors, bad flag values, aborts) of click and of the click typer >= 0.26 vendors:
    imported only when a command fails, since click's import costs every call ~10 ms."""
    import click

    errors: tuple[type[Exception], ...] = (click.ClickException,)
    bad_values: tuple[type[Exception], ...] = (click.BadParameter,)
    aborts: tuple[type[BaseException], ...] = (click.exceptions.Abort, typer.Abort)
    try:
        from typer._click.exceptions import BadParameter as _TyperBadParameter
        from typer._click.exceptions import ClickException as _TyperClickException

        errors += (_TyperClickException,)
        bad_values += (_TyperBadParameter,)
    except ImportError:  # older typer raises click's own
        pass
    return errors, bad_values, aborts


def _fail(message: str, code: int) -> NoReturn:
    with contextlib.suppress(OSError):  # a terminal that hung up
        sys.stderr.write(f"semantic: error: {message}\n")
        sys.stderr.flush()
    raise SystemExit(code)


def _interrupted(newline: str = "") -> NoReturn:
    """Ctrl-C's end of a command (130); SIGTERM's or SIGHUP's (128 + it), whose terminal may be gone."""
    from .. import interrupts

    with contextlib.suppress(OSError):
        sys.stderr.write(f"{newline}interrupted\n")
        sys.stderr.flush()
    signum = interrupts.terminating()
    if signum is not None:  # the terminal may be gone: Python's last flush of it must not turn the exit into 120
        _to_devnull(sys.stdout, sys.stderr)
    raise SystemExit(EXIT_INTERRUPTED if signum is None else 128 + signum)


def main(argv: list[str] | None = None) -> None:
    debug = os.environ.get("SEMANTIC_DEBUG") == "1"
    os.umask(0o077)  # everything this tool writes is private to the user
    _open_standard_streams()
    from .. import interrupts

    try:
        interrupts.stop_on_termination()
        register(sys.argv[1:] if argv is None else argv)
        result = app(args=argv, standalone_mode=False, prog_name="semantic")
        if result == EXIT_INTERRUPTED:  # typer's answer to Ctrl-C in a command: say it, once
            _interrupted()
        if (signum := interrupts.terminating()) is not None:  # a REPL that said so and left
            raise SystemExit(128 + signum)
        raise SystemExit(result if isinstance(result, int) else 0)
    except SemanticError as exc:
        if debug:
            raise
        _fail(exc.message, exc.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        _interrupted("\n")
    except BrokenPipeError:
        # The reader went away (`| head`): not an error worth a traceback.
        _to_devnull(sys.stdout)
        raise SystemExit(1) from None
    except Exception as exc:
        if interrupts.terminating() is not None and not debug:  # e.g. EIO writing to the terminal that hung up
            _interrupted()
        usage_errors, bad_values, aborts = _click_errors()
        if isinstance(exc, aborts):
            sys.stderr.write("\n")
            raise SystemExit(EXIT_INTERRUPTED) from None
        if isinstance(exc, bad_values):  # a flag's value out of its range or choices: one line, as our own usage errors
            bad: Any = exc
            _fail(bad.format_message(), bad.exit_code)
        if isinstance(exc, usage_errors):  # an unknown flag or command, a missing argument: one line, as our own
            usage_error: Any = exc  # click's or typer's vendored ClickException: both have format_message() and exit_code
            if not usage_error.format_message():  # a group run bare: click has printed its help already
                raise SystemExit(usage_error.exit_code) from None
            context = getattr(usage_error, "ctx", None)
            command = context.command_path if context is not None else "semantic"
            _fail(f"{usage_error.format_message()} (see `{command} --help`)", usage_error.exit_code)
        if debug:  # the last resort: one line, unless debugging
            raise
        if (environment := _environment_error(exc)) is not None:
            _fail(environment, 1)
        _fail(f"unexpected {type(exc).__name__}: {exc} (rerun with SEMANTIC_DEBUG=1 for a traceback and please report it)", 1)


def _environment_error(exc: Exception) -> str | None:
    """One line for what the machine refused (a full disk, a read-only or missing directory,
    a database SQLite cannot write), with what to check; None for anything else."""
    import errno
    import sqlite3

    from ..db import MACHINE_REFUSED

    if isinstance(exc, sqlite3.OperationalError) and any(words in str(exc) for words in MACHINE_REFUSED):
        return f"a database operation failed ({exc}): check the free disk space and that semantic's files are yours and writable"
    refused = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EIO)
    if isinstance(exc, OSError) and exc.errno in refused and exc.strerror:
        where = f" ({exc.filename})" if isinstance(exc.filename, str) else ""
        return f"{exc.strerror}{where}: check the free disk space, the path, and that semantic's directories are yours and writable"
    return None  # anything else is a bug to report


def _to_devnull(*streams: Any) -> None:
    """Point these streams' descriptors at /dev/null: their reader is gone, and what is left
    in their buffers must not fail the exit."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in streams:
            os.dup2(devnull, stream.fileno())


def _open_standard_streams() -> None:
    """A command started with stdin, stdout or stderr closed (`<&-`, `>&-`) gets /dev/null
    there: no input (an empty message is refused as such), output discarded."""
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, mode))  # noqa: SIM115 - it lives as long as the process


if __name__ == "__main__":
    main()
