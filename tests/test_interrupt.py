"""Ctrl-C during a reply: the partial reply's tokens stay in the token log, and the
next turn's prompt is the previous prompt + the partial reply + the new message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import SEMANTIC, run_cli
from helpers import Session, edited_copy
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


def _layer_counter(model, monkeypatch, on_layer) -> list[int]:
    """Counts the decoder layers each prefill pass builds (one list entry per pass); calls
    `on_layer(pass, layer)` as each layer is built."""
    layers = model.model.layers
    cls = type(layers[0])
    original = cls.__call__
    passes: list[int] = []

    def counted(self, x, *args, **kwargs):
        if x.shape[1] >= 16:  # prefill passes only (a decode step has one row per sequence; steps are 16+)
            if self is layers[0]:
                passes.append(0)
            passes[-1] += 1
            on_layer(len(passes), passes[-1])
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", counted)
    return passes


def test_ctrl_c_stops_a_prefill_step_between_layers_and_keeps_what_was_read(tiny, home, monkeypatch):
    """SIGINT while the second 512-token prefill step is at its third layer: the step stops
    there (the later layers never run), the 512 tokens of the first step are kept exactly as
    an uninterrupted first step leaves them, and the engine serves the next turn normally."""
    import mlx.core as mx

    from semantic_cli.engine import PREFILL_STEP
    from semantic_cli.events import TurnRequest

    engine = get_engine(resolve(str(tiny["llama"])))
    prompt = [(i * 7) % 200 + 3 for i in range(3 * PREFILL_STEP + 40)]
    n_layers = len(engine.lm.model.model.layers)
    assert n_layers >= 4

    def whole_run(key: str) -> list[int]:
        [done] = [e for e in engine.generate([TurnRequest(key, prompt[:300], None, 0, 4)]) if hasattr(e, "all_tokens")]
        return done.generated

    before = whole_run("s")
    # The reference: one whole step, then the cache of what it read.
    batch = engine.batch()
    batch.add(TurnRequest("r", prompt, None, 0, 3))
    batch.step()
    [(want_cache, want_tokens)] = batch.reading().values()
    mx.eval([c.state for c in want_cache])
    batch.close()

    def press(step: int, layer: int) -> None:
        if step == 2 and layer == 3:
            os.kill(os.getpid(), signal.SIGINT)

    reading: dict = {}
    with monkeypatch.context() as m:  # (monkeypatch.undo would undo the home fixture too)
        passes = _layer_counter(engine.lm.model, m, press)
        try:
            for _ in engine.generate([TurnRequest("r", prompt, None, 0, 3)], reading=reading):
                pass
            raise AssertionError("not interrupted")
        except KeyboardInterrupt:
            pass
    assert passes[:2] == [n_layers, 3]  # the second step stopped at the layer the key press came in
    got_cache, got_tokens = reading["r"]
    assert got_tokens == want_tokens == prompt[:PREFILL_STEP]
    assert [c.offset for c in got_cache] == [c.offset for c in want_cache]
    for got, want in zip(got_cache, want_cache, strict=True):
        for a, b in zip(got.state, want.state, strict=True):
            assert mx.array_equal(a, b).item()
    # The generator the stop left half-way is gone: the next run is a whole, normal one.
    assert whole_run("s") == before and len(before) == 4


def _interrupted(engine, requests, press) -> tuple[list[int], list, dict]:
    """Run `requests` with a real SIGINT sent by `press(pass, layer)`: (the layers each prefill
    pass built, the events before the interrupt, what the engine says was read)."""
    import pytest

    reading: dict = {}
    events: list = []
    with pytest.MonkeyPatch.context() as m:
        passes = _layer_counter(engine.lm.model, m, press)
        try:
            for ev in engine.generate(requests, reading=reading):
                events.append(ev)
            raise AssertionError("not interrupted")
        except KeyboardInterrupt:
            pass
    return passes, events, reading


def test_ctrl_c_mid_prefill_in_a_room_delivers_the_other_sequences_step(tiny, home):
    """A decodes while B reads a long message; Ctrl-C inside B's third prefill pass: the step's
    token for A still arrives, and B keeps the two passes it had read."""
    from semantic_cli.engine import PREFILL_STEP
    from semantic_cli.events import TokenEvent, TurnRequest

    engine = get_engine(resolve(str(tiny["llama"])))
    n_layers = len(engine.lm.model.model.layers)
    a = [(i * 5) % 150 + 3 for i in range(40)]
    b = [(i * 7) % 200 + 3 for i in range(3 * PREFILL_STEP + 40)]

    def press(n: int, layer: int) -> None:
        if n == 3 and layer == 3:
            os.kill(os.getpid(), signal.SIGINT)

    passes, events, reading = _interrupted(engine, [TurnRequest("A", a, None, 0, 50), TurnRequest("B", b, None, 0, 3)], press)
    assert passes[:3] == [n_layers, n_layers, 3]  # the third pass stopped where the key press came
    tokens_a = [e for e in events if isinstance(e, TokenEvent) and e.key == "A"]
    assert tokens_a, "A's token of the stopped step was delivered"
    cache, tokens = reading["B"]
    assert tokens == b[: 2 * PREFILL_STEP] and {c.offset for c in cache} == {2 * PREFILL_STEP}
    assert "A" not in reading  # it had its reply under way: recorded as interrupted, not as read


@pytest.mark.parametrize(("step_seconds", "steps"), [(1e-9, [64, 16, 16]), (1e9, [64, 512])], ids=["slow-steps", "fast-steps"])
def test_a_sliding_window_model_stops_its_prefill_between_short_steps(tiny, home, monkeypatch, step_seconds, steps):
    """A sliding-window cache cannot be rolled back: Ctrl-C waits for the end of the step,
    so its steps are sized to take about STEP_SECONDS (a short first one, then from what
    each took), and what the finished steps read is kept."""
    from semantic_cli import engine as engine_module
    from semantic_cli.events import TurnRequest

    monkeypatch.setattr(engine_module, "STEP_SECONDS", step_seconds)
    engine = get_engine(resolve(str(tiny["gemma3_text"])))
    assert not engine.stoppable_mid_step
    n_layers = len(engine.lm.model.model.layers)
    prompt = [(i * 7) % 200 + 3 for i in range(3 * engine_module.PREFILL_STEP + 40)]

    def press(n: int, layer: int) -> None:
        if n == len(steps) and layer == 2:
            os.kill(os.getpid(), signal.SIGINT)

    passes, _, reading = _interrupted(engine, [TurnRequest("g", prompt, None, 0, 3)], press)
    assert passes == [n_layers] * len(steps)  # the last step ran whole, then it stopped
    _, tokens = reading["g"]
    assert tokens == prompt[: sum(steps)]


STRICT_TEMPLATE = (  # as Gemma's and Mistral's official templates do: roles must alternate
    "{% for message in messages %}"
    "{% set offset = 1 if messages[0]['role'] == 'system' else 0 %}"
    "{% if message['role'] != 'system' and (message['role'] == 'user') != (loop.index0 % 2 == offset) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_an_unanswered_message_does_not_break_a_template_that_wants_alternating_roles(tiny, home, tmp_path):
    """Ctrl-C before the first token leaves the user's message unanswered, so the next turn
    has two user messages in a row: a template that refuses that still gets a conversation
    it accepts (the two messages as one), and the agent goes on."""
    strict = edited_copy(tiny["llama"], tmp_path / "strict", "tokenizer_config.json", chat_template=STRICT_TEMPLATE)
    with Session() as s:
        s.say("g", "hello there", model=strict, max_tokens=3)
        pending = s.chat.prepare(s.chat.open_agent("g"), "first question", GenSettings(max_tokens=3))
        s.chat.interrupt(pending)  # stopped before its first token: the message is kept, unanswered
        s.chat.release("g")
        assert [(m.role, m.status) for m in s.store.messages("g")][-2:] == [("assistant", "complete"), ("user", "unanswered")]
        rec = s.say("g", "second question", max_tokens=3)
        assert rec.done.finish_reason in ("length", "stop")
        text = s.chat.engine_for(s.chat.open_agent("g")).lm.tokenizer.decode(rec.done.all_tokens)
        s.chat.release("g")
    assert "first question\n\nsecond question" in text
    assert [m.role for m in Store().messages("g")] == ["user", "assistant", "user", "user", "assistant"]


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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_mid_reply_keeps_the_turn_as_ctrl_c_does(tiny, home, sig):
    """`kill` or a closed terminal stops a one-shot chat as Ctrl-C does: a new agent and its
    cut reply are recorded (interrupted), then the command ends with 128 + the signal."""
    proc = subprocess.Popen(
        [SEMANTIC, "chat", "-a", "fresh", "--model", str(tiny["llama"]), "--max-tokens", "4000", "-m", "go on forever"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # As from a terminal: a suite run under nohup would hand down SIGHUP ignored (which semantic keeps so).
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )
    assert os.read(proc.stdout.fileno(), 1)  # the reply is streaming
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    store = Store()
    try:
        [user, reply] = store.messages("fresh")
        assert user.content == "go on forever" and reply.status == "interrupted" and 0 < reply.meta["generated_tokens"] < 4000
    finally:
        store.close()


def test_a_turn_stopped_in_its_prefill_reports_what_was_read(tiny, home):
    """Ctrl-C in the third pass of a long message's prefill: the cut turn's figures say two
    passes' worth of tokens were prefilled, not the whole prompt (they stay as cache)."""
    from semantic_cli.engine import PREFILL_STEP

    text = " ".join(f"w{i}" for i in range(2 * PREFILL_STEP))
    with Session() as s:
        engine = get_engine(resolve(str(tiny["llama"])))

        def press(n: int, layer: int) -> None:
            if n == 3 and layer == 3:
                os.kill(os.getpid(), signal.SIGINT)

        agent = s.chat.open_agent("p", str(tiny["llama"]), None)
        pending = s.chat.prepare(agent, text, GenSettings(max_tokens=4))
        assert len(pending.request.prompt) > 3 * PREFILL_STEP
        with pytest.MonkeyPatch.context() as m:
            _layer_counter(engine.lm.model, m, press)
            with pytest.raises(KeyboardInterrupt):
                for _ in s.chat.run([pending]):
                    pass
        stats = pending.done.stats
        assert stats.generated_tokens == 0 and stats.prompt_tokens == len(pending.request.prompt)
        assert stats.prefilled_tokens == 2 * PREFILL_STEP - stats.cached_tokens
