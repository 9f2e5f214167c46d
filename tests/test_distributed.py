"""Two ranks on loopback (mlx.launch, ring backend): splits, exactness, per-rank KV, faults.

Every run has a timeout, so a hang fails the test instead of the suite."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SEMANTIC, run_cli

from semantic_cli.distributed import launch
from semantic_cli.errors import UsageError

HOSTS = ("--hosts", "127.0.0.1,127.0.0.1", "--backend", "ring")
TIMEOUT = 120  # a loaded 2-core machine starts two ranks in ~5-20 s; a hang fails here
PROBE = Path(__file__).parent / "distributed_probe.py"


def _chat(home: Path, model: Path, text: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = ("chat", "--agent", "a", "--model", str(model), "-m", text, "--max-tokens", "16", "-v", *extra)
    return run_cli(*args, timeout=TIMEOUT, env={"SEMANTIC_HOME": str(home), **(env or {})})


def _prefilled(stderr: bytes) -> tuple[int, int]:
    m = re.search(rb"prefilled (\d+) of (\d+) tokens", stderr)
    assert m, stderr
    return int(m.group(1)), int(m.group(2))


@pytest.mark.smollm
def test_smollm_pipeline_by_layers_is_byte_identical(tmp_path: Path, smollm: Path) -> None:
    """SmolLM2 (9 heads, 3 KV heads: no tensor split over 2) is split by layers; greedy output
    equals one process byte for byte."""
    q = "What is the capital of France? Answer in one sentence."
    one = _chat(tmp_path / "one", smollm, q, "--no-server")
    two = _chat(tmp_path / "two", smollm, q, *HOSTS)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and b"Paris" in two.stdout
    assert b"pipeline over 2 ranks by layers (layers 0-14 of 30 here)" in two.stderr
    assert b"[ring]" not in two.stderr and b"WARN" not in two.stderr


def test_splits_agree_with_one_process_and_mismatched_models_are_refused(tiny: dict[str, Path]) -> None:
    """Tensor parallel (llama, qwen3, qwen2 with heads divisible by 2): the same greedy tokens,
    logits within 1e-3 (measured: up to ~1.6e-4 on logits of magnitude ~35). The layer split:
    exactly equal logits."""
    models = [str(tiny[k]) for k in ("llama", "qwen3", "qwen2")]
    cmd = launch.command("127.0.0.1,127.0.0.1", None, "ring", [])[:-3] + [str(PROBE), "tensor,layers", *models]
    out = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, env=dict(os.environ), stdin=subprocess.DEVNULL)
    rows = [json.loads(line) for line in out.stdout.decode().splitlines() if line.startswith("{")]
    assert len(rows) == 7, out.stderr.decode()[-2000:]
    for row in rows[:6]:
        assert row["tokens_equal"], row
        if row["scheme"] == "tensor":
            assert 0 < row["max_abs_logit_diff"] < 1e-3, row
        else:
            assert row["scheme"] == "layers" and row["max_abs_logit_diff"] == 0.0, row
    assert rows[6] == {"refused": "rank 1 has another model than rank 0: give every host the same model files"}


def test_rank_cache_layout_damage_and_a_dead_rank(tmp_path: Path, tiny: dict[str, Path]) -> None:
    """Each rank persists its own shard; a damaged block on rank 1 makes both ranks re-prefill
    the same tokens (the reply still equals one process's); a rank that dies mid-turn stops the
    run with one line and exit code 12, keeping every completed turn; a cache written under
    the 2-rank layout is never read by one process, which re-prefills and continues."""
    model, home, ref = tiny["llama"], tmp_path / "two", tmp_path / "one"
    env = {"SEMANTIC_SPLIT": "layers", "SEMANTIC_BLOCK_TOKENS": "16"}
    turns = ["hello there, how are you today?", "tell me about the cache", "and the blocks?"]
    expected = []
    for text in turns[:2]:
        r = _chat(ref, model, text, "--no-server", env=env)
        assert r.returncode == 0, r.stderr
        expected.append(r.stdout)

    first = _chat(home, model, turns[0], *HOSTS, env=env)
    assert first.returncode == 0 and first.stdout == expected[0], first.stderr
    assert b"pipeline over 2 ranks by layers (layers 0-1 of 4 here)" in first.stderr
    rank1 = home / "cache" / "ranks" / "layers-w2-r1"
    blocks = sorted((rank1 / "blocks").rglob("*.kv"))
    assert blocks and sorted((home / "cache" / "blocks").rglob("*.kv"))  # both ranks wrote their shard
    for block in blocks:  # rank 1 loses its blocks; rank 0's are intact
        data = bytearray(block.read_bytes())
        data[-8] ^= 0xFF
        block.write_bytes(bytes(data))

    checked = run_cli("cache", "--rank", "layers-w2-r1", "verify", env={"SEMANTIC_HOME": str(home)})
    assert checked.returncode == 8 and b"checksum" in checked.stdout, checked.stdout  # rank 1's shard, damaged
    listed = run_cli("cache", "ls", env={"SEMANTIC_HOME": str(home)})
    assert b"other ranks' shards here: layers-w2-r1" in listed.stderr

    second = _chat(home, model, turns[1], *HOSTS, env=env)
    assert second.returncode == 0 and second.stdout == expected[1], second.stderr
    prefilled, total = _prefilled(second.stderr)
    assert prefilled == total  # rank 0 trimmed its own good cache to what rank 1 had: nothing

    dead = _chat(home, model, turns[2], *HOSTS, env={**env, "SEMANTIC_FAULT": "rank-step"})
    assert dead.returncode == 12, dead.stderr
    lines = [line for line in dead.stderr.decode().splitlines() if line.strip()]
    # Whoever notices first says it: rank 0 (its collective fails) or the launcher (mlx.launch reports the exit).
    said = r"semantic: error: (rank 1 exited with code -9|a rank of this run stopped mid-turn \(\[ring\] .*\)), so the run stopped"
    assert re.match(said, lines[-1]), lines
    assert len(lines) == 2 and "Traceback" not in dead.stderr.decode()  # the split line, then the one error line
    shown = run_cli("agents", "show", "a", "--json", env={"SEMANTIC_HOME": str(home)})
    messages = json.loads(shown.stdout)["messages"]
    replies = [e.decode().rstrip("\n") for e in expected]
    assert [m["content"] for m in messages[:4]] == [turns[0], replies[0], turns[1], replies[1]]
    assert all(m["status"] == "complete" for m in messages[:4]) and all(m["status"] != "complete" for m in messages[5:])

    alone = _chat(home, model, turns[2], "--no-server", env=env)  # after the dead turn (recorded as interrupted, or not at all)
    assert alone.returncode == 0 and alone.stdout.strip(), alone.stderr
    prefilled, total = _prefilled(alone.stderr)
    assert prefilled == total and b"damaged" not in alone.stderr  # the blocks name the 2-rank layout: not even looked at


def test_launch_options_are_checked(home: Path) -> None:
    r = run_cli("chat", "--agent", "a", "-m", "hi", "--hosts", "127.0.0.1", "--backend", "carrier-pigeon")
    assert r.returncode == 2 and b"--backend must be one of ring, jaccl, mpi, nccl, any" in r.stderr
    r = run_cli("chat", "--agent", "a", "-m", "hi", "--backend", "ring")
    assert r.returncode == 2 and b"--backend goes with --hosts or --hostfile" in r.stderr


def test_launch_command_line() -> None:
    argv = ["chat", "--agent", "a", "--hosts", "h1,h2", "--backend=ring", "-m", "hi", "--hostfile", "f"]
    assert launch.strip_launch_options(argv) == ["chat", "--agent", "a", "-m", "hi"]
    cmd = launch.command("127.0.0.1,127.0.0.1", None, "ring", ["chat", "-m", "hi"])
    assert cmd[1:3] == ["--python", sys.executable] and "--starting-port" in cmd
    assert cmd[-6:] == ["--", "-m", "semantic_cli.distributed.rank", "chat", "-m", "hi"]
    remote = launch.command("10.0.0.1,10.0.0.2", None, "any", [])
    assert "--starting-port" not in remote and "--backend" not in remote


def test_hostfile_option(tmp_path: Path, home: Path) -> None:
    hostfile = tmp_path / "cluster.json"
    hostfile.write_text('[{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]')
    cmd = launch.command(None, hostfile, "jaccl", ["serve"])
    options = [a for a in cmd[3:] if a != "--"]
    pairs = list(zip(options, options[1:], strict=False))
    assert ("--hostfile", str(hostfile)) in pairs and ("--backend", "jaccl") in pairs
    # Remote ranks see only what --env names: the home (the test's), and the line that carries rank 0's exit code.
    assert ("--env", f"SEMANTIC_HOME={os.environ['SEMANTIC_HOME']}") in pairs and ("--env", "SEMANTIC_RANK_MARKER=1") in pairs
    with pytest.raises(UsageError, match="no such file"):
        launch.command(None, tmp_path / "missing.json", "ring", [])
    with pytest.raises(UsageError, match="not both"):
        launch.command("127.0.0.1", hostfile, "ring", [])
    # A hostfile mlx.launch could not read is one line here, not its usage text and a stopped rank 0.
    for bad, needle in (("[]", "a JSON list of hosts"), ("{oops", "not readable JSON"), ('[{"ips": []}]', "a JSON list of hosts")):
        hostfile.write_text(bad)
        with pytest.raises(UsageError, match=needle):
            launch.command(None, hostfile, "ring", [])


def test_serve_over_two_ranks(tmp_path: Path, tiny: dict[str, Path]) -> None:
    """`semantic serve --hosts`: rank 0 serves, a plain `semantic chat` reaches it, the reply
    equals one process's (tensor split); SIGTERM stops every rank cleanly, exit code 0."""
    model, home = tiny["llama"], tmp_path / "two"
    env = dict(os.environ, SEMANTIC_HOME=str(home))
    cmd = [SEMANTIC, "serve", "--model", str(model), "--no-tcp", *HOSTS]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (home / "runtime" / "server.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "semantic serve --hosts never became ready"
            time.sleep(0.1)
        served = _chat(home, model, "hello there")
        alone = _chat(tmp_path / "one", model, "hello there", "--no-server")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()  # its ranks die with it
            raise
    err = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert served.returncode == 0 and served.stdout == alone.stdout, served.stderr
    assert code == 0 and "tensor parallel over 2 ranks" in err and "POST /semantic/v1/turns 200" in err, err
    assert "error" not in err and "[ring]" not in err, err
