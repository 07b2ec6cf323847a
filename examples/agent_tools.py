"""A two-tool agent loop (a calculator and a lookup) with the official `openai`
client against `memgen serve`, to a final answer.

    memgen serve --memgen demo/smollm2-arith --port 8000 &
    python examples/agent_tools.py --base-url http://127.0.0.1:8000/v1 "What is 12 + 30?"

Turn 1 makes the model call a tool (`tool_choice="required"`: the call is
enforced with structured outputs over the tools' schemas, so it always parses;
`parallel_tool_calls=False`: one call per turn);
each result goes back as a `role: "tool"` message; later turns let the model
choose (`"auto"`: a Hermes `<tool_call>` in its text becomes `tool_calls`) until
it answers in text, or `max_turns` is spent and a last turn asks for the answer
with `tool_choice="none"`. MemGen inserts its latents as usual in every turn
(`return_token_ids` reports where)."""
from __future__ import annotations

import argparse
import ast
import json
import operator

TOOLS = [
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression such as '12 + 30'.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string", "pattern": "^[0-9+*/(). -]{1,40}$"}},
                       "required": ["expression"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "lookup", "description": "Look a fact up by a short key.",
        "parameters": {"type": "object", "properties": {"key": {"type": "string", "pattern": "^[a-z ]{1,20}$"}},
                       "required": ["key"], "additionalProperties": False}}},
]
FACTS = {"answer": "42", "capital of france": "Paris", "speed of light": "299792458 m/s"}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculator(expression: str) -> str:
    """A safe arithmetic evaluator (numbers and + - * / only)."""
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError("not arithmetic")
    try:
        return str(ev(ast.parse(expression, mode="eval").body))
    except (ValueError, SyntaxError, ZeroDivisionError, RecursionError) as e:
        return f"error: {e}"


def lookup(key: str) -> str:
    return FACTS.get(key.strip().lower(), "unknown")


IMPLEMENTATIONS = {"calculator": calculator, "lookup": lookup}


def run_agent(client, model: str, question: str, max_turns: int = 3, max_tokens: int = 128,
              tool_choices=("required",), **create_kwargs) -> dict:
    """The loop; turn i uses tool_choices[i] ("auto" after them). Returns {"answer",
    "messages", "calls": [(name, arguments, result)], "turns"}."""
    messages = [{"role": "system", "content": "Use the tools to answer, then answer briefly."},
                {"role": "user", "content": question}]
    calls = []
    for turn in range(max_turns):
        out = client.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                             tool_choice=tool_choices[turn] if turn < len(tool_choices) else "auto",
                                             max_tokens=max_tokens, parallel_tool_calls=False, **create_kwargs)
        message = out.choices[0].message
        if not message.tool_calls:
            return {"answer": message.content, "messages": messages, "calls": calls, "turns": turn + 1}
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            args = json.loads(call.function.arguments)
            result = IMPLEMENTATIONS[call.function.name](**args)
            calls.append((call.function.name, args, result))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    out = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="none",
                                         max_tokens=max_tokens, **create_kwargs)
    return {"answer": out.choices[0].message.content, "messages": messages, "calls": calls, "turns": max_turns + 1}


def main() -> None:
    from openai import OpenAI

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("question", nargs="?", default="What is 12 + 30?")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--max-turns", type=int, default=3)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id
    result = run_agent(client, model, args.question, args.max_turns, temperature=0)
    for name, arguments, value in result["calls"]:
        print(f"tool {name}({json.dumps(arguments)}) -> {value}")
    print(f"answer ({result['turns']} turns): {result['answer']}")


if __name__ == "__main__":
    main()
