"""How a one-shot or piped turn prints: the reply streamed to stdout (each reply under its
`[name]` header in a room), warnings and --verbose's footer on stderr, `--json`, and what
Ctrl-C cut, the same whether the turn ran in this process or in the server."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TextIO

from . import render
from .render import printable

if TYPE_CHECKING:
    from ..turn import TurnEvent, TurnRecorded


def show_turns(
    events: Iterator[TurnEvent],
    order: list[str],
    json_out: bool,
    verbose: bool,
    progress: Any,
    stopped: Callable[[], list[TurnRecorded]] | None = None,
    room: bool = False,
    contexts: dict[str, int] | None = None,
) -> None:
    """Print each reply on stdout (streamed for one agent; in room order, each once recorded,
    for a room), whether the turns ran here or in the server. On a terminal the text goes
    through `render.printable`; a pipe gets it byte for byte. If some replies could not be
    saved (`TurnNotSaved`), the others are printed before the error. On Ctrl-C the turns it
    cut (`stopped`, once the core has recorded them) are printed as the finished ones are
    (JSON with finish_reason "interrupted"), and the output still ends with a newline.
    `contexts`: each agent's context length, for --verbose's footer (a full context)."""
    from ..events import PromptProgress, TokenEvent
    from ..turn import Notice, TurnNotSaved, TurnRecorded

    err = functools.cache(render.stderr)  # built when first needed: a plain piped reply never loads rich's console
    out = sys.stdout
    single = len(order) == 1 and not room  # a room whose other agents were left out still prints its headers
    finished: dict[str, TurnRecorded] = {}
    printed = 0
    streamed = False  # one agent's reply text is on stdout, its line not yet ended

    def emit_ready(skip: set[str]) -> None:
        nonlocal printed
        while printed < len(order) and (order[printed] in finished or order[printed] in skip):
            rec = finished.get(order[printed])
            cut_before_reply = rec is not None and rec.done.finish_reason == "interrupted" and not streamed
            if rec is not None and not (single and not json_out and cut_before_reply):
                _emit(rec, out, single, json_out)
                if verbose:
                    context = (contexts or {}).get(rec.key)
                    footer = render.footer(rec.done.stats, rec.tier, rec.done.finish_reason, context, rec.key)
                    err().print(footer, style="dim", markup=False)
            elif single and streamed:
                out.write("\n")  # the reply streamed: end its line before the error
                out.flush()
            printed += 1

    try:
        for ev in events:
            if isinstance(ev, Notice):
                where = f"{ev.key}: " if ev.key else ""
                err().print(f"warning: {where}{printable(ev.text)}", style="yellow", markup=False)
            elif isinstance(ev, PromptProgress) and verbose and ev.total > 256:
                progress(f"prefill {ev.key}", ev.done, ev.total)
            elif isinstance(ev, TokenEvent) and single and not json_out:
                out.write(printable(ev.text, out))
                out.flush()
                streamed = streamed or bool(ev.text)
            elif isinstance(ev, TurnRecorded):
                finished[ev.key] = ev
                for w in ev.warnings:
                    err().print(f"warning: {ev.key}: {printable(w)}", style="yellow", markup=False)
                emit_ready(set())
    except TurnNotSaved as exc:
        emit_ready(set(exc.errors))  # every other reply is recorded: print it before the error
        raise
    except KeyboardInterrupt:
        close = getattr(events, "close", None)
        if close is not None:
            close()  # the core records the cut turns now
        for rec in stopped() if stopped is not None else []:
            finished.setdefault(rec.key, rec)
        emit_ready(set(order))
        raise
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()  # on any error, the core (or the server) records the partial replies now


def turn_json(rec: TurnRecorded, model: str) -> dict[str, Any]:
    s = rec.done.stats
    return {
        "reply": rec.done.text,
        "agent": rec.key,
        "model": model,
        "finish_reason": rec.done.finish_reason,
        "ttft_s": round(s.ttft_s, 4),
        "restore_s": round(s.restore_s, 4),
        "prompt_tokens": s.prompt_tokens,
        "cached_tokens": s.cached_tokens,
        "prefilled_tokens": s.prefilled_tokens,
        "generated_tokens": s.generated_tokens,
        "prompt_tps": round(s.prompt_tps, 2),
        "generation_tps": round(s.generation_tps, 2),
        "cache_tier": rec.tier,
    }


def _emit(rec: TurnRecorded, out: TextIO, single: bool, json_out: bool) -> None:
    if json_out:
        out.write(json.dumps(turn_json(rec, rec.model)) + "\n")
    elif single:
        out.write("\n")
    else:
        out.write(f"[{rec.key}]\n{printable(rec.done.text, out)}\n\n")
    out.flush()
