"""Every use of mlx-lm below its public API, behind public functions (audited against mlx-lm 0.32).

- `restored_kv_cache`: a `KVCache` built from restored buffers that a batch of
  one adopts without a copy; its `merge` sets `BatchKVCache._idx` (the write
  position), which mlx-lm only sets inside its own `BatchKVCache.merge`.
- `batch_generator`: mlx-lm's `BatchGenerator` whose prompt batch hands its KV cache
  to generation without a copy when every sequence moves on at once (mlx-lm's
  `PromptProcessingBatch.split` deep-copies the whole cache first: at 4K tokens of
  SmolLM2, 190 MB copied into freshly faulted pages before the first token).
- `batch_generator(eager=True)` (the CPU): a generation batch that returns each sampled
  token as soon as its pass is done. mlx-lm's `GenerationBatch` queues the pass over a
  token before it hands that token out, which overlaps the two on a GPU; on the CPU
  `async_eval` itself runs most of the pass (48 of its 64 ms here), so every token,
  the first included, came one whole pass late, and a reply's last token got a pass
  nobody needs. Here the pass over the tokens handed out runs at the start of the next
  step, for the sequences that go on: a sequence alone runs the same passes in the same
  order (the same values), one token sooner; in a batch a finished sequence leaves one
  pass earlier (greedy tokens unchanged, tests/test_backend.py). A finished sequence's cache and token list then end
  before its last token (`Response.all_tokens` still says what the cache covers).
- `batch_generator`'s prompt batch also rolls a prompt pass that Ctrl-C stopped between two
  layers (`interruptible`) back to where it began: the layers' caches trimmed to their
  write position before it (`BatchKVCache._idx` and `_right_padding`, which mlx-lm keeps
  private) and its token lists cut to match, so what was read before it is kept as cache
  (`stopped_prompt`, only where `stoppable_mid_step`).
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

from . import runtime

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


_PROMPT_BATCH: dict[bool, Any] = {}  # eager -> the prompt batch class


def _moving_split_class(generation_class: Any) -> type:
    from mlx_lm.generate import PromptProcessingBatch

    class MovingSplitBatch(PromptProcessingBatch):
        stopped = False  # a prompt pass was stopped between layers (`interruptible`): see `stopped_prompt`

        def prompt(self, tokens: list[list[int]]) -> None:
            from .interruptible import PrefillStopped

            lengths = [len(t) for t in self.tokens]
            # BatchKVCache's write position (a pass is stopped only where every layer has one)
            positions = [getattr(c, "_idx", None) for c in self.prompt_cache]
            try:
                super().prompt(tokens)
            except PrefillStopped:
                # Back to where the pass began: the layers it reached trimmed to their write
                # position before it, right padding it prepared forgotten, the token lists cut.
                for layer, position in zip(self.prompt_cache, positions, strict=True):
                    if position is not None and layer._idx > position:
                        layer.trim(layer._idx - position)
                    layer._right_padding = None
                self.tokens = [t[:n] for t, n in zip(self.tokens, lengths, strict=True)]
                self.stopped = True

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

        def generate(self, tokens: list[list[int]]) -> Any:
            if generation_class is None:
                return super().generate(tokens)
            # mlx-lm's, with the generation batch class chosen (it names its own)
            if any(len(t) > 1 for t in tokens):
                self.prompt([t[:-1] for t in tokens])
            generation = generation_class(
                self.model,
                self.uids,
                runtime.mx().array([t[-1] for t in tokens]),
                self.prompt_cache,
                self.tokens,
                self.samplers,
                self.fallback_sampler,
                self.logits_processors,
                self.stop_sequences,
                self.max_tokens,
            )
            self.uids, self.prompt_cache, self.tokens = [], [], []
            self.samplers, self.logits_processors, self.max_tokens = [], [], []
            return generation

    return MovingSplitBatch


_EAGER: Any = None


def _eager_generation_class() -> type:
    from mlx_lm.generate import GenerationBatch

    mx = runtime.mx()

    class EagerGenerationBatch(GenerationBatch):
        owed = False  # the pass over the tokens the last `next` handed out is still to run

        def next(self) -> list[Any]:
            if not self.uids:
                self.owed = False
                return []
            if self.owed:
                self._step()  # the pass over the last tokens handed out: it samples this step's
            self.owed = False
            tokens_mx, logprobs = self._next_tokens, list(self._next_logprobs)
            mx.eval(tokens_mx, logprobs)
            tokens: list[int] = tokens_mx.tolist()  # type: ignore[assignment]  # one id per sequence
            keep: list[int] = []
            responses = []
            for i in range(len(self.uids)):
                finish_reason = None
                self._num_tokens[i] += 1
                if self._num_tokens[i] >= self.max_tokens[i]:
                    finish_reason = "length"
                if self._matchers[i].advance(tokens[i]):
                    finish_reason = "stop"
                done = finish_reason is not None
                if not done:
                    keep.append(i)
                responses.append(
                    self.Response(
                        uid=self.uids[i],
                        token=tokens[i],
                        logprobs=logprobs[i],
                        finish_reason=finish_reason,
                        prompt_cache=self._finished_cache(i) if done else None,
                        all_tokens=list(self.tokens[i]) if done else None,  # what the cache covers: not this token
                    )
                )
            if len(keep) < len(self.uids):
                self.filter(keep)
            self.owed = bool(self.uids)
            return responses

        def _finished_cache(self, i: int) -> list[Any]:
            """The cache of sequence `i`, which ends in this step: the batch's own buffers when
            it is alone (`_adopted`), else a copy."""
            adopted = _adopted(self.prompt_cache) if len(self.uids) == 1 else None
            return adopted if adopted is not None else self.extract_cache(i)

        def extend(self, batch: Any) -> None:
            if self.owed and self.uids:
                self._step()  # the joining sequences' next tokens are sampled, not handed out: so are ours
            self.owed = False
            super().extend(batch)

    return EagerGenerationBatch  # mlx-lm's `empty` builds `cls`: this class


def _adopted(layers: list[Any]) -> list[Any] | None:
    """A batch of one's KV cache as `restored_kv_cache`s over the batch's own buffers, spare
    capacity and all, or None where a layer is not a plain `BatchKVCache` that starts at
    position 0. `BatchKVCache.extract` copies every layer into a new buffer of the exact
    length, and the next turn's `merge` copies it again into another: three KV-sized
    allocations a turn, of sizes that grow with every turn, so MLX's buffer cache (which
    reuses a buffer only for a request within two pages of its size) never serves them
    and they come from freshly faulted pages. At 720 tokens of history the server took
    ~4,000 page faults a turn and its prompt step varied 130-250 ms; kept this way, the
    next turn's batch adopts the buffers (`RestoredKVCache.merge`) and writes its tokens
    after the cached ones in place. So one such cache must not seed two continuations (the
    second would write over the first's new tokens): a hot cache serves one agent, whose
    turns take turns, and an engine error drops it (`Chat.drop_hot`)."""
    from mlx_lm.models.cache import BatchKVCache

    out: list[Any] = []
    for c in layers:
        if type(c) is not BatchKVCache or c.keys is None or c._right_padding is not None:
            return None
        if c.left_padding.tolist() != [0]:
            return None
        out.append(restored_kv_cache(c.keys, c.values, c._idx))
    return out


def batch_generator(model: Any, eager: bool = False, **kwargs: Any) -> Any:
    """mlx-lm's BatchGenerator(model, **kwargs), with the no-copy hand-over to generation;
    `eager` (for the CPU): each token handed out as soon as its pass is done (see above)."""
    global _EAGER
    from mlx_lm.generate import BatchGenerator

    if eager and _EAGER is None:
        _EAGER = _eager_generation_class()
    if eager not in _PROMPT_BATCH:
        _PROMPT_BATCH[eager] = _moving_split_class(_EAGER if eager else None)
    gen = BatchGenerator(model, **kwargs)
    gen._prompt_batch = _PROMPT_BATCH[eager].empty(model, gen.sampler, prefill_step_size=gen.prefill_step_size)
    if eager:
        gen._generation_batch = _EAGER.empty(model, gen.sampler)
    return gen


def stoppable_mid_step(model: Any) -> bool:
    """Whether a prompt pass of `model` can be stopped between layers and rolled back: every
    layer's cache is a plain `KVCache` (a batch of them trims exactly). Sliding windows and
    SSM states cannot be rolled back, so their prefill stops only between steps."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    return all(type(c) is KVCache for c in make_prompt_cache(model))


def stopped_prompt(gen: Any) -> bool:
    """Whether the last step of `batch_generator`'s `gen` had its prompt pass stopped (and
    rolled back to where it began). The step's other results are whole; the generator's
    own bookkeeping is not (it counted the chunk as read): drop it after this step."""
    return bool(getattr(gen._prompt_batch, "stopped", False))


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
