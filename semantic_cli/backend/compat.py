"""Every use of mlx-lm below its public API, behind public functions (audited against mlx-lm 0.32).

- `restored_kv_cache`: a `KVCache` built from restored buffers that a batch of
  one adopts without a copy; its `merge` sets `BatchKVCache._idx` (the write
  position), which mlx-lm only sets inside its own `BatchKVCache.merge`.
- `batch_generator`: mlx-lm's `BatchGenerator` whose prompt batch hands its KV cache
  to generation without a copy when every sequence moves on at once (mlx-lm's
  `PromptProcessingBatch.split` deep-copies the whole cache first: at 4K tokens of
  SmolLM2, 190 MB copied into freshly faulted pages before the first token).
- `rolled_back_prompt`: after Ctrl-C stopped a prompt pass between two layers
  (`interruptible`), the prompt batch's caches trimmed back to where the pass began
  (`BatchKVCache._idx` and `_right_padding`, which mlx-lm keeps private) and its token
  lists cut to match, so what was read before the pass is kept as cache.
- `hf_download`: the snapshot download `mlx_lm.load` itself does for a Hugging
  Face repo id (mlx-lm's private `mlx_lm.utils._download`: `snapshot_download` with
  mlx-lm's file patterns), but into a cache directory semantic chooses, which
  `_download` cannot be told.
- `generation_stream`: the stream `BatchGenerator` runs the model on. A run over
  several ranks puts its own collectives on it too: collectives on two streams
  interleave on the wire in no fixed order, and the ranks would pair the wrong ones.

Lifting the `mlx-lm<0.33` pin means re-reading these against the new release
(tests/test_architecture.py keeps private names out of the rest of the package).
Nothing here imports mlx-lm until called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_RESTORED: type | None = None


def _restored_class() -> type:
    """A KVCache whose buffers came from disk, with spare capacity, that a batch
    of one adopts without copying (BatchKVCache.merge would copy it)."""
    from mlx_lm.models.cache import BatchKVCache, KVCache

    class RestoredKVCache(KVCache):
        @classmethod
        def merge(cls, caches: list[Any]) -> Any:
            if len(caches) != 1:
                return BatchKVCache.merge(caches)
            c = caches[0]
            batch = BatchKVCache([0])
            batch.keys, batch.values = c.keys, c.values
            batch.offset = batch.offset + c.offset
            batch._idx = c.offset  # as BatchKVCache.merge sets it: where the next token is written
            return batch

    return RestoredKVCache


def restored_kv_cache(keys: Any, values: Any, offset: int) -> Any:
    """A KVCache over `keys`/`values` (which may have room beyond `offset`) covering `offset` tokens."""
    global _RESTORED
    if _RESTORED is None:
        _RESTORED = _restored_class()
    cache = _RESTORED()
    cache.keys, cache.values, cache.offset = keys, values, offset
    return cache


_MOVING_SPLIT: Any = None


def _moving_split_class() -> type:
    from mlx_lm.generate import PromptProcessingBatch

    class MovingSplitBatch(PromptProcessingBatch):
        # Before the prompt pass in flight: each sequence's token count and each layer's write
        # position (`rolled_back_prompt` returns to them); None between passes.
        before: tuple[list[int], list[int | None]] | None = None

        def prompt(self, tokens: list[list[int]]) -> None:
            self.before = ([len(t) for t in self.tokens], [getattr(c, "_idx", None) for c in self.prompt_cache])
            super().prompt(tokens)
            self.before = None

        def split(self, indices: list[int]) -> Any:
            if sorted(indices) != list(range(len(self.uids))):
                return super().split(indices)  # some stay: both halves need their own cache objects
            moved = self.__class__.__new__(self.__class__)
            moved.__dict__.update(self.__dict__)
            for name in ("uids", "tokens", "samplers", "logits_processors", "stop_sequences", "max_tokens"):
                setattr(moved, name, list(getattr(self, name)))
            self.prompt_cache = []  # filter([]) clears the list in place: it is `moved`'s now
            self.filter([])
            return moved

    return MovingSplitBatch


def batch_generator(model: Any, **kwargs: Any) -> Any:
    """mlx-lm's BatchGenerator(model, **kwargs), with the no-copy hand-over to generation."""
    global _MOVING_SPLIT
    from mlx_lm.generate import BatchGenerator

    if _MOVING_SPLIT is None:
        _MOVING_SPLIT = _moving_split_class()
    gen = BatchGenerator(model, **kwargs)
    gen._prompt_batch = _MOVING_SPLIT.empty(model, gen.sampler, prefill_step_size=gen.prefill_step_size)
    return gen


def rolled_back_prompt(gen: Any) -> dict[int, tuple[list[Any], list[int]]]:
    """After a prompt pass of `batch_generator`'s `gen` stopped half-way (an exception in a
    layer): uid -> (cache, tokens) of each sequence it was reading, as they were before that
    pass. Layers the pass reached are trimmed back to their write position before it, and
    right padding it prepared is forgotten. Empty when a layer cannot be trimmed. `gen` is
    not usable afterwards (its own bookkeeping moved on): the caller drops it."""
    batch = gen._prompt_batch
    before = getattr(batch, "before", None)
    if before is None or not batch.uids:
        return {}
    lengths, positions = before
    for layer, position in zip(batch.prompt_cache, positions, strict=True):
        now = getattr(layer, "_idx", None)
        if position is None or now is None or (now > position and not layer.is_trimmable()):
            return {}
        if now > position:
            layer.trim(now - position)
        if hasattr(layer, "_right_padding"):
            layer._right_padding = None
    out = {}
    for i, uid in enumerate(batch.uids):
        tokens = list(batch.tokens[i][: lengths[i]])
        out[uid] = (batch.extract_cache(i), tokens)
    return out


def hf_download(repo: str, cache_dir: Path) -> Path:
    """Fetch a Hugging Face repo id's model files as `mlx_lm.load` would, into the hub
    cache at `cache_dir` (found there without a network once fetched); the local directory."""
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    return Path(snapshot_download(repo, allow_patterns=DEFAULT_ALLOW_PATTERNS, cache_dir=str(cache_dir)))


def generation_stream() -> Any:
    """The stream mlx-lm's generators evaluate the model on (`mlx_lm.generate.generation_stream`)."""
    from mlx_lm.generate import generation_stream as stream

    return stream
