"""Engine outputs -> OpenAI responses: whole (non-streaming) and as SSE chunks.

Choice i of a request with several prompts and n completions each is prompt
i // n, completion i % n (OpenAI's order). MemGen's fields go on each choice
when the request set `return_token_ids`; in a stream they are each chunk's
share (the concatenation is the whole)."""
from __future__ import annotations

import uuid

from memgen.outputs import INSERT, CompletionOutput
from memgen.detokenizer import IncrementalText
from memgen.serve.engine_loop import ChoiceUpdate
from memgen.serve.protocol import EngineInput
from memgen.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprob,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
)

DONE = "data: [DONE]\n\n"
MIN_LOGPROB = -9999.0     # vLLM's floor: a token a constraint rules out has -inf, which JSON cannot carry


def _finite(logprob: float | None) -> float | None:
    return None if logprob is None else max(logprob, MIN_LOGPROB)


def sse(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"


class _ChoiceState:
    def __init__(self, decode, stop):
        self.token_ids: list[int] = []
        self.text = IncrementalText(decode, stop)
        self.text_offset = 0


class ResponseBuilder:
    """Builds one request's response; `chat` picks the chat shapes."""

    def __init__(self, llm, model_name: str, inp: EngineInput, chat: bool):
        self.tokenizer = llm.tokenizer
        self.decode = llm._detokenize
        self.model_name = model_name
        self.inp = inp
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.n = inp.params.n
        self.num_choices = len(inp.prompts) * self.n
        self._states: dict[int, _ChoiceState] = {}
        self._tool_streams: dict = {}     # choice -> memgen.structured.tools.ToolStream (chat with tools)
        self._completion_tokens = 0

    # ---- pieces ------------------------------------------------------------------------
    def _prompt_ids(self, index: int) -> list[int]:
        return self.inp.prompts[index // self.n]

    def usage(self) -> UsageInfo:
        prompt = sum(len(p) for p in self.inp.prompts)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=self._completion_tokens,
                         total_tokens=prompt + self._completion_tokens)

    def _memgen_fields(self, token_ids, augmentation, start: int = 0, prompt_index: int | None = None) -> dict:
        if not self.inp.return_token_ids:
            return {}
        fields = dict(token_ids=list(token_ids), augmentation=list(augmentation),
                      insertion_positions=[start + i for i, a in enumerate(augmentation) if a == INSERT])
        if prompt_index is not None:
            fields["prompt_token_ids"] = self._prompt_ids(prompt_index)
        return fields

    def _token_text(self, token_id: int) -> str:
        return self.decode([token_id])

    def _completion_logprobs(self, token_ids, logprobs, offset: int) -> CompletionLogprobs | None:
        if logprobs is None:
            return None
        out = CompletionLogprobs()
        for token, lps in zip(token_ids, logprobs):
            text = self._token_text(token)
            out.tokens.append(text)
            out.token_logprobs.append(_finite(lps.get(token)))
            out.top_logprobs.append({self._token_text(t): _finite(lp) for t, lp in lps.items()})
            out.text_offset.append(offset)
            offset += len(text)
        return out

    def _chat_logprobs(self, token_ids, logprobs) -> ChatChoiceLogprobs | None:
        if logprobs is None:
            return None
        k = self.inp.params.logprobs or 0
        content = []
        for token, lps in zip(token_ids, logprobs):
            text = self._token_text(token)
            top = sorted(lps.items(), key=lambda kv: -kv[1])[:k]
            content.append(ChatLogprob(
                token=text, logprob=_finite(lps[token]), bytes=list(text.encode()),
                top_logprobs=[TopLogprob(token=(t_text := self._token_text(t)), logprob=_finite(lp),
                                         bytes=list(t_text.encode())) for t, lp in top]))
        return ChatChoiceLogprobs(content=content)

    # ---- whole responses ---------------------------------------------------------------
    def final(self, outputs: dict[int, CompletionOutput]) -> CompletionResponse | ChatCompletionResponse:
        self._completion_tokens = sum(len(o.token_ids) for o in outputs.values())
        if self.chat:
            choices = [ChatChoice(index=i, **self._message(o),
                                  logprobs=self._chat_logprobs(o.token_ids, o.logprobs),
                                  **self._memgen_fields(o.token_ids, o.augmentation))
                       for i, o in sorted(outputs.items())]
            return ChatCompletionResponse(id=self.id, model=self.model_name, choices=choices, usage=self.usage(),
                                          prompt_token_ids=self.inp.prompts[0] if self.inp.return_token_ids else None)
        choices = [CompletionChoice(index=i, text=o.text, logprobs=self._completion_logprobs(o.token_ids, o.logprobs, 0),
                                    finish_reason=o.finish_reason,
                                    **self._memgen_fields(o.token_ids, o.augmentation, prompt_index=i))
                   for i, o in sorted(outputs.items())]
        return CompletionResponse(id=self.id, model=self.model_name, choices=choices, usage=self.usage())

    def _message(self, o: CompletionOutput) -> dict:
        """A finished chat choice's message and finish_reason; with tools, the calls in
        its text become message.tool_calls and finish_reason "tool_calls" (memgen.structured)."""
        plain = dict(message=AssistantMessage(content=o.text), finish_reason=o.finish_reason)
        if self.inp.tools is None:
            return plain
        from memgen.structured.tools import parse_tool_calls

        content, calls = parse_tool_calls(o.text, self.inp.tools.tools, self.inp.tools.tool_choice)
        if not calls:
            return plain
        return dict(message=AssistantMessage(content=content, tool_calls=calls),
                    finish_reason="tool_calls" if o.finish_reason == "stop" else o.finish_reason)

    def _tool_delta(self, index: int, delta: str, finish: str | None):
        """A streamed chat choice with tools: (content, delta.tool_calls, finish_reason)."""
        from memgen.structured.tools import ToolStream

        stream = self._tool_streams.get(index)
        if stream is None:
            stream = self._tool_streams[index] = ToolStream(self.inp.tools.tools, self.inp.tools.tool_choice)
        content, calls = stream.update(delta, final=finish is not None)
        if finish == "stop" and stream.calls:
            finish = "tool_calls"
        return (content if content or not calls else None), (calls or None), finish

    # ---- stream chunks -----------------------------------------------------------------
    def first_chunks(self) -> list[str]:
        """Chat streams open each choice with the assistant role (OpenAI's first chunk)."""
        if not self.chat:
            return []
        return [sse(ChatCompletionChunk(id=self.id, model=self.model_name, choices=[ChatStreamChoice(
            index=i, delta=DeltaMessage(role="assistant", content=""),
            **({"prompt_token_ids": self._prompt_ids(i)} if self.inp.return_token_ids else {}))]))
            for i in range(self.num_choices)]

    def chunks(self, choices: list[ChoiceUpdate]) -> list[str]:
        out = []
        for cu in choices:
            st = self._states.get(cu.index)
            first = st is None
            if first:
                st = self._states[cu.index] = _ChoiceState(self.decode, self.inp.params.stop)
            start = len(st.token_ids)
            st.token_ids += cu.token_ids
            finish = None
            if cu.output is not None:
                delta = st.text.finish(cu.output.text)
                finish = cu.output.finish_reason
                self._completion_tokens += len(cu.output.token_ids)
            else:
                delta = st.text.update(st.token_ids)
            tool_calls = None
            if self.chat and self.inp.tools is not None:
                delta, tool_calls, finish = self._tool_delta(cu.index, delta, finish)
            carries = cu.token_ids and (self.inp.return_token_ids or cu.logprobs is not None)
            if not (delta or finish or carries or tool_calls):
                continue
            memgen = self._memgen_fields(cu.token_ids, cu.augmentation, start,
                                         prompt_index=cu.index if first and not self.chat else None)
            if self.chat:
                choice = ChatStreamChoice(index=cu.index, delta=DeltaMessage(content=delta, tool_calls=tool_calls),
                                          logprobs=self._chat_logprobs(cu.token_ids, cu.logprobs),
                                          finish_reason=finish, **memgen)
                out.append(sse(ChatCompletionChunk(id=self.id, model=self.model_name, choices=[choice])))
            else:
                choice = CompletionChoice(index=cu.index, text=delta,
                                          logprobs=self._completion_logprobs(cu.token_ids, cu.logprobs, st.text_offset),
                                          finish_reason=finish, **memgen)
                out.append(sse(CompletionResponse(id=self.id, model=self.model_name, choices=[choice])))
            st.text_offset += sum(len(self._token_text(t)) for t in cu.token_ids) if cu.logprobs is not None else 0
        return out

    def last_chunks(self) -> list[str]:
        """The usage chunk (stream_options.include_usage), then [DONE]."""
        out = []
        if self.inp.include_usage:
            cls = ChatCompletionChunk if self.chat else CompletionResponse
            out.append(sse(cls(id=self.id, model=self.model_name, choices=[], usage=self.usage())))
        out.append(DONE)
        return out
