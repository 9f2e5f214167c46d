"""One timed cache load in a fresh process, for `semantic bench resume`.

A warm turn in real use is a new `semantic` process restoring into memory it
has never touched, where first-touch page faults cost as much as the reads. So
the restore and mlx-lm's `load_prompt_cache` are each timed here, in their own
process, after the imports (which a chat process has done by then).

    python -m semantic_cli.bench.probe '{"op": "restore", ...}'   ->   {"seconds": 0.21, "tokens": 4096}
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def probe(job: dict[str, Any]) -> dict[str, Any]:
    """{"seconds": the load's time, "tokens": how many it brought back (0 for mlx-lm's file)}."""
    from ..backend import runtime
    from ..kv.layers import CacheSpec
    from ..kv.store import KVStore
    from ..model import loader

    mx = runtime.mx()
    from mlx_lm.models.cache import load_prompt_cache

    loader.settle()  # as a chat process once its model is loaded
    if job["op"] == "restore":
        store = KVStore(job["block_tokens"], disk_budget=1 << 62, hot_budget=0)
        prompt = job["prompt"]
        t = time.perf_counter()
        restored = store.restore(job["agent"], job["model_fp"], CacheSpec.from_json(job["spec"]), prompt, capacity=len(prompt))
        seconds = time.perf_counter() - t
        if restored.tier != "warm":
            raise RuntimeError(f"expected a warm restore, got {restored.tier}: {restored.warnings}")
        return {"seconds": seconds, "tokens": restored.matched}
    t = time.perf_counter()
    loaded = load_prompt_cache(job["path"])
    mx.eval([c.state for c in loaded])
    return {"seconds": time.perf_counter() - t, "tokens": 0}


def probe_record(job: dict[str, Any]) -> dict[str, Any]:
    """Run `probe(job)` in a fresh interpreter (same SEMANTIC_HOME); what it returned."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "semantic_cli.bench.probe", json.dumps(job)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench probe failed: {out.stderr.strip().splitlines()[-1:]}")
    record: dict[str, Any] = json.loads(out.stdout)
    return record


def run_probe(job: dict[str, Any]) -> float:
    """The seconds of `probe(job)` in a fresh interpreter."""
    return float(probe_record(job)["seconds"])


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
