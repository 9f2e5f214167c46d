"""The one exception family. Messages say what went wrong and what to do next.

The CLI converts these to one stderr line and an exit code at a single boundary
(`cli.main`); the core raises them and never prints.
"""

from __future__ import annotations

# Exit codes, documented in README.md and man/semantic.1.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3  # unknown agent, model or room
EXIT_BUSY = 4  # another process holds the agent
EXIT_TOO_LONG = 5  # the prompt does not fit the model's context, or an input is over 8 MiB
EXIT_BAD_INPUT = 6  # empty or undecodable input
EXIT_MODEL = 7  # a model could not be loaded or converted
EXIT_CACHE = 8  # cache damage that verify found and did not repair
EXIT_VERSION = 9  # a database written by a newer release of semantic
EXIT_UNSAFE = 10  # a directory of another user, or a symbolic link where semantic writes: refused
EXIT_SERVER = 11  # the server this command talked to went away mid-turn
EXIT_RANK = 12  # a rank of a run over several ranks (--hosts) stopped
EXIT_INTERRUPTED = 130


class SemanticError(Exception):
    """Base class: an error the user can act on."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(SemanticError):
    exit_code = EXIT_USAGE


class NotFoundError(SemanticError):
    exit_code = EXIT_NOT_FOUND


class BusyError(SemanticError):
    exit_code = EXIT_BUSY


class PromptTooLongError(SemanticError):
    exit_code = EXIT_TOO_LONG


class BadInputError(SemanticError):
    exit_code = EXIT_BAD_INPUT


class ModelError(SemanticError):
    exit_code = EXIT_MODEL


class CacheDamageError(SemanticError):
    exit_code = EXIT_CACHE


class StoreVersionError(SemanticError):
    """A database or file format newer than this code: refused, never modified."""

    exit_code = EXIT_VERSION


class UnsafePathError(SemanticError):
    """A directory semantic uses belongs to another user, or a file it would write is a
    symbolic link: refused, never followed or trusted."""

    exit_code = EXIT_UNSAFE


class StoreDamagedError(SemanticError):
    """A database semantic cannot read or write (damaged, read-only, on a full disk): never
    overwritten or "repaired" by guesswork; the message names the file and what to do."""


class ServerGoneError(SemanticError):
    """The `semantic serve` this command was using stopped answering mid-turn."""

    exit_code = EXIT_SERVER


class RankGoneError(SemanticError):
    """A rank of a run over several ranks (`--hosts`) stopped; the others were stopped too."""

    exit_code = EXIT_RANK


def error_for(exit_code: int, message: str) -> SemanticError:
    """The error a message and exit code stand for (one reported by `semantic serve`)."""
    for cls in (UsageError, NotFoundError, BusyError, PromptTooLongError, BadInputError, ModelError, CacheDamageError):
        if cls.exit_code == exit_code:
            return cls(message)
    for other in (StoreVersionError, UnsafePathError, ServerGoneError):
        if other.exit_code == exit_code:
            return other(message)
    return SemanticError(message)
