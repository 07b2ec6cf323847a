"""OpenAI tool calling on a chat template, Hermes style (as vLLM's
`--tool-call-parser hermes`):

- `check_tools` / `check_tool_choice`: OpenAI's `tools` and `tool_choice`,
  malformed -> ValueError (a 400 in the server).
- `prepare_conversation`: a template that takes `tools` (Qwen2.5, SmolLM3, ...)
  gets them and the messages natively (assistant `tool_calls` with their
  arguments as objects, `role: "tool"` turns); one that does not (SmolLM2's,
  MemGen's ChatML template) gets Qwen2.5's rendering folded into plain turns:
  the tools in the system turn, each call as `<tool_call>{...}</tool_call>`
  in the assistant's text, each result as a user turn in `<tool_response>`.
- `constraint_for`: "required" and a named function are enforced with
  structured outputs over the tools' parameter schemas (vLLM's way: a named
  function's output is its arguments object; "required" outputs a JSON array
  of {"name", "parameters"}), so the call always parses and validates.
- `parse_tool_calls` / `ToolStream`: the model's text -> content and
  `tool_calls` (ids, names, arguments as a JSON string), whole or as
  `delta.tool_calls` stream pieces.
"""
from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass, field

from memgen.structured.params import StructuredOutputsParams

START, END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

SYSTEM_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>")


# ---- the request ------------------------------------------------------------------------
def check_tools(tools) -> list[dict]:
    """OpenAI's tools, each {"type": "function", "function": {"name", "description"?,
    "parameters"?}}; returns them normalized (parameters default to an empty object)."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list of {'type': 'function', 'function': {...}} objects")
    out, names = [], set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': "
                             f"...}}}}, got {json.dumps(tool)[:200]}")
        fn = tool["function"]
        unknown = sorted(set(fn) - {"name", "description", "parameters", "strict"})
        if unknown:
            raise ValueError(f"tools[{i}].function has unknown field(s) {unknown}")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise ValueError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
        if name in names:
            raise ValueError(f"tools[{i}]: two tools are named {name!r}")
        names.add(name)
        if "description" in fn and not isinstance(fn["description"], str):
            raise ValueError(f"tools[{i}].function.description must be a string")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object, "
                             f"got {type(params).__name__}")
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    return out


def check_tool_choice(tool_choice, tools: list[dict] | None) -> str | dict:
    """"none" | "auto" | "required" | {"type": "function", "function": {"name"}}; the
    default is "auto" with tools, "none" without."""
    if tool_choice is None:
        return "auto" if tools else "none"
    names = [t["function"]["name"] for t in tools or ()]
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', "
                             f"'function': {{'name': ...}}}}, got {tool_choice!r}")
        if tool_choice != "none" and not tools:
            raise ValueError(f"tool_choice {tool_choice!r} needs tools")
        return tool_choice
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict) and isinstance(tool_choice["function"].get("name"), str):
        name = tool_choice["function"]["name"]
        if name not in names:
            raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools "
                             f"{names}")
        return {"type": "function", "function": {"name": name}}
    raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                     f"{{'name': ...}}}}, got {json.dumps(tool_choice)[:200]}")


def constraint_for(tools: list[dict], tool_choice, parallel_tool_calls: bool = True) -> StructuredOutputsParams | None:
    """The structured-output constraint that enforces "required" / a named function (None
    otherwise); compact JSON (no optional whitespace), so a call takes few tokens."""
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        fn = next(t["function"] for t in tools if t["function"]["name"] == name)
        return StructuredOutputsParams(json=fn["parameters"], disable_any_whitespace=True)
    if tool_choice == "required":
        items = [{"type": "object",
                  "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                 "parameters": t["function"]["parameters"]},
                  "required": ["name", "parameters"]} for t in tools]
        schema = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not parallel_tool_calls:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    return None


# ---- rendering ----------------------------------------------------------------------------
def template_takes_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def prepare_conversation(template: str | None, conversation: list[dict], tools: list[dict] | None):
    """(messages, tools to hand the template or None). See the module's docstring."""
    native = template_takes_tools(template)
    if native:
        messages = []
        for m in conversation:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [_native_call(c) for c in m["tool_calls"]]
            messages.append(m)
        return messages, tools
    messages = []
    for m in conversation:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(f"{START}\n{json.dumps(_call_object(c), ensure_ascii=False)}\n{END}"
                              for c in m["tool_calls"])
            messages.append({"role": "assistant", "content": (content + "\n" if content else "") + calls})
        elif role == "tool":
            messages.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            messages.append({"role": role, "content": content})
    if tools:
        text = SYSTEM_TOOLS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + text}
        else:
            messages.insert(0, {"role": "system", "content": text})
    return messages, None


def check_messages(messages: list[dict]) -> None:
    """Assistant `tool_calls` and tool turns in OpenAI's shapes."""
    for j, m in enumerate(messages):
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list):
                raise ValueError(f"messages[{j}].tool_calls must be a list on an assistant message")
            for c in calls:
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                        or not isinstance(fn.get("arguments", "{}"), (str, dict)):
                    raise ValueError(f"messages[{j}].tool_calls entries must be {{'id', 'type': 'function', "
                                     f"'function': {{'name', 'arguments'}}}}, got {json.dumps(c)[:200]}")
        if m["role"] == "tool" and m.get("tool_call_id") is not None and not isinstance(m["tool_call_id"], str):
            raise ValueError(f"messages[{j}].tool_call_id must be a string")


def _arguments(call: dict):
    args = call["function"].get("arguments", "{}")
    if isinstance(args, str):
        try:
            return json.loads(args) if args.strip() else {}
        except ValueError:
            return args
    return args


def _call_object(call: dict) -> dict:
    return {"name": call["function"]["name"], "arguments": _arguments(call)}


def _native_call(call: dict) -> dict:
    """transformers' convention: arguments as an object (the templates tojson them)."""
    out = copy.deepcopy(call)
    out.setdefault("type", "function")
    out["function"] = {**out["function"], "arguments": _arguments(call)}
    return out


# ---- parsing ----------------------------------------------------------------------------
def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(name: str, arguments) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": args}}


def _parse_block(text: str, names: set[str]) -> dict | None:
    try:
        obj = json.loads(text.strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or (names and obj["name"] not in names):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return tool_call(obj["name"], args)


def parse_tool_calls(text: str, tools: list[dict], tool_choice) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished output."""
    names = {t["function"]["name"] for t in tools}
    if isinstance(tool_choice, dict):     # the output is the arguments object
        try:
            args = json.loads(text)
        except ValueError:
            return text, []
        return None, [tool_call(tool_choice["function"]["name"], args)]
    if tool_choice == "required":         # the output is [{"name", "parameters"}, ...]
        try:
            items = json.loads(text)
        except ValueError:
            return text, []
        calls = [tool_call(i["name"], i.get("parameters", {})) for i in items
                 if isinstance(i, dict) and isinstance(i.get("name"), str)]
        return (None, calls) if calls else (text, [])
    if tool_choice == "none" or START not in text:
        return text, []
    calls = []
    for m in _BLOCK.finditer(text):
        call = _parse_block(m.group(1), names)
        if call is None:
            return text, []               # a malformed call: the text is returned as content
        calls.append(call)
    content = text[:text.index(START)].strip()
    return (content or None), calls


@dataclass
class ToolStream:
    """One streamed choice: content deltas until a tool call starts, then one
    `delta.tool_calls` entry per call (index, id, type and name first, then the
    arguments) as each `</tool_call>` closes (or at the end); a named function's
    arguments stream as they are generated, "required"'s calls come at the end."""
    tools: list[dict]
    tool_choice: object
    text: str = ""
    sent: int = 0                 # characters of text already sent as content
    calls: list[dict] = field(default_factory=list)
    consumed: int = 0             # characters of text already parsed as calls

    @property
    def constrained(self) -> bool:
        return isinstance(self.tool_choice, dict) or self.tool_choice == "required"

    def update(self, delta: str, final: bool = False) -> tuple[str, list[dict]]:
        """(content to send, tool-call deltas to send) after `delta` arrived."""
        self.text += delta
        if self.tool_choice == "none":
            out, self.sent = self.text[self.sent:], len(self.text)
            return out, []
        if isinstance(self.tool_choice, dict):     # the text is the arguments: streamed as they come
            deltas = []
            if not self.calls:
                call = tool_call(self.tool_choice["function"]["name"], "")
                self.calls.append(call)
                deltas.append({"index": 0, "id": call["id"], "type": "function",
                               "function": {"name": call["function"]["name"], "arguments": ""}})
            if delta:
                self.calls[0]["function"]["arguments"] += delta
                deltas.append({"index": 0, "function": {"arguments": delta}})
            return "", deltas
        if self.constrained:
            if not final:
                return "", []
            content, calls = parse_tool_calls(self.text, self.tools, self.tool_choice)
            return (content or "") if not calls else "", self._deltas(calls)
        content, deltas = "", []
        start = self.text.find(START)
        if start < 0:
            # hold back a tail that may be the start of "<tool_call>"
            keep = 0 if final else _partial_suffix(self.text, START)
            end = len(self.text) - keep
            content, self.sent = self.text[self.sent:end], max(self.sent, end)
            return content, []
        if self.sent < start:
            content = self.text[self.sent:start]
            self.sent = start
        names = {t["function"]["name"] for t in self.tools}
        pos = max(self.consumed, start)
        while True:
            s = self.text.find(START, pos)
            if s < 0:
                break
            e = self.text.find(END, s)
            if e < 0 and not final:
                break
            body = self.text[s + len(START):e if e >= 0 else len(self.text)]
            call = _parse_block(body, names)
            pos = (e + len(END)) if e >= 0 else len(self.text)
            self.consumed = pos
            if call is not None:
                deltas += self._deltas([call])
        return content, deltas

    def _deltas(self, calls: list[dict]) -> list[dict]:
        out = []
        for call in calls:
            index = len(self.calls)
            self.calls.append(call)
            out.append({"index": index, "id": call["id"], "type": "function",
                        "function": {"name": call["function"]["name"], "arguments": ""}})
            out.append({"index": index, "function": {"arguments": call["function"]["arguments"]}})
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
