"""End to end on the real SmolLM2-135M-Instruct (the embedded default model)."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from helpers import Session, uncached_reply_end

pytestmark = pytest.mark.smollm


def test_one_shot_answer_and_a_second_invocation_that_sees_the_first(smollm, home):
    first = run_cli("chat", "--agent", "planner", "--model", str(smollm), "--json", input="What is the capital of France?\n")
    assert first.returncode == 0, first.stderr
    one = json.loads(first.stdout)
    assert "Paris" in one["reply"] and one["finish_reason"] == "stop"
    second = run_cli("chat", "--agent", "planner", "--json", "-m", "Which city did you just name? Answer with the city name only.")
    assert second.returncode == 0, second.stderr
    two = json.loads(second.stdout)
    assert "Paris" in two["reply"]
    # restored from disk: all but the reply's last token, which no pass read (on the CPU)
    assert two["cached_tokens"] == one["prompt_tokens"] + one["generated_tokens"] - uncached_reply_end()
    assert two["prompt_tokens"] > two["cached_tokens"]


def test_default_model_is_used_without_flags(smollm, home, monkeypatch):
    monkeypatch.setenv("SEMANTIC_MODEL", str(smollm))
    r = run_cli("chat", "-a", "d", "-m", "What is the capital of France?")
    assert r.returncode == 0 and "Paris" in r.stdout.decode()


def test_resume_from_disk_equals_continuing_on_smollm2(smollm, tmp_path, monkeypatch):
    turns = ["Give me three colours.", "Now three animals.", "And three fruits?"]
    replies = {}
    for mode in ("hot", "warm"):
        monkeypatch.setenv("SEMANTIC_HOME", str(tmp_path / mode))
        s = Session()
        for i, text in enumerate(turns):
            if mode == "warm" and i == len(turns) - 1:
                s.close()
                s = Session()
            rec = s.say("r", text, model=smollm, max_tokens=24)
        s.close()
        assert rec.tier == mode
        replies[mode] = (rec.done.generated, rec.done.text)
    assert replies["hot"] == replies["warm"]
