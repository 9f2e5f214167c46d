"""Shared fixtures: a temp SEMANTIC_HOME per test, tiny random-weight models,
the real SmolLM2 (prepared by `make test` before pytest starts), and a runner
for the installed `semantic` entry point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from semantic_cli import config
from semantic_cli.backend import runtime

# A suite started in the background by a non-interactive shell inherits SIGINT ignored, and
# so would every `semantic` it starts: the Ctrl-C tests would see nothing. A handler here
# makes the children start with the default disposition again.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

runtime.mx()  # OpenBLAS is loaded before anything imports mlx

from tiny_models import ensure_tiny_model  # noqa: E402

TINY_KINDS = ("llama", "qwen3", "gemma3_text", "qwen2")
SEMANTIC = str(Path(sys.executable).parent / "semantic")

# The default model lives in the developer's (or CI's) real data dir; resolve it
# before any test relocates SEMANTIC_HOME.
_ORIGINAL_ENV = dict(os.environ)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-models")
    for kind in TINY_KINDS:
        ensure_tiny_model(kind, root)
    return root


@pytest.fixture(scope="session")
def tiny(tiny_root: Path) -> dict[str, Path]:
    return {kind: tiny_root / kind for kind in TINY_KINDS}


@pytest.fixture(scope="session")
def smollm() -> Path:
    """The converted SmolLM2 directory (converting it if `make model` has not)."""
    from semantic_cli.model.default import ensure_default_model

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(_ORIGINAL_ENV)
    try:
        return ensure_default_model()
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private SEMANTIC_HOME: every file the tool writes goes under it."""
    path = tmp_path / "home"
    monkeypatch.setenv("SEMANTIC_HOME", str(path))
    for var in [s.env for s in config.SETTINGS.values() if s.env] + ["SEMANTIC_DEBUG", "NO_COLOR"]:
        monkeypatch.delenv(var, raising=False)
    return path


def quiet(stderr: bytes) -> bool:
    """Nothing to warn about: stderr holds at most the line that says a new agent was made."""
    return all(line.startswith(b"new agent '") for line in stderr.splitlines())


def run_cli(*args: str, input: bytes | str | None = None, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed `semantic` entry point with the current environment (+ env)."""
    full_env = dict(os.environ, **(env or {}))
    data = input.encode() if isinstance(input, str) else input
    return subprocess.run([SEMANTIC, *args], input=data if data is not None else b"", capture_output=True, timeout=timeout, env=full_env)


@pytest.fixture
def tiny_cache_disk(home: Path):
    """The cache dir on a 16 MB tmpfs, so it can be filled up for real."""
    cache = home / "cache"
    cache.mkdir(parents=True)
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(cache)], capture_output=True).returncode
    ):
        pytest.skip("needs root to mount a small tmpfs for a real full disk")
    yield cache
    subprocess.run(["umount", "-l", str(cache)], check=False)


def fill_up(disk: Path) -> Path:
    """Fill a small disk (`tiny_cache_disk`) to the last byte; the file that fills it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler
