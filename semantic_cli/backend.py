"""Backend set-up in one place, done before `mlx` is first imported.

On Linux the `mlx[cpu]` wheel ships a reference BLAS; loading the system
OpenBLAS with RTLD_GLOBAL first routes MLX's float32 GEMM to it (~30x faster).
On the CPU backend models run in float32 (float16/bfloat16 matmuls do not use
BLAS there and are several times slower); on a GPU they keep their own dtype.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

_OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

_blas_path: str | None = None


def _load_openblas() -> str | None:
    if not sys.platform.startswith("linux") or "mlx" in sys.modules:
        return None
    for path in _OPENBLAS_CANDIDATES:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
                return path
            except OSError:
                continue
    return None


def mx() -> Any:
    """Import and return `mlx.core`, setting up the backend first."""
    global _blas_path
    if "mlx.core" not in sys.modules:
        _blas_path = _load_openblas()
    import mlx.core

    return mlx.core


@dataclass(frozen=True)
class BackendInfo:
    backend: str  # "cpu", "metal" or "cuda"
    device: str
    blas: str
    compute_dtype: str  # the dtype models run in on this backend


@lru_cache(maxsize=1)
def info() -> BackendInfo:
    core = mx()
    device = core.default_device()
    if device.type == core.gpu:
        backend = "metal" if sys.platform == "darwin" else "cuda"
        return BackendInfo(backend, str(device), "accelerator", "model")
    if sys.platform == "darwin":
        blas = "Accelerate"
    else:
        blas = f"OpenBLAS ({_blas_path})" if _blas_path else "bundled reference BLAS (slow: install libopenblas0-pthread)"
    return BackendInfo("cpu", str(device), blas, "float32")


def compute_dtype_name(model_dtype: str) -> str:
    """The dtype a model whose weights are `model_dtype` runs in here."""
    policy = info().compute_dtype
    return model_dtype if policy == "model" else policy


def apply_dtype_policy(model: Any) -> str:
    """Cast a loaded model's floating weights per the backend policy; returns the dtype."""
    core = mx()
    from mlx.utils import tree_flatten

    floats = [v.dtype for _, v in tree_flatten(model.parameters()) if core.issubdtype(v.dtype, core.floating)]
    current = str(floats[0]).replace("mlx.core.", "") if floats else "float32"
    target = compute_dtype_name(current)
    if target != current:
        model.set_dtype(getattr(core, target))
    return target
