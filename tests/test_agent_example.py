"""The README's agent example (examples/agent_tools.py): the official `openai`
client runs a two-tool loop (a calculator and a lookup) against a real
`memgen serve` process on the tiny MemGen fixture (active trigger), to a final
answer. Turns 1 and 2 name a tool each (enforced with structured outputs, so
the calls parse and validate on a random model), turn 3 is "auto": the tiny
model answers in text. Each call's result goes back as a tool turn and is in
the next prompt; MemGen's fields still come back."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import agent_tools  # noqa: E402

NAME = "tiny-agent"


@pytest.fixture(scope="module")
def base_url(memgen_reasoner_dir, memgen_active_ckpt_dir, tmp_path_factory):
    from serve_process import memgen_serve
    from test_serve_tools import long_context_copy

    model = long_context_copy(memgen_reasoner_dir, tmp_path_factory)
    args = ["--model", str(model), "--memgen", str(memgen_active_ckpt_dir), "--weaver-model", str(model),
            "--trigger-model", str(model), "--max-model-len", "2048", "--dtype", "float64", "--device", "cpu",
            "--served-model-name", NAME, "--log-level", "warning"]
    with memgen_serve(args, tmp_path_factory.mktemp("agent") / "server.log") as (base, _):
        yield f"{base}/v1"


def test_tools_themselves():
    assert agent_tools.calculator("12 + 30") == "42" and agent_tools.calculator("2 * (3 + 4)") == "14"
    assert agent_tools.calculator("__import__('os')").startswith("error")
    assert agent_tools.lookup("Capital of France") == "Paris" and agent_tools.lookup("nope") == "unknown"


def test_two_tool_agent_loop_to_a_final_answer(base_url, tokenizer):
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    assert model == NAME
    named = [{"type": "function", "function": {"name": n}} for n in ("calculator", "lookup")]
    result = agent_tools.run_agent(client, model, "What is 12 + 30?", max_turns=4, max_tokens=64,
                                   tool_choices=named, temperature=1.0, seed=0,
                                   extra_body={"return_token_ids": True})
    names = [name for name, _, _ in result["calls"]]
    assert names[:2] == ["calculator", "lookup"], result["calls"]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in agent_tools.TOOLS}
    for name, args, value in result["calls"]:
        jsonschema.validate(args, schemas[name])
        assert value == agent_tools.IMPLEMENTATIONS[name](**args)
    assert isinstance(result["answer"], str) and 3 <= result["turns"] <= 5
    roles = [m["role"] for m in result["messages"]]
    assert roles[:6] == ["system", "user", "assistant", "tool", "assistant", "tool"]
    # the results went back into the prompt, and MemGen's fields still come back
    out = client.chat.completions.create(model=model, messages=result["messages"], tools=agent_tools.TOOLS,
                                         tool_choice="none", max_tokens=2, extra_body={"return_token_ids": True})
    extra = out.choices[0].model_extra
    assert len(extra["augmentation"]) == len(extra["token_ids"]) and "insertion_positions" in extra
    prompt = tokenizer.decode(out.model_extra["prompt_token_ids"])
    for _, _, value in result["calls"]:
        assert f"<tool_response>\n{value}\n</tool_response>" in prompt
    assert prompt.count("<tool_call>") >= 2 + 1     # the two calls, and the instructions' example
