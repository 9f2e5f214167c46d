#!/usr/bin/env python3
"""Would a warm turn gain from restoring its cache while the model already computes? (issue 19)

    SEMANTIC_HOME=DIR python scripts/restore_overlap.py AGENT [--rounds 4]

In one process: a warm turn of AGENT (it restores the agent's blocks), then rounds of
three measurements on the same loaded model:
- *alone*: the agent's blocks restored into fresh memory (a second `KVStore`, MLX's
  freed buffers and the C allocator's handed back to the OS first), nothing else running;
- *hot*: a hot turn of AGENT (its cache never left memory), nothing else running;
- *both*: the same hot turn while a thread restores the blocks again, as in *alone*.
If the two cores had idle time during a turn, *both* would be close to *hot*; if the
turn already uses them fully, *both* is about *hot* plus *alone*, and reading the cache
while the model runs (layer by layer, say) would save nothing. Each turn adds an
exchange to AGENT: use a copy of a home. docs/benchmarks.md has what it measured.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("agent")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    if "SEMANTIC_HOME" not in os.environ:
        parser.error("set SEMANTIC_HOME to a copy of a home: every turn adds to the agent")

    from semantic_cli.backend import runtime
    from semantic_cli.bench.turns import QUESTION, timed_turn
    from semantic_cli.chat import Chat
    from semantic_cli.kv.store import KVStore
    from semantic_cli.store import Store

    chat = Chat(Store())
    agent = chat.open_agent(args.agent, None, "")
    chat.engine_for(agent)
    seen: dict[str, Any] = {}
    restore = chat.kv.restore

    def recorded(*call: Any, **kwargs: Any) -> Any:
        seen["call"] = call
        return restore(*call, **kwargs)

    chat.kv.restore = recorded  # type: ignore[method-assign]
    ttft, record = timed_turn(chat, args.agent, QUESTION, None)
    if record.tier != "warm":
        raise SystemExit(f"the first turn was {record.tier}, not warm: the agent needs blocks on disk")
    print(f"warm turn: TTFT {ttft * 1e3:.0f} ms")
    name, model, spec, prompt = seen["call"]

    def restore_alone() -> float:
        store = KVStore(chat.kv.block_tokens, disk_budget=1 << 62, hot_budget=0)  # its own SQLite connection
        runtime.release_freed_memory()
        start = time.perf_counter()
        restored = store.restore(name, model, spec, prompt, capacity=len(prompt))
        seconds = time.perf_counter() - start
        if restored.tier != "warm" or restored.matched == 0:
            raise SystemExit(f"the restore came back {restored.tier}: {restored.warnings}")
        return seconds

    rows: dict[str, list[float]] = {"alone": [], "hot": [], "both": [], "restore during both": []}
    for _ in range(args.rounds):
        rows["alone"].append(restore_alone())
        runtime.release_freed_memory()
        rows["hot"].append(timed_turn(chat, args.agent, QUESTION, None)[0])
        runtime.release_freed_memory()
        during: list[float] = []
        thread = threading.Thread(target=lambda out=during: out.append(restore_alone()))
        thread.start()
        rows["both"].append(timed_turn(chat, args.agent, QUESTION, None)[0])
        thread.join()
        rows["restore during both"].append(during[0])
    for label, values in rows.items():
        print(f"{label:>20}: " + " ".join(f"{v * 1e3:.0f}" for v in values) + " ms")
    print(f"each restore: the cache of the warm turn's {len(prompt)}-token prompt")


if __name__ == "__main__":
    main()
