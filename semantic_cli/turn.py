"""The records of a turn that the core and its drivers share: the settings it runs with,
the prepared `PendingTurn`, the `TurnEvent`s the UI (or the server's wire) receives, and
rules about them: a stopped turn's figures (`partial_stats`) and what it keeps of its prompt
(`unanswered_tokens`), one model per room (`check_room`), and where each sampling setting
comes from (`sampling`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import SemanticError, UsageError
from .events import PromptProgress, TokenEvent, TurnDone, TurnRequest, TurnStats
from .kv.stats import PersistStats

if TYPE_CHECKING:  # the piped client imports this module, and needs neither the engine nor the store
    from .engine import Engine
    from .store import Agent


@dataclass(frozen=True)
class GenSettings:
    """What a turn asks for; None: the agent's setting, else the config's, else the model's
    generation_config.json, else the built-in default (`Chat` resolves them)."""

    max_tokens: int | None = None
    temp: float | None = None
    top_p: float | None = None
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    max_tokens_limit: int | None = None  # a ceiling on max_tokens however it resolves (the server's --max-tokens)


@dataclass(frozen=True)
class Notice:
    key: str
    text: str


@dataclass(frozen=True)
class TurnRecorded:
    key: str
    model: str
    done: TurnDone  # finish_reason "interrupted" for a reply cut short by Ctrl-C
    tier: str  # where the reused prefix came from: hot, warm or cold
    persisted: PersistStats | None
    warnings: list[str]  # said after the turn (e.g. the cache could not be saved)


TurnEvent = Notice | PromptProgress | TokenEvent | TurnDone | TurnRecorded
"""What `Chat.run` yields: warnings first, then each turn's progress and tokens, and per
turn its `TurnDone` followed by its `TurnRecorded` (once it is in the transcript)."""

# Said when the cache fails ({reason}: `failure_reason`); a failure while caching costs a re-prefill, never a message.
CACHE_UNAVAILABLE = "KV cache unavailable ({reason}): re-prefilling, and not caching this turn"
CACHE_NOT_SAVED = "KV cache not saved ({reason}); the conversation is saved and will re-prefill next time"
CACHE_NOT_KEPT = "KV cache not kept in memory ({reason}); the conversation is saved and will re-read it next time"


class TurnNotSaved(SemanticError):
    """Raised by `Chat.run` once every other reply is recorded: the transcript write of
    these agents' replies failed, so those replies (shown, but not saved) are not in
    their conversations. `errors` maps each such agent to what went wrong."""

    def __init__(self, errors: dict[str, BaseException], others: bool) -> None:
        names = ", ".join(errors)
        reasons = "; ".join(dict.fromkeys(one_line(e) for e in errors.values()))
        if len(errors) == 1:
            lost = f"{names}'s reply could not be saved to the transcript ({reasons}): it is not in the conversation"
        else:
            lost = f"the replies of {names} could not be saved to the transcript ({reasons}): they are not in their conversations"
        super().__init__(lost + ("; the other agents' replies are saved" if others else ""))
        self.errors = errors


def note(exc: BaseException, text: str) -> None:
    """Say on an exception that propagates anyway what else went wrong (shown with SEMANTIC_DEBUG=1)."""
    add = getattr(exc, "add_note", None)  # Python >= 3.11
    if add is not None:
        add(text)


def one_line(exc: BaseException) -> str:
    """`Type: message` on one line (the message's first line), for a warning or an error."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@dataclass
class PendingTurn:
    """A prepared turn: `Chat.prepare` makes it and `Chat.run` generates and records it.
    Not frozen: while it runs, the core collects its tokens and text here (what an
    interrupted turn records) and notes its warnings and whether the agent is stored yet."""

    agent: Agent
    user_text: str
    engine: Engine
    request: TurnRequest
    new_log: bool
    log_len: int
    tier: str
    is_new: bool
    warnings: list[str]
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)  # the turn's clock: set by prepare before the restore
    first_token_at: float | None = None
    done: TurnDone | None = None  # set when generation ends: what is recorded, even if the run stops before
    recorded: bool = False  # the transcript holds this turn: never record it twice
    stateless: bool = False  # an API turn on a model, not an agent: nothing is recorded
    changes: dict[str, str] = field(default_factory=dict)  # a flag's new model or system: saved with this turn
    opening: int | None = None  # the assistant's opening at the prompt's end, in tokens (None: not known)


def unanswered_tokens(p: PendingTurn) -> list[int] | None:
    """The token log of a turn stopped before its reply: its prompt up to the user's
    message (the assistant's opening left out, as the next turn's prompt has the next
    message there); None when the template's opening is not known."""
    if p.opening is None:
        return None
    return p.request.prompt[: len(p.request.prompt) - p.opening]


def partial_stats(p: PendingTurn, read: int | None = None) -> TurnStats:
    """A turn stopped before the engine ended it: TTFT as for a finished turn (0 when it was
    stopped before its first token); no rates. `read`: how many prompt tokens the model had
    read when a prefill was stopped (None: all of them)."""
    req = p.request
    ttft = p.first_token_at - p.started if p.first_token_at is not None else 0.0
    prefilled = (len(req.prompt) if read is None else read) - req.cached
    return TurnStats(ttft, len(req.prompt), req.cached, prefilled, len(p.tokens), 0.0, 0.0, req.restore_s)


def interrupted(p: PendingTurn, read: int | None = None) -> TurnDone:
    """The turn as it stands when stopped before the engine ended it (`read`: partial_stats')."""
    req = p.request
    return TurnDone(req.key, "interrupted", "".join(p.text), list(p.tokens), None, req.prompt + p.tokens, partial_stats(p, read))


def transcript_rows(p: PendingTurn, done: TurnDone, model: str) -> tuple[list[tuple[str, str, str, dict]], list[int], bool]:
    """What a turn adds to the transcript: its messages (role, content, status, meta), the
    token log they end with, and whether that log replaces the stored one (else only its
    part past `p.log_len` is new). A turn stopped before its reply adds the user's message
    alone, "unanswered" (no empty reply), and the log up to it (`unanswered_tokens`)."""
    status = "interrupted" if done.finish_reason == "interrupted" else "complete"
    meta = {"finish_reason": done.finish_reason, "model": model, **done.stats.__dict__}
    replace_log = p.new_log or bool(p.changes)  # a new persona or model: the old log is not what the model sees
    if status == "interrupted" and not done.generated:
        kept = unanswered_tokens(p)  # None (an unknown opening): the next turn re-renders the transcript
        unanswered = ("user", p.user_text, "unanswered", {"finish_reason": "interrupted", "model": model})
        return [unanswered], kept or [], replace_log or kept is None
    return [("user", p.user_text, "complete", {}), ("assistant", done.text, status, meta)], done.all_tokens, replace_log


def check_room(agents: Sequence[Agent], engines: Sequence[Engine] = ()) -> None:
    """A room's agents must share one model, since one engine generates their turns together
    (UsageError if not): before loading, the same model spec; once loaded (`engines`, one per
    agent), the same engine, which two specs naming the same files share."""
    shared = len({id(e) for e in engines}) <= 1 if engines else len({a.model for a in agents}) <= 1
    if not shared:
        detail = ", ".join(f"{a.name}: {a.model}" for a in agents)
        raise UsageError(f"a room's agents must share one model ({detail}); pass --model to switch them all, or chat with them separately")


def sampling(settings: GenSettings, agent: Agent, model: dict[str, Any]) -> Callable[[str], Any]:
    """Each setting from the first that has it: the turn's flag, the agent's settings, the
    config (environment or file), the model's generation_config.json (`model`), the
    built-in default."""
    from . import config

    configured = config.effective()  # the file read once per turn, not once per setting

    def value(key: str) -> Any:
        given = getattr(settings, key)
        if given is not None:
            return given
        if agent.settings.get(key) is not None:
            return agent.settings[key]
        found, source = configured[key]
        if key in model and source == "default":
            return model[key]
        return found

    return value


def ended(p: PendingTurn, reason: str, text: str) -> TurnDone:
    """A turn its driver ended early with `text` as the whole reply (the server, at a stop
    sequence): no cache, and the agent's token log is dropped (its ids would run past the
    text), so the next turn re-renders the transcript and finds its blocks by content."""
    p.new_log = True
    return TurnDone(p.request.key, reason, text, list(p.tokens), None, [], partial_stats(p))
