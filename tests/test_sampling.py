"""Sampling settings: flags, the config, the model's generation_config.json and /set, each
resolved in that order of precedence, and the repetition penalty that stops loops."""

from __future__ import annotations

import json
import shutil

from conftest import run_cli
from test_repl import Term

from semantic_cli.errors import EXIT_USAGE

ARGS = ("--max-tokens", "40", "--json", "--no-server")


def _reply(agent: str, model: str, *flags: str) -> str:
    r = run_cli("chat", "-a", agent, "--model", model, "-m", "tell me more", *ARGS, *flags)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["reply"]


def test_the_repetition_penalty_is_on_by_default_and_each_source_can_turn_it_off(tiny, home, tmp_path):
    model = str(tiny["llama"])
    plain = _reply("p1", model, "--repeat-penalty", "1")
    default = _reply("p2", model)
    assert default != plain  # greedy with the default penalty is not plain greedy
    assert _reply("p3", model, "--repeat-penalty", "1.15", "--repeat-last-n", "256") == default  # the documented default
    assert _reply("p4", model, "--repeat-penalty", "1", "--temp", "0") == plain  # deterministic

    # The model's generation_config.json: below the flags and the config, above the built-in default.
    own = tmp_path / "own-model"
    shutil.copytree(model, own)
    (own / "generation_config.json").write_text(json.dumps({"do_sample": True, "repetition_penalty": 1.0}))
    assert _reply("g1", str(own)) == plain
    assert _reply("g2", str(own), "--repeat-penalty", "1.15") == default
    assert run_cli("config", "set", "repeat_penalty", "1.15").returncode == 0
    assert _reply("g3", str(own)) == default  # the user's config outranks the model's file
    (own / "generation_config.json").write_text(json.dumps({"do_sample": False, "repetition_penalty": 1.0}))
    assert run_cli("config", "set", "repeat_penalty", "1").returncode == 0
    assert _reply("g4", model) == plain  # the config alone

    r = run_cli("chat", "-a", "bad", "--model", model, "-m", "x", "--repeat-penalty", "0", "--no-server")
    assert r.returncode == EXIT_USAGE and b"--repeat-penalty" in r.stderr
    r = run_cli("config", "set", "top_k", "-1")
    assert r.returncode == EXIT_USAGE


def test_top_k_and_min_p_reach_the_sampler(tiny, home):
    model = str(tiny["llama"])
    free = _reply("k1", model, "--temp", "5", "--seed", "3")
    assert _reply("k2", model, "--temp", "5", "--seed", "3") == free  # seeded: reproducible
    one = _reply("k3", model, "--temp", "5", "--seed", "3", "--top-k", "1")
    assert one != free and one == _reply("k4", model, "--temp", "0")  # top-k 1 is greedy, whatever the temperature
    assert _reply("k5", model, "--temp", "5", "--seed", "3", "--min-p", "1") == one  # only the top token survives min-p 1


def test_set_in_the_repl_changes_sampling_for_the_session(tiny, home):
    model = str(tiny["llama"])
    expected = _reply("ref", model, "--temp", "0", "--repeat-penalty", "1")
    t = Term("-a", "a", "--model", model, "--max-tokens", "40", "--no-markdown")
    try:
        t.prompt()
        t.send("/set repeat_penalty 1")
        t.expect(r"repeat_penalty = 1\.0")
        t.send("/set temp nope")
        t.expect(r"/set temp: 'nope'")
        t.send("/set")
        t.expect(r"set for this session: max_tokens 40, repeat_penalty 1\.0")
        t.say("tell me more")
        t.send("/quit")
        assert t.exit_code() == 0
    finally:
        t.close()
    r = run_cli("agents", "show", "a", "--json")
    assert json.loads(r.stdout)["messages"][-1]["content"] == expected


def test_an_agents_own_settings_rank_between_the_flags_and_the_config(tiny, home):
    model = str(tiny["llama"])
    plain = _reply("ref1", model, "--repeat-penalty", "1")
    default = _reply("ref2", model)
    assert run_cli("agents", "new", "own", "--model", model, "--repeat-penalty", "1", "--top-k", "0").returncode == 0
    assert _reply("own", model) == plain
    assert run_cli("agents", "edit", "own2", "--repeat-penalty", "1").returncode == 3  # unknown agent: nothing made
    assert run_cli("agents", "new", "own2", "--model", model, "--repeat-penalty", "1").returncode == 0
    assert run_cli("agents", "edit", "own2", "--repeat-penalty", "1.15", "--repeat-last-n", "256").returncode == 0
    assert _reply("own2", model) == default
    r = run_cli("agents", "edit", "own2", "--repeat-penalty", "0")
    assert r.returncode == EXIT_USAGE and b"--repeat-penalty" in r.stderr


def test_a_small_temperature_samples_the_top_token_in_half_precision_too():
    """A GPU runs the model in float16 or bfloat16: mlx-lm's logits / temp overflowed there
    (float16 at 1e-5 picked tokens at random); the engine's samplers see float32."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    from semantic_cli.engine import _in_float32

    logits = mx.array([[1.0, 3.0, 2.5, -1.0, 0.5]], dtype=mx.float16)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    mx.random.seed(0)
    raw = make_sampler(temp=1e-5)
    assert len({raw(logprobs).item() for _ in range(16)}) > 1  # what the engine must not do
    ours = _in_float32(make_sampler(temp=1e-5))
    assert {ours(logprobs).item() for _ in range(16)} == {1}
