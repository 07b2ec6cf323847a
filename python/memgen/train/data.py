"""Training data for `memgen train`: chat examples -> (input_ids, labels) with
the reference's masking (spec §3.6), and prompts for GRPO rollouts.

SFT masking, as TRL 0.21 + MemGen's `forward` do it for one assistant turn:
    text   = template(prompt + [assistant])        ids = tokens(text)
    labels = -100 on tokens(template(prompt))      (no generation prompt)
           then -100 on every "<|im_start|>assistant\\n" token run
so supervision starts at the assistant's content and covers its `<|im_end|>`
and the trailing newline. Running example (ChatML, one user turn):
    <|im_start|> user \\n Hi . <|im_end|> \\n | <|im_start|> ass istant \\n | The ... }. <|im_end|> \\n
    -100 ......................................|  -100 (header) .............| supervised ................
The first supervised token is MemGen's prompt insertion point.

SFT input lines (JSONL):
    {"messages": [{"role": "user", ...}, ..., {"role": "assistant", "content": "..."}]}
    {"prompt": [...messages...] | "text", "completion": [{"role": "assistant", ...}] | "text"}
    {"messages" | "prompt" | "question": ..., "answer": "42"}     # an eval record (bench/data/*.jsonl)
    {"conversations": [{"from": "human" | "gpt", "value": ...}, ...]}   # a raw AgentBank row (agentbank.py)
The third form has no assistant text: the assistant turn is the answer put in
`answer_template` ("The answer is \\boxed{42}." by default, what the boxed
scorer of `memgen eval` reads), so the same file trains and evaluates.

Conversations (spec §3.2). In the "messages" form EVERY assistant turn is
learned, as TRL's assistant-only loss on the reference's template does: the
conversation is tokenized once, and each assistant block's content, its
`<|im_end|>` and newline are supervised (system, user and observation turns
are not). A row with several assistant turns trains through the
conversational forward (conversation.py). In the "prompt" + "completion" form
only the completion is learned, whatever the prompt holds (TRL's
prompt-completion semantics).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from memgen.jsonl import iter_jsonl

IGNORE = -100
ASSISTANT_HEADER = "<|im_start|>assistant\n"
ANSWER_TEMPLATE = "The answer is \\boxed{{answer}}."   # {answer} -> the answer: "\\boxed{42}"


@dataclass
class ChatExample:
    prompt: list[dict]           # messages before the completion
    completion: str              # the assistant's content to learn
    id: str | int | None = None
    # True: the assistant turns inside `prompt` are learned too (a conversation, the "messages"
    # form); False: only `completion` is (the "prompt" + "completion" form)
    all_assistant_turns: bool = False

    @property
    def messages(self) -> list[dict]:
        return self.prompt + [{"role": "assistant", "content": self.completion}]

    @property
    def num_assistant_turns(self) -> int:
        """Assistant turns that are learned."""
        return 1 + (sum(m["role"] == "assistant" for m in self.prompt) if self.all_assistant_turns else 0)


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]            # IGNORE where unsupervised
    id: str | int | None = None

    @property
    def num_supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def _messages(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise ValueError(f"{where}: expected a string or a list of {{\"role\", \"content\"}} objects")
    return [dict(role=m["role"], content=m["content"]) for m in value]


def answer_completion(answer, template: str, where: str) -> str:
    """The assistant turn of an eval-style record: `template` with {answer} filled in."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"{where}: \"answer\" must be a string or a number to build the assistant turn, "
                         f"got {type(answer).__name__}")
    if "{answer}" not in template:
        raise ValueError(f"the answer template must contain {{answer}}, got {template!r}")
    return template.replace("{answer}", str(answer))


def parse_chat_example(obj: dict, where: str = "example", answer_template: str = ANSWER_TEMPLATE) -> ChatExample:
    """One JSON object in any accepted form (module docstring) -> ChatExample."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "conversations" in obj and "messages" not in obj:
        from .agentbank import agentbank_messages

        obj = {**obj, "messages": agentbank_messages(obj["conversations"], where)}
    all_turns = False
    ends_with_assistant = (isinstance(obj.get("messages"), list) and obj["messages"]
                           and isinstance(obj["messages"][-1], dict)
                           and obj["messages"][-1].get("role") == "assistant")
    if "completion" in obj:
        prompt = _messages(obj.get("prompt", obj.get("messages")), f"{where} prompt")
        comp = obj["completion"]
        if isinstance(comp, list):
            turns = _messages(comp, f"{where} completion")
            if len(turns) != 1 or turns[0]["role"] != "assistant":
                raise ValueError(f"{where}: completion must be one assistant message")
            comp = turns[0]["content"]
        if not isinstance(comp, str):
            raise ValueError(f"{where}: completion must be a string or one assistant message")
    elif "messages" in obj and (ends_with_assistant or "answer" not in obj):
        msgs = _messages(obj["messages"], f"{where} messages")
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the last message must be the assistant turn to learn "
                             "(or give a separate \"completion\", or an \"answer\")")
        prompt, comp = msgs[:-1], msgs[-1]["content"]
        all_turns = True
    elif "answer" in obj and any(k in obj for k in ("messages", "prompt", "question")):
        key = next(k for k in ("messages", "prompt", "question") if k in obj)
        prompt = _messages(obj[key], f"{where} {key}")
        comp = answer_completion(obj["answer"], answer_template, where)
    else:
        raise ValueError(f"{where}: needs \"messages\" ending with an assistant turn, \"prompt\" + "
                         "\"completion\", or \"messages\"/\"prompt\"/\"question\" + \"answer\"")
    if not prompt:
        raise ValueError(f"{where}: the prompt has no messages")
    return ChatExample(prompt=prompt, completion=comp, id=obj.get("id"), all_assistant_turns=all_turns)


def read_chat_jsonl(path: str | os.PathLike, answer_template: str = ANSWER_TEMPLATE) -> list[ChatExample]:
    """Every example of a JSONL file; a bad line raises ValueError naming it."""
    out = [parse_chat_example(obj, f"{path}:{line_no}", answer_template) for line_no, obj in iter_jsonl(path)]
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def _tokens(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def mask_assistant_header(input_ids: list[int], labels: list[int], header_ids: list[int]) -> list[int]:
    """The reference's `_postprocess_assistant_labels`: -100 on every run of
    `header_ids` in input_ids (overlapping scan, as it does)."""
    out = list(labels)
    n = len(header_ids)
    for i in range(len(input_ids) - n + 1):
        if input_ids[i:i + n] == header_ids:
            out[i:i + n] = [IGNORE] * n
    return out


def _prefix_tokens(tokenizer, messages: list[dict], full_ids: list[int]) -> int:
    """Token count of template(messages), checked to be a prefix of full_ids."""
    if not messages:
        return 0
    ids = _tokens(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False))
    if full_ids[:len(ids)] != ids:
        raise ValueError("the chat template renders (or tokenizes) an earlier part of the conversation "
                         "differently inside the whole conversation")
    return len(ids)


def encode_example(tokenizer, example: ChatExample, max_length: int | None = None) -> EncodedExample:
    """(input_ids, labels) with the reference's masking (module docstring).
    The tokenizer must carry MemGen's chat template (HFMemGenModel.tokenizer
    does). The conversation is tokenized once; each learned assistant block
    is the span between template(messages[:i]) and template(messages[:i+1]).
    Truncated on the right to max_length, as TRL does."""
    messages = example.messages
    ids = _tokens(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False))
    labels = [IGNORE] * len(ids)
    learned = [i for i, m in enumerate(messages) if m["role"] == "assistant"] if example.all_assistant_turns \
        else [len(messages) - 1]
    for i in learned:
        start = _prefix_tokens(tokenizer, messages[:i], ids)
        end = _prefix_tokens(tokenizer, messages[:i + 1], ids)
        labels[start:end] = ids[start:end]
    labels = mask_assistant_header(ids, labels, _tokens(tokenizer, ASSISTANT_HEADER))
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return EncodedExample(ids, labels, example.id)


def encode_prompt(tokenizer, record: dict) -> list[int]:
    """Rollout prompt ids for an eval-style record ("messages" or raw "prompt"),
    exactly as `LLM.chat` / `LLM.generate` would encode it."""
    if "messages" in record:
        text = tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=False)
        return _tokens(tokenizer, text)
    return list(tokenizer(record["prompt"])["input_ids"])
