"""`semantic bench serve`: what the resident engine buys, measured side by side in one run.

1. pipe: wall time of a piped one-token `semantic chat` (a new process each time) with a
   server running vs `--no-server`, on the same agent, the two alternating (order effects
   cancel); both with the model files in the page cache.
2. concurrent: four `semantic chat` processes started together against the server vs the
   same four turns one after another through it; fresh agents with the same questions in
   both phases, so the work is identical. Aggregate generated tokens per second.
3. restart: an HTTP client (streaming, as the openai client does) sends a ~2K-token
   conversation as the first request after a server start: cold (the cache emptied first)
   vs warm (the blocks the previous run wrote, found by content). TTFT is measured by the
   client, to the first content chunk. Optionally mlx_lm.server beside it: the same request
   as the first after its start (its prompt cache lives in RAM, so a restart is cold), and
   again in the same process.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..engine import Engine
from .results import Results, filler_tokens, model_info
from .turns import drop_page_cache, scratch_home, semantic_command

QUESTIONS = [
    "Name three uses of a hash table.",
    "Why is the sky blue? Answer briefly.",
    "Give two tips for writing clear code.",
    "What does a compiler do?",
]

Report = Callable[[str, int, int], None]


class _Server:
    """`semantic serve` in the scratch home, on a free port."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> _Server:
        info_file = Path(os.environ["SEMANTIC_HOME"]) / "runtime" / "server.json"
        self.proc = subprocess.Popen(
            [*semantic_command(), "serve", "--model", self.model, "--port", "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"semantic serve exited {self.proc.returncode}: {self.proc.stderr.read().decode()[-400:]}")  # type: ignore[union-attr]
            try:
                info = json.loads(info_file.read_text())
                if info["pid"] == self.proc.pid:
                    self.url = info["url"]
                    return self
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        raise RuntimeError("semantic serve never became ready")

    def __exit__(self, *_: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


def _chat(args: list[str], stdin: str | None = None) -> tuple[float, dict[str, Any]]:
    t = time.perf_counter()
    out = subprocess.run([*semantic_command(), "chat", *args], input=stdin, capture_output=True, text=True, check=False, timeout=3600)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"semantic chat failed ({out.returncode}): {out.stderr.strip()[-400:]}")
    record = json.loads(out.stdout.splitlines()[-1]) if "--json" in args else {}
    return wall, record


def _pipe(model: str, rounds: int, report: Report) -> dict[str, Any]:
    _chat(["-a", "pipe", "--model", model, "-m", "hello", "--max-tokens", "1", "--no-server"])  # the agent exists; files cached
    served: list[float] = []
    alone: list[float] = []
    with _Server(model):
        _chat(["-a", "pipe", "--max-tokens", "1"], stdin="warm-up\n")
        for i in range(rounds):
            report("pipe", i, rounds)
            order = [True, False] if i % 2 == 0 else [False, True]
            for use_server in order:
                args = ["-a", "pipe", "--max-tokens", "1"] + ([] if use_server else ["--no-server"])
                wall, _ = _chat(args, stdin="ok\n")
                (served if use_server else alone).append(wall)
    return {
        "served_s": served,
        "alone_s": alone,
        "served_p50_s": statistics.median(served),
        "alone_p50_s": statistics.median(alone),
        "speedup": statistics.median(alone) / statistics.median(served),
    }


def _concurrent(model: str, rounds: int, max_tokens: int, report: Report) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    with _Server(model):
        for r in range(rounds):
            report("concurrent", r, rounds)
            phases = ["sequential", "concurrent"] if r % 2 == 0 else ["concurrent", "sequential"]
            row: dict[str, Any] = {}
            for phase in phases:
                names = [f"{phase[0]}{r}-{i}" for i in range(len(QUESTIONS))]
                commands = [
                    ["-a", n, "--model", model, "-m", q, "--max-tokens", str(max_tokens), "--temp", "0", "--json"]
                    for n, q in zip(names, QUESTIONS, strict=True)
                ]
                t = time.perf_counter()
                if phase == "sequential":
                    records = [_chat(c)[1] for c in commands]
                else:
                    procs = [
                        subprocess.Popen([*semantic_command(), "chat", *c], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                        for c in commands
                    ]
                    records = []
                    for p in procs:
                        out, err = p.communicate(timeout=3600)
                        if p.returncode != 0:
                            raise RuntimeError(f"semantic chat failed ({p.returncode}): {err.strip()[-400:]}")
                        records.append(json.loads(out))
                wall = time.perf_counter() - t
                tokens = sum(rec["generated_tokens"] for rec in records)
                row[phase] = {"wall_s": wall, "generated_tokens": tokens, "tps": tokens / wall}
            row["ratio"] = row["concurrent"]["tps"] / row["sequential"]["tps"]
            results.append(row)
    return {"rounds": results, "ratio_p50": statistics.median(r["ratio"] for r in results)}


def _conversation(engine: Engine, tokens: int) -> list[dict[str, str]]:
    """About `tokens` tokens of alternating turns, ending with a question."""
    tok = engine.lm.tokenizer
    turns = max(2, tokens // 256)
    per = tokens // turns
    msgs = [{"role": "system", "content": "You are a concise assistant."}]
    for i in range(turns):
        role = "user" if i % 2 == 0 else "assistant"
        msgs.append({"role": role, "content": filler_tokens(tok, per, seed=i)})
    if msgs[-1]["role"] == "user":
        msgs.append({"role": "assistant", "content": "Noted."})
    msgs.append({"role": "user", "content": "In one word: is this about caching?"})
    return msgs


def _first_token(url: str, model: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    """Stream one request; the client's time to the first content chunk, and usage."""
    import httpx

    body = {"model": model, "messages": messages, "max_tokens": 4, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    t = time.perf_counter()
    ttft = None
    usage: dict[str, Any] = {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t
            if chunk.get("usage"):
                usage = chunk["usage"]
    return {"ttft_s": ttft if ttft is not None else time.perf_counter() - t, "usage": usage}


def _restart(engine: Engine, model: str, tokens: int, repeats: int, report: Report) -> dict[str, Any]:
    messages = _conversation(engine, tokens)
    name = engine.lm.name
    cold: list[dict[str, Any]] = []
    warm: list[dict[str, Any]] = []
    warm_disk: list[dict[str, Any]] = []
    for r in range(repeats):
        report("restart", r, repeats)
        subprocess.run([*semantic_command(), "cache", "evict", "--all", "--yes"], capture_output=True, check=False)
        with _Server(model) as server:
            cold.append(_first_token(server.url, name, messages))
        with _Server(model) as server:
            warm.append(_first_token(server.url, name, messages))
        dropped, _ = drop_page_cache()
        with _Server(model) as server:
            row = _first_token(server.url, name, messages)
            row["page_cache_dropped"] = dropped
            warm_disk.append(row)
    p50 = lambda rows: statistics.median(x["ttft_s"] for x in rows)  # noqa: E731
    return {
        "prompt_tokens": cold[0]["usage"].get("prompt_tokens"),
        "cold": cold,
        "warm": warm,
        "warm_disk": warm_disk,
        "cold_p50_s": p50(cold),
        "warm_p50_s": p50(warm),
        "warm_disk_p50_s": p50(warm_disk),
        "speedup": p50(cold) / p50(warm),
        "speedup_disk": p50(cold) / p50(warm_disk),
    }


def _mlx_lm_server(engine: Engine, tokens: int) -> dict[str, Any]:
    """mlx_lm.server on the same request: the first after its start, then again (its RAM cache)."""
    import socket
    import sys

    messages = _conversation(engine, tokens)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm", "server", "--model", engine.lm.ref.path, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                return {"error": f"mlx_lm.server exited {proc.returncode}: {proc.stderr.read().decode()[-300:]}"}  # type: ignore[union-attr]
            try:
                httpx.get(f"{url}/v1/models", timeout=5)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    return {"error": "mlx_lm.server never became ready"}
                time.sleep(0.2)
        first = _first_token(url, engine.lm.ref.path, messages)
        again = _first_token(url, engine.lm.ref.path, messages)
        return {"after_start_ttft_s": first["ttft_s"], "same_process_ttft_s": again["ttft_s"]}
    except Exception as exc:  # a comparison only: its failure is reported, not ours
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(engine: Engine, rounds: int, max_tokens: int, tokens: int, repeats: int, mlx_lm: bool, report: Report) -> Results:
    model = engine.lm.ref.spec if engine.lm.ref.spec != "default" else engine.lm.ref.path
    res = Results(
        "serve",
        model_info(engine.lm),
        {"rounds": rounds, "max_tokens": max_tokens, "history_tokens": tokens, "restart_repeats": repeats},
    )
    with scratch_home():
        res.results["pipe"] = _pipe(model, rounds, report)
        res.results["concurrent"] = _concurrent(model, max(2, rounds // 2), max_tokens, report)
        res.results["restart"] = _restart(engine, model, tokens, repeats, report)
        if mlx_lm:
            res.results["mlx_lm_server"] = _mlx_lm_server(engine, tokens)
    res.results["state"] = (
        "every figure is a new client process or the first request after a server start; model files in the page cache; "
        "restart warm: the block files just written (page cache), warm_disk: dropped from it first"
    )
    return res


def table(res: Results) -> list[tuple[str, ...]]:
    r = res.results
    rows: list[tuple[str, ...]] = [("measure", "with server", "without", "ratio", "target")]
    p = r["pipe"]
    rows.append(
        ("piped 1-token chat, wall p50", f"{p['served_p50_s']:.3f} s", f"{p['alone_p50_s']:.3f} s", f"{p['speedup']:.1f}x", ">= 6x")
    )
    c = r["concurrent"]
    last = c["rounds"][-1]
    rows.append(
        (
            "4 chats at once vs one by one, tok/s",
            f"{last['concurrent']['tps']:.1f}",
            f"{last['sequential']['tps']:.1f}",
            f"{c['ratio_p50']:.2f}x",
            ">= 2.5x",
        )
    )
    s = r["restart"]
    rows.append(
        (
            f"{s['prompt_tokens']}-token resend after restart, TTFT p50",
            f"{s['warm_p50_s']:.3f} s (disk {s['warm_disk_p50_s']:.3f} s)",
            f"{s['cold_p50_s']:.3f} s cold",
            f"{s['speedup']:.1f}x ({s['speedup_disk']:.1f}x)",
            ">= 15x",
        )
    )
    m = r.get("mlx_lm_server")
    if m and "error" not in m:
        rows.append(
            (
                "mlx_lm.server, same request",
                f"{m['after_start_ttft_s']:.3f} s after start",
                f"{m['same_process_ttft_s']:.3f} s again",
                "",
                "",
            )
        )
    elif m:
        rows.append(("mlx_lm.server", m["error"][:60], "", "", ""))
    return rows
