"""Splitting a lazily loaded mlx-lm model over the ranks of an `mx.distributed` group.

Three schemes, picked in this order by `auto`:
- `tensor`: the model's own `shard(group)` (llama, qwen2, qwen3, ...), when its heads and
  MLP widths divide by the world size. Sums change order (all_sum): logits differ slightly.
- `pipeline`: the model's own `model.model.pipeline(group)` (deepseek_v3, qwen3_5, ...).
- `layers`: our pipeline over the layer list for every other model whose inner model is
  `embed_tokens -> layers -> norm` (SmolLM2: 9 heads / 3 KV heads do not split over 2).
  Rank r runs a contiguous slice, in order: it receives the hidden state from rank r-1
  before its first layer and sends it to rank r+1 after its last; `all_gather` then hands
  the last rank's state to every rank, so every rank computes the same logits. The
  operations are those of one process, in the same order: greedy output is identical.

Each rank's KV cache holds only its shard (its layers, or its heads), so its blocks are
keyed by the layout (`Layout.key`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ModelError
from . import runtime

SCHEMES = ("auto", "tensor", "pipeline", "layers")


@dataclass(frozen=True)
class Layout:
    scheme: str  # "single" | "tensor" | "pipeline" | "layers"
    world: int
    rank: int
    detail: str  # for the one line that says which split was chosen

    @property
    def key(self) -> str:
        """Names the shard a rank's cache holds: never read under another layout."""
        return f"{self.scheme}-w{self.world}-r{self.rank}"


SINGLE = Layout("single", 1, 0, "one process")


def shard(model: Any, group: Any, scheme: str = "auto") -> Layout:
    """Split `model` (loaded lazily: weights of layers dropped here are never read) in place."""
    n, rank = group.size(), group.rank()
    if n == 1:
        return SINGLE
    if scheme not in SCHEMES:
        raise ModelError(f"unknown split {scheme!r}: use one of {', '.join(SCHEMES)}")
    inner: Any = getattr(model, "model", None)
    if scheme in ("auto", "tensor") and hasattr(model, "shard"):
        why = _tensor_blocker(model, n)
        if why is None:
            model.shard(group)
            return Layout("tensor", n, rank, f"tensor parallel over {n} ranks (heads and MLP split)")
        if scheme == "tensor":
            raise ModelError(f"this model cannot be tensor-split over {n} ranks: {why}")
    elif scheme == "tensor":
        raise ModelError("this model has no tensor-parallel split in mlx-lm: use --split auto or layers")
    if scheme in ("auto", "pipeline") and hasattr(inner, "pipeline"):
        inner.pipeline(group)
        return Layout("pipeline", n, rank, f"mlx-lm pipeline over {n} ranks (layers {inner.start_idx}-{inner.end_idx - 1} here)")
    if scheme == "pipeline":
        raise ModelError("this model has no pipeline split in mlx-lm: use --split auto or layers")
    return _split_layers(model, group)


def _tensor_blocker(model: Any, n: int) -> str | None:
    args = getattr(model, "args", None)
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(args, name, None)
        if not isinstance(value, int) or value % n:
            return f"{name} = {value} does not divide by {n}"
    return None


def _split_layers(model: Any, group: Any) -> Layout:
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    n, rank = group.size(), group.rank()
    inner: Any = getattr(model, "model", None)
    if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
        raise ModelError("this model cannot be split over ranks: it has no shard/pipeline in mlx-lm and no plain layer list")
    layers = list(inner.layers)
    if len(layers) < n:
        raise ModelError(f"this model has {len(layers)} layers: too few to split over {n} ranks")
    # Masks are built from one layer's cache by index (llama's fa_idx): re-derived below
    # for llama's layer_types; any other mix of cache kinds is refused.
    mixed = any(type(c) is not KVCache for c in make_prompt_cache(model))
    if mixed and not hasattr(inner, "layer_types"):
        raise ModelError("this model mixes cache kinds across layers: splitting it over ranks is not supported")
    base, extra = divmod(len(layers), n)
    sizes = [base + (1 if r < extra else 0) for r in range(n)]
    start = sum(sizes[:rank])
    end = start + sizes[rank]
    stages = [
        _Stage(layer, rank - 1 if i == start and rank > 0 else None, rank + 1 if i == end - 1 and rank < n - 1 else None, group)
        for i, layer in enumerate(layers[start:end], start)
    ]
    inner.layers = stages
    if hasattr(inner, "layer_types"):
        types = list(inner.layer_types)[start:end]
        inner.layer_types = types
        if hasattr(inner, "fa_idx"):
            if "full_attention" not in types:
                raise ModelError("this split leaves a rank without a full-attention layer: not supported")
            inner.fa_idx = types.index("full_attention")
            inner.swa_idx = types.index("sliding_attention") if "sliding_attention" in types else None
    inner.norm = _Gather(inner.norm, group)
    return Layout("layers", n, rank, f"pipeline over {n} ranks by layers (layers {start}-{end - 1} of {len(layers)} here)")


def _module() -> Any:
    runtime.mx()
    import mlx.nn as nn

    return nn.Module


class _Stage(_module()):  # type: ignore[misc]
    """One of this rank's layers, with the hand-over from the previous stage or to the next."""

    def __init__(self, layer: Any, recv_from: int | None, send_to: int | None, group: Any) -> None:
        super().__init__()
        self.layer = layer
        self.recv_from = recv_from
        self.send_to = send_to
        self.group = group

    def __getattr__(self, key: str) -> Any:  # the wrapped layer's attributes (llama's use_sliding)
        try:
            return super().__getattr__(key)
        except AttributeError:
            if key == "layer" or "layer" not in self:
                raise
            return getattr(self["layer"], key)

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        mx = runtime.mx()
        if self.recv_from is not None:
            x = mx.distributed.recv_like(x, self.recv_from, group=self.group)
        h = self.layer(x, *args, **kwargs)
        if self.send_to is not None:
            h = mx.distributed.send(h, self.send_to, group=self.group)
            cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
            if cache is not None and getattr(cache, "keys", None) is not None:
                # A prefill chunk evaluates only the caches: the send must be part of them.
                cache.keys = mx.depends(cache.keys, h)
        return h


class _Gather(_module()):  # type: ignore[misc]
    """The final norm, after handing the last stage's hidden state to every rank."""

    def __init__(self, norm: Any, group: Any) -> None:
        super().__init__()
        self.norm = norm
        self.group = group

    def __call__(self, h: Any) -> Any:
        mx = runtime.mx()
        rows = h.shape[0]
        h = mx.distributed.all_gather(h, group=self.group)[-rows:]
        return self.norm(h)
