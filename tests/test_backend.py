"""Backend set-up: OpenBLAS is loaded before anything imports mlx, on every path."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from semantic_cli.backend import runtime

PACKAGE = Path(runtime.__file__).parent.parent


def test_only_backend_imports_mlx_core_directly():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] == "backend":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*(import mlx\.core|from mlx\.core import|import mlx$)", line):
                offenders.append(f"{path.name}:{n}")
    assert offenders == [], "import mlx through runtime.mx() so OpenBLAS is loaded first"


@pytest.mark.skipif(not any(Path(p).exists() for p in runtime._OPENBLAS_CANDIDATES), reason="no system OpenBLAS")
def test_converting_a_gguf_first_still_gets_openblas(tiny, tmp_path):
    """The default model's conversion is often the first thing to touch mlx."""
    import conftest_gguf

    gguf = conftest_gguf.tiny_gguf(tiny["llama"], tmp_path / "tiny.gguf")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from semantic_cli.model import convert\n"
        "from semantic_cli.backend import runtime\n"
        f"convert.convert_gguf(Path({str(gguf)!r}), Path({str(tmp_path / 'out')!r}))\n"
        "assert 'mlx.core' in sys.modules, 'the conversion never touched mlx: this test checks nothing'\n"
        "print(runtime.info().blas)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OpenBLAS"), r.stdout


def test_cpu_runs_models_in_float32(tiny):
    from semantic_cli.model.loader import ModelRef, load

    lm = load(ModelRef(str(tiny["qwen3"]), str(tiny["qwen3"])))
    assert runtime.info().backend != "cpu" or lm.dtype == "float32"


def test_a_loaded_model_lets_mlx_keep_freed_buffers_up_to_the_buffer_cache_setting(tiny, monkeypatch):
    """On the CPU MLX keeps only 32 MiB of freed buffers: a second restore of an 8K cache
    then faulted in new pages. Once a model is loaded it keeps `buffer_cache`, and a
    smaller setting never lowers what MLX keeps already."""
    from semantic_cli.model.loader import ModelRef, load

    if runtime.info().backend != "cpu":
        pytest.skip("a GPU's cache limit is MLX's own (its memory limit) and is left alone")
    mx = runtime.mx()
    original = mx.set_cache_limit(32 << 20)
    try:
        monkeypatch.setenv("SEMANTIC_BUFFER_CACHE", "256MiB")
        load(ModelRef(str(tiny["llama"]), str(tiny["llama"])))
        assert mx.set_cache_limit(256 << 20) == 256 << 20
        mx.clear_cache()
        big = mx.zeros((96 << 20) // 4)  # 96 MB: over MLX's own 32 MiB
        mx.eval(big)
        del big
        assert mx.get_cache_memory() >= 96 << 20  # kept for the next allocation
        monkeypatch.setenv("SEMANTIC_BUFFER_CACHE", "1MB")
        load(ModelRef(str(tiny["llama"]), str(tiny["llama"])))
        assert mx.set_cache_limit(256 << 20) == 256 << 20  # not lowered
    finally:
        mx.set_cache_limit(original)
        mx.clear_cache()


def test_a_restored_cache_starts_generating_without_a_copy(tiny):
    """mlx-lm's hand-over from prompt processing to generation deep-copies the batch's
    whole KV cache (at 4K tokens of SmolLM2: 190 MB, into fresh pages, before the first
    token). The engine's batch moves it when every sequence moves on at once."""
    from semantic_cli.backend import compat
    from semantic_cli.engine import Engine
    from semantic_cli.events import TokenEvent, TurnRequest
    from semantic_cli.model import loader

    mx = runtime.mx()
    lm = loader.load(loader.resolve(str(tiny["llama"])))
    engine = Engine(lm)
    n = 2048
    prompt = [3 + (i * 7) % 900 for i in range(n + 1)]
    from mlx_lm.models.cache import make_prompt_cache

    prefilled = make_prompt_cache(lm.model)
    lm.model(mx.array([prompt[:n]]), cache=prefilled)
    room = [
        (mx.zeros((1, *c.keys.shape[1:2], n + 256, c.keys.shape[3])), mx.zeros((1, *c.values.shape[1:2], n + 256, c.values.shape[3])))
        for c in prefilled
    ]
    for (k, v), c in zip(room, prefilled, strict=True):  # with room to grow, as a restore makes them
        k[..., :n, :], v[..., :n, :] = c.keys[..., :n, :], c.values[..., :n, :]
    caches = [compat.restored_kv_cache(k, v, n) for k, v in room]  # as a restore hands them over
    mx.eval([c.state for c in caches])
    cache_bytes = sum(c.keys.nbytes + c.values.nbytes for c in caches)
    del prefilled, room
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    batch = engine.batch()
    batch.add(TurnRequest("a", prompt, caches, n, max_tokens=1))
    del caches
    events = []
    while not any(isinstance(e, TokenEvent) for e in events):
        events += batch.step()
    batch.close()
    extra = mx.get_peak_memory() - base
    assert extra < cache_bytes / 2, f"{extra} bytes over the {cache_bytes}-byte cache: it was copied"


def _run_turn(engine, req):
    from semantic_cli.events import TurnDone

    [done] = [e for e in engine.generate([req]) if isinstance(e, TurnDone)]
    return done


def test_a_turn_alone_hands_its_cache_to_the_next_without_a_copy(tiny):
    """A sequence alone keeps the batch's own KV buffers as its cache (mlx-lm's `extract`
    copies them, and the next turn's `merge` copies them again, into buffers of a new size
    every turn: fresh pages, ~4,000 faults a turn at 720 tokens in the server), and the
    next turn adopts them: its KV memory is its new tokens, not another copy of the history."""
    from semantic_cli.events import TurnRequest
    from semantic_cli.model import loader

    mx = runtime.mx()
    from semantic_cli.engine import Engine

    engine = Engine(loader.load(loader.resolve(str(tiny["llama"]))))
    n = 2048
    prompt = [3 + (i * 7) % 900 for i in range(n)]
    first = _run_turn(engine, TurnRequest("a", prompt, None, 0, max_tokens=3))
    cache, covered = first.cache, first.cache_covers
    assert cache is not None and all(c.offset == covered for c in cache)
    assert all(c.keys.shape[2] > covered for c in cache), "the batch's buffers, with their spare room, were not kept"
    cache_bytes = sum(c.keys.nbytes + c.values.nbytes for c in cache)
    follow = first.cached_log + [5, 6, 7, 8]
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    second = _run_turn(engine, TurnRequest("a", follow, cache, covered, max_tokens=3))
    extra = mx.get_peak_memory() - base
    assert second.cache is not None and second.cache[0].keys is cache[0].keys  # written in place, not copied
    assert extra < cache_bytes / 2, f"{extra} bytes over the {cache_bytes}-byte cache: it was copied"
    # The same two turns with mlx-lm's copies: the same tokens.
    from semantic_cli.backend import compat

    stock = compat._adopted
    compat._adopted = lambda layers: None  # type: ignore[assignment]
    try:
        first_copy = _run_turn(engine, TurnRequest("b", prompt, None, 0, max_tokens=3))
        assert first_copy.cache is not None and first_copy.cache[0].keys.shape[2] == first_copy.cache_covers
        second_copy = _run_turn(engine, TurnRequest("b", follow, first_copy.cache, covered, max_tokens=3))
    finally:
        compat._adopted = stock  # type: ignore[assignment]
    assert (first_copy.generated, second_copy.generated) == (first.generated, second.generated)


def test_a_sequence_that_leaves_others_running_takes_a_copy(tiny):
    """In a batch of two, the finished sequence's cache cannot be the batch's buffers (the
    other sequence goes on writing them)."""
    from semantic_cli.engine import Engine
    from semantic_cli.events import TurnDone, TurnRequest
    from semantic_cli.model import loader

    engine = Engine(loader.load(loader.resolve(str(tiny["llama"]))))
    batch = engine.batch()
    batch.add(TurnRequest("short", [3 + i for i in range(40)], None, 0, max_tokens=1))
    batch.add(TurnRequest("long", [5 + i for i in range(40)], None, 0, max_tokens=8))
    done = None
    while done is None:
        done = next((e for e in batch.step() if isinstance(e, TurnDone) and e.key == "short"), None)
    assert batch.live == ["long"]
    assert done.cache is not None and all(c.keys.shape[0] == 1 and c.keys.shape[2] == c.offset for c in done.cache)
    batch.close()


class _CountedModel:
    """The model, counting its forward passes (everything else passes through)."""

    def __init__(self, model: object) -> None:
        self.model, self.passes = model, 0

    def __call__(self, *args, **kwargs):
        self.passes += 1
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def _counted_engine(tiny, monkeypatch=None, eager: bool = True):
    import dataclasses

    from semantic_cli.backend import compat
    from semantic_cli.engine import Engine
    from semantic_cli.model import loader

    if not eager:  # mlx-lm's own generation batch, as on a GPU
        stock = compat.batch_generator
        monkeypatch.setattr(compat, "batch_generator", lambda model, eager=False, **kw: stock(model, eager=False, **kw))
    lm = loader.load(loader.resolve(str(tiny["llama"])))
    counted = _CountedModel(lm.model)
    return Engine(dataclasses.replace(lm, model=counted)), counted


@pytest.mark.parametrize("eager", [True, False])
def test_on_the_cpu_each_token_comes_out_after_its_own_pass(tiny, monkeypatch, eager):
    """mlx-lm queues the pass over a token before handing the token out (on a GPU the two
    overlap; on the CPU async_eval runs most of the pass first), so every token came one
    pass late and a reply's last token got a pass nobody needs. On the CPU the engine hands
    each token out once its own pass is done and never reads the last one: a one-token
    turn is two passes (the prompt but its last token, then that token), not three. The
    cache then covers the turn but its last token, which the next turn's prefill reads.
    `eager=False` is mlx-lm's stock batch, as on a GPU: the pass counts there show what the
    first case saves, and that this test tells the two apart."""
    from semantic_cli.events import TokenEvent, TurnDone, TurnRequest

    if runtime.info().backend != "cpu":
        pytest.skip("a GPU keeps mlx-lm's own generation batch")
    engine, counted = _counted_engine(tiny, monkeypatch, eager)
    late = 0 if eager else 1
    prompt = [3 + (i * 7) % 900 for i in range(40)]
    seen: list[int] = []
    done = None
    for ev in engine.generate([TurnRequest("a", prompt, None, 0, max_tokens=5)]):
        if isinstance(ev, TokenEvent) and ev.token is not None:
            seen.append(counted.passes)
        if isinstance(ev, TurnDone):
            done = ev
    assert seen == [k + 2 + late for k in range(5)]  # the k-th token after the prompt's 2 passes and k more
    assert done is not None and counted.passes == 6 + late
    assert done.all_tokens == prompt + done.generated
    assert done.cache_covers == len(done.all_tokens) - 1 + late
    assert {c.offset for c in done.cache} == {done.cache_covers}
    counted.passes = 0
    one = [ev for ev in engine.generate([TurnRequest("b", prompt, None, 0, max_tokens=1)]) if isinstance(ev, TurnDone)]
    assert counted.passes == 2 + late and one[0].cache_covers == len(prompt) + late


def test_the_cpu_batch_samples_what_mlx_lms_own_batch_samples(tiny, monkeypatch):
    """Sequences joining mid-decode and leaving at different steps (an EOS or a length):
    the engine on the CPU batch gives every sequence the tokens mlx-lm's stock batch gives."""
    from semantic_cli.events import TurnDone, TurnRequest

    def run(engine) -> dict[str, list[int]]:
        batch = engine.batch()
        prompts = {k: [5 + (i * p) % 700 for i in range(n)] for k, p, n in (("a", 3, 30), ("b", 11, 9), ("c", 13, 50), ("d", 17, 4))}
        limits = {"a": 12, "b": 3, "c": 9, "d": 7}
        out: dict[str, list[int]] = {}
        batch.add(TurnRequest("a", prompts["a"], None, 0, max_tokens=limits["a"]))
        batch.add(TurnRequest("b", prompts["b"], None, 0, max_tokens=limits["b"]))
        steps = 0
        while batch.live:
            steps += 1
            if steps == 4:  # joins while a and b decode
                batch.add(TurnRequest("c", prompts["c"], None, 0, max_tokens=limits["c"]))
            if steps == 6:
                batch.add(TurnRequest("d", prompts["d"], None, 0, max_tokens=limits["d"]))
            for ev in batch.step():
                if isinstance(ev, TurnDone):
                    out[ev.key] = ev.generated
        batch.close()
        return out

    eager, _ = _counted_engine(tiny)
    got = run(eager)
    stock, _ = _counted_engine(tiny, monkeypatch, eager=False)
    want = run(stock)
    assert sorted(got) == ["a", "b", "c", "d"] and all(got.values())
    assert got == want
