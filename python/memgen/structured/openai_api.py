"""The server's side of structured outputs and tools: OpenAI's `response_format`,
vLLM's `structured_outputs` extra field, `tools` / `tool_choice` ->
StructuredOutputsParams and a `ToolPlan`; every bad value a ValueError that
serve.protocol turns into a 400."""
from __future__ import annotations

from dataclasses import dataclass

from memgen.structured.params import StructuredOutputsParams
from memgen.structured.tools import (
    check_messages,
    check_tool_choice,
    check_tools,
    constraint_for,
    prepare_conversation,
)


@dataclass
class ToolPlan:
    """A chat request's tools, as the response builder needs them."""
    tools: list[dict]
    tool_choice: object            # "none" | "auto" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool = True


def structured_from_request(req) -> StructuredOutputsParams | None:
    """`response_format` ({"type": "text" | "json_object" | "json_schema"}) or vLLM's
    `structured_outputs` ({"json" | "regex" | "choice" | "grammar": ...}); not both."""
    rf = getattr(req, "response_format", None)
    so = getattr(req, "structured_outputs", None)
    from_rf = None
    if rf is not None:
        kind = rf.get("type")
        if kind == "text":
            unknown = sorted(set(rf) - {"type"})
            if unknown:
                raise ValueError(f"response_format {{'type': 'text'}} takes no other field, got {unknown}")
        elif kind == "json_object":
            unknown = sorted(set(rf) - {"type"})
            if unknown:
                raise ValueError(f"response_format {{'type': 'json_object'}} takes no other field, got {unknown}")
            from_rf = StructuredOutputsParams(json_object=True)
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict):
                raise ValueError("response_format json_schema needs 'json_schema': {'name': ..., 'schema': {...}}")
            unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
            if unknown:
                raise ValueError(f"response_format.json_schema has unknown field(s) {unknown}")
            schema = spec.get("schema", {"type": "object"})
            if not isinstance(schema, dict):
                raise ValueError(f"response_format.json_schema.schema must be a JSON schema object, "
                                 f"got {type(schema).__name__}")
            from_rf = StructuredOutputsParams(json=schema)
        else:
            raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    from_so = None
    if so is not None:
        from_so = StructuredOutputsParams.from_dict(so)
    if from_rf is not None and from_so is not None:
        raise ValueError("send response_format or structured_outputs, not both")
    return from_rf if from_rf is not None else from_so


def tool_plan(req) -> ToolPlan | None:
    """The request's tools (None when it has none); tool_choice without tools is refused
    unless it is "none"."""
    tools = getattr(req, "tools", None)
    choice = getattr(req, "tool_choice", None)
    if tools is None:
        if choice not in (None, "none"):
            raise ValueError(f"tool_choice {choice!r} needs tools")
        return None
    tools = check_tools(tools)
    parallel = getattr(req, "parallel_tool_calls", None)
    return ToolPlan(tools, check_tool_choice(choice, tools), True if parallel is None else bool(parallel))


def tool_constraint(plan: ToolPlan | None) -> StructuredOutputsParams | None:
    if plan is None:
        return None
    return constraint_for(plan.tools, plan.tool_choice, plan.parallel_tool_calls)


def render_conversation(tokenizer, conversation: list[dict], plan: ToolPlan | None):
    """(messages, tools for the template): see memgen.structured.tools.prepare_conversation."""
    check_messages(conversation)
    return prepare_conversation(getattr(tokenizer, "chat_template", None), conversation,
                                plan.tools if plan is not None else None)
