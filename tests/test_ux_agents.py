"""What a command does to an agent (issue 20, items 1, 2 and 4), in-process on a tiny model:
a failed command changes nothing (every flag of `semantic chat` that could touch an agent),
a new agent, a switched model and a set or ignored persona each get one stderr line, an
unknown name suggests near ones, and a reply cut by the token limit is marked in the
footer, in `agents show` and in the exports."""

from __future__ import annotations

import json
from contextlib import closing

import pytest
from helpers import Session

from semantic_cli.cli.app import main
from semantic_cli.errors import EXIT_MODEL, EXIT_NOT_FOUND, EXIT_TOO_LONG
from semantic_cli.store import Store


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`semantic ARGS` in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(list(args))
    out, err = capsys.readouterr()
    return int(stop.value.code or 0), out, err


def snapshot(name: str) -> tuple:
    """Everything the store holds about an agent, and the saved rooms."""
    with closing(Store()) as store:
        agent = store.find_agent(name)
        messages = [(m.role, m.content, m.status, m.meta) for m in store.messages(name)]
        logs = {tok: store.token_log(name, tok) for tok in {r[0] for r in store.db.execute("SELECT tokenizer FROM token_chunks")}}
        return agent, messages, logs, store.list_rooms()


@pytest.fixture
def talked(tiny, home):
    """Agent t1 on the tiny llama with one exchange; t2 with no conversation yet."""
    with Session() as s:
        s.say("t1", "hello", model=tiny["llama"], max_tokens=3)
    with closing(Store()) as store:
        store.create_agent("t2", str(tiny["llama"]), "", {})
    return tiny


FLAGS = [
    ["--system", "You are a cat."],
    ["--max-tokens", "3"],
    ["--temp", "0.5"],
    ["--top-p", "0.9"],
    ["--seed", "1"],
    ["--top-k", "5"],
    ["--min-p", "0.1"],
    ["--repeat-penalty", "1.3"],
    ["--repeat-last-n", "8"],
    ["--save-room", "r1"],
]


@pytest.mark.parametrize("flag", FLAGS + [["--model", "QWEN"]], ids=lambda f: f[0])
@pytest.mark.parametrize("agent", ["t1", "t2", "t3"])
def test_a_failed_command_changes_nothing(talked, capsys, flag, agent):
    """The message is too long for the model (exit 5, after the model loaded): the agent,
    its messages, its token log and the saved rooms are as before; t3 is not created."""
    flag = [str(talked["qwen3"]) if f == "QWEN" else f for f in flag]
    if flag[0] != "--model":
        flag += ["--model", str(talked["llama"])]  # t3 would be on the default model, not prepared under this home
    before = snapshot(agent)
    too_long = " ".join(["word"] * 2500)
    code, out, err = cli(capsys, "chat", "-a", agent, *flag, "-m", too_long)
    assert code == EXIT_TOO_LONG, err
    assert out == "" and err.splitlines()[-1].startswith("semantic: error: the ") and "has a context of 4096" in err
    assert snapshot(agent) == before


@pytest.mark.parametrize("flag", FLAGS, ids=lambda f: f[0])
def test_a_model_that_does_not_load_changes_nothing(talked, capsys, flag):
    before = snapshot("t1")
    code, _, err = cli(capsys, "chat", "-a", "t1", "-m", "hi", *flag, "--model", "/nonexistent")
    assert code in (EXIT_NOT_FOUND, EXIT_MODEL), err
    assert snapshot("t1") == before
    code, _, err = cli(capsys, "chat", "-a", "t1", "-m", "hi", "--max-tokens", "2")  # still works as it was
    assert code == 0, err


def test_model_flag_switches_an_agent_once_its_turn_succeeds(talked, capsys):
    code, out, err = cli(capsys, "chat", "-a", "t1", "--model", str(talked["qwen3"]), "--max-tokens", "2", "--json", "-m", "hi")
    assert code == 0, err
    assert f"t1: model {talked['llama']} -> {talked['qwen3']} (--model" in err
    assert json.loads(out)["prompt_tokens"] > 0
    agent, messages, _, _ = snapshot("t1")
    assert agent.model == str(talked["qwen3"]) and len(messages) == 4
    code, _, err = cli(capsys, "chat", "-a", "t1", "--model", str(talked["qwen3"]), "--max-tokens", "2", "-m", "again")
    assert code == 0 and err == ""  # the same model again: nothing to say


def test_system_flag_sets_a_persona_only_without_a_conversation_and_says_so(talked, capsys):
    code, _, err = cli(capsys, "chat", "-a", "t1", "--system", "You are a cat.", "--max-tokens", "2", "-m", "hi")
    assert code == 0
    assert err == (
        "t1: --system ignored: t1 has a conversation and keeps its persona; change it with `semantic agents edit t1 --system ...`\n"
    )
    assert snapshot("t1")[0].system == ""
    code, _, err = cli(capsys, "chat", "-a", "t2", "--system", "You are a cat.", "--max-tokens", "2", "-m", "hi")
    assert code == 0 and err == "t2: persona set by --system (it has no conversation yet)\n"
    assert snapshot("t2")[0].system == "You are a cat."


def test_a_new_agent_is_announced_with_near_names(talked, capsys):
    code, _, err = cli(capsys, "chat", "-a", "t1x", "--model", str(talked["llama"]), "--max-tokens", "2", "-m", "hi")
    assert code == 0
    assert err == f"new agent 't1x' (model {talked['llama']}): saved with its first turn; did you mean 't1'?\n"
    code, _, err = cli(capsys, "chat", "-a", "zz", "-a", "t1", "--model", str(talked["llama"]), "--max-tokens", "2", "--all", "-m", "hi")
    assert code == 0 and err.startswith(f"new agent 'zz' (model {talked['llama']}): saved with its first turn\n")  # a room, no near name


@pytest.mark.parametrize("command", [["show", "t11"], ["rm", "t11", "--yes"], ["edit", "t11", "--temp", "1"], ["rename", "t11", "x"]])
def test_an_unknown_name_suggests_near_ones(talked, capsys, command):
    code, out, err = cli(capsys, "agents", *command)
    assert code == EXIT_NOT_FOUND and out == ""
    assert err == "semantic: error: no agent named 't11'; did you mean 't1'?\n"


def test_a_reply_cut_by_the_token_limit_is_marked(talked, capsys):
    code, out, err = cli(capsys, "chat", "-a", "t1", "--max-tokens", "2", "-v", "-m", "tell me a long story")
    assert code == 0 and out.endswith("\n")
    assert "cut off at the token limit (2 tokens; --max-tokens raises it)\nttft" in err
    _, show, _ = cli(capsys, "agents", "show", "t1")
    assert show.count("t1 (cut off at the token limit)\n") == 2  # the fixture's reply was cut at 3 tokens too
    _, md, _ = cli(capsys, "agents", "show", "t1", "--markdown")
    assert md.count("*(cut off at the token limit)*") == 2
    _, js, _ = cli(capsys, "agents", "show", "t1", "--json")
    assert [m["meta"].get("finish_reason") for m in json.loads(js)["messages"]] == [None, "length", None, "length"]


# ---- Ctrl-C: during the prefill, and with --json ----------------------------------------
def sigint_during(monkeypatch, call: int) -> list[int]:
    """A real SIGINT to this process while the engine's `call`-th step runs (inside the
    step, as a key press would land); returns the list of steps seen."""
    import os
    import signal

    from mlx_lm.generate import BatchGenerator

    steps: list[int] = []
    original = BatchGenerator.next

    def next_step(self):
        steps.append(len(steps) + 1)
        if len(steps) == call:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(BatchGenerator, "next", next_step)
    return steps


def test_ctrl_c_during_prefill_keeps_the_message_and_what_was_read(talked, capsys, monkeypatch):
    """Ctrl-C as the second 512-token prefill step begins stops it at its first layer: exit
    130, the message kept unanswered (no empty reply), and the 512 tokens the first step read
    are the next turn's cache (tests/test_interrupt.py stops a step half-way)."""
    from semantic_cli.engine import PREFILL_STEP

    long = " ".join(f"w{i}" for i in range(900))  # 3,500 tokens: seven prefill steps
    with monkeypatch.context() as m:  # (monkeypatch.undo would undo the fixture's SEMANTIC_HOME too)
        steps = sigint_during(m, 2)
        code, out, err = cli(capsys, "chat", "-a", "t1", "--max-tokens", "2", "--json", "-m", long)
    assert code == 130 and len(steps) == 2, err
    [stopped] = [json.loads(line) for line in out.splitlines()]
    assert stopped["finish_reason"] == "interrupted" and stopped["reply"] == "" and stopped["generated_tokens"] == 0
    assert err.count("interrupted") == 1
    _, messages, logs, _ = snapshot("t1")
    assert [(role, status) for role, _, status, _ in messages][-2:] == [("assistant", "complete"), ("user", "unanswered")]
    code, out, err = cli(capsys, "chat", "-a", "t1", "--max-tokens", "2", "--json", "-m", "short")
    assert code == 0, err
    turn = json.loads(out)
    assert turn["cached_tokens"] == stopped["cached_tokens"] + PREFILL_STEP and turn["cache_tier"] == "warm"  # read once
    [log] = logs.values()
    assert turn["prompt_tokens"] > len(log) > PREFILL_STEP
    _, messages, _, _ = snapshot("t1")
    assert [role for role, *_ in messages][-3:] == ["user", "user", "assistant"]


def test_ctrl_c_with_json_prints_the_interrupted_turn(talked, capsys, monkeypatch):
    steps = sigint_during(monkeypatch, 4)  # the prompt is read in one step; then a token per step
    code, out, err = cli(capsys, "chat", "-a", "t1", "--max-tokens", "50", "--json", "-m", "go on")
    assert code == 130 and len(steps) == 4, err
    [turn] = [json.loads(line) for line in out.splitlines()]
    assert turn["finish_reason"] == "interrupted" and turn["generated_tokens"] > 0 and turn["agent"] == "t1"
    _, messages, _, _ = snapshot("t1")
    assert messages[-1][1] == turn["reply"] and messages[-1][2] == "interrupted"
    assert err.count("interrupted") == 1


def test_ctrl_c_ends_the_one_shot_output_with_a_newline(talked, capsys, monkeypatch):
    sigint_during(monkeypatch, 4)
    code, out, _ = cli(capsys, "chat", "-a", "t1", "--max-tokens", "50", "-m", "go on")
    assert code == 130 and out.endswith("\n") and out.count("\n") == 1


# ---- /round has a cap ---------------------------------------------------------------------
class _Room:
    """What /round needs of a REPL: a room, and a record of the rounds it was asked for."""

    room = True
    agents = {"a": None, "b": None}

    def __init__(self) -> None:
        self.rounds: list[int] = []

    def round(self, n: int, topic: str) -> None:
        self.rounds.append(n)

    def info(self, text: str) -> None:
        pass


def test_round_runs_up_to_its_cap_and_refuses_more_without_a_terminal(home, monkeypatch):
    from semantic_cli.cli import slash
    from semantic_cli.errors import UsageError

    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    repl = _Room()
    slash.dispatch(repl, "/round 20 the plan")
    with pytest.raises(UsageError, match=r"^/round 21 is over round_cap \(20\); raise it with `semantic config set round_cap 21`$"):
        slash.dispatch(repl, "/round 21 the plan")
    monkeypatch.setenv("SEMANTIC_HOME", str(home))
    main_code = cli_code("config", "set", "round_cap", "30")
    assert main_code == 0
    slash.dispatch(repl, "/round 30 the plan")
    assert repl.rounds == [20, 30]


def cli_code(*args: str) -> int:
    with pytest.raises(SystemExit) as stop:
        main(list(args))
    return int(stop.value.code or 0)


def test_all_keeps_a_header_per_agent_when_one_is_busy(talked, capsys):
    from semantic_cli.locks import AgentLock

    with AgentLock("t2"):
        code, out, err = cli(capsys, "chat", "-a", "t1", "-a", "t2", "--max-tokens", "2", "--all", "-m", "hi")
    assert code == 0, err
    assert out.startswith("[t2]\n(no reply: busy in another process)\n\n[t1]\n") and out.endswith("\n\n")
    assert "warning: agent 't2' is busy" in err


def test_json_at_a_terminal_without_a_message_is_refused(home, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    code, out, err = cli(capsys, "chat", "-a", "t1", "--json")
    assert code == 2 and out == ""
    assert err == "semantic: error: --json is for one-shot turns: pass -m TEXT or pipe the message in (the REPL shows replies as text)\n"


def test_a_removed_agent_leaves_its_saved_rooms(tiny, home):
    """`agents rm` takes the agent out of every saved room (a room it leaves empty goes), so
    `--room` still opens the rest of the room instead of failing on a missing agent."""
    from conftest import run_cli

    model = str(tiny["llama"])
    pair = run_cli("chat", "-a", "a", "-a", "b", "--model", model, "--save-room", "pair", "--all", "--max-tokens", "2", "-m", "hi")
    assert pair.returncode == 0
    assert run_cli("chat", "-a", "a", "--save-room", "solo", "--max-tokens", "2", "-m", "hi").returncode == 0
    r = run_cli("agents", "rm", "a", "--yes")
    assert r.returncode == 0 and b"left rooms pair, solo" in r.stderr, r.stderr
    with closing(Store()) as store:
        assert store.list_rooms() == [("pair", ["b"])]
    assert run_cli("chat", "--room", "pair", "--max-tokens", "2", "-m", "still here?").returncode == 0
