"""Time one decode step of the model itself at batch sizes 1, 2, 4 and 8 (no BatchGenerator),
to separate the engine's overhead from what the model's forward pass costs on this machine.

    .venv/bin/python scripts/model_step.py [MODEL_DIR]
"""

from __future__ import annotations

import sys
import time

from semantic_cli.backend import runtime
from semantic_cli.model.loader import ModelRef, load, resolve


def main() -> None:
    mx = runtime.mx()
    from mlx_lm.models.cache import make_prompt_cache

    ref = ModelRef(sys.argv[1], sys.argv[1]) if len(sys.argv) > 1 else resolve(None)
    model = load(ref).model
    base = None
    for batch in (1, 2, 4, 8):
        cache = make_prompt_cache(model)
        model(mx.array([[5] * 64] * batch), cache=cache)
        mx.eval([c.state for c in cache])
        token = mx.array([[7]] * batch)
        for _ in range(3):
            mx.eval(model(token, cache=cache))
        t = time.perf_counter()
        for _ in range(10):
            mx.eval(model(token, cache=cache))
        step = (time.perf_counter() - t) / 10
        base = base or batch / step
        print(f"batch {batch}: {step * 1000:.1f} ms per step, {batch / step:.1f} tok/s, {batch / step / base:.2f}x batch 1")


if __name__ == "__main__":
    main()
