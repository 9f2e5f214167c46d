"""Uninitialised MLX buffers for a warm restore to read into, and the optional native module.

`empty_arrays` hands out evaluated arrays whose contents are undefined: from
`_native` (semantic_cli/backend/_native.cpp, built by `make native`) where it
matches the mlx in use, else through a header-only safetensors stream that MLX
loads without touching the data (a private use of MLX's loader: it lives here).
Either way a negative dimension or a size that overflows is a ValueError and a
failed allocation a MemoryError, never a buffer smaller than its shape.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
from typing import Any

from . import runtime

# safetensors names of the dtypes `stream_empty_arrays` can allocate.
_SAFETENSORS_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
}


_MAX_BYTES = (1 << 63) - 1  # MLX's sizes are signed 64-bit


def empty_arrays(specs: list[tuple[tuple[int, ...], str]]) -> list[Any]:
    """Evaluated MLX arrays of these (shape, dtype)s whose contents are undefined, to be filled in place.

    Each is its own allocation, so MLX can update it in place. From the compiled
    module where `make setup` built one for this mlx (semantic_cli/backend/_native.cpp),
    else from Python.
    """
    for shape, dtype in specs:
        if dtype not in _SAFETENSORS_DTYPES or any(type(d) is not int or d < 0 for d in shape):
            raise ValueError(f"empty_arrays: cannot allocate {dtype} {tuple(shape)}")
    compiled = native()
    if compiled is not None:
        core = runtime.mx()
        # The module raises ValueError for a size that overflows, MemoryError for a failed allocation.
        return compiled.empty_arrays([list(shape) for shape, _ in specs], [getattr(core, dtype) for _, dtype in specs])
    return stream_empty_arrays(specs)


def native() -> Any | None:
    """semantic_cli.backend._native, if it was built for the mlx in use and SEMANTIC_NATIVE is not 0."""
    if os.environ.get("SEMANTIC_NATIVE") == "0":
        return None
    try:
        from . import _native  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _native if _native.mlx_version == runtime.mx().__version__ else None


def restore_code() -> str:
    """What a warm restore runs here: "native", "native allocation" (built without xxhash.h) or "python"."""
    compiled = native()
    if compiled is None:
        return "python"
    return "native" if hasattr(compiled, "Reader") else "native allocation"


def stream_empty_arrays(specs: list[tuple[tuple[int, ...], str]]) -> list[Any]:
    """`empty_arrays` through MLX's Python API (~7 ms for SmolLM2's 60 buffers on the dev VM).

    `mx.empty` is `mx.zeros`: a memset costs more than the reads it precedes on
    this CPU. But `mx.load` allocates without touching a buffer and hands it to
    the stream's `readinto`, so a safetensors stream that serves only its header
    gives uninitialised buffers. One stream for all: MLX evaluates a Python
    stream's arrays one by one, and one call for 60 arrays is ~4 ms cheaper than
    60 calls.
    """
    core = runtime.mx()
    import numpy as np

    meta, offset = {}, 0
    for i, (shape, dtype) in enumerate(specs):
        nbytes = getattr(core, dtype).size * math.prod(shape)
        meta[str(i)] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if offset > _MAX_BYTES:
        raise ValueError("empty_arrays: size overflows")
    head = json.dumps(meta, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    loaded = core.load(_HeaderOnlyStream(struct.pack("<Q", len(head)) + head, offset), format="safetensors")
    arrays = [loaded[str(i)] for i in range(len(specs))]
    for a in arrays:  # a failed allocation must not become a view of address 0
        if a.nbytes and np.frombuffer(memoryview(a).cast("B"), np.uint8, count=1).__array_interface__["data"][0] == 0:
            raise MemoryError(f"cannot allocate {a.nbytes} bytes")
    return arrays


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
