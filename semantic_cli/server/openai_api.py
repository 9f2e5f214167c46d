"""The OpenAI-compatible subset: request models (validated by pydantic) and the response
shapes of `/v1/chat/completions` and `/v1/models`.

`model` names an agent (its conversation: the client resends the history, only the new
message is appended, and the reply is recorded as `semantic chat` records it) or the
server's model (stateless: nothing recorded, the cache found by content and kept under
`prompt_cache_key`, else `user`, else one of a few shared slots). Agents are looked up
first: an agent called like the model shadows it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import BadInputError, SemanticError
from ..events import TurnStats
from ..store import Agent, Message
from ..turn import GenSettings, TurnRecorded

MAX_MESSAGES = 2048
MAX_STOP = 4


class ConflictError(SemanticError):
    """The client's history is not the agent's transcript (HTTP 409)."""


def check_history(agent: Agent, transcript: list[Message], history: list[dict[str, str]]) -> None:
    """An OpenAI client resends the conversation: the messages before its new one must be
    the agent's transcript (its persona, then every message), or only the persona, or
    nothing (the client sends just the new message). Anything else is a 409: nothing is
    written, and the client is told where the two part."""
    stored = [{"role": "system", "content": agent.system}] if agent.system else []
    stored += [{"role": m.role, "content": m.content} for m in transcript if m.role != "summary"]
    given = list(history)
    if given and given[0]["role"] == "system" and not agent.system:
        raise ConflictError(f"agent {agent.name!r} has no persona: leave out the system message (set one with `semantic agents edit`)")
    if not given or given == stored or given == stored[:1] and agent.system:
        return
    at = next((i for i, (a, b) in enumerate(zip(given, stored, strict=False)) if a != b), min(len(given), len(stored)))
    raise ConflictError(
        f"the messages differ from agent {agent.name!r}'s transcript at message {at} "
        f"({len(given)} sent before the new one, {len(stored)} stored): send the whole transcript and one new user message, "
        f"or only the new message; to branch, `semantic agents fork {agent.name} NEW` and talk to NEW"
    )


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def as_dict(self) -> dict[str, str]:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields clients send that change nothing here (e.g. logprobs=false)
    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    prompt_cache_key: str | None = Field(None, max_length=256)
    n: int = Field(1, ge=1, le=1)
    # Beyond OpenAI's fields, as vLLM and llama-server accept them:
    top_k: int | None = Field(None, ge=0, le=1 << 20)  # above the vocabulary: no cut (the engine clamps)
    min_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0.0, allow_inf_nan=False)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP or any(not s or len(s) > 256 for s in stops):
            raise ValueError(f"at most {MAX_STOP} non-empty stop sequences of at most 256 characters")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def settings(self) -> GenSettings:
        return GenSettings(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temp=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            top_k=self.top_k,
            min_p=self.min_p,
            repeat_penalty=self.repetition_penalty,
        )

    def new_message(self) -> str:
        last = self.messages[-1]
        if last.role != "user":
            raise BadInputError("the last message must be the user's (role 'user'): it is what the model answers")
        if not last.text().strip():
            raise BadInputError("the last message is empty: nothing to answer")
        return last.text()


def parse(body: bytes) -> ChatRequest:
    try:
        return ChatRequest.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadInputError(f"{where}: {first['msg']}") from None


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(stats: TurnStats) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }


def completion(cid: str, model: str, rec: TurnRecorded) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": rec.done.text},
                "finish_reason": rec.done.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(rec.done.stats),
    }


def chunk(cid: str, model: str, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage_chunk(cid: str, model: str, stats: TurnStats) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model, "choices": [], "usage": usage(stats)}


def model_list(agents: list[tuple[str, float]], model: str) -> dict[str, Any]:
    data = [{"id": name, "object": "model", "created": int(created), "owned_by": "semantic-agent"} for name, created in agents]
    data.append({"id": model, "object": "model", "created": int(time.time()), "owned_by": "semantic-model"})
    return {"object": "list", "data": data}


def error_body(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
