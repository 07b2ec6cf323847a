"""Structured outputs and tool calling (docs/API.md, "Structured outputs and tools").

`StructuredOutputsParams` (vLLM's names and meaning) constrains the sampled
tokens of a request to a JSON schema, a regex, a list of choices or an EBNF
grammar. The constraint is compiled by xgrammar (`backend.py`) and applied as a
per-row logits mask at sampled positions only: MemGen's latent positions and a
LatentPolicy's inserted rows are never masked. `tools.py` renders OpenAI tools
into the chat template and parses Hermes-style `<tool_call>` output."""
from memgen.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
