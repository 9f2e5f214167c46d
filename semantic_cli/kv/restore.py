"""Reading an agent's block files straight into fresh KV cache buffers.

One buffer per layer for keys and one for values, allocated uninitialised with
room to grow; every block's bytes land in place with one copy out of the page
cache, hashed on the way (blockfile). What a damaged file leaves behind is
reported, never trusted: the caller drops it and re-prefills from there.

Files are data, never instructions. The buffers' geometry and dtype come from
the model's cache spec (kv/layers.py), never from a file: a header must agree
with the spec in every array's name, shape, dtype, offset and size, or the file
is damaged. Snapshot arrays are taken only in a tail, only for the model's
snapshot layers, in their spec's dtype and within its size bound. Every
exception while a file is read or checked (a header too deeply nested, a value of
the wrong type, memory) marks that file as damaged; none escapes a restore.
Nothing is allocated from a header's numbers: KV buffers from the spec and the
prompt, snapshot arrays only after their shape passed the spec's bound. The
checks are per file and per array, never per byte.

Where the time goes (SmolLM2, 2-core dev VM, new process): ~80% of the CPU is
the kernel (page faults on fresh memory, the copy out of the page cache), as in
mlx-lm's own load; the rest is mostly the checksum mlx-lm does not have.
Where semantic_cli/backend/_native.cpp is built, the 60 buffers are allocated in ~0.3 ms
(~7 ms from Python: see buffers.empty_arrays), and the files' reads and xxh3 run on
native threads that never take the GIL, each file as soon as its header is planned
(fileread.read_files): an 8K-token restore in reused memory ~34 ms (exp-006, 2026-12-03),
against ~55 ms with a Python thread per file and ~48 ms with every row read by `preadv`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backend import buffers, compat, runtime
from . import fileread
from .blockfile import BlockFileError
from .layers import CACHE_DTYPES, ITEMSIZE, CacheSpec, check_snapshot, check_snapshot_array, from_snapshot, snapshot_nbytes

STEP = 256  # KVCache's growth step: restored buffers get spare capacity in these units


@dataclass(frozen=True)
class CacheFile:
    path: Path
    checksum: str
    nbytes: int  # its size, as the index records it
    start: int  # the first token it covers
    n_tokens: int
    block_hash: str | None  # None for the agent's tail
    keep: int | None = None  # restore only its first `keep` tokens (a tail that runs past the prompt); None: all

    @property
    def kept(self) -> int:
        return self.n_tokens if self.keep is None else self.keep


@dataclass(frozen=True)
class Damage:
    file: CacheFile
    reason: str


def read_cache(spec: CacheSpec, files: list[CacheFile], prompt: list[int], capacity: int) -> tuple[list[Any] | None, int, Damage | None]:
    """The cache the files rebuild (or None), the tokens it covers, and the first damaged file.
    MemoryError if the buffers the spec asks for cannot be allocated."""
    mx = runtime.mx()
    import numpy as np

    if not files or not spec.persistable:
        return None, 0, None
    total = 0
    for file in files:  # the index rows the caller read are data too: they must tile the prompt
        if file.start != total or file.n_tokens < 0 or file.nbytes < 0 or not 0 <= file.kept <= file.n_tokens:
            return None, 0, Damage(file, "does not continue the cached prefix")
        if file.kept < file.n_tokens and (file.block_hash is not None or spec.snapshot_layers):
            return None, 0, Damage(file, "only a tail without whole-layer snapshots can be cut short")
        total += file.kept
    if total > len(prompt):
        return None, 0, Damage(files[-1], "covers more tokens than the conversation")
    stored = spec.stored()
    itemsize = ITEMSIZE[stored]
    # The buffers' geometry and dtype, from the model's spec: (KV heads, head dim) per array.
    geometry: dict[str, tuple[int, int]] = {}
    for layer in spec.kv_layers:
        ls = spec.layers[layer]
        geometry[f"k{layer}"], geometry[f"v{layer}"] = (ls.heads, ls.k_dim), (ls.heads, ls.v_dim)
    names = list(geometry)
    cap = -(-max(capacity, total) // STEP) * STEP
    # Uninitialised: every byte up to `total` is read into. The spare capacity is left
    # as it is (no page faults now for room a reply may never use): caches never read
    # past their offset, and a test fills it with NaNs to prove it.
    try:
        allocated = buffers.empty_arrays([((1, geometry[name][0], cap, geometry[name][1]), stored) for name in names])
    except Exception as exc:
        raise MemoryError(f"cannot allocate the restored cache ({exc})") from exc
    kv_arrays = dict(zip(names, allocated, strict=True))
    token_bytes = {name: geometry[name][1] * itemsize for name in names}
    rows = {name: _head_rows(kv_arrays[name], geometry[name][0], cap * token_bytes[name]) for name in names}  # per head, its bytes
    snapshot_arrays = {f"s{layer}:{a.key}": (layer, a) for layer in spec.snapshot_layers for a in spec.layers[layer].arrays}
    n_layers = len(spec.layers)

    every_row = [(row, token_bytes[name]) for name in names for row in rows[name]]  # in the order persist writes them
    known_entries: dict[int, list[dict]] = {}

    def kv_entries(n: int) -> list[dict]:
        """The array list of a file of `n` tokens with no snapshots, as persist writes it."""
        if n not in known_entries:
            entries, offset = [], 0
            for name in names:
                heads, dim = geometry[name]
                nbytes = heads * n * dim * itemsize
                entries.append({"name": name, "dtype": stored, "shape": [heads, n, dim], "offset": offset, "nbytes": nbytes})
                offset += nbytes
            known_entries[n] = entries
        return known_entries[n]

    def planned(file: CacheFile, snapshots: dict[str, Any]) -> fileread.FileRead:
        n, start, keep = file.n_tokens, file.start, file.kept
        tail = file.block_hash is None
        # The bytes of the tokens past `keep` are read (the checksum covers them) into scratch.
        scratch = memoryview(bytearray((n - keep) * sum(heads * dim for heads, dim in geometry.values()) * itemsize)) if keep < n else None
        scratch_used = 0

        def plan(header: dict) -> list[memoryview]:
            nonlocal scratch_used
            if header.get("kind") != ("tail" if tail else "block"):
                raise BlockFileError("not the kind of file expected")
            if not tail and header.get("hash") != file.block_hash:
                raise BlockFileError("block name does not match its content")
            tokens = header.get("tokens")
            if not isinstance(tokens, list) or len(tokens) != n or header.get("start") != start:
                raise BlockFileError("block tokens do not match")
            if tokens[:keep] != prompt[start : start + keep]:
                raise BlockFileError("block tokens do not match")
            if spec.kv_layers and header.get("kv_dtype") != spec.dtype:
                raise BlockFileError(f"KV dtype {header.get('kv_dtype')!r}, the model's is {spec.dtype}")
            entries = header.get("arrays")
            if not isinstance(entries, list):
                raise BlockFileError("no array list")
            if keep == n and not (tail and snapshot_arrays) and entries == kv_entries(n):
                # Exactly the list persist writes (every check below holds): the views in one pass.
                return [row[start * width : (start + n) * width] for row, width in every_row]
            views: list[memoryview] = []
            seen: set[str] = set()
            shapes: dict[int, dict[str, tuple[int, ...]]] = {}
            offset = 0
            for a in entries:
                name = a.get("name") if isinstance(a, dict) else None
                if not isinstance(name, str) or name in seen:
                    raise BlockFileError("an array without a name, or twice")
                seen.add(name)
                if a.get("offset") != offset:
                    raise BlockFileError(f"array {name} is not where it should be")
                dest = rows.get(name)
                if dest is not None:
                    heads, dim = geometry[name]
                    nbytes = heads * n * dim * itemsize
                    # Never let a header steer bytes outside this file's slice of the buffers.
                    if a.get("shape") != [heads, n, dim] or a.get("dtype") != stored or a.get("nbytes") != nbytes:
                        raise BlockFileError(f"array {name} has an unexpected shape, dtype or size")
                    lo, hi = start * token_bytes[name], (start + keep) * token_bytes[name]
                    rest = (n - keep) * token_bytes[name]
                    for row in dest:
                        views.append(row[lo:hi])
                        if rest:  # a distinct slice each: a group's views are hashed after the group is read
                            assert scratch is not None
                            views.append(scratch[scratch_used : scratch_used + rest])
                            scratch_used += rest
                else:
                    found = snapshot_arrays.get(name) if tail else None
                    if found is None:
                        raise BlockFileError(f"unexpected array {name[:40]!r}")
                    layer, spec_array = found
                    shape = check_snapshot_array(spec_array, a.get("shape"), a.get("dtype"), spec.layers[layer].token_limit(total))
                    nbytes = snapshot_nbytes(spec_array, shape)
                    if a.get("nbytes") != nbytes:
                        raise BlockFileError(f"array {name} has an unexpected size")
                    buf = np.empty(shape, dtype=CACHE_DTYPES[spec_array.dtype])  # bounded by the spec
                    snapshots[name] = buf
                    views.append(buf.data.cast("B"))
                    shapes.setdefault(layer, {})[spec_array.key] = shape
                offset += nbytes
            if seen != set(rows) | (set(snapshot_arrays) if tail else set()):
                raise BlockFileError("arrays missing")
            if tail and spec.snapshot_layers:
                _check_snapshots(spec, header.get("snapshots"), shapes, total)
            return views

        return fileread.FileRead(file.path, file.checksum, file.nbytes, plan, fileread.header_limit(n, n_layers))

    file_snapshots: list[dict[str, Any]] = [{} for _ in files]  # "s{layer}:{key}" -> numpy array, filled by a tail's plan
    results = fileread.read_files([planned(file, snaps) for file, snaps in zip(files, file_snapshots, strict=True)])
    snapshots: dict[int, Any] = {}
    matched = 0
    damage = None
    for file, result, snaps in zip(files, results, file_snapshots, strict=False):  # results stop at the first damage
        if isinstance(result, Exception):
            damage = Damage(file, _reason(result))
            break
        if file.block_hash is None and spec.snapshot_layers:
            try:
                snapshots = _snapshot_caches(mx, spec, result["snapshots"], snaps)
            except Exception as exc:
                damage = Damage(file, _reason(exc))
                break
        matched = file.start + file.kept
    if matched == 0 or (spec.snapshot_layers and (matched != total or len(snapshots) != len(spec.snapshot_layers))):
        return None, 0, damage  # whole-layer snapshots only fit at the tail's end
    cache: list[Any] = []
    for layer, kind in enumerate(spec.kinds):
        if kind == "kv":
            # The cache's own dtype, where the file holds other bits (bfloat16 is stored as uint16).
            keys, values = (as_dtype(mx, kv_arrays[f"{kv}{layer}"], spec.dtype) for kv in "kv")
            cache.append(compat.restored_kv_cache(keys, values, matched))
        else:
            cache.append(snapshots[layer])
    return cache, matched, damage


def _check_snapshots(spec: CacheSpec, snaps: Any, shapes: dict[int, dict[str, tuple[int, ...]]], total: int) -> None:
    """A tail's snapshot section must describe exactly the model's snapshot layers."""
    if not isinstance(snaps, dict) or set(snaps) != {str(layer) for layer in spec.snapshot_layers}:
        raise BlockFileError("snapshots do not match the model's layers")
    for layer in spec.snapshot_layers:
        snap, ls = snaps[str(layer)], spec.layers[layer]
        if not isinstance(snap, dict) or snap.get("dtypes") != {a.key: a.dtype for a in ls.arrays}:
            raise BlockFileError(f"snapshot of layer {layer} does not match the model's")
        check_snapshot(ls, snap.get("class"), shapes.get(layer, {}), snap.get("scalars"), total)


def _snapshot_caches(mx: Any, spec: CacheSpec, snaps: dict, arrays: dict[str, Any]) -> dict[int, Any]:
    """The snapshot layers' caches, from a tail whose header `plan` checked."""
    out = {}
    for layer in spec.snapshot_layers:
        ls = spec.layers[layer]
        restored = {a.key: as_dtype(mx, mx.array(arrays[f"s{layer}:{a.key}"]), a.dtype) for a in ls.arrays}
        out[layer] = from_snapshot(ls.kind, restored, dict(snaps[str(layer)]["scalars"]))
    return out


def _reason(exc: Exception) -> str:
    if isinstance(exc, (BlockFileError, ValueError)) and not isinstance(exc, UnicodeError):
        return str(exc)[:200]
    return f"unreadable ({type(exc).__name__})"


def _head_rows(buffer: Any, heads: int, row_bytes: int) -> list[memoryview]:
    whole = memoryview(buffer).cast("B")
    return [whole[h * row_bytes : (h + 1) * row_bytes] for h in range(heads)]


def as_dtype(mx: Any, a: Any, name: str) -> Any:
    """Reinterpret restored bits as the cache dtype the spec names (numpy has no bfloat16)."""
    dtype = getattr(mx, name)
    return a.view(dtype) if dtype != a.dtype else a
