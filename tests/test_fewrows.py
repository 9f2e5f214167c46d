"""Batched decoding's matmuls on the CPU (backend/fewrows, the native few_rows_matmul):
the products MLX computes, used by decode steps of two or more sequences only, so a
prefill and a batch of one keep MLX's own bits; the mode ends with the batch."""

from __future__ import annotations

import pytest

from semantic_cli.backend import buffers, fewrows, runtime
from semantic_cli.engine import get_engine
from semantic_cli.events import TokenEvent, TurnDone, TurnRequest
from semantic_cli.model.loader import ModelRef

needs_kernel = pytest.mark.skipif(not fewrows.available(), reason="needs the CPU backend and the native module")


@needs_kernel
@pytest.mark.parametrize(
    "rows,n,k",
    [(1, 576, 576), (2, 192, 576), (4, 1536, 576), (7, 300, 37), (8, 64, 15), (9, 130, 64), (16, 100, 1536)],
)
def test_the_kernel_computes_x_times_w_transposed(rows, n, k):
    """Every row count the kernel specialises (1-8, then passes of 8), a k that is no
    multiple of its 16 lanes, an n that is no multiple of a thread's share."""
    mx = runtime.mx()
    mx.random.seed(rows * 1000 + n + k)
    x = mx.random.normal((rows, k))
    w = mx.random.normal((n, k))
    got = buffers.native().few_rows_matmul(x, w, 2)
    want = x @ w.T
    assert got.shape == (rows, n) and got.dtype == mx.float32
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item()
    assert not mx.array_equal(got, mx.zeros_like(got)).item()


@needs_kernel
def test_the_kernel_takes_views_and_one_thread():
    mx = runtime.mx()
    mx.random.seed(5)
    x = mx.random.normal((576, 4)).T  # columns of a matrix: strided rows
    w = mx.random.normal((576, 300)).T
    want = x @ w.T
    for threads in (1, 2, 3):
        got = buffers.native().few_rows_matmul(x, w, threads)
        assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item()


@needs_kernel
def test_the_kernel_refuses_what_it_cannot_compute():
    mx = runtime.mx()
    native = buffers.native()
    with pytest.raises(ValueError):
        native.few_rows_matmul(mx.ones((2, 8)), mx.ones((4, 9)), 2)
    with pytest.raises(ValueError):
        native.few_rows_matmul(mx.ones((2, 8), dtype=mx.float16), mx.ones((4, 8), dtype=mx.float16), 2)


@needs_kernel
def test_the_kernel_gives_the_same_bits_under_load_from_two_streams():
    """Thousands of back-to-back calls from two threads, each on its own CPU stream (so two
    MLX stream threads share the native pool), with more parts than threads: every result
    is the one a lone call gives, and none hangs."""
    import threading

    mx = runtime.mx()
    native = buffers.native()
    mx.random.seed(11)
    x = mx.random.normal((4, 96))
    ws = [mx.random.normal((n, 96)) for n in (64, 130, 700)]
    mx.eval(x, *ws)
    want = [native.few_rows_matmul(x, w, 4) for w in ws]
    mx.eval(*want)
    bad: list[str] = []

    def hammer() -> None:
        stream = mx.new_stream(mx.cpu)
        with mx.stream(stream):
            for i in range(600):
                got = [native.few_rows_matmul(x, w, 4) for w in ws]
                mx.eval(*got)
                for g, r in zip(got, want, strict=True):
                    if not mx.array_equal(g, r).item():
                        bad.append(f"call {i}")

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a call never returned"
    assert bad == []


@needs_kernel
def test_batched_mode_routes_decode_steps_of_two_or_more_rows_only():
    """On, a decode step of 2+ sequences (x of shape (b, 1, k)) takes the kernel's bits,
    while a prefill chunk and a single row keep MLX's own; off, nothing changes."""
    mx = runtime.mx()
    import mlx.nn as nn

    mx.random.seed(3)
    layer = nn.Linear(96, 300, bias=True)
    embed = nn.Embedding(500, 96)
    native = buffers.native()
    decode = mx.random.normal((4, 1, 96))
    prefill = mx.random.normal((1, 7, 96))
    single = mx.random.normal((1, 1, 96))
    plain = {name: (layer(x), embed.as_linear(x)) for name, x in (("decode", decode), ("prefill", prefill), ("single", single))}
    try:
        fewrows.set_batched(True)
        assert fewrows.active()
        on = {name: (layer(x), embed.as_linear(x)) for name, x in (("decode", decode), ("prefill", prefill), ("single", single))}
    finally:
        fewrows.set_batched(False)
    kernel = native.few_rows_matmul(decode.reshape(4, 96), layer.weight, 2).reshape(4, 1, 300) + layer.bias
    assert mx.array_equal(on["decode"][0], kernel).item()
    assert mx.array_equal(on["decode"][1], native.few_rows_matmul(decode.reshape(4, 96), embed.weight, 2).reshape(4, 1, 500)).item()
    assert not mx.array_equal(on["decode"][0], plain["decode"][0]).item()  # the other kernel: other rounding
    for name in ("decode",):
        for a, b in zip(plain[name], on[name], strict=True):
            assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item()
    for name in ("prefill", "single"):
        for a, b in zip(plain[name], on[name], strict=True):
            assert mx.array_equal(a, b).item(), name
    off = (layer(decode), embed.as_linear(decode))
    for a, b in zip(plain["decode"], off, strict=True):
        assert mx.array_equal(a, b).item()


def _replies(engine, prompts: list[list[int]], max_tokens: int = 12) -> dict[str, list[int]]:
    reqs = [TurnRequest(f"s{i}", p, None, 0, max_tokens) for i, p in enumerate(prompts)]
    return {ev.key: ev.generated for ev in engine.generate(reqs) if isinstance(ev, TurnDone)}


@needs_kernel
def test_a_batch_decodes_through_the_kernel_and_a_turn_alone_does_not(tiny, monkeypatch):
    """qwen2's tiny model has an untied lm_head; llama's is tied (as_linear)."""
    for arch in ("qwen2", "llama"):
        engine = get_engine(ModelRef(str(tiny[arch]), str(tiny[arch])))
        calls: list[int] = []
        kernel = fewrows.matmul_t

        def counting(x, w, kernel=kernel, calls=calls):
            y = kernel(x, w)
            if y is not None:
                calls.append(x.shape[0])
            return y

        monkeypatch.setattr(fewrows, "matmul_t", counting)
        _replies(engine, [[5, 9, 13, 2]])
        assert calls == []  # a batch of one: mlx-lm's own matmuls
        replies = _replies(engine, [[5, 9, 13, 2], [7, 7, 1], [11, 3, 4, 8, 21]])
        assert calls and set(calls) <= {2, 3}
        assert all(len(g) == 12 for g in replies.values())
        assert not fewrows.active()  # off with the batch
        monkeypatch.setattr(fewrows, "matmul_t", kernel)


@needs_kernel
def test_closing_a_batch_early_turns_the_mode_off(tiny):
    engine = get_engine(ModelRef(str(tiny["qwen2"]), str(tiny["qwen2"])))
    events = engine.generate([TurnRequest("a", [5, 9, 13], None, 0, 50), TurnRequest("b", [7, 1], None, 0, 50)])
    next(e for e in events if isinstance(e, TokenEvent))
    assert fewrows.active()  # on between the steps of a batch of two
    events.close()  # what Ctrl-C in a room does
    assert not fewrows.active()
