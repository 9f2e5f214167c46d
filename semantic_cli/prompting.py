"""From a transcript to the token ids the model sees.

The agent's token log is append-only: each turn adds only the tokens of the
new user message (and the template's closing of the previous reply) to what
the model already saw, so the KV cache of earlier turns stays a valid prefix.
Templates that rewrite history would silently break that; when the rendered
history is not a prefix of the new rendering we re-render everything instead.
"""

from __future__ import annotations

from typing import Any

from .store import Agent, Message


def chat_messages(agent: Agent, history: list[Message]) -> list[dict[str, str]]:
    """What the model sees: the persona (with the latest compaction summary), then the
    messages after what that summary covers (history.py)."""
    from .history import live, persona

    system = persona(agent, history)
    out = [{"role": "system", "content": system}] if system else []
    out += [{"role": m.role, "content": m.content} for m in live(history)]
    return out


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError:
        # Templates such as Gemma's and Mistral's refuse two user messages in a row, which
        # a message left unanswered (Ctrl-C before the reply) makes: they get them as one.
        merged = _merge_user_runs(messages)
        if merged == messages:
            raise
        return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=add_generation_prompt)


def _merge_user_runs(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for m in messages:
        if out and m["role"] == "user" and out[-1]["role"] == "user":
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(dict(m))
    return out


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def full_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Every token of the conversation, ending in the assistant's opening."""
    return encode(tokenizer, _render(tokenizer, messages, add_generation_prompt=True))


def turn_delta(tokenizer: Any, messages: list[dict[str, str]], new_user: str, log_ends_with_eos: bool) -> list[int] | None:
    """Tokens to append to the log for a new user message, or None if the template
    does not render history as a stable prefix (the caller then re-renders)."""
    before = _render(tokenizer, messages, add_generation_prompt=False)
    after = _render(tokenizer, messages + [{"role": "user", "content": new_user}], add_generation_prompt=True)
    if not after.startswith(before):
        return None
    closing = ""
    if messages and messages[-1]["role"] == "assistant":
        # The log holds the reply as generated (ending in EOS, or cut short);
        # add whatever the template puts after it that the model did not emit.
        opened = _render(tokenizer, messages[:-1], add_generation_prompt=True)
        rest = before[len(opened) :] if before.startswith(opened) else None
        reply = messages[-1]["content"]
        if rest is None or not rest.startswith(reply):
            return None
        closing = rest[len(reply) :]
        eos_text = tokenizer.eos_token or ""
        if log_ends_with_eos and eos_text and closing.startswith(eos_text):
            closing = closing[len(eos_text) :]
    return encode(tokenizer, closing) + encode(tokenizer, after[len(before) :])


def opening_len(tokenizer: Any, messages: list[dict[str, str]], prompt: list[int]) -> int | None:
    """How many tokens at the end of `prompt` (the conversation `messages`, ending in a
    user message, with the assistant's opening) are that opening; None when the template
    does not add it as a clean suffix. What a turn stopped before its reply keeps of its
    prompt is the rest: the conversation up to the user's message."""
    without = _render(tokenizer, messages, add_generation_prompt=False)
    with_opening = _render(tokenizer, messages, add_generation_prompt=True)
    if not with_opening.startswith(without):
        return None
    ids = encode(tokenizer, with_opening[len(without) :])
    if not ids:
        return 0
    return len(ids) if ids and len(ids) < len(prompt) and prompt[-len(ids) :] == ids else None
