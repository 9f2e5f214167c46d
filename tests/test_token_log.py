"""The append-only token log against a fresh render of the whole conversation.

After every kind of turn ending (a normal reply, an EOS, a `length` stop, Ctrl-C),
the stored log plus the next message's delta, which is exactly the prompt the
next turn feeds the model, must equal the chat template's render of the whole
transcript plus the new message, with each reply as the ids the model generated
(see turns.rendered_log for why replies are spliced in as ids). Where the replies
happen to be the canonical encoding of their text, that is plain
`prompting.full_prompt` over the transcript, and the test says so too.

The differences from a plain re-render, and why the log is right:
- A `length` stop or an interrupted reply has no end-of-turn token in the log
  (the model never emitted one); the next delta supplies the template's closing
  text (`<|im_end|>\\n` in ChatML), so log + delta still equals the render.
- An EOS stop's end-of-turn token is the model's own, so the next delta adds only
  what the template writes after it (`\\n`), never a second `<|im_end|>`.
- An interrupted reply's stored text may stop short of a half-decoded character
  while its ids are all in the log: the ids are what the model saw.
- None of these tokenizers' templates rewrites history (all are ChatML, as
  SmolLM2's); for one that does, see test_history_rewriting_template_re_renders.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Session, edited_copy
from turns import encode, eos_at, rendered_log, reply_ids, run_turn, transcript

from semantic_cli import prompting
from semantic_cli.chat import GenSettings

# (how the turn ends, message, max_tokens). Tiny random-weight models never stop by
# themselves, so their "normal" turn ends by length too and their EOS is forced.
TURNS = [
    ("normal", "What is the capital of France?", 48),
    ("eos", "And the capital of Italy? Answer in one word.", 48),
    ("length", "Tell me a long story about the sea.", 3),
    ("interrupted", "Write a long essay about mountains, with many details.", 200),
]
NEXT = "Thank you!"
INTERRUPT_AFTER = 5
EOS_STEP = 4  # on tiny models the EOS is the 4th generated token


def _check_conversation(model: Path, system: str | None, natural_eos: bool) -> dict[str, bool]:
    """Run TURNS on one agent, checking each next prompt against the full render.
    Returns, per turn, whether its prompt was also plain `full_prompt` (canonical replies)."""
    name = "t"
    replies: list[list[int]] = []
    canonical: dict[str, bool] = {}
    with Session() as s:
        chat, store = s.chat, s.store
        for how, text, max_tokens in [*TURNS, ("next", NEXT, 1)]:
            agent = chat.open_agent(name, str(model), system)
            pending = chat.prepare(agent, text, GenSettings(max_tokens=max_tokens))
            lm = pending.engine.lm
            tok = lm.tokenizer
            eos_ids = set(tok.eos_token_ids)
            history = transcript(store, name) if store.find_agent(name) else ([{"role": "system", "content": system}] if system else [])
            messages = history + [{"role": "user", "content": text}]
            log = store.token_log(name, lm.tokenizer_fingerprint)
            prompt = pending.request.prompt
            # The prompt the model is fed is the stored log plus the delta...
            if log is not None:
                assert not pending.new_log and prompt[: len(log)] == log
            # ...and that equals one render of the whole conversation.
            assert prompt == rendered_log(tok, messages, replies), how
            past = [m["content"] for m in history if m["role"] == "assistant"]
            canonical[how] = all(encode(tok, c) == r for c, r in zip(past, replies, strict=True))
            if canonical[how]:
                assert prompt == prompting.full_prompt(tok, messages), how
            if how == "next":
                break
            if how == "eos" and not natural_eos:
                with eos_at(pending.engine, EOS_STEP, tok.eos_token_id):
                    rec, streamed = run_turn(chat, pending)
            else:
                rec, streamed = run_turn(chat, pending, INTERRUPT_AFTER if how == "interrupted" else None)
            new_log = store.token_log(name, lm.tokenizer_fingerprint)
            if how == "interrupted":
                assert rec is None
                [*_, last] = store.messages(name)
                assert last.status == "interrupted" and last.meta["generated_tokens"] == INTERRUPT_AFTER
                # The log ends with exactly the tokens streamed before Ctrl-C.
                assert new_log == prompt + streamed
                replies.append(streamed)
                continue
            assert rec is not None
            if how == "eos":
                assert rec.done.finish_reason == "stop"
                assert new_log[-1] in eos_ids  # the model's own end-of-turn token is in the log
                if not natural_eos:
                    assert len(rec.done.generated) == EOS_STEP
            if how == "length":
                assert rec.done.finish_reason == "length" and len(rec.done.generated) == max_tokens
                assert new_log[-1] not in eos_ids  # no closing yet: the next delta brings it
            # The log is the prompt followed by every generated id (an EOS included).
            assert new_log == prompt + rec.done.generated == rec.done.all_tokens
            replies.append(reply_ids(rec, eos_ids))
    return canonical


@pytest.mark.parametrize("system", [None, "You are a terse assistant."], ids=["default-persona", "own-persona"])
@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3_text", "qwen2"])
def test_log_plus_delta_equals_full_render_on_tiny_models(tiny, home, monkeypatch, kind, system):
    # One tail file holds the whole cache (the KV layout is not what this test is about).
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "4096")
    _check_conversation(tiny[kind], system, natural_eos=False)


@pytest.mark.smollm
def test_log_plus_delta_equals_full_render_on_smollm2(smollm, home, monkeypatch):
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "64")
    canonical = _check_conversation(smollm, None, natural_eos=True)
    # A trained model's replies are canonical BPE, so the log is plain full_prompt here.
    assert all(canonical.values()), canonical


HISTORY_REWRITING_TEMPLATE = (
    # Mistral-style: the persona is rendered inside the *last* user message, so adding a
    # message moves it: the rendered history is not a prefix of the next render.
    "{% if messages[0]['role'] == 'system' %}{% set persona = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set persona = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% set last_user = namespace(i=-1) %}{% for m in loop_messages %}{% if m['role'] == 'user' %}"
    "{% set last_user.i = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in loop_messages %}{% if m['role'] == 'user' %}{{ '<|im_start|>[INST] ' }}"
    "{% if loop.index0 == last_user.i %}{{ persona }}{% endif %}{{ m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
)


def test_history_rewriting_template_re_renders(tiny, home, monkeypatch, tmp_path):
    """A template that rewrites history cannot be appended to: the next prompt is a
    fresh full render and it replaces the log (documented in prompting.py). The old
    log is then not a prefix of the prompt, which is right: the model must see the
    conversation as the template now renders it."""
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "4096")
    model = edited_copy(tiny["llama"], tmp_path / "rewriting", "tokenizer_config.json", chat_template=HISTORY_REWRITING_TEMPLATE)
    with Session() as s:
        first = s.say("m", "first question", model=model, system="Be brief.", max_tokens=4)
        agent = s.chat.open_agent("m")
        pending = s.chat.prepare(agent, "second question", GenSettings(max_tokens=4))
        tok = pending.engine.lm.tokenizer
        messages = transcript(s.store, "m") + [{"role": "user", "content": "second question"}]
        assert pending.new_log
        assert pending.request.prompt == prompting.full_prompt(tok, messages)
        assert pending.request.prompt[: len(first.done.all_tokens)] != first.done.all_tokens
        rec, _ = run_turn(s.chat, pending)
        assert s.store.token_log("m", pending.engine.lm.tokenizer_fingerprint) == rec.done.all_tokens
