"""What a model's KV cache looks like (`CacheSpec`), and whole-layer snapshots.

Full-attention layers (`KVCache`) are cut into token blocks. Layers that a
prefix of blocks cannot rebuild (a sliding window that may have wrapped, SSM
state) are snapshotted whole at the end of the agent's log: `snapshot_state`
takes one apart, `from_snapshot` builds it again. The cache class restored
blocks go into lives in backend/compat.py (it sets a private mlx-lm field).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, cast

from ..backend import runtime

# Cache classes a snapshot may name: the ones `mlx_lm.models.cache` defines
# that carry their whole state in `state` (no pickling, no arbitrary classes).
SNAPSHOT_CLASSES = ("RotatingKVCache", "ArraysCache", "MambaCache", "ChunkedKVCache")


@dataclass(frozen=True)
class CacheSpec:
    kinds: tuple[str, ...]  # per layer: "kv" (block-stored) or a snapshot class name

    @property
    def kv_layers(self) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == "kv"]

    @property
    def snapshot_layers(self) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k != "kv"]

    @property
    def persistable(self) -> bool:
        return all(k == "kv" or k in SNAPSHOT_CLASSES for k in self.kinds)


def cache_spec(model: Any) -> CacheSpec:
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    kinds = tuple("kv" if type(c) is KVCache else type(c).__name__ for c in make_prompt_cache(model))
    return CacheSpec(kinds)


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
