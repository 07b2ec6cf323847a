"""An API request -> the engine's input: token-id prompts and one SamplingParams.

Validation is the offline API's (`LLM._to_token_ids`, `_check_params`,
`_check_request`, `_apply_chat_template`, `SamplingParams`): a ValueError or
TypeError there becomes a 400 carrying its message. OpenAI fields memgen
cannot honour are refused here with a message that says so."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from memgen.sampling_params import SamplingParams
from memgen.serve.errors import bad_request
from memgen.serve.schemas import ChatCompletionRequest, CompletionRequest

DEFAULT_COMPLETION_MAX_TOKENS = 16     # OpenAI's default for /v1/completions


@dataclass
class EngineInput:
    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    return_token_ids: bool
    tools: object = None          # memgen.structured.openai_api.ToolPlan of a chat request with tools


@contextlib.contextmanager
def user_errors():
    """ValueError / TypeError from the offline API's checks -> 400 with its message."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise bad_request(str(e)) from None


def completion_input(llm, req: CompletionRequest, memgen_checkpoint: str | None = None) -> EngineInput:
    """`memgen_checkpoint`: the MemGen checkpoint the request's `model` picked (None: the default)."""
    from memgen.llm import _as_prompt_list

    if req.echo:
        raise bad_request("echo is not supported by memgen; send it false or leave it out", "echo")
    if req.suffix:
        raise bad_request("suffix is not supported by memgen; leave it out", "suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise bad_request("best_of is not supported by memgen (only best_of == n); use n", "best_of")
    with user_errors():
        prompts = [llm._to_token_ids(p, i) for i, p in enumerate(_as_prompt_list(req.prompt))]
    params = _sampling_params(llm, req, req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, req.logprobs, prompts,
                              memgen_checkpoint=memgen_checkpoint)
    return _engine_input(req, prompts, params)


def chat_input(llm, req: ChatCompletionRequest, memgen_checkpoint: str | None = None) -> EngineInput:
    from memgen.llm import _as_conversation_list

    from memgen.structured.openai_api import tool_plan

    with user_errors():
        tools = tool_plan(req)      # tools / tool_choice checked (memgen.structured.tools)
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    if req.max_tokens is not None and req.max_completion_tokens is not None and \
            req.max_tokens != req.max_completion_tokens:
        raise bad_request("max_tokens and max_completion_tokens disagree; send one of them", "max_tokens")
    conversation = [{"role": m.role, "content": _content_text(m.content),
                     **({"tool_calls": m.tool_calls} if m.tool_calls is not None else {}),
                     **({"tool_call_id": m.tool_call_id} if m.tool_call_id is not None else {})}
                    for m in req.messages]
    add_generation_prompt = True if req.add_generation_prompt is None else req.add_generation_prompt
    with user_errors():
        conversation = _as_conversation_list(conversation)[0]
        try:
            ids = llm._apply_chat_template(conversation, add_generation_prompt,
                                           tools.tools if tools is not None else None)
        except Exception as e:   # a template that raises (e.g. roles it does not accept) refuses this input
            if isinstance(e, (ValueError, TypeError)) or type(e).__module__.startswith("jinja2"):
                raise ValueError(f"the chat template refused the conversation: {e}") from None
            raise
        if not ids:
            raise ValueError("the conversation renders to no tokens")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    # OpenAI's chat default: as many as fit (MemGen's latents take room too; the engine ends
    # the request with "length" when the positions run out)
    default = max(1, llm.max_model_len - len(ids))
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = _sampling_params(llm, req, max_tokens, default, logprobs, [ids], tools, memgen_checkpoint)
    inp = _engine_input(req, [ids], params)
    inp.tools = tools
    return inp


def _content_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def _sampling_params(llm, req, max_tokens, default_max_tokens: int, logprobs, prompts, tools=None,
                     memgen_checkpoint: str | None = None) -> SamplingParams:
    from memgen.structured.openai_api import structured_from_request, tool_constraint

    if req.logit_bias:
        raise bad_request("logit_bias is not supported by memgen; leave it out", "logit_bias")
    with user_errors():
        # response_format / structured_outputs, or the tools' constraint ("required", a named function)
        structured = structured_from_request(req)
        forced = tool_constraint(tools)
        if forced is not None and structured is not None:
            raise ValueError("tool_choice 'required' or a named function constrains the output itself: leave "
                             "response_format and structured_outputs out")
        structured = forced if forced is not None else structured
    given = dict(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, n=req.n, stop=req.stop, seed=req.seed,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, logprobs=logprobs,
        top_k=req.top_k, min_tokens=req.min_tokens, repetition_penalty=req.repetition_penalty,
        ignore_eos=req.ignore_eos, stop_token_ids=req.stop_token_ids, trigger_sample=req.trigger_sample,
        trigger_temperature=req.trigger_temperature, structured_outputs=structured,
        memgen_checkpoint=memgen_checkpoint)
    kwargs = {k: v for k, v in given.items() if v is not None}
    kwargs.setdefault("max_tokens", default_max_tokens)
    with user_errors():
        params = SamplingParams(**kwargs)      # OpenAI's default temperature is 1, as SamplingParams'
        llm._check_params(params, len(prompts))
        for i, ids in enumerate(prompts):
            llm._check_request(ids, params, i)
    return params


def _engine_input(req, prompts, params) -> EngineInput:
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")
    return EngineInput(prompts=prompts, params=params, stream=bool(req.stream),
                       include_usage=bool(req.stream_options and req.stream_options.include_usage),
                       return_token_ids=bool(req.return_token_ids))
