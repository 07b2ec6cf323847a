"""Request and response bodies in OpenAI's shapes (pydantic).

Requests are strict: a value of the wrong type or an out-of-range value of a
known field is a 400, and an unknown top-level field is ignored with one warning
in the log (vLLM's habit: routers and clients add other servers' fields) (OpenAI's ranges here; the engine's own ranges are
checked by SamplingParams / LLM, with their messages). OpenAI fields that
memgen cannot honour are accepted by the schema and refused in `protocol` with
a message that says so.

Extra request fields (the OpenAI client sends them through `extra_body`):
- MemGen: `return_token_ids` (per choice `token_ids`, `augmentation` and
  `insertion_positions`, plus the prompt's ids), `trigger_sample`,
  `trigger_temperature`;
- vLLM's: `top_k`, `min_tokens`, `repetition_penalty`, `ignore_eos`,
  `stop_token_ids` (and `add_generation_prompt` for chat);
- the fields vllm-router adds to every request it forwards (`no_stop_trim`,
  `skip_special_tokens`, `return_hidden_states`; for chat `continue_final_message`,
  `separate_reasoning`, `stream_reasoning`, `include_reasoning`): accepted at the
  values it sends (memgen's behaviour), a 400 otherwise (the reasoning flags are
  ignored: memgen has no reasoning parser).
"""
from __future__ import annotations

import time
from typing import Any, Literal

import logging

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

INT64 = dict(ge=-(2**63), le=2**64 - 1)
_log = logging.getLogger("memgen.serve")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _GenerationFields(_Strict):
    # a field memgen does not know (another server's: routers add vLLM's and SGLang's own) is
    # accepted and ignored with one warning per request, as vLLM does; known fields stay strict
    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="after")
    def _ignore_unknown_fields(self):
        extra = self.__pydantic_extra__
        if extra:
            _log.warning("The following fields were present in the request but ignored: %s", sorted(extra))
            extra.clear()
        return self

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = None
    n: int | None = Field(None, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, **INT64)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    # MemGen's fields (extra_body)
    return_token_ids: bool | None = None
    trigger_sample: bool | None = None
    trigger_temperature: float | None = None
    # vLLM's structured outputs ({"json" | "regex" | "choice" | "grammar": ...}; memgen.structured)
    structured_outputs: dict[str, Any] | None = None
    # vllm-router fills these in on every request it forwards (docs/API.md, "Replicas behind a router")
    no_stop_trim: Literal[False] | None = None
    skip_special_tokens: Literal[True] | None = None
    return_hidden_states: Literal[False] | None = None


class CompletionRequest(_GenerationFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    response_format: dict[str, Any] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None     # an assistant's calls (memgen.structured.tools)
    tool_call_id: str | None = None                    # a tool turn's answer to that call


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    add_generation_prompt: bool | None = None
    # vllm-router's defaults (see _GenerationFields)
    continue_final_message: Literal[False] | None = None
    separate_reasoning: bool | None = None
    stream_reasoning: bool | None = None
    include_reasoning: bool | None = None


# ---- responses -------------------------------------------------------------------------
MEMGEN_CHOICE_FIELDS = ("prompt_token_ids", "token_ids", "augmentation", "insertion_positions")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _without_none(data: dict, names) -> dict:
    """`data` without the fields in `names` that are None: optional fields a
    response leaves out unless the request asked for them."""
    for name in names:
        if data.get(name) is None:
            data.pop(name, None)
    return data


class _ChoiceWithMemGen(_Response):
    """MemGen's per-choice fields, present only when the request asked
    (`return_token_ids`): the generated ids, the augmentation mask (-100 not
    consulted, 0 skipped, 1 inserted; entry i is the decision before token i)
    and the indices i of the tokens that latents were inserted before. In a
    stream chunk they are the chunk's share (concatenate them)."""
    prompt_token_ids: list[int] | None = None     # completions: the choice's prompt (vLLM's place)
    token_ids: list[int] | None = None
    augmentation: list[int] | None = None
    insertion_positions: list[int] | None = None

    @model_serializer(mode="wrap")
    def _drop_unasked(self, handler):
        return _without_none(handler(self), MEMGEN_CHOICE_FIELDS)


class UsageInfo(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_ChoiceWithMemGen):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


def _now() -> int:
    return int(time.time())


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(_Response):
    content: list[ChatLogprob] | None = None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None   # [{"id", "type": "function", "function": {"name", "arguments"}}]

    @model_serializer(mode="wrap")
    def _drop_no_calls(self, handler):
        return _without_none(handler(self), ("tool_calls",))


class ChatChoice(_ChoiceWithMemGen):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
    prompt_token_ids: list[int] | None = None

    @model_serializer(mode="wrap")
    def _drop_unasked(self, handler):
        return _without_none(handler(self), ("prompt_token_ids",))


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None   # [{"index", "id"?, "type"?, "function": {...}}]

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(_ChoiceWithMemGen):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "memgen"
    root: str | None = None
    max_model_len: int | None = None
    memgen: str | None = None     # the MemGen checkpoint's directory (None: the base model)
    parent: str | None = None     # a named checkpoint's base model id (vLLM's LoRA cards' habit)
    memgen_version: int | None = None   # the checkpoint's version (0 when loaded, +1 per update)


class LoadCheckpointRequest(_Strict):
    """POST /v1/load_memgen_checkpoint and /v1/update_memgen_checkpoint."""
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)


class UnloadCheckpointRequest(_Strict):
    """POST /v1/unload_memgen_checkpoint."""
    name: str = Field(min_length=1)


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
