"""Ways out of a full context (fork at a turn, trim, compact) and taking a turn back (/undo,
/retry), on real stores and tiny models, in-process: the CLI through `main`, the REPL's
commands on a real `Repl`. The cache must stay honest: a cut agent's next reply is the
reply an agent with exactly the kept history gives."""

from __future__ import annotations

import contextlib
import json
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from helpers import Session, edited_copy

from semantic_cli import history, prompting, takeback
from semantic_cli.cli import slash
from semantic_cli.cli.app import main
from semantic_cli.cli.transcript import plain
from semantic_cli.errors import PromptTooLongError, SemanticError, UsageError
from semantic_cli.kv.index import KVIndex
from semantic_cli.store import Store
from semantic_cli.turn import GenSettings

LONG = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(12))
B = 32


@pytest.fixture
def blocks(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SEMANTIC_BLOCK_TOKENS", str(B))
    return home


def cli(*args: str, capsys: Any = None) -> tuple[int, str]:
    """`semantic ARGS` in this process: its exit code and stderr."""
    if capsys is not None:
        capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err if capsys is not None else ""


def state(name: str) -> tuple[list[tuple[str, str]], list[int] | None, list[str], Any]:
    """An agent's messages, token log (any tokenizer), cache chain and tail."""
    with closing(Store()) as store, closing(KVIndex()) as index:
        chunks = store.chunk_sizes(name)
        log = store.log_tokens(name, len(chunks)) if chunks else None
        return [(m.role, m.content) for m in store.messages(name)], log, index.chain(name), index.tail(name)


def three_turns(model: Path, name: str = "src") -> list[Any]:
    with Session() as s:
        return [s.say(name, LONG, model=model, system="Be brief."), s.say(name, "And then?"), s.say(name, "Why so?")]


def prompt_of(rec: Any) -> list[int]:
    return rec.done.all_tokens[: rec.done.stats.prompt_tokens]


# ---- fork --at-turn -----------------------------------------------------------
def test_fork_at_a_turn_replies_as_the_source_did_then(tiny, blocks, capsys):
    t1, t2, t3 = three_turns(tiny["llama"])
    code, err = cli("agents", "fork", "src", "early", "--at-turn", "2", capsys=capsys)
    assert code == 0 and "forked 'src' as 'early': 2 turns, sharing" in err, err
    msgs, log, chain, tail = state("early")
    assert msgs == state("src")[0][:4]
    assert log == t2.done.all_tokens  # exactly the chunks of turns 1-2
    assert tail is None and 0 < len(chain) == len(t2.done.all_tokens) // B  # only blocks of that prefix
    with Session() as s:  # a new process: nothing hot
        again = s.say("early", "Why so?")
    assert prompt_of(again) == prompt_of(t3)
    assert again.done.text == t3.done.text
    assert again.tier == "warm" and again.done.stats.cached_tokens == len(chain) * B
    assert len(state("src")[0]) == 6  # the source is untouched


def test_fork_before_the_log_starts_re_renders(tiny, blocks, capsys):
    with Session() as s:
        s.say("src", LONG, model=tiny["llama"])
        s.say("src", "And then?")
        s.store.update_agent(s.store.get_agent("src"), system="New persona.")  # drops the log
        s.chat.kv.release_agent("src")
        t3 = s.say("src", "Why so?")  # one chunk now covers turns 1-3
    code, err = cli("agents", "fork", "src", "early", "--at-turn", "2", capsys=capsys)
    assert code == 0 and "re-reads the kept turns" in err, err
    msgs, log, chain, tail = state("early")
    assert len(msgs) == 4 and log is None and tail is None
    with Session() as s:
        again = s.say("early", "Why so?")
    assert prompt_of(again) == prompt_of(t3) and again.done.text == t3.done.text


def test_fork_errors(tiny, blocks, capsys):
    three_turns(tiny["llama"])
    code, err = cli("agents", "fork", "src", "x", "--at-turn", "4", capsys=capsys)
    assert code == 2 and "between 1 and 3" in err and "x" not in [a for a in _names()]
    code, err = cli("agents", "fork", "src", "x", "--at-turn", "0", capsys=capsys)
    assert code == 2


def _names() -> list[str]:
    with closing(Store()) as store:
        return [a.name for a in store.list_agents()]


# ---- trim ---------------------------------------------------------------------
def test_trim_keeps_the_last_turns_and_replies_as_a_fresh_agent_would(tiny, blocks, capsys):
    three_turns(tiny["llama"])
    before = state("src")
    code, err = cli("agents", "trim", "src", "--keep-last", "1", "--dry-run", capsys=capsys)
    assert code == 0 and "would delete 2 turns (4 messages)" in err and state("src") == before
    code, err = cli("agents", "trim", "src", "--keep-last", "1", capsys=capsys)  # no terminal, no --yes
    assert code == 2 and "--yes" in err and state("src") == before
    code, err = cli("agents", "trim", "src", "--keep-last", "1", "--yes", capsys=capsys)
    assert code == 0 and "trimmed 2 turns" in err, err
    msgs, log, chain, tail = state("src")
    assert msgs == before[0][4:] and log is None and chain == [] and tail is None
    # A fresh agent given the same persona and the same one exchange, never cached.
    with closing(Store()) as store:
        store.create_agent("fresh", str(tiny["llama"]), "Be brief.")
        store.record_turn("fresh", [("user", msgs[0][1], "complete", {}), ("assistant", msgs[1][1], "complete", {})], "t", [], False)
    with Session() as s:
        a, b = s.say("src", "Go on."), s.say("fresh", "Go on.")
    assert prompt_of(a) == prompt_of(b) and a.done.text == b.done.text
    code, err = cli("agents", "trim", "src", "--keep-last", "5", capsys=capsys)
    assert code == 0 and "nothing to trim" in err


# ---- compact --------------------------------------------------------------------
def test_compact_summarises_older_turns_and_keeps_the_transcript(tiny, blocks, capsys):
    three_turns(tiny["llama"])
    before = state("src")[0]
    code, err = cli("agents", "compact", "src", "--keep-last", "1", "--dry-run", capsys=capsys)
    assert code == 0 and "would summarise 2 turns of 'src' and keep 1 verbatim" in err and state("src")[0] == before
    code, err = cli("agents", "compact", "src", "--keep-last", "1", "--max-tokens", "6", capsys=capsys)
    assert code == 0 and "compacted 'src': 2 turns summarised" in err, err
    msgs, log, chain, tail = state("src")
    assert msgs[:6] == before and msgs[6][0] == "summary" and msgs[6][1]  # every message kept, the summary after them
    assert log is None and chain == [] and tail is None  # the prefix changed: one re-prefill
    with closing(Store()) as store:
        agent, stored = store.get_agent("src"), store.messages("src")
    assert history.compacted(stored) == {m.id for m in stored[:4]}
    shown = plain(agent, stored)
    assert shown.count("(compacted)") == 4 and "\nsummary\n" in shown
    with Session() as s:
        rec = s.say("src", "Go on.")
        tok = s.chat.engine_for(agent).lm.tokenizer
    seen = [{"role": "system", "content": "Be brief.\n\n" + history.SUMMARY_HEADER + msgs[6][1]}]
    seen += [{"role": r, "content": c} for r, c in msgs[4:6]] + [{"role": "user", "content": "Go on."}]
    assert prompt_of(rec) == prompting.full_prompt(tok, seen)
    doc = json.loads(cli_out("agents", "show", "src", "--json", capsys=capsys))
    assert [m["compacted"] for m in doc["messages"]] == [True] * 4 + [False] * 5
    # agents ls counts every turn and says how many the summary covers: those agents show marks.
    [row] = json.loads(cli_out("agents", "ls", "--json", capsys=capsys))
    covered = sum(1 for m in doc["messages"] if m["role"] == "user" and m["compacted"])
    assert (row["turns"], row["compacted_turns"]) == (4, covered) == (4, 2)
    header, line = cli_out("agents", "ls", capsys=capsys).splitlines()
    piped = dict(zip(header.split("\t"), line.split("\t"), strict=True))
    assert (piped["TURNS"], piped["COMPACTED"]) == ("4", "2")  # piped: a number per column
    assert history.turn_counts(store_messages("src")) == (4, 2)  # the REPL's /agents
    code, err = cli("agents", "compact", "src", "--keep-last", "2", capsys=capsys)
    assert code == 2 and "nothing to compact" in err
    # A fork of a compacted agent is compacted too: its summary names the copies' ids.
    code, err = cli("agents", "fork", "src", "copy", capsys=capsys)
    assert code == 0, err
    with closing(Store()) as store:
        copied = store.messages("copy")
        assert [m.content for m in history.live(copied)] == [m.content for m in history.live(store.messages("src"))]
        assert len(history.compacted(copied)) == 4
    # Trimming that would keep every turn would only drop the summary, bringing the covered turns back: refused.
    code, err = cli("agents", "trim", "src", "--keep-last", "4", "--yes", capsys=capsys)
    assert code == 0 and "nothing to trim" in err
    assert state("src")[0][6][0] == "summary"


def store_messages(name: str) -> list[Any]:
    with closing(Store()) as store:
        return store.messages(name)


def cli_out(*args: str, capsys: Any) -> str:
    capsys.readouterr()
    with contextlib.suppress(SystemExit):
        main(list(args))
    return capsys.readouterr().out


def test_a_full_context_offers_every_way_out(tiny, blocks):
    with Session() as s:
        s.say("a", "hello", model=tiny["llama"])
        with pytest.raises(PromptTooLongError) as exc:
            s.say("a", "word " * 5000)
    for way in ("agents compact a", "/compact", "agents trim a --keep-last N", "agents fork a NEW --at-turn N", "agents reset a"):
        assert way in exc.value.message


# ---- the REPL: /undo, /retry, /compact ------------------------------------------
def repl_for(s: Session, name: str, model: Path | None = None, settings: GenSettings | None = None) -> Any:
    from semantic_cli.cli.repl import Repl

    agent = s.chat.open_agent(name, str(model) if model else None)
    return Repl(s.chat, [agent], settings or GenSettings(max_tokens=12))


def test_undo_and_retry_keep_the_cache_on_the_kept_prefix(tiny, blocks):
    with Session() as s:
        t1 = s.say("a", LONG, model=tiny["llama"])
        t2 = s.say("a", "And then?")
        repl = repl_for(s, "a")
        slash.dispatch(repl, "/undo")
        msgs, log, chain, tail = state("a")
        assert len(msgs) == 2 and log == t1.done.all_tokens and tail is not None  # the tail stays: its shared tokens still serve
        assert len(chain) == len(t1.done.all_tokens) // B
        again = s.say("a", "And then?")  # nothing hot: the kept blocks (the tail is past a block the reply filled)
        assert again.tier == "warm" and again.done.stats.cached_tokens == len(chain) * B
        assert prompt_of(again) == prompt_of(t2) and again.done.text == t2.done.text
        slash.dispatch(repl, "/retry")
        msgs = state("a")[0]
        assert len(msgs) == 4 and msgs[2] == ("user", "And then?") and msgs[3][1] == t2.done.text  # one exchange, regenerated
        assert takeback.pending(s.store.db) == []  # the retry's journal entry went with its success
        slash.dispatch(repl, "/undo")
        slash.dispatch(repl, "/undo")
        assert state("a")[0] == [] and state("a")[1] is None
        with pytest.raises(UsageError, match="nothing to undo"):
            slash.dispatch(repl, "/undo")


def fail_at_step(monkeypatch: pytest.MonkeyPatch, call: int, how: str) -> list[int]:
    """The engine's `call`-th step is cut: a real SIGINT inside it (Ctrl-C), or an error."""
    import os
    import signal

    from mlx_lm.generate import BatchGenerator

    steps: list[int] = []
    original = BatchGenerator.next

    def next_step(self: Any) -> Any:
        steps.append(len(steps) + 1)
        if len(steps) == call:
            if how == "error":
                raise RuntimeError("the engine failed")
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(BatchGenerator, "next", next_step)
    return steps


def test_an_engine_error_mid_turn_drops_the_agents_hot_cache(tiny, blocks, monkeypatch):
    """A turn alone writes into its hot cache's own buffers (compat._adopted): an error inside
    the step can leave them holding that step's unevaluated writes, so the hot copy goes and
    the next turn restores from disk (Ctrl-C stops only between layers: its copy stays)."""
    with Session() as s:
        s.say("a", LONG, model=tiny["llama"])
        assert "a" in s.chat.kv.hot_agents()
        fail_at_step(monkeypatch, 2, "error")
        with pytest.raises(RuntimeError, match="the engine failed"):
            s.say("a", "And then?")
        assert "a" not in s.chat.kv.hot_agents()
        monkeypatch.undo()
        again = s.say("a", "And then?")
    assert again.tier == "warm" and again.done.finish_reason in ("stop", "length")


@pytest.mark.parametrize("how", ["sigint", "error", "cut"])
def test_a_retry_that_does_not_finish_puts_the_old_exchange_back(tiny, blocks, monkeypatch, capsys, how):
    """Ctrl-C, an error, or a reply the server cut (recorded "interrupted", no exception)."""
    import dataclasses

    with Session() as s:
        s.say("a", LONG, model=tiny["llama"])
        s.say("a", "And then?")
        before = s.store.messages("a"), state("a")[1]
        repl = repl_for(s, "a", settings=GenSettings(max_tokens=50))
        if how == "cut":
            turn = repl.turn
            cut = lambda recs: [dataclasses.replace(r, done=dataclasses.replace(r.done, finish_reason="interrupted")) for r in recs]  # noqa: E731
            monkeypatch.setattr(repl, "turn", lambda targets: cut(turn(targets)))
            slash.dispatch(repl, "/retry")
        else:
            steps = fail_at_step(monkeypatch, 4, how)
            with pytest.raises(KeyboardInterrupt if how == "sigint" else RuntimeError):
                slash.dispatch(repl, "/retry")
            assert len(steps) == 4  # cut mid-reply: the partial one was recorded, then taken out again
        assert (s.store.messages("a"), state("a")[1]) == before  # the same messages (ids too) and token log
        assert takeback.pending(s.store.db) == []
        assert "a: the previous reply is back (the retry did not finish)" in capsys.readouterr().err
        monkeypatch.undo()
        nxt = s.say("a", "Why so?")
    assert nxt.done.all_tokens[: len(before[1])] == before[1]  # the next turn continues the old exchange


def test_a_retry_whose_put_back_fails_still_reports_the_retrys_own_error(tiny, blocks, monkeypatch, capsys):
    from semantic_cli import takeback

    with Session() as s:
        s.say("a", LONG, model=tiny["llama"])
        repl = repl_for(s, "a", settings=GenSettings(max_tokens=50))
        fail_at_step(monkeypatch, 4, "error")

        def locked(db: Any, name: str) -> None:
            raise OSError("database is locked")

        monkeypatch.setattr(takeback, "put_back", locked)
        with pytest.raises(RuntimeError, match="the engine failed"):  # not the put-back's OSError
            slash.dispatch(repl, "/retry")
        err = capsys.readouterr().err
    assert "a: the previous reply could not be put back (OSError: database is locked)" in err, err


def test_a_failed_retry_leaves_a_turn_another_process_recorded_meanwhile(tiny, blocks, monkeypatch, capsys):
    """Through a server a REPL holds no lock between turns: if another client records a turn
    while the retry runs, putting the old exchange back would delete it. It stays."""
    from mlx_lm.generate import BatchGenerator

    from semantic_cli.store import Store

    with Session() as s:
        s.say("a", LONG, model=tiny["llama"])
        fp = s.chat.engine_for(s.chat.open_agent("a")).lm.tokenizer_fingerprint
        s.chat.release("a")
        repl = repl_for(s, "a", settings=GenSettings(max_tokens=50))
        original = BatchGenerator.next
        steps: list[int] = []

        def elsewhere_then_fail(self: Any) -> Any:
            steps.append(1)
            if len(steps) == 4:
                other = Store()
                other.record_turn("a", [("user", "from elsewhere", "complete", {}), ("assistant", "noted", "complete", {})], fp, [], True)
                other.close()
                raise RuntimeError("the engine failed")
            return original(self)

        monkeypatch.setattr(BatchGenerator, "next", elsewhere_then_fail)
        with pytest.raises(RuntimeError, match="the engine failed"):
            slash.dispatch(repl, "/retry")
        err = capsys.readouterr().err
        contents = [m.content for m in s.store.messages("a")]
    assert "from elsewhere" in contents and "noted" in contents  # the other client's turn stays
    assert "could not be put back (agent 'a' changed since the retry began; what is there now stays)" in err, err


def test_compact_in_the_repl(tiny, blocks, capsys):
    three_turns(tiny["llama"], "a")
    with Session() as s:
        repl = repl_for(s, "a", settings=GenSettings(max_tokens=6))
        with pytest.raises(UsageError, match="/compact"):
            slash.dispatch(repl, "/compact all")
        slash.dispatch(repl, "/compact 2")
        assert "compacted 'a': 1 turn summarised" in capsys.readouterr().err
        stored = s.store.messages("a")
    assert [m.role for m in history.live(stored)] == ["user", "assistant"] * 2 and stored[-1].role == "summary"


def test_retry_takes_nothing_back_when_the_model_cannot_load(tiny, blocks, tmp_path):
    with Session() as s:
        s.say("a", "hello", model=tiny["llama"])
        repl = repl_for(s, "a")
        before = s.store.messages("a")
        repl.replace_agent(s.store.update_agent(repl.agent(), model=str(tmp_path / "gone")))
        with pytest.raises(SemanticError):
            slash.dispatch(repl, "/retry")
        assert s.store.messages("a") == before


def test_a_conversation_that_fills_the_context_still_compacts(tiny, home, capsys):
    """The oldest turns that do not fit beside the instruction are left out of the
    summary's prompt (and said so), rather than the compaction failing."""
    big = " ".join(f"w{i}" for i in range(600))  # 2,290 tokens: one fits a 4,096 context beside the rest, two do not
    with closing(Store()) as store:
        store.create_agent("full", str(tiny["llama"]))
        for text in (big, big, "a short one", "another short one"):
            store.record_turn("full", [("user", text, "complete", {}), ("assistant", "ok", "complete", {})], "t", [], False)
    code, err = cli("agents", "compact", "full", "--max-tokens", "4", capsys=capsys)
    with closing(Store()) as store:
        summary = store.messages("full")[-1]
    assert summary.role == "summary" and summary.meta["left_out"] == 1 and summary.meta["turns"] == 4  # only what must go
    assert code == 0 and "4 turns summarised" in err and "the oldest 1 turn did not fit its prompt" in err, err


# ---- a reply cut short says what cut it, and what applies -------------------------------
def test_a_reply_cut_by_a_full_context_names_the_ways_out_not_the_token_limit(tiny, home, tmp_path, capsys):
    small = edited_copy(tiny["llama"], tmp_path / "small", "config.json", max_position_embeddings=80)
    code, err = cli("chat", "-a", "c", "--model", str(small), "--max-tokens", "500", "-v", "-m", "hi", capsys=capsys)
    assert code == 0, err
    assert "cut off: the context is full (80/80 tokens); make room: `semantic agents compact c`" in err
    assert "`semantic agents trim c --keep-last N`" in err and "`semantic agents fork c NEW --at-turn N`" in err
    assert "--max-tokens" not in err and "/compact" not in err
    with Session() as s:
        repl = repl_for(s, "c", settings=GenSettings(max_tokens=500))
        slash.dispatch(repl, "/retry")
        capsys.readouterr()
        slash.dispatch(repl, "/stats")
        full = " ".join(capsys.readouterr().out.split())  # the console wraps at 80 columns
        s.say("d", "hi", model=tiny["llama"], max_tokens=2)
        repl = repl_for(s, "d", settings=GenSettings(max_tokens=2))
        slash.dispatch(repl, "/retry")
        shown = " ".join(capsys.readouterr().out.split())  # the reply's footer, as the REPL draws it
        slash.dispatch(repl, "/stats")
        stats = " ".join(capsys.readouterr().out.split())
    assert "cut off: the context is full (80/80 tokens); make room: /compact" in full and "`semantic agents trim c" in full
    assert "--max-tokens" not in full + shown + stats
    assert "cut off at the token limit (2 tokens; /set max_tokens N raises it)" in stats
    assert "/set max_tokens N raises it" in shown
