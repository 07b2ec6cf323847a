"""Structured outputs and tool calling in `memgen serve`'s app, spoken to with the
official `openai` client over an in-process transport (starlette's TestClient:
the app, its lifespan and its engine loop run as in the server, without a
process to start). The model is the tiny MemGen fixture with an active trigger:
MemGen's fields (augmentation, insertion positions) still come back."""
from __future__ import annotations

import json
import re

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from fastapi.testclient import TestClient  # noqa: E402

from memgen import LLM  # noqa: E402
from memgen.structured.tools import ToolStream, parse_tool_calls, prepare_conversation  # noqa: E402

NAME = "tiny-memgen"
CALC = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                     "op": {"enum": ["+", "-", "*"]},
                                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["a", "op", "b"], "additionalProperties": False}}}
LOOKUP = {"type": "function", "function": {
    "name": "lookup", "description": "Look a word up.",
    "parameters": {"type": "object", "properties": {"word": {"type": "string", "pattern": "^[a-z]{1,6}$"}},
                   "required": ["word"], "additionalProperties": False}}}
TOOLS = [CALC, LOOKUP]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "What is 12 plus 30?"}]
# a Hermes-style call forced by a regex, so that tool_choice "auto" meets a call on a random model
HERMES = r'Sure\.<tool_call>\n\{"name": "lookup", "arguments": \{"word": "[a-z]{1,5}"\}\}\n</tool_call>'


def long_context_copy(model_dir, tmp_path_factory, positions: int = 2048):
    """The tiny reasoner with room for a tools prompt (the fixture's 320-token BPE spends
    about a token per 1.3 characters: Hermes' tools preamble alone is ~600 tokens)."""
    import shutil

    copy = tmp_path_factory.mktemp("long_reasoner") / "model"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.fixture(scope="module")
def llm(memgen_reasoner_dir, memgen_active_ckpt_dir, tmp_path_factory):
    model = long_context_copy(memgen_reasoner_dir, tmp_path_factory)
    return LLM(model, memgen=memgen_active_ckpt_dir, weaver_model=model, trigger_model=model, dtype="float64",
               max_model_len=2048)


@pytest.fixture(scope="module")
def client(llm):
    from memgen.serve.app import create_app

    with TestClient(create_app(llm, NAME)) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)


def _chat(client, **kw):
    return client.chat.completions.create(model=NAME, messages=kw.pop("messages", USER),
                                          **{"max_tokens": 80, "temperature": 1.0, "seed": 1, **kw})


# ---- structured outputs ------------------------------------------------------------------
def test_response_format_json_schema_and_object(client):
    schema = SCHEMAS["calculator"]
    out = _chat(client, n=2, response_format={"type": "json_schema", "json_schema": {"name": "calc", "schema": schema}},
                extra_body={"return_token_ids": True})
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)
        extra = choice.model_extra
        assert len(extra["augmentation"]) == len(extra["token_ids"])        # MemGen's fields are still there
    obj = _chat(client, response_format={"type": "json_object"},
                extra_body={"structured_outputs": None, "return_token_ids": True})
    assert obj.choices[0].finish_reason in ("stop", "length")
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_structured_outputs_field_on_completions_and_chat(client):
    out = client.completions.create(model=NAME, prompt="Hello", max_tokens=20, temperature=1.0, seed=2, n=3,
                                    extra_body={"structured_outputs": {"regex": "[0-9]{2}-[a-z]{3}"}})
    assert all(re.fullmatch(r"[0-9]{2}-[a-z]{3}", c.text) for c in out.choices)
    out = client.completions.create(model=NAME, prompt="Hello", max_tokens=60, temperature=1.0, seed=3,
                                    extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                        "name": "w", "schema": SCHEMAS["lookup"]}}})
    if out.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(out.choices[0].text), SCHEMAS["lookup"])
    compact = {"json": SCHEMAS["lookup"], "disable_any_whitespace": True}
    out = client.completions.create(model=NAME, prompt="Hello", max_tokens=60, temperature=1.0, seed=3, n=2,
                                    extra_body={"structured_outputs": compact})
    for c in out.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), SCHEMAS["lookup"])
    chat = _chat(client, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert chat.choices[0].message.content in ("yes", "no")


def test_bad_constraints_are_400s_and_the_engine_keeps_serving(client):
    cases = [
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
         "does not compile"),
        (dict(extra_body={"structured_outputs": {"regex": "a(("}}), "does not compile"),
        (dict(extra_body={"structured_outputs": {"grammar": "root ::= missing"}}), "does not compile"),
        (dict(extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}}), "exactly one"),
        (dict(response_format={"type": "json_object"}, extra_body={"structured_outputs": {"regex": "a"}}),
         "not both"),
        (dict(response_format={"type": "yaml"}), "response_format.type"),
        (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools[0].function.name"),
        (dict(tools=[{"type": "function"}]), "tools[0]"),
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "not among the tools"),
        (dict(tool_choice="required"), "needs tools"),
        (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice must be"),
        (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "constrains the output"),
    ]
    for kwargs, text in cases:
        with pytest.raises(openai.BadRequestError) as e:
            _chat(client, **kwargs)
        assert e.value.status_code == 400 and text in e.value.body["message"], (kwargs, e.value.body)
        assert e.value.type == "invalid_request_error"
    assert _chat(client, max_tokens=3).choices[0].message.content is not None


# ---- tools ------------------------------------------------------------------------------
def test_named_and_required_tool_choice_always_parse(client):
    named = _chat(client, n=2, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "calculator"}},
                  extra_body={"return_token_ids": True})
    for choice in named.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "calculator"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["calculator"])
        assert "insertion_positions" in choice.model_extra
    # "required": a JSON array of calls; one call at most without parallel_tool_calls
    single = _chat(client, n=3, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=120)
    parallel = _chat(client, n=3, tools=TOOLS, tool_choice="required", max_tokens=120)
    for choice in single.choices + parallel.choices:
        if choice in single.choices or choice.finish_reason != "length":   # a random model may list calls on
            assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls or ():
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert all(len(c.message.tool_calls) == 1 for c in single.choices)
    assert any(c.finish_reason == "tool_calls" for c in parallel.choices)


def test_auto_parses_hermes_calls_whole_and_streamed(client):
    kw = dict(tools=TOOLS, tool_choice="auto", extra_body={"structured_outputs": {"regex": HERMES}})
    whole = _chat(client, **kw)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure."
    (call,) = choice.message.tool_calls
    assert call.function.name == "lookup" and set(json.loads(call.function.arguments)) == {"word"}
    chunks = list(_chat(client, stream=True, **kw))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert content == "Sure."
    assert deltas[0].index == 0 and deltas[0].id and deltas[0].type == "function"
    assert deltas[0].function.name == "lookup"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments   # same seed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    # "none": the same text stays content
    none = _chat(client, tools=TOOLS, tool_choice="none", extra_body={"structured_outputs": {"regex": HERMES}})
    assert none.choices[0].finish_reason == "stop" and none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content.startswith("Sure.<tool_call>")


def test_named_tool_streams_tool_call_deltas(client):
    chunks = list(_chat(client, stream=True, tools=TOOLS,
                        tool_choice={"type": "function", "function": {"name": "calculator"}}))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "calculator" and deltas[0].id and deltas[0].function.arguments == ""
    assert len(deltas) > 3 and all(d.index == 0 and d.id is None for d in deltas[1:])   # arguments as they come
    jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in deltas)), SCHEMAS["calculator"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_tool_turns_render_back(client, llm):
    """An assistant turn with tool_calls and the tool's answer go back into the prompt
    (MemGen's ChatML template takes no tools: Qwen2.5's rendering, folded into turns)."""
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "calculator", "arguments": '{"a": 12, "op": "+", "b": 30}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    out = _chat(client, messages=messages, tools=TOOLS, max_tokens=4, extra_body={"return_token_ids": True})
    text = llm.tokenizer.decode(out.model_extra["prompt_token_ids"])
    assert '<tool_call>\n{"name": "calculator", "arguments": {"a": 12, "op": "+", "b": 30}}\n</tool_call>' in text
    assert "<tool_response>\n42\n</tool_response>" in text
    assert '"name": "lookup"' in text and "<tools>" in text
    # offline, LLM.chat(tools=...) renders the same prompt (rendered only: the app's loop owns the engine)
    offline = [{**m, "content": m["content"] or ""} for m in messages]
    assert llm._apply_chat_template(offline, True, TOOLS) == out.model_extra["prompt_token_ids"]


# ---- units --------------------------------------------------------------------------------
def test_parse_tool_calls_and_stream_pieces():
    text = ('Let me check.\n<tool_call>\n{"name": "lookup", "arguments": {"word": "cat"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "calculator", "arguments": {"a": 1, "op": "+", "b": 2}}\n</tool_call>')
    content, calls = parse_tool_calls(text, TOOLS, "auto")
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["lookup", "calculator"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"a": 1, "op": "+", "b": 2}
    assert parse_tool_calls("<tool_call>{broken</tool_call>", TOOLS, "auto") == ("<tool_call>{broken</tool_call>", [])
    assert parse_tool_calls('<tool_call>{"name": "other", "arguments": {}}</tool_call>', TOOLS, "auto")[1] == []
    stream = ToolStream(TOOLS, "auto")
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
    sent, deltas = "", []
    for i, p in enumerate(pieces):
        c, d = stream.update(p, final=i == len(pieces) - 1)
        sent += c
        deltas += d
    assert sent.strip() == "Let me check." and "<" not in sent
    assert [d["index"] for d in deltas] == [0, 0, 1, 1] and deltas[0]["function"]["name"] == "lookup"


def test_native_template_gets_tools_and_object_arguments():
    template = "{% for m in messages %}{{ m.role }}{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments.a }}" \
               "{% endif %}{% endfor %}{% if tools %}{{ tools | length }}{% endif %}"
    conv = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": "calculator", "arguments": '{"a": 7}'}}]}]
    messages, tools = prepare_conversation(template, conv, TOOLS)
    assert tools == TOOLS and messages[0]["tool_calls"][0]["function"]["arguments"] == {"a": 7}
    assert conv[0]["tool_calls"][0]["function"]["arguments"] == '{"a": 7}'     # the caller's data unchanged


def test_offline_chat_checks_tools(llm):
    with pytest.raises(ValueError, match="tools\\[0\\]"):
        llm.chat(USER, tools=[{"type": "function", "function": {"name": "x", "parameters": "not a schema"}}],
                 use_tqdm=False)
    with pytest.raises(ValueError, match="tool_calls"):
        llm.chat(USER + [{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]}],
                 tools=TOOLS, use_tqdm=False)


def test_logprobs_of_ruled_out_tokens_are_finite(client):
    """A constraint gives the tokens it rules out -inf; the server reports vLLM's floor, -9999."""
    out = _chat(client, logprobs=True, top_logprobs=5, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    entries = out.choices[0].logprobs.content
    assert entries and all(t.logprob >= -9999.0 for e in entries for t in e.top_logprobs)
    assert any(t.logprob == -9999.0 for e in entries for t in e.top_logprobs)
    out = client.completions.create(model=NAME, prompt="Hi", logprobs=5, max_tokens=3,
                                    extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert all(v >= -9999.0 for d in out.choices[0].logprobs.top_logprobs for v in d.values())
