"""What a turn asks the engine for and the records it gets back: plain data, importable
without the engine (a client whose turns a server runs reads these and nothing more)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TurnRequest:
    key: str  # who is asking (the agent name); events carry it back
    prompt: list[int]  # the whole token sequence the reply continues
    cache: list[Any] | None  # a KV cache covering prompt[:cached], or None
    cached: int
    max_tokens: int
    temp: float = 0.0
    top_p: float = 1.0
    started: float | None = None  # perf_counter() when the turn began (before its restore); default: when inserted
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0  # 1: none
    repeat_last_n: int = 64
    restore_s: float = 0.0  # how long restoring `cache` took (part of the TTFT), for the stats


@dataclass(frozen=True)
class TurnStats:
    ttft_s: float  # from the turn's start (its restore included) to the first token
    prompt_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    generated_tokens: int
    prompt_tps: float
    generation_tps: float
    restore_s: float = 0.0  # of the TTFT, the KV cache restore (hot: ~0)


@dataclass(frozen=True)
class PromptProgress:
    key: str
    done: int
    total: int


@dataclass(frozen=True)
class TokenEvent:
    key: str
    token: int | None  # the sampled id; None for text flushed at the end
    text: str  # the newly decodable text (may be empty mid-character)


@dataclass(frozen=True)
class TurnDone:
    key: str
    finish_reason: str  # "stop" | "length" | "interrupted"
    text: str
    generated: list[int]  # sampled ids, the final EOS included when there was one
    cache: list[Any] | None  # the KV cache of `cached_log` (None when interrupted)
    all_tokens: list[int]  # prompt + generated: the token log the turn ends with
    stats: TurnStats
    # How many of all_tokens `cache` covers: all, or all but the reply's last token,
    # which the model never read on the CPU (no pass is run just to cache it: compat.batch_generator).
    cache_covers: int = 0

    @property
    def cached_log(self) -> list[int]:
        """The tokens `cache` covers: a prefix of `all_tokens`."""
        return self.all_tokens[: self.cache_covers]


Event = PromptProgress | TokenEvent | TurnDone
