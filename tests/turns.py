"""Test-side tools for driving turns and for the token log's independent expectation.

`rendered_log` is what the append-only token log must hold: one render of the
whole conversation by the chat template, tokenized the way the model saw it.
The template's own text (personas, user messages, role markers, end-of-turn
markers) is encoded; each assistant reply is the exact ids the model generated
for it. Replies are spliced in as ids rather than re-encoded from their text
because a model's tokens need not be the tokenizer's canonical encoding of the
text they decode to (a random-weight model almost never emits canonical BPE,
and an interrupted reply's stored text may stop short of a half-decoded
character): re-encoding would describe tokens the model never saw, and the KV
cache would no longer be a prefix of the next prompt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from semantic_cli.chat import Chat, TurnRecorded
from semantic_cli.engine import Engine
from semantic_cli.events import TokenEvent


def render(tok: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode(tok: Any, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def transcript(store: Any, name: str) -> list[dict[str, str]]:
    """The agent's conversation as chat messages, from the transcript store (the truth)."""
    agent = store.get_agent(name)
    persona = [{"role": "system", "content": agent.system}] if agent.system else []
    return persona + [{"role": m.role, "content": m.content} for m in store.messages(name)]


def rendered_log(tok: Any, messages: list[dict[str, str]], replies: list[list[int]]) -> list[int]:
    """The render of `messages` (ending with the assistant's opening) with the content of
    the i-th assistant message replaced by replies[i]: the ids generated for it, less a
    final EOS (the template's end-of-turn text encodes to that id itself)."""
    text = render(tok, messages)
    out: list[int] = []
    pos = 0
    assistant = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(assistant) == len(replies)
    for k, reply in zip(assistant, replies, strict=True):
        opened = render(tok, messages[:k])  # the conversation up to this reply's opening
        assert text.startswith(opened), "the template re-renders history before this reply"
        assert text.startswith(messages[k]["content"], len(opened)), "the reply is not rendered verbatim"
        out += encode(tok, text[pos : len(opened)]) + reply
        pos = len(opened) + len(messages[k]["content"])
    return out + encode(tok, text[pos:])


def reply_ids(rec: TurnRecorded, eos_ids: set[int]) -> list[int]:
    """A finished reply's generated ids, less the EOS that ended it (if one did)."""
    gen = list(rec.done.generated)
    if rec.done.finish_reason == "stop":
        assert gen and gen[-1] in eos_ids
        gen = gen[:-1]
    return gen


def run_turn(chat: Chat, pending: Any, interrupt_after: int | None = None) -> tuple[TurnRecorded | None, list[int]]:
    """Run one prepared turn; with interrupt_after=k, stop it after k streamed tokens the
    way the REPL does on Ctrl-C (closing the event iterator). Returns the record (None
    when interrupted) and the ids streamed."""
    streamed: list[int] = []
    events = chat.run([pending])
    rec = None
    for ev in events:
        if isinstance(ev, TokenEvent) and ev.token is not None:
            streamed.append(ev.token)
            if len(streamed) == interrupt_after:
                events.close()
                return None, streamed
        elif isinstance(ev, TurnRecorded):
            rec = ev
    assert interrupt_after is None, f"the reply ended before it could be interrupted: {rec}"
    return rec, streamed


@contextlib.contextmanager
def forcing(engine: Engine, pick: Callable[[int], int | None]) -> Iterator[None]:
    """Make every sequence inserted meanwhile sample `pick(step)` at each generated step
    (0-based) where it returns an id, and the model's own choice elsewhere.

    A logits processor makes that id the argmax: only the sampling changes; the prompt,
    the KV cache and the other tokens are the model's own."""
    gen = engine.generator
    real_insert = gen.insert

    def processor() -> Any:
        step = [0]

        def force(_tokens: Any, logits: Any) -> Any:
            forced = pick(step[0])
            step[0] += 1
            if forced is None:
                return logits
            import mlx.core as mx

            return mx.where(mx.arange(logits.shape[-1]) == forced, mx.array(1e4, logits.dtype), logits)

        return force

    def insert(*args: Any, **kwargs: Any) -> Any:
        n = len(args[0]) if args else len(kwargs["prompts"])
        kwargs["logits_processors"] = [[processor()] for _ in range(n)]
        return real_insert(*args, **kwargs)

    gen.insert = insert
    try:
        yield
    finally:
        del gen.insert


def eos_at(engine: Engine, step: int, eos: int) -> contextlib.AbstractContextManager[None]:
    """Make the model end its reply with `eos` as its `step`-th generated token (1-based):
    random-weight models practically never sample an end-of-turn token."""
    return forcing(engine, lambda i: eos if i + 1 == step else None)
