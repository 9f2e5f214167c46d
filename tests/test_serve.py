"""`semantic serve` end to end: a real server process on a free loopback port and on the
home's Unix socket, talked to by the real `openai` client, curl-like raw HTTP (httpx) and
the `semantic` CLI, on a tiny random-weight model."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import pytest
from conftest import run_cli
from servers import Server, openai_client, socket_client

from semantic_cli.errors import EXIT_BUSY, EXIT_NOT_FOUND, EXIT_SERVER, EXIT_USAGE
from semantic_cli.locks import AgentLock
from semantic_cli.store import Store


def _messages(store_name: str) -> list[tuple[str, str, str]]:
    store = Store()
    try:
        return [(m.role, m.content, m.status) for m in store.messages(store_name)]
    finally:
        store.close()


def _chat(*args: str, input: str | None = None) -> tuple[int, str, str]:
    r = run_cli("chat", *args, input=input, timeout=120)
    return r.returncode, r.stdout.decode(), r.stderr.decode()


def test_openai_client_streaming_and_not_on_the_model_and_the_socket(tiny, home):
    with Server(home, tiny["llama"]) as server:
        client = openai_client(server)
        ids = [m.id for m in client.models.list().data]
        assert ids == ["llama"]  # no agents yet: only the model
        msgs = [{"role": "user", "content": "hello there"}]
        full = client.chat.completions.create(model="llama", messages=msgs, max_tokens=6)
        assert full.object == "chat.completion" and full.choices[0].finish_reason == "length"
        assert full.usage.completion_tokens == 6 and full.usage.prompt_tokens > 0
        text = full.choices[0].message.content
        assert text
        stream = client.chat.completions.create(
            model="llama", messages=msgs, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text  # greedy: the same reply
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
        over_socket = socket_client(server).chat.completions.create(model="llama", messages=msgs, max_tokens=6)
        assert over_socket.choices[0].message.content == text
        listed = run_cli("agents", "ls", "--json")
        assert listed.returncode == 0 and json.loads(listed.stdout) == []  # stateless: no agent was made


def test_agent_mode_appends_only_new_messages_then_the_cli_continues(tiny, home):
    model = str(tiny["llama"])
    code, _, err = _chat("-a", "ann", "--model", model, "--system", "be brief", "-m", "first", "--max-tokens", "3", "--no-server")
    assert code == 0, err
    with Server(home, model) as server:
        client = openai_client(server)
        assert "ann" in [m.id for m in client.models.list().data]
        history = [{"role": "system", "content": "be brief"}] + [{"role": r, "content": c} for r, c, _ in _messages("ann")]
        r1 = client.chat.completions.create(model="ann", messages=history + [{"role": "user", "content": "second"}], max_tokens=4)
        assert r1.usage.prompt_tokens_details.cached_tokens > 0  # the agent's cache, found on disk
        history += [{"role": "user", "content": "second"}, {"role": "assistant", "content": r1.choices[0].message.content}]
        r2 = client.chat.completions.create(model="ann", messages=history + [{"role": "user", "content": "third"}], max_tokens=4)
        only_new = client.chat.completions.create(model="ann", messages=[{"role": "user", "content": "fourth"}], max_tokens=4)
        stored = _messages("ann")
        assert [c for r, c, _ in stored if r == "user"] == ["first", "second", "third", "fourth"]
        assert stored[3][1] == r1.choices[0].message.content and stored[5][1] == r2.choices[0].message.content
        assert stored[7][1] == only_new.choices[0].message.content
        # The CLI goes through the server (its log says so) and continues the same conversation.
        code, out, err = _chat("-a", "ann", "-m", "fifth", "--max-tokens", "3", "--json")
        assert code == 0, err
        assert json.loads(out)["cache_tier"] == "hot"  # the server kept ann in memory
        assert [c for r, c, _ in _messages("ann") if r == "user"][-1] == "fifth"
        _, log = server.stop()
    assert log.count("POST /semantic/v1/turns 200") == 1 and log.count("POST /v1/chat/completions 200") == 3
    code, _, err = _chat("-a", "ann", "-m", "sixth", "--max-tokens", "3")  # no server now: in-process
    assert code == 0, err
    assert len(_messages("ann")) == 12


def test_a_history_that_diverges_from_the_transcript_is_409_and_writes_nothing(tiny, home):
    model = str(tiny["llama"])
    assert _chat("-a", "bo", "--model", model, "-m", "one", "--max-tokens", "3", "--no-server")[0] == 0
    before = _messages("bo")
    with Server(home, model) as server:
        client = openai_client(server)
        edited = [{"role": "user", "content": "one (edited)"}, {"role": "assistant", "content": before[1][1]}]
        with pytest.raises(openai.ConflictError) as caught:
            client.chat.completions.create(model="bo", messages=edited + [{"role": "user", "content": "two"}], max_tokens=3)
        assert caught.value.code == "conversation_diverged" and "at message 0" in caught.value.message
        with pytest.raises(openai.ConflictError):  # a persona the agent does not have
            client.chat.completions.create(
                model="bo", messages=[{"role": "system", "content": "x"}, {"role": "user", "content": "two"}], max_tokens=3
            )
    assert _messages("bo") == before


def test_each_error_status_in_openai_shape_and_nothing_written(tiny, home):
    model = str(tiny["llama"])
    assert _chat("-a", "ag", "--model", model, "-m", "one", "--max-tokens", "2", "--no-server")[0] == 0
    before = _messages("ag")
    with Server(home, model, "--max-body", "2048", "--max-tokens", "50") as server:
        url = server.url + "/chat/completions"
        for target in ("llama", "ag"):
            ok = {"model": target, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            cases = [
                (b"{not json", 400, None),
                (json.dumps({**ok, "temperature": 9}).encode(), 400, None),
                (json.dumps({**ok, "seed": -1}).encode(), 400, None),
                (json.dumps({**ok, "messages": []}).encode(), 400, None),
                (json.dumps({**ok, "messages": [{"role": "assistant", "content": "x"}]}).encode(), 400, None),
                (json.dumps({**ok, "messages": [{"role": "user", "content": 5}]}).encode(), 400, None),
                (json.dumps({**ok, "max_tokens": 51}).encode(), 400, None),
                (json.dumps({**ok, "n": 2}).encode(), 400, None),
                (json.dumps(ok).encode()[:-1] + b', "repetition_penalty": 1e999}', 400, None),  # infinity
                (json.dumps(ok).encode()[:-1] + b', "temperature": NaN}', 400, None),
                (json.dumps({**ok, "model": "nosuch"}).encode(), 404, "model_not_found"),
                (json.dumps({**ok, "model": "../../etc/passwd"}).encode(), 404, "model_not_found"),
                (json.dumps({**ok, "messages": [{"role": "user", "content": "x" * 4000}]}).encode(), 413, None),
            ]
            for body, status, code in cases:
                r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
                assert r.status_code == status, (target, body[:80], r.text)
                error = r.json()["error"]
                assert error["message"] and error["type"] and error["code"] == code, r.text
                assert r.headers.get("x-should-retry") == "false"  # the openai client would retry a 409 otherwise
        # What a web page could send: a "simple" cross-site POST, or a rebound DNS name.
        ok = {"model": "ag", "messages": [{"role": "user", "content": "INJECTED"}], "max_tokens": 2}
        simple = httpx.post(url, content=json.dumps(ok), headers={"content-type": "text/plain;charset=UTF-8"})
        assert simple.status_code == 415
        foreign = httpx.post(url, json=ok, headers={"origin": "https://evil.example"})
        assert foreign.status_code == 403
        assert httpx.get(server.url + "/models", headers={"host": "rebind.evil.example"}).status_code == 403
        assert httpx.get(server.url + "/models", headers={"origin": "http://localhost:3000"}).status_code == 200
    assert _messages("ag") == before
    listed = run_cli("agents", "ls", "--json")
    assert listed.returncode == 0 and [a["name"] for a in json.loads(listed.stdout)] == ["ag"]


def test_bad_sampling_values_never_break_the_engine_or_keep_an_agent(tiny, home):
    model = str(tiny["llama"])
    assert _chat("-a", "sv", "--model", model, "-m", "one", "--max-tokens", "2", "--no-server")[0] == 0
    with Server(home, model) as server:
        client = openai_client(server)
        msgs = [{"role": "user", "content": "hi"}]
        wide = client.chat.completions.create(model="llama", messages=msgs, max_tokens=3, temperature=1, extra_body={"top_k": 5000})
        assert wide.choices[0].finish_reason == "length"  # a k above the vocabulary cuts nothing
        again = client.chat.completions.create(model="llama", messages=msgs, max_tokens=3, temperature=0.7)
        assert again.choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="sv", messages=msgs, max_tokens=3, seed=-1)
        code, _, err = _chat("-a", "sv", "-m", "two", "--max-tokens", "2", "--seed", "-1")
        assert code == EXIT_USAGE and "--seed" in err
        assert _chat("-a", "sv", "-m", "three", "--max-tokens", "2")[0] == 0  # not left locked
        assert [c for r, c, _ in _messages("sv") if r == "user"] == ["one", "three"]


def test_prompt_too_long_for_the_context_is_400(tiny, home):
    with Server(home, tiny["llama"], "--max-body", str(1 << 20)) as server:
        client = openai_client(server)
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "word " * 5000}], max_tokens=2)
        assert caught.value.code == "context_length_exceeded"


def test_api_key_is_required_on_tcp_and_compared_whole(tiny, home):
    with Server(home, tiny["llama"], env={"SEMANTIC_API_KEY": "s3cret"}) as server:
        msgs = [{"role": "user", "content": "hi"}]
        for key in ("wrong", "s3cre", "s3cret2"):
            with pytest.raises(openai.AuthenticationError):
                openai_client(server, api_key=key).chat.completions.create(model="llama", messages=msgs, max_tokens=2)
        assert httpx.get(server.url + "/models").status_code == 401
        good = openai_client(server, api_key="s3cret").chat.completions.create(model="llama", messages=msgs, max_tokens=2)
        assert good.choices[0].message.content is not None
        assert socket_client(server).models.list().data  # the socket is the user's own: no key


def test_refusals_at_start_are_one_line(tiny, home):
    r = run_cli("serve", "--model", str(tiny["llama"]), "--host", "0.0.0.0", timeout=60)
    assert r.returncode == EXIT_USAGE and b"without an API key" in r.stderr and len(r.stderr.splitlines()) == 1
    with Server(home, tiny["llama"]) as server:
        r = run_cli("serve", "--model", str(tiny["llama"]), "--port", "0", timeout=60)
        assert r.returncode == EXIT_BUSY and f"(pid {server.proc.pid})".encode() in r.stderr, r.stderr  # type: ignore[union-attr]
        assert len(r.stderr.splitlines()) == 1
        doctor = json.loads(run_cli("doctor", "--json").stdout)
        assert doctor["server"].startswith(f"running (pid {server.proc.pid}") and server.socket in doctor["server"]  # type: ignore[union-attr]
    assert json.loads(run_cli("doctor", "--json").stdout)["server"].startswith("not running")


def test_cli_through_the_server_matches_in_process_output_and_exit_codes(tiny, home):
    model = str(tiny["llama"])
    with Server(home, model) as server:
        via_server = _chat("-a", "s1", "--model", model, "-m", "same words", "--max-tokens", "5", "--json")
        in_process = _chat("-a", "s2", "--model", model, "-m", "same words", "--max-tokens", "5", "--json", "--no-server")
        assert via_server[0] == in_process[0] == 0, via_server[2] + in_process[2]
        a, b = json.loads(via_server[1]), json.loads(in_process[1])
        assert a.keys() == b.keys() and a["reply"] == b["reply"] and a["agent"] == "s1"
        piped = _chat("-a", "s3", "--model", model, "--max-tokens", "5", input="same words\n")
        assert piped[0] == 0 and piped[1] == a["reply"] + "\n"
        code, _, err = _chat("-a", "s4", "--model", model, "-m", "same words", "--max-tokens", "5", "-v")
        assert code == 0 and "cut off at the token limit (5 tokens; --max-tokens raises it)" in err and " · context " in err
        room = _chat("-a", "r1", "-a", "r2", "--model", model, "--all", "--max-tokens", "3", "-m", "hi")
        assert room[0] == 0 and room[1].index("[r1]\n") < room[1].index("[r2]\n")
        with AgentLock("s1"):
            code, _, err = _chat("-a", "s1", "-m", "again")
            assert code == EXIT_BUSY and "busy" in err and len(err.splitlines()) == 1
        code, _, err = _chat("-a", "Bad Name", "-m", "x")
        assert code == EXIT_USAGE
        code, _, err = _chat("-a", "s9", "--model", "/nonexistent", "-m", "x")  # another model: in-process, same error
        assert code == EXIT_NOT_FOUND and "unknown model" in err
        _, log = server.stop()
    assert log.count("POST /semantic/v1/turns 200") == 4  # s1, s3, s4 and the room; s2 ran in-process


def test_a_client_of_another_wire_version_is_told_and_runs_the_turn_in_process(tiny, home):
    """A server left running across an upgrade: the CLI says so in one line and runs the
    turn itself; the server writes nothing for it."""
    import subprocess
    import sys

    model = str(tiny["llama"])
    older_client = (
        "import sys\nimport semantic_cli.server.wire as wire\nwire.WIRE_VERSION -= 1\n"
        "from semantic_cli.cli.app import main\nmain(sys.argv[1:])\n"
    )
    with Server(home, model) as server:
        argv = ["chat", "-a", "old", "--model", model, "-m", "hello", "--max-tokens", "3", "--json"]
        r = subprocess.run([sys.executable, "-c", older_client, *argv], capture_output=True, timeout=120)
        err = r.stderr.decode()
        assert r.returncode == 0, err
        assert json.loads(r.stdout)["agent"] == "old"
        told = [line for line in err.splitlines() if "another release" in line]
        assert len(told) == 1 and "restart it" in told[0] and "in-process" in told[0], err
        assert [(role, status) for role, _, status in _messages("old")] == [("user", "complete"), ("assistant", "complete")]
        code, _, err = _chat("-a", "old", "-m", "again", "--max-tokens", "2")  # this release's client: through the server
        assert code == 0 and "another release" not in err
        _, log = server.stop()
    assert log.count("POST /semantic/v1/turns 409") == 1 and log.count("POST /semantic/v1/turns 200") == 1, log


def test_a_server_from_before_the_wire_version_answer_is_recognised_by_its_refusal():
    """A wire-1 server (before it answered 409 wire_version) refused another version with a
    usage error in its own words: the CLI runs the turn in-process and says why."""
    from semantic_cli.server import client, wire

    old_servers_answer = {
        "event": "error",
        "kind": "error",
        "message": "this server speaks wire version 1; upgrade the client or the server",
        "exit_code": 2,
        "names": [],
    }
    with pytest.raises(client.Unavailable) as raised:
        client._raise(old_servers_answer)
    said = str(raised.value)
    assert raised.value.tell and f"older release (wire version 1, this client's {wire.WIRE_VERSION})" in said and "restart it" in said


def test_a_client_that_disconnects_mid_stream_stops_its_own_turn_only(tiny, home):
    model = str(tiny["llama"])
    for name in ("long", "other"):
        assert _chat("-a", name, "--model", model, "-m", "start", "--max-tokens", "2", "--no-server")[0] == 0
    with Server(home, model) as server:
        client = openai_client(server)
        other: dict = {}

        def run_other() -> None:
            other["r"] = client.chat.completions.create(model="other", messages=[{"role": "user", "content": "go"}], max_tokens=300)

        stream = client.chat.completions.create(model="long", messages=[{"role": "user", "content": "go"}], max_tokens=3000, stream=True)
        got = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
            if len(got) == 5:
                thread = threading.Thread(target=run_other)
                thread.start()
            if len(got) == 20:
                break
        stream.close()
        thread.join(120)
        assert other["r"].choices[0].finish_reason == "length" and other["r"].usage.completion_tokens == 300
        deadline = time.monotonic() + 30
        while len(_messages("long")) < 4:
            assert time.monotonic() < deadline, "the interrupted turn was never recorded"
            time.sleep(0.1)
    role, text, status = _messages("long")[-1]
    assert role == "assistant" and status == "interrupted"
    assert text.startswith("".join(got)) and len(text) < 3000  # stopped soon after the client left, not at max_tokens


def test_sigterm_ends_running_turns_and_exits_0_within_10_s(tiny, home):
    model = str(tiny["llama"])
    assert _chat("-a", "t", "--model", model, "-m", "start", "--max-tokens", "2", "--no-server")[0] == 0
    server = Server(home, model).start()
    try:
        stream = openai_client(server).chat.completions.create(
            model="t", messages=[{"role": "user", "content": "go"}], max_tokens=4000, stream=True
        )
        chunks = iter(stream)
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        code = server.proc.wait(15)  # type: ignore[union-attr]
        took = time.monotonic() - started
    finally:
        server.__exit__()
    assert code == 0 and took < 10
    assert reasons == ["interrupted"]  # 4000 tokens take longer than the 5 s grace: the client is told
    last = _messages("t")[-1]
    assert last[0] == "assistant" and last[2] == "interrupted"
    assert not (home / "runtime" / "server.json").exists()


def test_server_killed_mid_turn_is_its_own_exit_code_and_no_completed_turn_is_lost(tiny, home):
    model = str(tiny["llama"])
    server = Server(home, model).start()
    try:
        assert _chat("-a", "k", "--model", model, "-m", "kept", "--max-tokens", "3")[0] == 0
        import subprocess

        from conftest import SEMANTIC

        proc = subprocess.Popen(
            [SEMANTIC, "chat", "-a", "k", "-m", "long one", "--max-tokens", "4000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        first = proc.stdout.read(1)  # type: ignore[union-attr]
        assert first
        server.stop(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        server.__exit__()
    assert proc.returncode == EXIT_SERVER and "stopped answering" in err.decode() and len(err.decode().strip().splitlines()) == 1
    assert [c for r, c, _ in _messages("k") if r == "user"][0] == "kept"
    code, _, err2 = _chat("-a", "k", "-m", "after", "--max-tokens", "2")  # the dead server's file is ignored: in-process
    assert code == 0, err2


def test_a_long_history_hits_the_cache_after_a_restart(tiny, home):
    model = str(tiny["llama"])
    env = {"SEMANTIC_BLOCK_TOKENS": "16"}
    history = [{"role": "user", "content": " ".join(f"word{i}" for i in range(200))}]
    with Server(home, model, env=env) as server:
        cold = openai_client(server).chat.completions.create(model="llama", messages=history, max_tokens=3)
        assert server.stop()[0] == 0  # a restart: SIGTERM writes the caches of the turns that ended
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    with Server(home, model, env=env) as server:
        warm = openai_client(server).chat.completions.create(model="llama", messages=history, max_tokens=3, user="someone-else")
    assert warm.usage.prompt_tokens_details.cached_tokens >= cold.usage.prompt_tokens - 16  # every full block, found by content
    assert warm.choices[0].message.content == cold.choices[0].message.content


def test_saturated_server_answers_503(tiny, home):
    model = str(tiny["llama"])
    assert _chat("-a", "q", "--model", model, "-m", "start", "--max-tokens", "2", "--no-server")[0] == 0
    with Server(home, model, "--max-queue", "1") as server:
        client = openai_client(server)
        stream = client.chat.completions.create(model="q", messages=[{"role": "user", "content": "go"}], max_tokens=3000, stream=True)
        next(iter(stream))
        waiting = threading.Thread(
            target=lambda: client.chat.completions.create(model="q", messages=[{"role": "user", "content": "x"}], max_tokens=2)
        )
        waiting.start()  # waits for q: the one place in the queue
        time.sleep(1.0)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="q", messages=[{"role": "user", "content": "y"}], max_tokens=2)
        assert caught.value.status_code == 503
        stream.close()
        waiting.join(120)


def test_stop_sequences_cut_the_reply_and_the_transcript_keeps_the_cut_text(tiny, home):
    model = str(tiny["llama"])
    with Server(home, model) as server:
        client = openai_client(server)
        go = [{"role": "user", "content": "go on"}]
        pieces = [
            c.choices[0].delta.content
            for c in client.chat.completions.create(model="llama", messages=go, max_tokens=40, stream=True)
            if c.choices and c.choices[0].delta.content
        ]
        text = "".join(pieces)
        # A stop sequence across a token boundary: the last character of one piece and the first of the next.
        k = next(
            i
            for i in range(3, len(pieces) - 1)
            if pieces[i] and pieces[i + 1] and pieces[i][-1] + pieces[i + 1][0] not in text[: len("".join(pieces[:i])) + len(pieces[i]) - 1]
        )
        stop = pieces[k][-1] + pieces[k + 1][0]
        want = text[: text.index(stop)]
        cut = client.chat.completions.create(model="llama", messages=go, max_tokens=40, stop=[stop])
        assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == want
        streamed = list(client.chat.completions.create(model="llama", messages=go, max_tokens=40, stop=stop, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want  # nothing of the stop leaks
        assert [c.choices[0].finish_reason for c in streamed if c.choices and c.choices[0].finish_reason] == ["stop"]
        # In agent mode the transcript keeps exactly what the client received, so its next resend matches.
        assert run_cli("agents", "new", "fresh", "--model", model).returncode == 0  # no history: the same prompt as above
        agent = client.chat.completions.create(model="fresh", messages=go, max_tokens=40, stop=[stop])
        assert agent.choices[0].finish_reason == "stop" and agent.choices[0].message.content == want
        assert _messages("fresh")[-1][1] == want
        history = go + [{"role": "assistant", "content": want}]
        again = client.chat.completions.create(model="fresh", messages=history + [{"role": "user", "content": "more"}], max_tokens=3)
        assert again.choices[0].finish_reason == "length"  # the next turn re-renders the transcript and goes on
        assert httpx.post(server.info["url"] + "/semantic/v1/turns", json={}).status_code == 403  # the CLI's route: socket only


def test_a_named_slot_keeps_its_cache_between_requests_and_leaves_no_files(tiny, home):
    model = str(tiny["llama"])
    with Server(home, model) as server:
        client = openai_client(server)
        msgs = [{"role": "user", "content": "first question"}]
        first = client.chat.completions.create(model="llama", messages=msgs, max_tokens=4, extra_body={"prompt_cache_key": "bob"})
        msgs += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "second"}]
        second = client.chat.completions.create(model="llama", messages=msgs, max_tokens=4, extra_body={"prompt_cache_key": "bob"})
        assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
        other = client.chat.completions.create(model="llama", messages=msgs, max_tokens=4, extra_body={"prompt_cache_key": "eve"})
        assert other.usage.prompt_tokens_details.cached_tokens == 0  # another slot: nothing of bob's in memory, no full block
    assert not list((home / "cache").rglob(".tmp-*"))
    assert "(API slot)" in run_cli("cache", "ls").stdout.decode()


def test_a_client_that_gives_up_on_a_plain_request_stops_its_turn(tiny, home):
    model = str(tiny["llama"])
    assert _chat("-a", "gu", "--model", model, "-m", "start", "--max-tokens", "2", "--no-server")[0] == 0
    with Server(home, model) as server:
        impatient = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=1.5)
        with pytest.raises(openai.APITimeoutError):
            impatient.chat.completions.create(model="gu", messages=[{"role": "user", "content": "go"}], max_tokens=4000)
        deadline = time.monotonic() + 30
        while len(_messages("gu")) < 4:
            assert time.monotonic() < deadline, "the abandoned turn was never recorded"
            time.sleep(0.1)
        assert _messages("gu")[-1][2] == "interrupted"
        other = _chat("-a", "gu2", "--model", "/nonexistent", "-m", "x")  # the CLI: another model runs in-process
        assert other[0] == EXIT_NOT_FOUND
        assert _chat("-a", "dflt", "-m", "x", "--max-tokens", "1", "--no-server")[0] == 0
        with pytest.raises(openai.BadRequestError) as caught:  # an agent on another model than the server's
            openai_client(server).chat.completions.create(model="dflt", messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert caught.value.code == "model_not_served"
    with Server(home, model, "--max-tokens", "8") as capped:  # the API's cap is not the CLI's
        with pytest.raises(openai.BadRequestError):
            openai_client(capped).chat.completions.create(model="gu", messages=[{"role": "user", "content": "x"}], max_tokens=40)
        code, out, err = _chat("-a", "big", "--model", model, "-m", "x", "--max-tokens", "40", "--json")
        assert code == 0 and json.loads(out)["generated_tokens"] == 40, err
        assert "/semantic/v1/turns 200" in capped.stop()[1]  # the server ran it


def test_the_repl_sends_its_turns_to_the_server_and_holds_no_agent_between_them(tiny, home):
    from test_repl import Term

    model = str(tiny["llama"])
    with Server(home, model) as server:
        t = Term("-a", "rp", "--model", model, "--max-tokens", "4", "--no-markdown", "--system", "be terse")
        try:
            t.prompt("rp")
            t.say("first", agent="rp")
            assert _messages("rp")[0] == ("user", "first", "complete")  # created by the server, with its persona
            code, _, err = _chat("-a", "rp", "-m", "from elsewhere", "--max-tokens", "2")  # the idle REPL blocks nobody
            assert code == 0, err
            t.send("/system be brief")
            t.expect("persona set")
            t.say("second", agent="rp")
            t.send("/quit")
            assert t.exit_code() == 0
        finally:
            t.close()
        _, log = server.stop()
    assert log.count("POST /semantic/v1/turns 200") == 3
    assert [c for r, c, _ in _messages("rp") if r == "user"] == ["first", "from elsewhere", "second"]
    store = Store()
    try:
        assert store.get_agent("rp").system == "be brief"
    finally:
        store.close()


def _raw(server: Server, request: bytes, then_close: bool = False, timeout: float = 20) -> bytes:
    """Send bytes as they are over TCP; the server's answer (b"" if it sent none before we hung up)."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(server.info["url"])
    with socket.create_connection((where.hostname, where.port), timeout=timeout) as conn:
        conn.sendall(request)
        if then_close:
            return b""
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_limits_hold_without_asking_and_every_refusal_is_openai_shaped(tiny, home):
    """--max-tokens caps a request that names no max_tokens; a body sent too slowly gets 408
    and one cut off leaves no traceback; unknown routes, wrong methods and trailing slashes
    answer in OpenAI's error shape (never a redirect built from the Host header); the CLI's
    own route refuses malformed fields; a temperature too small to divide by is greedy."""
    model = str(tiny["llama"])
    with Server(home, model, "--max-tokens", "3", "--body-timeout", "1") as server:
        client = openai_client(server)
        msgs = [{"role": "user", "content": "hi"}]
        capped = client.chat.completions.create(model="llama", messages=msgs)
        assert capped.usage.completion_tokens == 3 and capped.choices[0].finish_reason == "length"
        greedy = client.chat.completions.create(model="llama", messages=msgs, temperature=0)
        tiny_temp = client.chat.completions.create(model="llama", messages=msgs, temperature=1e-300, seed=1)
        assert tiny_temp.choices[0].message.content == greedy.choices[0].message.content

        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
        started = time.monotonic()
        slow = _raw(server, head + b'{"a":')
        assert slow.startswith(b"HTTP/1.1 408") and b'"error"' in slow and time.monotonic() - started < 15, slow[:200]
        _raw(server, head + b'{"a":', then_close=True)  # the client hangs up mid-body
        time.sleep(0.5)

        for method, path, status in (("GET", "/v1/completions", 404), ("GET", "/v1/chat/completions", 405), ("DELETE", "/v1/models", 405)):
            r = httpx.request(method, server.info["url"] + path)
            assert r.status_code == status and r.json()["error"]["message"], (method, path, r.text)
        assert "POST" in httpx.get(server.url + "/chat/completions").headers["allow"]
        slash = httpx.post(server.url + "/chat/completions/", json={"model": "llama", "messages": msgs}, headers={"host": "evil.example"})
        assert slash.status_code in (403, 404) and "location" not in slash.headers, slash.text
        slash = httpx.post(server.url + "/chat/completions/", json={"model": "llama", "messages": msgs})
        assert slash.status_code == 404 and slash.json()["error"], slash.text

        with httpx.Client(transport=httpx.HTTPTransport(uds=server.socket)) as own:
            shapes = ({"settings": [1]}, {"settings": []}, {"settings": 0}, {"targets": {"zz": "hi"}}, {"targets": [["zz", 5]]})
            for bad in ({"targets": [["zz", "hi"]], **shape} for shape in shapes):
                r = own.post("http://semantic/semantic/v1/turns", json={"wire": 2, **bad})
                assert r.status_code == 400 and r.json()["error"]["message"], (bad, r.text)
        assert [a["name"] for a in json.loads(run_cli("agents", "ls", "--json").stdout)] == []
        code, log = server.stop()
    assert code == 0 and "Traceback" not in log, log[-3000:]
    r = run_cli("serve", "--model", model, "--port", "0", "--api-key", "  ", timeout=60)
    assert r.returncode == EXIT_USAGE and len(r.stderr.splitlines()) == 1 and b"--api-key" in r.stderr, r.stderr


def _hook(tmp_path, code: str) -> dict[str, str]:
    """The env for a server process that imports `code` first (a sitecustomize on PYTHONPATH):
    a test-only change to the real objects inside the real server."""
    import os
    import textwrap

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(code))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}


CHMOD_WITNESS = """
    import os, stat

    _real = os.chmod


    def chmod(path, mode, *args, **kwargs):
        st = os.stat(path)
        if stat.S_ISSOCK(st.st_mode):  # what the socket's mode was between bind and this chmod
            with open(os.environ["SOCKET_MODE_BEFORE_CHMOD"], "a") as f:
                f.write(oct(stat.S_IMODE(st.st_mode)) + "\\n")
        return _real(path, mode, *args, **kwargs)


    os.chmod = chmod
"""


def test_the_unix_socket_is_0600_from_the_moment_it_exists(tiny, home, tmp_path):
    """Others on the machine can never connect: the socket is 0600 once listening, and it is
    created so (the umask at bind), not made so a moment later by chmod."""
    import os
    import stat

    witness = tmp_path / "mode-before-chmod"
    env = {**_hook(tmp_path, CHMOD_WITNESS), "SOCKET_MODE_BEFORE_CHMOD": str(witness)}
    old = os.umask(0o022)  # the usual umask: a socket bound under it would be 0755
    try:
        with Server(home, tiny["llama"], env=env) as server:
            st = os.stat(server.socket)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
            assert st.st_uid == os.geteuid()
            assert socket_client(server).models.list().data  # and it is the one the server listens on
    finally:
        os.umask(old)
    assert witness.read_text().split() == ["0o600"], witness.read_text()  # never more open, even before the chmod


def test_socket_path_that_is_a_regular_file_is_refused_and_left_alone(tiny, home, tmp_path):
    from semantic_cli.errors import EXIT_UNSAFE

    path = tmp_path / "notes.txt"
    path.write_bytes(b"my notes\n")
    r = run_cli("serve", "--model", str(tiny["llama"]), "--port", "0", "--socket", str(path), timeout=60)
    assert r.returncode == EXIT_UNSAFE, (r.returncode, r.stderr)
    assert len(r.stderr.splitlines()) == 1 and b"is not a socket of yours" in r.stderr, r.stderr
    assert path.read_bytes() == b"my notes\n" and path.is_file()
    assert not (home / "runtime" / "server.json").exists()


def test_a_host_off_loopback_without_an_api_key_is_refused_in_one_line(tiny, home):
    """A hostname is never taken for loopback (only `localhost` is): even this machine's own
    name, which may resolve to 127.0.0.1, is refused without a key, as is a LAN address."""
    import socket

    for host in ("192.0.2.1", "lan-box.example", socket.gethostname()):
        if host == "localhost":
            continue
        r = run_cli("serve", "--model", str(tiny["llama"]), "--port", "0", "--host", host, timeout=60)
        assert r.returncode == EXIT_USAGE, (host, r.returncode, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and f"refusing to listen on {host} without an API key".encode() in r.stderr, r.stderr


def test_an_api_key_is_compared_stripped_on_both_sides(tiny, home):
    """A key given with spaces around it (a shell quirk, a trailing newline in a file) is the
    key without them, as the client's is: it was 401 for every request."""
    with Server(home, tiny["llama"], "--api-key", " s3cret\n") as server:
        done = openai_client(server, api_key="s3cret").chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert done.choices[0].finish_reason == "length"


def test_a_host_that_is_no_address_here_is_a_usage_error_before_the_model_loads(tiny, home):
    """With a key, a --host that does not resolve, or is not this machine's, is exit 2 in one
    line (it was "busy, pass another --port", exit 4, after the model had loaded)."""
    for host, needle in (("not a host", b"can resolve"), ("192.0.2.1", b"an address of this machine")):
        # A model that does not exist: the host is refused first, or this would be exit 3.
        r = run_cli("serve", "--model", "/nonexistent/model", "--port", "0", "--api-key", "k", "--host", host, timeout=60)
        assert r.returncode == EXIT_USAGE and len(r.stderr.splitlines()) == 1 and needle in r.stderr, (host, r.stderr)


def test_a_chunked_body_over_max_body_is_413(tiny, home):
    """No Content-Length to refuse it by: the body is counted as it arrives."""
    with Server(home, tiny["llama"], "--max-body", "2048") as server:
        body = json.dumps({"model": "llama", "messages": [{"role": "user", "content": "x" * 4000}], "max_tokens": 2}).encode()

        def chunked():
            for i in range(0, len(body), 512):
                yield body[i : i + 512]

        r = httpx.post(server.url + "/chat/completions", content=chunked(), headers={"content-type": "application/json"}, timeout=60)
        assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
        assert r.status_code == 413 and r.json()["error"]["message"], r.text
        small = json.dumps({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
        ok = httpx.post(
            server.url + "/chat/completions",
            content=iter([small[:10], small[10:]]),
            headers={"content-type": "application/json"},
            timeout=60,
        )
        assert ok.status_code == 200, ok.text  # a chunked body under the limit is read whole


ENGINE_FAILS_ONCE = """
    from semantic_cli import engine

    _real = engine.Batch.step
    _steps = []


    def step(self):
        # The 6th step that runs agent "doomed" fails inside the generator, once.
        if "doomed" in self.live and self._gen is not None:
            _steps.append(1)
            if len(_steps) == 6:
                def boom(*args, **kwargs):
                    raise RuntimeError("injected engine failure")

                self._gen.next = boom
        return _real(self)


    engine.Batch.step = step
"""


def test_an_engine_failure_mid_turn_is_an_error_an_interrupted_turn_and_the_server_goes_on(tiny, home, tmp_path):
    model = str(tiny["llama"])
    assert _chat("-a", "doomed", "--model", model, "-m", "start", "--max-tokens", "2", "--no-server")[0] == 0
    with Server(home, model, env=_hook(tmp_path, ENGINE_FAILS_ONCE)) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=45)
        msgs = [{"role": "user", "content": "go"}]
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="doomed", messages=msgs, max_tokens=300)
        assert "the engine failed" in caught.value.message and "injected engine failure" in caught.value.message
        role, text, status = _messages("doomed")[-1]
        assert (role, status) == ("assistant", "interrupted") and len(_messages("doomed")) == 4
        # The server goes on: a stateless request and the same agent again, on a new batch.
        fresh = client.chat.completions.create(model="llama", messages=msgs, max_tokens=5)
        assert fresh.choices[0].finish_reason == "length" and fresh.usage.completion_tokens == 5
        again = client.chat.completions.create(model="doomed", messages=[{"role": "user", "content": "again"}], max_tokens=5)
        assert again.choices[0].finish_reason == "length"
        assert [(r, s) for r, _, s in _messages("doomed")][-2:] == [("user", "complete"), ("assistant", "complete")]
        code, log = server.stop()
    assert code == 0 and "Traceback" not in log, log[-3000:]


def test_stateless_requests_on_different_slots_run_at_the_same_time(tiny, home):
    """Requests naming no slot take different ones: the second's first chunk arrives while
    the first is still generating (4000 tokens, seconds here), instead of after it."""
    with Server(home, tiny["llama"]) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
        first = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "one"}], max_tokens=4000, stream=True)
        second_started = threading.Event()
        got: dict = {}

        def second() -> None:
            stream = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "two"}], max_tokens=5, stream=True)
            for c in stream:
                if c.choices and c.choices[0].delta.content:
                    second_started.set()
                if c.choices and c.choices[0].finish_reason:
                    got["reason"] = c.choices[0].finish_reason

        thread = None
        first_reasons = []
        for c in first:
            if not (c.choices and (c.choices[0].delta.content or c.choices[0].finish_reason)):
                continue
            if c.choices[0].finish_reason:
                first_reasons.append(c.choices[0].finish_reason)
                break
            if thread is None:  # the first is generating: send the second
                thread = threading.Thread(target=second)
                thread.start()
            elif second_started.is_set():
                break  # the second streams while the first goes on
        first.close()
        assert thread is not None
        thread.join(60)
        assert first_reasons == [], "the second request waited for the first to finish"
        assert second_started.is_set() and got.get("reason") == "length", got
