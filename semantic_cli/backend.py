"""Backend set-up in one place, done before `mlx` is first imported.

On Linux the `mlx[cpu]` wheel ships a reference BLAS; loading the system
OpenBLAS with RTLD_GLOBAL first routes MLX's float32 GEMM to it (~30x faster).
On the CPU backend models run in float32 (float16/bfloat16 matmuls do not use
BLAS there and are several times slower); on a GPU they keep their own dtype.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import io
import json
import math
import os
import struct
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

    floats = [v.dtype for _, v in tree_flatten(model.parameters()) if core.issubdtype(v.dtype, core.floating)]
    current = dtype_name(floats[0]) if floats else "float32"
    target = compute_dtype_name(current)
    if target != current:
        model.set_dtype(getattr(core, target))
    return target


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


# safetensors names of the dtypes `stream_empty_arrays` can allocate.
_SAFETENSORS_DTYPES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
    "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64",
    "uint8": "U8", "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
}


def empty_arrays(specs: list[tuple[tuple[int, ...], str]]) -> list[Any]:
    """Evaluated MLX arrays of these (shape, dtype)s whose contents are undefined, to be filled in place.

    Each is its own allocation, so MLX can update it in place. From the compiled
    module where `make setup` built one for this mlx (semantic_cli/_native.cpp),
    else from Python.
    """
    compiled = native()
    if compiled is not None:
        core = mx()
        return compiled.empty_arrays([list(shape) for shape, _ in specs], [getattr(core, dtype) for _, dtype in specs])
    return stream_empty_arrays(specs)


def native() -> Any | None:
    """semantic_cli._native, if it was built for the mlx in use and SEMANTIC_NATIVE is not 0."""
    if os.environ.get("SEMANTIC_NATIVE") == "0":
        return None
    try:
        from . import _native  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _native if _native.mlx_version == mx().__version__ else None


def restore_code() -> str:
    """What a warm restore runs here: "native", "native allocation" (built without xxhash.h) or "python"."""
    compiled = native()
    if compiled is None:
        return "python"
    return "native" if hasattr(compiled, "read_hashed") else "native allocation"


def stream_empty_arrays(specs: list[tuple[tuple[int, ...], str]]) -> list[Any]:
    """`empty_arrays` through MLX's Python API (~7 ms for SmolLM2's 60 buffers on the dev VM).

    `mx.empty` is `mx.zeros`: a memset costs more than the reads it precedes on
    this CPU. But `mx.load` allocates without touching a buffer and hands it to
    the stream's `readinto`, so a safetensors stream that serves only its header
    gives uninitialised buffers. One stream for all: MLX evaluates a Python
    stream's arrays one by one, and one call for 60 arrays is ~4 ms cheaper than
    60 calls.
    """
    core = mx()
    meta, offset = {}, 0
    for i, (shape, dtype) in enumerate(specs):
        nbytes = getattr(core, dtype).size * math.prod(shape)
        meta[str(i)] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(meta, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    loaded = core.load(_HeaderOnlyStream(struct.pack("<Q", len(head)) + head, offset), format="safetensors")
    return [loaded[str(i)] for i in range(len(specs))]


class _HeaderOnlyStream(io.RawIOBase):
    """A read-only stream of a header followed by `data_bytes` of data that is never written."""

    def __init__(self, header: bytes, data_bytes: int) -> None:
        self._header = header
        self._end = len(header) + data_bytes
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._end}[whence]
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), max(0, self._end - self._pos))
        if self._pos < len(self._header):
            n = min(n, len(self._header) - self._pos)
            buffer[:n] = self._header[self._pos : self._pos + n]
        self._pos += n
        return n
