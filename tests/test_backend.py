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


def test_a_restored_cache_starts_generating_without_a_copy(tiny):
    """mlx-lm's hand-over from prompt processing to generation deep-copies the batch's
    whole KV cache (at 4K tokens of SmolLM2: 190 MB, into fresh pages, before the first
    token). The engine's batch moves it when every sequence moves on at once."""
    from semantic_cli.backend import compat
    from semantic_cli.engine import Engine, TokenEvent, TurnRequest
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
