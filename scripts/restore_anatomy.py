#!/usr/bin/env python3
"""Where a warm turn's restore spends its time, one new process per turn (issue 19).

    SEMANTIC_HOME=DIR python scripts/restore_anatomy.py AGENT [--turns 8] [--sleep 0]

Runs AGENT's next turns as `semantic chat --json` processes, one after another, as a
user would (each adds a turn to the agent: use a copy of a home). In each, it times
the restore's read into fresh buffers (`kv.store.read_cache`) and reports what the
process spent meanwhile: CPU in user space and in the kernel (all threads, the
reader threads included), minor page faults, the machine's steal time, and the CPU
ticks of the process's other threads alive after it (the readers have exited by then:
their time is in user and kernel; so has any other thread that ended meanwhile). Ticks
are 10 ms: over a read of ~100 ms, 0 means less than about one. The read is timed
alone, without the index lookups a turn's `restore_s` includes. A restore twice as
slow with the same faults and twice the kernel time, no steal and no other thread
busy points below the process: at what each new page costs the kernel (and, in a VM,
its host). docs/benchmarks.md has what it measured on the dev VM.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

MARK = "restore-anatomy: "


def _steal_ticks() -> int:
    with open("/proc/stat") as f:
        return int(f.readline().split()[8])


def _thread_ticks() -> dict[str, int]:
    """CPU ticks (user + system) of each live thread of this process."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a thread that just exited
        out[tid] = int(fields[11]) + int(fields[12])
    return out


def child(argv: list[str]) -> None:
    """`semantic` itself, with the restore's read timed and its costs printed on stderr."""
    import semantic_cli.kv.store as kv_store

    read_cache = kv_store.read_cache
    seen: list[dict[str, Any]] = []  # one entry per restore the turn ran

    def timed(*args: Any, **kwargs: Any) -> Any:
        before, ticks, steal = resource.getrusage(resource.RUSAGE_SELF), _thread_ticks(), _steal_ticks()
        t = time.perf_counter()
        result = read_cache(*args, **kwargs)
        wall = time.perf_counter() - t
        after, ticks_after = resource.getrusage(resource.RUSAGE_SELF), _thread_ticks()
        main = str(os.getpid())
        seen.append(
            dict(
                restore_ms=round(wall * 1e3, 1),
                tokens=result[1],
                user_ms=round((after.ru_utime - before.ru_utime) * 1e3),
                sys_ms=round((after.ru_stime - before.ru_stime) * 1e3),
                minor_faults=after.ru_minflt - before.ru_minflt,
                steal_ticks=_steal_ticks() - steal,
                other_threads_ticks=sum(n - ticks.get(tid, 0) for tid, n in ticks_after.items() if tid != main),
            )
        )
        return result

    kv_store.read_cache = timed
    from semantic_cli.cli.app import main

    try:
        main(argv)
    finally:
        print(MARK + json.dumps(seen), file=sys.stderr)


def run(agent: str, turns: int, sleep: float) -> None:
    from semantic_cli.bench.turns import QUESTION  # the bench's own question

    print("turn  restore_ms  tokens  user_ms  sys_ms  minor_faults  steal_ticks  other_threads_ticks  ttft_s")
    for i in range(turns):
        time.sleep(sleep)
        argv = ["chat", "-a", agent, "-m", f"{QUESTION} ({i})", "--max-tokens", "1", "--temp", "0", "--json"]
        out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"semantic chat failed ({out.returncode}): {out.stderr.strip()[-400:]}")
        lines = [line for line in out.stderr.splitlines() if line.startswith(MARK)]
        restores = json.loads(lines[-1][len(MARK) :]) if lines else []
        if not restores:
            sys.exit("the turn restored nothing: give an agent whose cache is on disk")
        keys = ("restore_ms", "tokens", "user_ms", "sys_ms", "minor_faults", "steal_ticks", "other_threads_ticks")
        ttft = json.loads(out.stdout)["ttft_s"]
        for seen in restores:  # one, unless the turn restored twice
            print(f"{i:4d}  " + "  ".join(f"{seen[k]:>{len(k)}}" for k in keys) + f"  {ttft:>6}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("agent")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds between one process's exit and the next one's start")
    args = parser.parse_args()
    run(args.agent, args.turns, args.sleep)


if __name__ == "__main__":
    main()
