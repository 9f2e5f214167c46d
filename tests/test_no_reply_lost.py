"""No reply is lost (issue 18, item 5): whatever fails after generation, every agent's
finished reply in a room is recorded; replies still in flight when a run stops are
recorded as interrupted; a failure while caching costs only the cache and a warning;
a failed transcript write costs only that agent's reply, and is reported once the
others are safe. And the REPL survives an unexpected error.

Failures are injected into the real objects, in process, for ONE agent ("a") of a
three-agent room on a tiny model. "a" asks for fewer tokens than "b" and "c", so it
finishes first while the other two are still generating.
"""

from __future__ import annotations

import errno
import io
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_repl import FOOTER, Term, rows

from semantic_cli.chat import Chat, GenSettings, TurnNotSaved, TurnRecorded
from semantic_cli.errors import SemanticError
from semantic_cli.events import TokenEvent, TurnDone
from semantic_cli.kv import blockfile
from semantic_cli.store import Store

ROOM = {"a": ("first question", 3), "b": ("second question", 14), "c": ("third question", 14)}


class Room:
    """One 'process': a store, a chat, and the events of the last run."""

    def __init__(self, model: Path) -> None:
        self.store = Store()
        self.chat = Chat(self.store)
        self.model = str(model)
        self.recorded: dict[str, TurnRecorded] = {}
        self.streamed: dict[str, str] = {}

    def run(self, turns: dict[str, tuple[str, int]] = ROOM, stop_after_done: str | None = None) -> None:
        """Run the room's turns; with `stop_after_done`, close the run (as Ctrl-C does) as
        soon as that agent's TurnDone arrives."""
        pendings = [
            self.chat.prepare(self.chat.open_agent(n, self.model), text, GenSettings(max_tokens=mt)) for n, (text, mt) in turns.items()
        ]
        self.recorded, self.streamed = {}, {n: "" for n in turns}
        events = self.chat.run(pendings)
        try:
            for ev in events:
                if isinstance(ev, TokenEvent):
                    self.streamed[ev.key] += ev.text
                elif isinstance(ev, TurnRecorded):
                    self.recorded[ev.key] = ev
                elif isinstance(ev, TurnDone) and ev.key == stop_after_done:
                    events.close()
                    return
        finally:
            events.close()

    def messages(self, name: str) -> list[tuple[str, str, str]]:
        return [(m.role, m.status, m.content) for m in self.store.messages(name)] if self.store.find_agent(name) else []

    def close(self) -> None:
        self.chat.close()
        self.store.close()


@pytest.fixture
def room(tiny, home) -> Iterator[Room]:
    r = Room(tiny["llama"])
    yield r
    r.close()


def assert_complete(room: Room, name: str) -> None:
    """The agent's transcript holds its turn, whole: the question and the complete reply."""
    question = ROOM[name][0]
    assert room.messages(name) == [("user", "complete", question), ("assistant", "complete", room.streamed[name])]
    assert room.store.messages(name)[-1].meta["generated_tokens"] == ROOM[name][1]


def assert_interrupted(room: Room, name: str) -> None:
    """The agent's transcript holds the question and the reply as far as it streamed, marked interrupted."""
    [user, reply] = room.messages(name)
    assert user == ("user", "complete", ROOM[name][0])
    assert reply[:2] == ("assistant", "interrupted") and reply[2] == room.streamed[name]
    n = room.store.messages(name)[-1].meta["generated_tokens"]
    assert 0 < n < ROOM[name][1]


def for_a(method: Any, exc: BaseException) -> Any:
    """`method`, except that it raises `exc` when called for agent "a"."""

    def wrapper(agent: str, *args: Any, **kwargs: Any) -> Any:
        if agent == "a":
            raise exc
        return method(agent, *args, **kwargs)

    return wrapper


# ---- a failure while caching costs only the cache ------------------------------
@pytest.mark.parametrize(
    "exc",
    [
        MemoryError(),
        ValueError("cache covers 40 tokens, log has 41"),
        RuntimeError("a bug"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["MemoryError", "ValueError", "RuntimeError", "OSError"],
)
def test_a_failing_persist_costs_only_the_cache(room, monkeypatch, exc):
    monkeypatch.setattr(room.chat.kv, "persist", for_a(room.chat.kv.persist, exc))
    room.run()
    for name in "abc":
        assert_complete(room, name)
    assert room.recorded["a"].persisted is None and room.recorded["b"].persisted is not None
    [warning] = room.recorded["a"].warnings
    assert warning.startswith("KV cache not saved (") and "the conversation is saved" in warning and "\n" not in warning
    assert room.recorded["b"].warnings == room.recorded["c"].warnings == []
    assert "a" not in room.chat.kv.hot_agents() and {"b", "c"} <= set(room.chat.kv.hot_agents())
    room.run({"a": ("and then?", 3)})  # the agent goes on: its next turn re-reads the conversation
    assert [m[0] for m in room.messages("a")] == ["user", "assistant", "user", "assistant"]


@pytest.mark.parametrize(
    "exc", [RuntimeError("the tail writer broke"), OSError(errno.EIO, "Input/output error")], ids=["RuntimeError", "OSError"]
)
def test_a_failing_tail_write_costs_only_the_cache(room, monkeypatch, exc):
    monkeypatch.setattr(blockfile, "write_tail", for_a(blockfile.write_tail, exc))
    room.run()
    for name in "abc":
        assert_complete(room, name)
    assert any(w.startswith("KV cache not saved (") for w in room.recorded["a"].warnings)
    assert room.recorded["b"].persisted is not None and room.recorded["b"].persisted.bytes_written > 0


def test_a_failing_keep_hot_costs_only_the_cache(room, monkeypatch):
    monkeypatch.setattr(room.chat.kv, "keep_hot", for_a(room.chat.kv.keep_hot, MemoryError()))
    room.run()
    for name in "abc":
        assert_complete(room, name)
    assert any(w.startswith("KV cache not kept in memory (unexpected MemoryError)") for w in room.recorded["a"].warnings)
    assert room.recorded["a"].persisted is not None  # on disk all the same
    room.run({"a": ("and then?", 3)})
    assert room.recorded["a"].tier == "warm"


def test_a_failing_mark_used_costs_nothing(room, monkeypatch):
    monkeypatch.setattr(room.chat.kv, "mark_used", for_a(room.chat.kv.mark_used, RuntimeError("index broke")))
    room.run(stop_after_done="a")  # closed early: the others are interrupted, and their use marked
    assert room.messages("a")[1][:2] == ("assistant", "complete")
    assert_interrupted(room, "b")
    assert_interrupted(room, "c")


# ---- a failed transcript write costs that reply only -----------------------------
def _fail_inside_the_transaction(room: Room, monkeypatch: Any) -> None:
    """A real SQLite error in the middle of a's transaction: after its messages are inserted."""
    room.store.db.execute(
        "CREATE TEMP TRIGGER fail_a BEFORE INSERT ON token_chunks WHEN NEW.agent = 'a' BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END"
    )


def _fail_in_python(room: Room, monkeypatch: Any) -> None:
    monkeypatch.setattr(room.store, "record_turn", for_a(room.store.record_turn, MemoryError()))


@pytest.mark.parametrize("inject", [_fail_inside_the_transaction, _fail_in_python], ids=["sqlite", "MemoryError"])
def test_a_failed_transcript_write_loses_only_that_reply_and_is_reported_after(room, monkeypatch, inject):
    inject(room, monkeypatch)
    with pytest.raises(TurnNotSaved) as caught:
        room.run()
    # Raised once the others were recorded: their TurnRecorded came first, and their transcripts are whole.
    assert set(room.recorded) == {"b", "c"}
    assert_complete(room, "b")
    assert_complete(room, "c")
    assert room.messages("a") == []  # nothing half-written: the transaction rolled back
    assert list(caught.value.errors) == ["a"] and isinstance(caught.value, SemanticError)
    message = caught.value.message
    assert message.startswith("a's reply could not be saved to the transcript (") and "other agents' replies are saved" in message
    assert "\n" not in message
    assert not room.store.db.in_transaction
    room.store.db.execute("DROP TRIGGER IF EXISTS fail_a")
    monkeypatch.undo()
    room.run({"a": ("once more", 3)})  # the agent goes on from what its transcript holds
    assert room.messages("a") == [("user", "complete", "once more"), ("assistant", "complete", room.recorded["a"].done.text)]


# ---- a run that stops records what is in flight as interrupted --------------------
def _engine_fails_after(room: Room, monkeypatch: Any, after_done: str, tokens: int, exc: BaseException) -> None:
    """The engine raises `exc` `tokens` tokens after agent `after_done` finished."""
    engine = room.chat.engine_for(room.chat.open_agent("a", room.model))
    real = engine.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        events = real(*args, **kwargs)
        seen = None
        try:
            for ev in events:
                yield ev
                if isinstance(ev, TurnDone) and ev.key == after_done:
                    seen = 0
                elif isinstance(ev, TokenEvent) and seen is not None:
                    seen += 1
                    if seen == tokens:
                        raise exc
        finally:
            events.close()

    monkeypatch.setattr(engine, "generate", generate)


def test_an_engine_error_records_finished_replies_whole_and_the_others_interrupted(room, monkeypatch):
    _engine_fails_after(room, monkeypatch, "a", 6, RuntimeError("Metal ran out of memory"))
    with pytest.raises(RuntimeError, match="Metal ran out of memory"):
        room.run()
    assert_complete(room, "a")
    assert_interrupted(room, "b")
    assert_interrupted(room, "c")


def test_one_failed_record_while_stopping_does_not_cost_the_others(room, monkeypatch):
    room.store.db.execute(
        "CREATE TEMP TRIGGER fail_b BEFORE INSERT ON token_chunks WHEN NEW.agent = 'b' BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END"
    )
    _engine_fails_after(room, monkeypatch, "a", 6, RuntimeError("engine failure"))
    with pytest.raises(RuntimeError, match="engine failure") as caught:
        room.run()
    assert_complete(room, "a")
    assert room.messages("b") == []
    assert_interrupted(room, "c")
    assert any("b's reply could not be saved" in note for note in getattr(caught.value, "__notes__", []))


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit], ids=["KeyboardInterrupt", "SystemExit"])
def test_ctrl_c_while_caching_still_stops_and_records_the_others_as_interrupted(room, monkeypatch, exc):
    """KeyboardInterrupt and SystemExit are not cache failures: they stop the run, and the
    replies in flight are recorded as interrupted first."""
    monkeypatch.setattr(room.chat.kv, "persist", for_a(room.chat.kv.persist, exc()))
    with pytest.raises(exc):
        room.run()
    assert_complete(room, "a")
    assert_interrupted(room, "b")
    assert_interrupted(room, "c")


def test_a_run_closed_right_after_a_reply_finished_records_it_complete(room):
    room.run(stop_after_done="a")  # a's TurnDone came, its TurnRecorded never will
    [user, reply] = room.messages("a")
    assert reply[:2] == ("assistant", "complete") and reply[2] == room.streamed["a"]
    assert room.store.messages("a")[-1].meta["generated_tokens"] == ROOM["a"][1]
    assert_interrupted(room, "b")
    assert_interrupted(room, "c")


# ---- the REPL survives ------------------------------------------------------------
SITECUSTOMIZE = textwrap.dedent(
    '''
    """Test-only: the first generation of this process fails after 5 tokens."""
    from semantic_cli import engine

    _real = engine.Engine.generate
    _calls = []


    def generate(self, requests, seed=None, **kwargs):
        _calls.append(1)
        events = _real(self, requests, seed=seed, **kwargs)
        if len(_calls) > 1:
            yield from events
            return
        n = 0
        try:
            for ev in events:
                yield ev
                if isinstance(ev, engine.TokenEvent):
                    n += 1
                    if n == 5:
                        raise RuntimeError("injected engine failure")
        finally:
            events.close()


    engine.Engine.generate = generate
    '''
)


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "SEMANTIC_DEBUG"])
def test_the_repl_survives_an_unexpected_error_and_the_next_message_works(tiny, home, tmp_path, monkeypatch, debug):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    if debug:
        monkeypatch.setenv("SEMANTIC_DEBUG", "1")
    t = Term("--model", str(tiny["llama"]), "-a", "a", "-a", "b", "--max-tokens", "12", "--no-markdown")
    try:
        t.prompt("a")
        start = t.mark
        t.send("@all hello")
        t.expect(r"error: unexpected RuntimeError: injected engine failure")
        shown = t.text[start:]
        if debug:
            assert "Traceback (most recent call last)" in shown
        else:
            assert "Traceback" not in shown
            t.expect(r"\(rerun with SEMANTIC_DEBUG=1 for a traceback")
        assert "interrupted after" in shown  # the panels say their replies were kept, interrupted
        t.prompt("a")
        for name in "ab":  # what was in flight is kept, marked interrupted
            assert [r["status"] for r in rows(home, name)] == ["complete", "interrupted"]
        t.send("@all and now?")
        t.expect(FOOTER)
        t.expect(FOOTER)
        t.prompt("a")
        for name in "ab":
            assert [r["status"] for r in rows(home, name)] == ["complete", "interrupted", "complete", "complete"]
        t.child.sendeof()
        assert t.exit_code() == 0
    finally:
        t.close()


def test_the_repl_reports_a_reply_it_could_not_save_and_goes_on(monkeypatch):
    """In process: the loop turns any Exception from a turn into one line and reads on."""
    from semantic_cli.cli import repl as repl_mod

    lines: list[str] = []
    said = iter(["first", "second", "third"])
    calls: list[str] = []

    def send(text: str) -> None:
        calls.append(text)
        if text == "first":
            raise TurnNotSaved({"a": OSError(errno.ENOSPC, "No space left on device")}, others=False)
        if text == "second":
            raise ValueError("something nobody expected\nsecond line")

    def read() -> str:
        try:
            return next(said)
        except StopIteration:
            raise EOFError from None

    fake = SimpleNamespace(
        agents={"a": SimpleNamespace(model="m")},
        current="a",
        room=False,
        agent=lambda: SimpleNamespace(model="m"),
        read=read,
        send=send,
        err=SimpleNamespace(print=lambda text, **kw: lines.append(text), file=SimpleNamespace(write=lines.append, flush=lambda: None)),
    )
    fake.error = lambda message: repl_mod.Repl.error(fake, message)  # type: ignore[arg-type]
    fake.unexpected = lambda exc: repl_mod.Repl.unexpected(fake, exc)  # type: ignore[arg-type]
    monkeypatch.delenv("SEMANTIC_DEBUG", raising=False)
    repl_mod.Repl.run(fake)  # type: ignore[arg-type]
    assert calls == ["first", "second", "third"]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors[0].startswith("error: a's reply could not be saved to the transcript (OSError: [Errno 28] No space left on device)")
    assert errors[1] == (
        "error: unexpected ValueError: something nobody expected (rerun with SEMANTIC_DEBUG=1 for a traceback and please report it)"
    )
    assert len(errors) == 2


def test_one_shot_prints_the_saved_replies_in_room_order_then_the_error(room, monkeypatch):
    """`semantic chat -a a -a b -a c --all` without a terminal, a's transcript write failing:
    b's and c's replies are printed (in room order, a left out), then the error is raised."""
    from semantic_cli.cli.chat import one_shot

    _fail_inside_the_transaction(room, monkeypatch)
    targets = [(room.chat.open_agent(n, room.model), ROOM[n][0]) for n in "abc"]
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    with pytest.raises(TurnNotSaved, match="a's reply could not be saved"):
        one_shot(room.chat, targets, GenSettings(max_tokens=5), json_out=False, verbose=False)
    replies = {n: room.store.messages(n)[-1].content for n in "bc"}
    assert room.messages("a") == []
    assert out.getvalue() == f"[b]\n{replies['b']}\n\n[c]\n{replies['c']}\n\n"


def test_after_a_step_fails_the_engine_starts_afresh_and_the_next_turn_works(room):
    """A failure inside a generation step may leave the batch generator half-way through
    it: the engine drops it, and the next turn runs on a fresh one."""
    engine = room.chat.engine_for(room.chat.open_agent("a", room.model))
    gen = engine.generator
    real_next = gen.next
    steps = [0]

    def poisoned() -> Any:
        steps[0] += 1
        if steps[0] > 3:
            raise RuntimeError("a step failed half-way")
        return real_next()

    gen.next = poisoned  # this generator fails every step from its fourth on
    with pytest.raises(RuntimeError, match="half-way"):
        room.run()
    for name in "abc":  # each reply, complete or not, is kept
        assert [m[0] for m in room.messages(name)] == ["user", "assistant"]
    room.run({n: ("go on", 3) for n in "abc"})
    for name in "abc":
        assert [m[1] for m in room.messages(name)][-2:] == ["complete", "complete"]
