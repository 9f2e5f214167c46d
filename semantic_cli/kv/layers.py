"""What a model's KV cache looks like (`CacheSpec`), and whole-layer snapshots.

Full-attention layers (`KVCache`) are cut into token blocks. Layers that a
prefix of blocks cannot rebuild (a sliding window that may have wrapped, SSM
state) are snapshotted whole at the end of the agent's log: `snapshot_state`
takes one apart, `from_snapshot` builds it again. The cache class restored
blocks go into lives in backend/compat.py (it sets a private mlx-lm field).

The spec comes from the loaded model, never from a cache file: `cache_spec`
takes mlx-lm's own `make_prompt_cache(model)` (each layer's cache class, a
window's size) and traces one token through the model without evaluating it.
MLX is lazy, so the caches' arrays then carry exactly the shapes and dtype the
engine produces (KV heads, key and value head dims, the cache dtype, a snapshot
layer's state arrays) while nothing is computed or allocated: ~8 ms of graph
building for SmolLM2's 30 layers, once per model per process. (model.args
would need each architecture's names for heads and head dims, and a guess at
the dtype the activations end up in.) A restore allocates from the spec, and a
file whose header disagrees with it (array names, shapes, dtypes, offsets,
sizes, a snapshot's class or scalars) is damaged.

Dtypes come from a short allow-list (`CACHE_DTYPES`): float32, float16 and
bfloat16, which files store as uint16 (numpy has no bfloat16). A model whose
cache uses anything else (or a cache class outside `SNAPSHOT_CLASSES`) is not
persisted: its turns re-prefill.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, cast

from ..backend import runtime

# Cache classes a snapshot may name: the ones `mlx_lm.models.cache` defines
# that carry their whole state in `state` (no pickling, no arbitrary classes).
SNAPSHOT_CLASSES = ("RotatingKVCache", "ArraysCache", "MambaCache", "ChunkedKVCache")

# The dtypes a cache array may have, and what its file stores (numpy has no bfloat16).
CACHE_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}
ITEMSIZE = {"float32": 4, "float16": 2, "uint16": 2}

# Snapshot classes whose keys and values (state keys "0" and "1") grow along the token
# axis (2), and the state key of their window (max_size / chunk_size): a restore checks
# the file's window against the model's and bounds the token axis with it.
_GROWING = {"RotatingKVCache": "4", "ChunkedKVCache": "3"}
GROWTH_STEP = 256  # mlx-lm's caches grow their buffers in steps of this many tokens
SCALAR_LIMIT = 1 << 40  # a snapshot's integer scalars (offsets, indices) are below this


@dataclass(frozen=True)
class SnapshotArray:
    key: str  # the state key `snapshot_state` gives it ("0", "0.1", ...)
    shape: tuple[int, ...]  # -1 on the token axis of a growing window
    dtype: str  # its dtype in the cache (a CACHE_DTYPES key)


@dataclass(frozen=True)
class LayerSpec:
    kind: str  # "kv" (block-stored) or a snapshot class name
    heads: int = 0  # KV heads (attention layers)
    k_dim: int = 0  # key head dim
    v_dim: int = 0  # value head dim
    arrays: tuple[SnapshotArray, ...] = ()  # a snapshot layer's state arrays
    scalars: tuple[tuple[str, int | None], ...] = ()  # a snapshot layer's other state: key, and its value in the model's own cache

    @property
    def window(self) -> int:
        """A growing window's size (0 for other layers)."""
        key = _GROWING.get(self.kind)
        value = dict(self.scalars).get(key) if key else None
        return value if isinstance(value, int) else 0

    def token_limit(self, tokens: int) -> int:
        """The most tokens a growing window's arrays hold after `tokens` tokens: a prefill
        chunk beyond the window (mlx-lm keeps window - 1 + chunk), plus a growth step."""
        return tokens + self.window + GROWTH_STEP


@dataclass(frozen=True)
class CacheSpec:
    layers: tuple[LayerSpec, ...]
    dtype: str  # the dtype of the engine's KV arrays (a CACHE_DTYPES key, or "" if unknown)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(layer.kind for layer in self.layers)

    @property
    def kv_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.kind == "kv"]

    @property
    def snapshot_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.kind != "kv"]

    @property
    def persistable(self) -> bool:
        """Whether every layer's cache can be stored and checked against this spec."""
        for layer in self.layers:
            if layer.kind == "kv":
                if self.dtype not in CACHE_DTYPES or min(layer.heads, layer.k_dim, layer.v_dim) <= 0:
                    return False
            elif layer.kind not in SNAPSHOT_CLASSES or not layer.arrays or any(a.dtype not in CACHE_DTYPES for a in layer.arrays):
                return False
        return True

    def stored(self) -> str:
        """The dtype files store KV arrays in."""
        return CACHE_DTYPES[self.dtype]

    @classmethod
    def uniform(cls, kinds: tuple[str, ...], heads: int, head_dim: int, dtype: str = "float32", window: int = 32) -> CacheSpec:
        """A spec built by hand (tests, benchmarks): every attention layer with these KV heads
        and head dim; a "RotatingKVCache" layer with this window."""
        layers = []
        for kind in kinds:
            if kind == "kv":
                layers.append(LayerSpec("kv", heads, head_dim, head_dim))
            elif kind == "RotatingKVCache":
                arrays = tuple(SnapshotArray(k, (1, heads, -1, head_dim), dtype) for k in "01")
                layers.append(LayerSpec(kind, heads, head_dim, head_dim, arrays, (("2", 0), ("3", 0), ("4", window), ("5", 0))))
            else:
                raise ValueError(f"cannot build a {kind} layer by hand")
        return cls(tuple(layers), dtype)

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "layers": [
                [layer.kind, layer.heads, layer.k_dim, layer.v_dim, [[a.key, list(a.shape), a.dtype] for a in layer.arrays], layer.scalars]
                for layer in self.layers
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CacheSpec:
        """The spec `to_json` gave (a benchmark's own child process: not for anything read from the cache)."""
        layers = tuple(
            LayerSpec(
                kind,
                heads,
                k_dim,
                v_dim,
                tuple(SnapshotArray(key, tuple(shape), dtype) for key, shape, dtype in arrays),
                tuple((key, value) for key, value in scalars),
            )
            for kind, heads, k_dim, v_dim, arrays, scalars in data["layers"]
        )
        return cls(layers, data["dtype"])


def cache_spec(model: Any) -> CacheSpec:
    """The model's cache spec: `make_prompt_cache` and a lazy one-token trace (see the module doc)."""
    mx = runtime.mx()
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    caches = make_prompt_cache(model)
    kinds = ["kv" if type(c) is KVCache else type(c).__name__ for c in caches]
    try:
        model(mx.array([[0]]), cache=caches)  # builds the graph only: shapes and dtypes are known, nothing runs
    except Exception:  # a model that cannot be traced like this is not cached (its turns re-prefill)
        return CacheSpec(tuple(LayerSpec(k) for k in kinds), "")
    layers: list[LayerSpec] = []
    dtypes: set[str] = set()
    for kind, c in zip(kinds, caches, strict=True):
        if kind == "kv":
            if c.keys is None or c.values is None:
                layers.append(LayerSpec(kind))  # a layer the trace did not reach (shared KV): not persistable
                continue
            dtypes |= {runtime.dtype_name(c.keys.dtype), runtime.dtype_name(c.values.dtype)}
            layers.append(LayerSpec(kind, c.keys.shape[1], c.keys.shape[3], c.values.shape[3]))
        elif kind in SNAPSHOT_CLASSES:
            layers.append(_snapshot_layer(kind, c))
        else:
            layers.append(LayerSpec(kind))
    dtype = dtypes.pop() if len(dtypes) == 1 else ""
    return CacheSpec(tuple(layers), dtype)


def _snapshot_layer(kind: str, cache: Any) -> LayerSpec:
    try:
        _, arrays, scalars = snapshot_state(cache)
    except Exception:
        return LayerSpec(kind)
    growing = kind in _GROWING
    if growing and {key for key, _ in arrays} != {"0", "1"}:
        return LayerSpec(kind)  # a window the trace did not fill: not persistable
    specs = []
    heads = k_dim = v_dim = 0
    for key, a in arrays:
        shape = tuple(a.shape)
        if growing and key in ("0", "1"):
            heads, dim = shape[1], shape[3]
            k_dim, v_dim = (dim, v_dim) if key == "0" else (k_dim, dim)
            shape = (shape[0], shape[1], -1, shape[3])
        specs.append(SnapshotArray(key, shape, runtime.dtype_name(a.dtype)))
    if any(not (v is None or (isinstance(v, int) and not isinstance(v, bool))) for v in scalars.values()):
        return LayerSpec(kind)  # state this module cannot check: not persistable
    return LayerSpec(kind, heads, k_dim, v_dim, tuple(specs), tuple(scalars.items()))


def check_snapshot(layer: LayerSpec, class_name: Any, shapes: dict[str, tuple[int, ...]], scalars: Any, tokens: int) -> None:
    """Raise ValueError unless a file's snapshot of `layer` is one the model's cache could have
    left after `tokens` tokens: its class, its arrays' shapes (already checked against the
    spec's), and scalars of the spec's keys and kinds, in range; a window the model's own."""
    if class_name != layer.kind:
        raise ValueError(f"snapshot class {class_name!r}, the model's is {layer.kind}")
    expected = dict(layer.scalars)
    if not isinstance(scalars, dict) or set(scalars) != set(expected):
        raise ValueError("snapshot scalars do not match the model's cache")
    for key, value in scalars.items():
        if (value is None) != (expected[key] is None):
            raise ValueError(f"snapshot scalar {key} is not what the model's cache holds")
        if value is not None and (type(value) is not int or not 0 <= value < SCALAR_LIMIT):
            raise ValueError(f"snapshot scalar {key} is out of range")
    window_key = _GROWING.get(layer.kind)
    if window_key is not None:
        if scalars[window_key] != expected[window_key]:
            raise ValueError("snapshot window differs from the model's")
        filled = shapes["0"][2]
        if layer.kind == "RotatingKVCache" and not (scalars["5"] <= filled and scalars["3"] <= scalars["4"] and scalars["2"] <= tokens):
            raise ValueError("snapshot position out of range")


def check_snapshot_array(array: SnapshotArray, shape: Any, stored_dtype: Any, limit: int) -> tuple[int, ...]:
    """The shape of a snapshot array a file (or a cache being saved) holds, if the spec
    allows it; ValueError if not. The dtype is the spec's; each dimension is the spec's,
    but for a growing window's token axis, which holds at most `limit` (`token_limit`)."""
    if stored_dtype != CACHE_DTYPES[array.dtype]:
        raise ValueError(f"snapshot array {array.key} has dtype {stored_dtype!r}, the model's is {array.dtype}")
    if not isinstance(shape, (list, tuple)) or len(shape) != len(array.shape) or any(type(d) is not int for d in shape):
        raise ValueError(f"snapshot array {array.key} has an unexpected shape")
    for got, want in zip(shape, array.shape, strict=True):
        if got != want and not (want == -1 and 0 <= got <= limit):
            raise ValueError(f"snapshot array {array.key} has an unexpected shape")
    return tuple(shape)


def snapshot_nbytes(array: SnapshotArray, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * ITEMSIZE[CACHE_DTYPES[array.dtype]]


def cache_mismatch(spec: CacheSpec, cache: list[Any], tokens: int) -> str | None:
    """Why a cache about to be saved is not one this spec's restores accept (a bug, not
    damage: nothing is written then), or None."""
    if len(cache) != len(spec.layers):
        return f"{len(cache)} layers, the spec has {len(spec.layers)}"
    for i, (ls, c) in enumerate(zip(spec.layers, cache, strict=True)):
        try:
            if ls.kind == "kv":
                k, v = c.keys, c.values
                found = (k.shape[1], k.shape[3], v.shape[1], v.shape[3], runtime.dtype_name(k.dtype), runtime.dtype_name(v.dtype))
                if found != (ls.heads, ls.k_dim, ls.heads, ls.v_dim, spec.dtype, spec.dtype):
                    return f"layer {i} holds {found}"
                continue
            cls, arrays, scalars = snapshot_state(c)
            specs = {a.key: a for a in ls.arrays}
            if [key for key, _ in arrays] != list(specs):
                return f"layer {i} has other state arrays"
            limit = ls.token_limit(tokens)
            shapes = {
                key: check_snapshot_array(specs[key], tuple(a.shape), CACHE_DTYPES.get(runtime.dtype_name(a.dtype)), limit)
                for key, a in arrays
            }
            check_snapshot(ls, cls, shapes, scalars, tokens)
        except (ValueError, AttributeError, IndexError) as exc:
            return f"layer {i}: {exc}"
    return None


def snapshot_state(cache: Any) -> tuple[str, list[tuple[str, Any]], dict[str, Any]]:
    """(class name, [(key, mx.array)], {key: scalar}) of a layer cache's state."""
    mx = runtime.mx()
    from mlx.utils import tree_flatten

    arrays, scalars = [], {}
    # Without `destination`, tree_flatten returns a list of (key, leaf).
    flat = cast(list[tuple[str, Any]], tree_flatten(list(cache.state), is_leaf=lambda v: v is None))
    for key, value in flat:
        if isinstance(value, mx.array):
            arrays.append((key, value))
        else:
            scalars[key] = value
    return type(cache).__name__, arrays, scalars


def from_snapshot(class_name: str, arrays: dict[str, Any], scalars: dict[str, Any]) -> Any:
    runtime.mx()
    from mlx.utils import tree_unflatten
    from mlx_lm.models import cache as cache_module

    if class_name not in SNAPSHOT_CLASSES:
        raise ValueError(f"unexpected cache class {class_name}")
    items = sorted({**arrays, **scalars}.items(), key=lambda kv: [int(p) if p.isdigit() else p for p in kv[0].split(".")])
    state = tree_unflatten(items)
    return getattr(cache_module, class_name).from_state(state)


def cache_nbytes(cache: list[Any]) -> int:
    total = 0
    for c in cache:
        with contextlib.suppress(NotImplementedError, AttributeError):
            total += c.nbytes
    return total


def trim_cache(cache: list[Any], n: int) -> bool:
    """Drop the last `n` tokens from every layer of a cache, in place; False (nothing
    changed) when some layer cannot be trimmed (a wrapped sliding window, SSM state)."""
    from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

    if not can_trim_prompt_cache(cache):
        return False
    return bool(trim_prompt_cache(cache, n) == n)
