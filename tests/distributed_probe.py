"""Run under mlx.launch (2 ranks) by tests/test_distributed.py: `SCHEMES MODEL_DIR...`.

For each split scheme and tiny model: the model split over the ranks against the same model
whole (on every rank): rank 0 prints one JSON line with the largest logits difference over
a prompt and whether 24 greedy tokens agree. Then the start-up check that every rank has
the same model: a mismatch is refused on rank 0 with one line, a match passes."""

from __future__ import annotations

import json
import sys

from semantic_cli.backend import runtime, sharding
from semantic_cli.distributed.link import Link
from semantic_cli.errors import ModelError

mx = runtime.mx()

from mlx_lm import load  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402

group = mx.distributed.init(strict=True)
schemes, paths = sys.argv[1].split(","), sys.argv[2:]
for scheme in schemes:
    for path in paths:
        whole, tok = load(path)
        split, _ = load(path, lazy=True)
        layout = sharding.shard(split, group, scheme)
        for m in (whole, split):
            runtime.apply_dtype_policy(m)
            mx.eval(m.parameters())
        prompt = mx.array(tok.encode("The quick brown fox jumps over the lazy dog. What is the capital of France?"))
        diff = float(mx.max(mx.abs(whole(prompt[None]) - split(prompt[None]))))
        tokens = [[int(t) for t, _ in generate_step(prompt, m, max_tokens=24)] for m in (whole, split)]
        if group.rank() == 0:
            row = {"model": path.rstrip("/").rsplit("/", 1)[-1], "scheme": layout.scheme, "max_abs_logit_diff": diff}
            print(json.dumps({**row, "tokens_equal": tokens[0] == tokens[1]}), flush=True)
link = Link(group)
link.check_same("model", "same", "never said")
try:
    link.check_same("model", f"weights of rank {group.rank()}", "give every host the same model files")
except ModelError as exc:
    if group.rank() == 0:
        print(json.dumps({"refused": exc.message}), flush=True)
