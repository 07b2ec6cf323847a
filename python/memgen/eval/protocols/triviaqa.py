"""TriviaQA (`question`, `answer.normalized_aliases` / `answer.aliases`): the
reference's search interaction (data/triviaqa/builder.py and env.py,
interactions/multiturn_interaction.py), run by memgen.eval.multiturn.

A turn: the whole chat so far is rendered and generated afresh (so each turn
gets its prompt insertion); the response is cut after its first `</search>`, else
after its first `</answer>`; a search returns the retriever's top documents as
the next user message, an answer ends the episode (reward 1 if an alias,
lowercased, is a substring of the answer's first line, lowercased), anything
else gets the reference's "invalid action" message. At most 5 turns.
Observations are sent as the retriever returns them: the system prompt promises
<information> tags, but the reference's environment never adds them.
"""
from __future__ import annotations

from typing import Any

from memgen.eval.protocols import DatasetProtocol, require, text_field
from memgen.eval.tasks import Score

# The reference's system prompt as its environment sends it (not stripped: it ends with ". ").
SYSTEM_PROMPT = (
    "Answer the given question. "
    "You must conduct reasoning inside <think> and </think> first every time you get new information. "
    "After reasoning, if you find you lack some knowledge, you can call a search engine by <search> query "
    "</search> and it will return the top searched results between <information> and </information>. "
    "You can search as many times as your want. "
    "If you find no further external knowledge needed, you can directly provide the answer inside <answer> and "
    "</answer>, without detailed illustrations. For example, <answer> Beijing </answer>. "
)
INVALID_ACTION = (
    "\nMy previous action is invalid. "
    "If I want to search, I should put the query between <search> and </search>. "
    "If I want to give the final answer, I should put the answer between <answer> and </answer>. "
    "Let me try again.\n"
)
SEARCH_FAILED = "Cannot find corresponding pages."
MAX_TURNS = 5
MAX_OBS_TOKENS = 512
TOPK = 3


def cut_response(text: str) -> str:
    """The reference's preprocess_action: up to the first </search>, else the first </answer>."""
    for tag in ("</search>", "</answer>"):
        if tag in text:
            return text.split(tag, 1)[0] + tag
    return text


def parse_action(response: str) -> tuple[str, str]:
    """("search", query) | ("answer", answer) | ("invalid", text): the first line of
    the text between the first opening and the first closing tag, stripped."""
    action = cut_response(response).strip()
    for kind in ("search", "answer"):
        open_tag, close_tag = f"<{kind}>", f"</{kind}>"
        if open_tag in action and close_tag in action:
            inner = action[action.index(open_tag) + len(open_tag):action.index(close_tag)]
            return kind, inner.strip().split("\n", 1)[0].strip()
    return "invalid", action


def is_correct(answer: str, aliases: list[str]) -> bool:
    low = answer.lower()
    return any(str(a).lower() in low for a in aliases)


def _aliases(answer: Any) -> list[str]:
    if not isinstance(answer, dict):
        raise ValueError("column 'answer' must be an object with 'normalized_aliases' (or 'aliases')")
    # the reference scores against the normalized aliases; plain aliases only when they are absent
    aliases = answer.get("normalized_aliases") or answer.get("aliases")
    if not isinstance(aliases, list) or not aliases or not all(isinstance(a, str) for a in aliases):
        raise ValueError("column 'answer' needs a non-empty 'normalized_aliases' (or 'aliases') list of strings")
    return aliases


def build(row: dict[str, Any], record_id: Any, seed: int) -> dict[str, Any]:
    require(row, "TriviaQA", "question", "answer")
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text_field(row, "question")}]
    return {"messages": messages, "aliases": _aliases(row["answer"])}


def score(completion: str, data: dict[str, Any]) -> Score:
    """The reward of a final response: its answer against the aliases (0 without one)."""
    kind, content = parse_action(completion)
    if kind != "answer":
        return Score(0.0, None)
    return Score(float(is_correct(content, data["aliases"])), content)


PROTOCOL = DatasetProtocol("triviaqa", build, score, default_split="validation", id_field="question_id",
                           multiturn=True)
