"""Benchmark plumbing: results JSON (schema, machine, model, commit, raw samples) and summaries."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


def machine() -> dict[str, Any]:
    from ..backend import buffers, runtime

    info = runtime.info()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    with contextlib.suppress(ValueError, OSError):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "backend": info.backend,
        "device": info.device,
        "blas": info.blas,
        "python": platform.python_version(),
        "restore_code": buffers.restore_code(),
    }


def git_commit() -> str | None:
    """The commit the code was measured at, with "+dirty" when tracked files had changes on top."""
    try:
        here = Path(__file__).parent
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5, cwd=here
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if changes.stdout.strip() else "")) or None


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "min": min(samples),
        "p50": percentile(samples, 0.5),
        "p95": percentile(samples, 0.95),
        "p99": percentile(samples, 0.99),
        "max": max(samples),
        "mean": statistics.fmean(samples),
    }


@dataclass
class Results:
    name: str
    model: dict[str, Any]
    params: dict[str, Any]
    results: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    commit: str | None = field(default_factory=git_commit)  # at the start: the code that ran, not what was committed during the run

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "benchmark": self.name,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "duration_s": round(time.time() - self.started, 3),
            "git_commit": self.commit,
            "machine": machine(),
            "model": self.model,
            "params": self.params,
            "results": self.results,
            "samples": self.samples,
        }

    def write(self, path: Path | None) -> Path:
        from .. import paths

        if path is None:
            out_dir = paths.data_dir() / "bench"
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"{self.name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def model_info(lm: Any) -> dict[str, Any]:
    return {"name": lm.name, "spec": lm.ref.spec, "path": lm.ref.path, "dtype": lm.dtype, "fingerprint": lm.fingerprint}


_FILLER_WORDS = (
    "the system stores every block of the cache on disk so a later turn reads it back instead of recomputing "
    "attention over the whole conversation which saves minutes on a slow machine"
)


def filler_tokens(tokenizer: Any, n: int, seed: int = 0) -> str:
    """Plain English-ish text of about n tokens, deterministic."""
    import random

    rng = random.Random(seed)
    words = _FILLER_WORDS.split()
    text: list[str] = []
    while True:
        text += [rng.choice(words) for _ in range(64)]
        body = " ".join(text)
        if len(tokenizer.encode(body, add_special_tokens=False)) >= n:
            ids = tokenizer.encode(body, add_special_tokens=False)[:n]
            return tokenizer.decode(ids)
