"""MLX itself: imported once, lazily, after the backend is set up.

On Linux the `mlx[cpu]` wheel ships a reference BLAS; loading the system
OpenBLAS with RTLD_GLOBAL first routes MLX's float32 GEMM to it (~30x faster).
On the CPU backend models run in float32 (float16/bfloat16 matmuls do not use
BLAS there and are several times slower); on a GPU they keep their own dtype.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
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
_blas_lib: ctypes.CDLL | None = None


def _load_openblas() -> str | None:
    global _blas_lib
    if not sys.platform.startswith("linux") or "mlx" in sys.modules:
        return None
    for path in _OPENBLAS_CANDIDATES:
        if os.path.exists(path):
            try:
                _blas_lib = ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
                return path
            except OSError:
                continue
    return None


def openblas() -> ctypes.CDLL | None:
    """The OpenBLAS that MLX's CPU matmuls call, when this process loaded one."""
    mx()
    return _blas_lib


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


def dtype_name(dtype: Any) -> str:
    """An MLX dtype's bare name: mlx.core.bfloat16 -> "bfloat16"."""
    return str(dtype).rsplit(".", 1)[-1]


def apply_dtype_policy(model: Any) -> str:
    """Cast a loaded model's floating weights per the backend policy; returns the dtype."""
    core = mx()
    from mlx.utils import tree_flatten

    leaves: Any = tree_flatten(model.parameters())  # [(name, array)]
    floats = [v.dtype for _, v in leaves if core.issubdtype(v.dtype, core.floating)]
    current = dtype_name(floats[0]) if floats else "float32"
    target = compute_dtype_name(current)
    if target != current:
        model.set_dtype(getattr(core, target))
    return target


def keep_freed_buffers(nbytes: int) -> None:
    """On the CPU, let MLX keep up to `nbytes` of freed buffers for reuse; never less than it
    keeps already (32 MiB by default there). A GPU's limit (its memory limit) is left alone.

    A process that restores KV caches more than once (the server, a room, a REPL
    switching agents) then reads into memory it has mapped already: with 32 MiB, most of
    an 8K-token SmolLM2 cache's buffers (377 MB) went back to the OS when freed, and every
    other restore in exp-006 faulted in ~9,400 new pages (2-core VM: 48-53 against 43-44 ms).
    """
    if info().backend != "cpu":
        return
    core = mx()
    previous = core.set_cache_limit(nbytes)
    if previous > nbytes:
        core.set_cache_limit(previous)


def release_freed_memory() -> None:
    """Hand every freed buffer back to the OS: MLX's cache, then what the C allocator keeps
    (glibc's `malloc_trim`, where there is one), so that the next allocations are new pages."""
    mx().clear_cache()
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(ctypes.c_size_t(0))


def freeze_startup_objects() -> None:
    """Exempt everything allocated so far (imports, the loaded model) from garbage collection.

    A full collection walks every tracked object: ~70K once mlx-lm is imported,
    about 50 ms on the 2-core dev VM. Left alone, one lands every few restores or
    decode steps, as a latency spike; frozen objects are never walked again.
    """
    gc.collect()
    gc.freeze()
    # Hand them back at exit: objects left frozen are never finalized, and a
    # process exiting with them alive hung in OpenBLAS's thread shutdown (3 in 8 runs).
    global _unfreeze_at_exit
    if not _unfreeze_at_exit:
        atexit.register(gc.unfreeze)
        _unfreeze_at_exit = True


_unfreeze_at_exit = False
