"""Ctrl-C during a reply: the partial reply's tokens stay in the token log, and the
next turn's prompt is the previous prompt + the partial reply + the new message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from conftest import SEMANTIC, run_cli
from helpers import Session
from servers import Server
from turns import encode, render, run_turn, transcript

from semantic_cli.chat import GenSettings
from semantic_cli.engine import get_engine
from semantic_cli.model.loader import resolve
from semantic_cli.store import Store


def _next_message_ids(tok, store: Store, name: str, new_text: str) -> list[int]:
    """What the template adds after the cut reply's text for a new message: its closing of
    the reply, then the new user message and the assistant's opening (from one render of
    the whole conversation, not from prompting.turn_delta)."""
    history = transcript(store, name)
    assert history[-1]["role"] == "assistant"
    text = render(tok, history + [{"role": "user", "content": new_text}])
    opened = render(tok, history[:-1])  # up to the cut reply's opening
    assert text.startswith(opened) and text.startswith(history[-1]["content"], len(opened))
    return encode(tok, text[len(opened) + len(history[-1]["content"]) :])


def test_interrupted_reply_tokens_are_in_the_log_and_the_next_prompt(tiny, home, tmp_path, monkeypatch):
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", "16")
    model = tiny["qwen2"]
    k = 7
    with Session() as s:
        chat, store = s.chat, s.store
        s.say("c", "hello there", model=model, max_tokens=6)
        agent = chat.open_agent("c")
        cut = chat.prepare(agent, "tell me everything you know", GenSettings(max_tokens=500))
        lm = cut.engine.lm
        rec, partial = run_turn(chat, cut, interrupt_after=k)
        assert rec is None and len(partial) == k
        log = store.token_log("c", lm.tokenizer_fingerprint)
        # The log ends with the partial reply's generated tokens, right after the prompt they answered.
        assert log[-k:] == partial
        assert log == cut.request.prompt + partial
        [*_, reply] = store.messages("c")
        assert reply.status == "interrupted" and reply.meta["generated_tokens"] == k
        new_ids = _next_message_ids(lm.tokenizer, store, "c", "go on")
        nxt = s.say("c", "go on", max_tokens=3)
    assert nxt.done.stats.prompt_tokens == len(cut.request.prompt) + k + len(new_ids)
    assert nxt.done.all_tokens[: len(log)] == log
    # The partial tokens are what the model generated: the start of the uninterrupted reply.
    monkeypatch.setenv("SEMANTIC_HOME", str(tmp_path / "uninterrupted"))
    with Session() as s:
        s.say("c", "hello there", model=model, max_tokens=6)
        whole = s.say("c", "tell me everything you know", max_tokens=k + 5)
    assert whole.done.generated[:k] == partial


def test_sigint_keeps_the_partial_reply_tokens_for_the_next_invocation(tiny, home):
    """The real thing: SIGINT to a one-shot `semantic chat`, then a new invocation."""
    model = tiny["llama"]
    lm = get_engine(resolve(str(model))).lm
    tok = lm.tokenizer
    proc = subprocess.Popen(
        [SEMANTIC, "chat", "-a", "c", "--model", str(model), "--max-tokens", "4000", "-m", "go on forever"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert os.read(proc.stdout.fileno(), 1)  # the reply is streaming
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    store = Store()
    try:
        first_prompt = encode(tok, render(tok, [{"role": "user", "content": "go on forever"}]))
        log = store.token_log("c", lm.tokenizer_fingerprint)
        [_, reply] = store.messages("c")
        n = reply.meta["generated_tokens"]
        assert reply.status == "interrupted" and 0 < n < 4000
        # The log is the prompt and then the n tokens generated before the signal.
        assert len(log) == len(first_prompt) + n and log[: len(first_prompt)] == first_prompt
        partial = log[len(first_prompt) :]
        new_ids = _next_message_ids(tok, store, "c", "next")
    finally:
        store.close()
    # Greedy: those n tokens are the first n of the same reply left uninterrupted.
    ref = run_cli("chat", "-a", "ref", "--model", str(model), "--max-tokens", str(n), "--json", "-m", "go on forever")
    assert ref.returncode == 0, ref.stderr
    store = Store()
    try:
        assert store.token_log("ref", lm.tokenizer_fingerprint) == first_prompt + partial
    finally:
        store.close()
    r = run_cli("chat", "-a", "c", "--max-tokens", "3", "--json", "-m", "next")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt_tokens"] == len(first_prompt) + n + len(new_ids)


def test_sigint_with_json_through_the_server_prints_the_interrupted_turn(tiny, home):
    """As in-process: the JSON of the cut turn (from what the server sent), exit 130; the
    server records the same turn as interrupted once the client hangs up."""
    model = str(tiny["llama"])
    with Server(home, model):
        proc = subprocess.Popen(
            [SEMANTIC, "chat", "-a", "c", "--model", model, "--max-tokens", "4000", "--json", "-m", "go on forever"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert b"new agent" in proc.stderr.readline()  # said once the server has taken the turn and sent a token
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        [turn] = [json.loads(line) for line in out.decode().splitlines()]
        deadline = time.monotonic() + 30
        while True:
            store = Store()
            try:
                messages = store.messages("c")
            finally:
                store.close()
            if messages and messages[-1].role == "assistant":
                break
            assert time.monotonic() < deadline, "the server never recorded the cut turn"
            time.sleep(0.1)
    reply = messages[-1]
    ref = run_cli("chat", "-a", "ref", "--model", model, "--max-tokens", "2", "--json", "--no-server", "-m", "go on forever")
    assert turn.keys() == json.loads(ref.stdout).keys()
    assert turn["finish_reason"] == "interrupted" and turn["agent"] == "c" and turn["model"] == reply.meta["model"]
    assert 0 < turn["generated_tokens"] <= reply.meta["generated_tokens"] < 4000
    assert reply.status == "interrupted" and reply.content.startswith(turn["reply"]) and turn["reply"]
    assert (turn["prompt_tokens"], turn["cached_tokens"]) == (reply.meta["prompt_tokens"], reply.meta["cached_tokens"])
    assert err.decode().count("interrupted") == 1
