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
