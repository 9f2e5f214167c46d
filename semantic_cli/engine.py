"""The process-wide engine: one loaded model and one continuous-batching generator.

Every generation, a single agent included, runs through
`mlx_lm.generate.BatchGenerator`; each sequence may be seeded with a restored
KV cache. The engine yields small event records and never prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .events import Event, PromptProgress, TokenEvent, TurnDone, TurnRequest, TurnStats

if TYPE_CHECKING:
    from .model.loader import LoadedModel, ModelRef

PREFILL_STEP = 512  # small enough for a live progress bar, large enough for BLAS
# Where Ctrl-C can stop a prefill only between steps (a sliding-window or SSM cache, a GPU),
# each step is sized to take about this long, so Ctrl-C never waits much longer; down to
# MIN_STEP tokens. Prefill throughput on the CPU is flat from 64 to 512 tokens a step.
STEP_SECONDS = 0.4
MIN_STEP, FIRST_STEP = 16, 64  # the first step is short: nothing is measured yet
GREEDY_BELOW = 1e-6  # a temperature under this samples greedily (see Batch.add)


@dataclass
class _Live:
    request: TurnRequest
    uid: int
    start: float
    detok: Any
    first_token_at: float | None = None
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    read: int = 0  # prompt tokens read so far (its last PromptProgress), for `Batch._size_steps`


class Engine:
    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self._generator: Any = None
        self._stoppable: bool | None = None

    @property
    def generator(self) -> Any:
        if self._generator is None:
            from .backend import compat, cpu_split, interruptible, runtime

            mx = runtime.mx()
            cpu_split.install_attention()  # before the first forward pass: bit-identical, faster on 2+ cores
            interruptible.install()  # around it: Ctrl-C stops a long prefill step between layers

            eos = sorted(self.lm.tokenizer.eos_token_ids)
            self._generator = compat.batch_generator(
                self.lm.model,
                eager=mx.default_device().type == mx.cpu,  # each token out as soon as its pass is done
                stop_tokens=[[e] for e in eos],
                prefill_step_size=PREFILL_STEP,
                completion_batch_size=32,
                prefill_batch_size=8,
            )
        return self._generator

    @property
    def stoppable_mid_step(self) -> bool:
        """Whether Ctrl-C can stop a prompt pass of this model between layers (backend/interruptible.py).
        On the CPU only: there a 512-token step of a small model takes seconds at long
        contexts; on a GPU steps are short and a sync per layer would stall it."""
        if self._stoppable is None:
            from .backend import compat, runtime

            mx = runtime.mx()
            self._stoppable = mx.default_device().type == mx.cpu and compat.stoppable_mid_step(self.lm.model)
        return self._stoppable

    def batch(self) -> Batch:
        """A continuous batch on this engine's generator: sequences join (`add`) and leave
        (`cancel`) between steps. One at a time per engine (the server's loop, or `generate`)."""
        return Batch(self)

    def generate(
        self, requests: Sequence[TurnRequest], seed: int | None = None, reading: dict[str, tuple[list[Any], list[int]]] | None = None
    ) -> Generator[Event, None, None]:
        """Run the requests concurrently; yields events as they happen.

        Ctrl-C during a step (in the main thread) is held until the step is over (a long
        prefill pass stops between layers and is rolled back), then raised here as
        KeyboardInterrupt. Stopped between steps that way, or by closing the
        iterator early, the unfinished sequences are removed so the generator stays usable,
        and those still reading their prompt leave in `reading` (key -> the cache of the
        tokens read so far, those tokens). Any other way out (an exception in a step) may
        have left it half-way through a step: it is then dropped, and the next call starts
        a fresh one (the model stays loaded).
        """
        for req in requests:
            _check(req)
        batch = self.batch()
        whole = False  # no step or insert half done
        try:
            if seed is not None:
                batch.seed(seed)
            for req in requests:
                batch.add(req)
            whole = True
            while batch.live:
                whole = False
                events = batch.step()
                whole = True
                yield from events
                if batch.stop_requested:
                    raise KeyboardInterrupt
        except BaseException:
            if not whole:
                self._generator = None  # possibly mid-step: never reused
            elif reading is not None:
                reading.update(batch.reading())
            raise
        finally:
            batch.close()


def _done(st: _Live, reason: str, cache: Any, covered: list[int], now: float) -> TurnDone:
    req = st.request
    log = list(req.prompt) + st.generated
    if covered != log[: len(covered)] or len(covered) < len(log) - 1:
        raise RuntimeError(f"the engine's cache covers {len(covered)} tokens that are not the turn's {len(log)}")
    first = st.first_token_at or now
    ttft = first - (req.started if req.started is not None else st.start)
    prefill_s = first - st.start  # from the insert: the prefill alone
    prefilled = len(req.prompt) - req.cached
    decode_time = now - first
    stats = TurnStats(
        ttft_s=ttft,
        prompt_tokens=len(req.prompt),
        cached_tokens=req.cached,
        prefilled_tokens=prefilled,
        generated_tokens=len(st.generated),
        prompt_tps=prefilled / prefill_s if prefill_s > 0 else 0.0,
        generation_tps=(len(st.generated) - 1) / decode_time if decode_time > 0 else 0.0,
        restore_s=req.restore_s,
    )
    return TurnDone(req.key, reason, "".join(st.text), list(st.generated), cache, log, stats, len(covered))


def _in_float32(sample: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A sampler that sees float32 log-probabilities: a half-precision model's (a GPU's) would
    overflow to inf under a small temperature's division (float16 at 1e-5 sampled at random)."""
    from .backend import runtime

    float32 = runtime.mx().float32

    def sampled(logprobs: Any) -> Any:
        return sample(logprobs.astype(float32) if logprobs.dtype != float32 else logprobs)

    return sampled


def _check(req: TurnRequest) -> None:
    if req.cached >= len(req.prompt):
        raise ValueError("a cache must leave at least one prompt token to process")


class Batch:
    """The sequences running on an engine's `BatchGenerator`, keyed by `TurnRequest.key`.
    `step` runs one generator step and returns its events; a sequence leaves when its
    `TurnDone` is returned, or at once with `cancel` (its partial reply is the caller's)."""

    def __init__(self, engine: Engine) -> None:
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        self.engine = engine
        self._make_sampler = make_sampler
        self._make_processors = make_logits_processors
        self._gen = engine.generator
        self._live: dict[int, _Live] = {}
        self.stop_requested = False  # Ctrl-C came during the last step (see `interrupts`)
        self.mid_step_stop = True  # Ctrl-C may stop a prompt pass between layers (not with other ranks in the same pass)
        self._read_before_stop: dict[int, tuple[list[Any], list[int]]] = {}  # see `_stopped_in_prefill`
        self._step = FIRST_STEP  # the prefill step where Ctrl-C can stop only between steps
        self._samplers: dict[tuple[float, float, int, float], Any] = {}
        args = getattr(engine.lm.model, "args", None)  # the model's logits width: its vocabulary
        self._vocab = int(getattr(args, "vocab_size", 0) or len(engine.lm.tokenizer.vocab))

    @property
    def live(self) -> list[str]:
        return [st.request.key for st in self._live.values()]

    def seed(self, seed: int) -> None:
        from .backend import runtime

        runtime.mx().random.seed(seed)

    def add(self, req: TurnRequest) -> None:
        _check(req)
        if req.key in self.live:
            raise ValueError(f"{req.key!r} already has a sequence in this batch")
        # One sampler object per setting: BatchGenerator samples the whole
        # batch in one call only when every sequence shares the same object.
        top_k = req.top_k if 0 < req.top_k < self._vocab else 0  # k at or above the vocabulary cuts nothing (and mlx would fail)
        # Below GREEDY_BELOW mlx-lm's logits / temp overflows float32 (1e-300 sampled garbage),
        # and well above it sampling already picks the top token: greedy is what was meant.
        temp = req.temp if req.temp >= GREEDY_BELOW else 0.0
        key = (temp, req.top_p, top_k, req.min_p)
        if key not in self._samplers:
            top_p = req.top_p if req.top_p < 1.0 else 0.0
            self._samplers[key] = _in_float32(self._make_sampler(temp=temp, top_p=top_p, top_k=top_k, min_p=req.min_p))
        processors = []
        if req.repeat_penalty != 1.0 and req.repeat_last_n > 0:  # per sequence: each keeps its own token context
            processors = self._make_processors(repetition_penalty=req.repeat_penalty, repetition_context_size=req.repeat_last_n)
        [uid] = self._gen.insert(
            [req.prompt[req.cached :]],
            max_tokens=[req.max_tokens],
            caches=[req.cache] if req.cache is not None else None,
            all_tokens=[list(req.prompt[: req.cached])],
            samplers=[self._samplers[key]],
            logits_processors=[processors],
        )
        self._live[uid] = _Live(req, uid, time.perf_counter(), self.engine.lm.tokenizer.detokenizer)

    def cancel(self, key: str) -> None:
        """Stop a sequence now (the others go on); unknown keys are ignored."""
        uids = [uid for uid, st in self._live.items() if st.request.key == key]
        for uid in uids:
            del self._live[uid]
        if uids:
            self._remove(uids)

    def step(self) -> list[Event]:
        from . import interrupts
        from .backend import compat, fewrows, interruptible

        events: list[Event] = []
        if not self._live or self._gen is None:  # nothing to run, or stopped in a prefill step
            return events
        try:
            # Native matmuls for the decode steps of two or more sequences; off again in `close`.
            fewrows.set_batched(len(self._live) >= 2)
            # Ctrl-C waits for the step's end (its state stays whole), or, in a long prefill
            # step, stops its prompt pass between two layers (`_stopped_in_prefill`).
            with interrupts.deferred() as sigint:
                watch = sigint.active and self.mid_step_stop and self.engine.stoppable_mid_step
                sized = sigint.active and not watch  # Ctrl-C waits for the step's end: keep steps short
                self._gen.prefill_step_size = self._step if sized else PREFILL_STEP
                began = time.perf_counter()
                with interruptible.watching(lambda: sigint.requested, watch):
                    prompt_responses, gen_responses = self._gen.next()
            self.stop_requested = sigint.requested
            if sized:
                self._size_steps(prompt_responses, time.perf_counter() - began)
        except BaseException:
            self.engine._generator = None  # possibly mid-step: never reused
            self._live.clear()
            fewrows.set_batched(False)
            raise
        for pr in prompt_responses:
            if pr.uid in self._live:
                done, total = pr.progress
                events.append(PromptProgress(self._live[pr.uid].request.key, done, total))
        for r in gen_responses:
            st = self._live.get(r.uid)
            if st is None:
                continue
            now = time.perf_counter()
            if st.first_token_at is None:
                st.first_token_at = now
            st.generated.append(r.token)
            if r.finish_reason != "stop":  # the stop token itself is not text
                st.detok.add_token(r.token)
                piece = st.detok.last_segment
                st.text.append(piece)
                events.append(TokenEvent(st.request.key, r.token, piece))
            if r.finish_reason is not None:
                st.detok.finalize()
                tail = st.detok.last_segment
                if tail:
                    st.text.append(tail)
                    events.append(TokenEvent(st.request.key, None, tail))
                del self._live[r.uid]
                events.append(_done(st, r.finish_reason, r.prompt_cache, list(r.all_tokens), now))
        if watch and compat.stopped_prompt(self._gen):
            self._stopped_in_prefill()
        return events

    def _size_steps(self, prompt_responses: list[Any], seconds: float) -> None:
        """Size the next prefill step from this one: about STEP_SECONDS, a power of two from
        MIN_STEP to PREFILL_STEP (the time includes any decoding in the same step)."""
        read = 0
        for pr in prompt_responses:
            st = self._live.get(pr.uid)
            if st is not None:
                read = max(read, pr.progress[0] - st.read)
                st.read = pr.progress[0]
        if read <= 0:
            return
        fits = STEP_SECONDS / (seconds / read)
        self._step = MIN_STEP
        while self._step * 2 <= min(fits, PREFILL_STEP):
            self._step *= 2

    def _stopped_in_prefill(self) -> None:
        """Ctrl-C stopped this step's prompt pass between layers (its other results were
        delivered): what the sequences still reading had read before that pass is kept for
        `reading`, and the generator, whose bookkeeping counted the pass, is dropped (the
        next batch starts a fresh one)."""
        from .backend import fewrows

        reading = [uid for uid, st in self._live.items() if not st.generated]
        try:
            self._read_before_stop = self._gen.extract_cache(reading)
        except Exception:  # nothing kept: the turn is still stopped, its message still recorded
            self._read_before_stop = {}
        self.engine._generator = None
        self._gen = None
        self.stop_requested = True
        fewrows.set_batched(False)

    def reading(self) -> dict[str, tuple[list[Any], list[int]]]:
        """The sequences still reading their prompt, past their restored cache: key -> (the
        cache of the tokens read so far, those tokens). Between steps only."""
        out: dict[str, tuple[list[Any], list[int]]] = {}
        live = {uid: st for uid, st in self._live.items() if not st.generated}
        found = self._read_before_stop if self._gen is None else self._gen.extract_cache(list(live))
        for uid, (cache, tokens) in found.items():
            if uid not in live:
                continue
            if len(tokens) > live[uid].request.cached:
                out[live[uid].request.key] = (list(cache), list(tokens))
        return out

    def close(self) -> None:
        """Remove the sequences still running, so the generator stays usable; batched matmuls off."""
        from .backend import fewrows

        try:
            if self._live:
                uids = list(self._live)
                self._live.clear()
                self._remove(uids)
        finally:
            fewrows.set_batched(False)

    def _remove(self, uids: list[int]) -> None:
        if self._gen is None or self.engine._generator is not self._gen:
            return
        try:
            self._gen.remove(uids)
        except Exception:
            self.engine._generator = None  # dropped instead: the next batch starts a fresh one


_engines: dict[str, Engine] = {}
# Set on rank 0 of a run over several ranks (semantic_cli.distributed): its engines keep the ranks in step.
factory: Callable[[ModelRef], Engine] | None = None


def get_engine(ref: ModelRef | None = None) -> Engine:
    """The engine for a model, loading it once per process."""
    from .model import loader

    ref = ref or loader.resolve(None)
    engine = _engines.get(ref.path)
    if engine is None:
        engine = _engines[ref.path] = factory(ref) if factory is not None else Engine(loader.load(ref))
    return engine
