"""Raw AgentBank rows -> the chat layout the reference trains TriviaQA SFT on
(spec §3.7), so `memgen train sft` can read the dataset's own rows:

    {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...]}
 -> [system: SEARCH_SYSTEM_PROMPT,
     user: the question,                       assistant: "<think> ... </think>\\n<search> q </search>",
     user: "<observation> ... </observation>", assistant: "<think> ... </think>\\n<answer> a </answer>", ...]

A human turn whose text has "Observation: X" becomes "<observation> X </observation>"
(X: the rest of that line); other human turns are kept. A gpt turn keeps its
"Thought:" text (up to "Action:" / "Final Answer:"), its "Action: search[q]"
and its "Final Answer: a" line, each in its tag, joined by newlines. The
system prompt is the text the reference's TriviaQA builder puts first (the
model learns under it, so the wording matters for parity).
"""
from __future__ import annotations

import re

SEARCH_SYSTEM_PROMPT = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you get "
    "new information. After reasoning, if you find you lack some knowledge, you can call a search engine by "
    "<search> query </search> and it will return the top searched results between <information> and "
    "</information>. You can search as many times as your want. If you find no further external knowledge "
    "needed, you can directly provide the answer inside <answer> and </answer>, without detailed "
    "illustrations. For example, <answer> Beijing </answer>.")

_OBSERVATION = re.compile(r"Observation: (.*)")
_THOUGHT = re.compile(r"Thought: (.*?)(?=\nAction:|\nFinal Answer:|$)", re.DOTALL)
_SEARCH = re.compile(r"Action: search\[(.*?)\]")
_ANSWER = re.compile(r"Final Answer: (.*)")


def user_content(text: str) -> str:
    """A human turn: its observation in <observation> tags, else as it is."""
    m = _OBSERVATION.search(text)
    return f"<observation> {m.group(1).strip()} </observation>" if m else text


def assistant_content(text: str) -> str:
    """A gpt turn: its thought, search and final answer in their tags."""
    parts = []
    for pattern, tag in ((_THOUGHT, "think"), (_SEARCH, "search"), (_ANSWER, "answer")):
        m = pattern.search(text)
        if m:
            parts.append(f"<{tag}> {m.group(1).strip()} </{tag}>")
    return "\n".join(parts)


def agentbank_messages(conversations, where: str = "example",
                       system_prompt: str = SEARCH_SYSTEM_PROMPT) -> list[dict]:
    """An AgentBank "conversations" list -> chat messages (module docstring)."""
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{where}: \"conversations\" must be a non-empty list of {{\"from\", \"value\"}} objects")
    messages = [{"role": "system", "content": system_prompt}]
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: conversations[{i}] must be an object with a string \"value\"")
        if turn.get("from") == "human":
            messages.append({"role": "user", "content": user_content(turn["value"])})
        elif turn.get("from") == "gpt":
            messages.append({"role": "assistant", "content": assistant_content(turn["value"])})
        else:
            raise ValueError(f"{where}: conversations[{i}]: \"from\" must be \"human\" or \"gpt\", "
                             f"got {turn.get('from')!r}")
    return messages
