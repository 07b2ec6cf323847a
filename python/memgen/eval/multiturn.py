"""The reference's multi-turn search interaction (TriviaQA), over a batch of
records: every turn renders each open episode's whole chat with MemGen's
template and generates all of them in one call; responses are cut and parsed as
the reference's environment does, searches go to the retriever in one call, and
observations longer than 512 tokens are cut to 509 + "..." as the reference's
`_postprocess_observations` does. See memgen.eval.protocols.triviaqa.

Generation stops at the first "</search>" (a stop string): the reference
generates on and then cuts there, so the kept text is the same. It does not stop
at "</answer>", because a later "</search>" would take precedence.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from memgen.eval.protocols import render_prompt
from memgen.eval.protocols import triviaqa as tq


@dataclass
class Episode:
    messages: list[dict[str, str]]
    aliases: list[str]
    turns: list[dict[str, Any]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    augmentation: list[int] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    num_prompt_tokens: int = 0
    finish_reason: str | None = None
    reward: float = 0.0
    answer: str | None = None
    error: str | None = None
    done: bool = False


def truncate_observation(tokenizer, text: str, max_tokens: int = tq.MAX_OBS_TOKENS) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    extra = tokenizer("...", add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:max_tokens - len(extra)] + extra, skip_special_tokens=True)


def _add_metrics(total: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in (new or {}).items():
        if key == "time_to_first_token_s":
            total.setdefault(key, value)              # the episode's first token
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value


def run_episodes(llm, records: Sequence[Any], make_params: Callable[[Any, int], Any], retriever,
                 generate: Callable, max_turns: int = tq.MAX_TURNS,
                 max_obs_tokens: int = tq.MAX_OBS_TOKENS) -> list[Episode]:
    """One episode per record (`record.data` from the triviaqa protocol).
    `make_params(record, turn)`: that turn's SamplingParams. `generate(llm, id_lists,
    params)` -> (outputs, errors), as the runner generates (one bad prompt fails alone)."""
    episodes = [Episode([dict(m) for m in r.data["messages"]], list(r.data["aliases"])) for r in records]
    tokenizer = llm.tokenizer
    for turn in range(max_turns):
        active = [i for i, e in enumerate(episodes) if not e.done]
        if not active:
            break
        prompts = [tokenizer(render_prompt(episodes[i].messages), add_special_tokens=False)["input_ids"]
                   for i in active]
        outs, errors = generate(llm, prompts, [make_params(records[i], turn) for i in active])
        searches: list[tuple[int, str]] = []
        for i, prompt, out, err in zip(active, prompts, outs, errors):
            e = episodes[i]
            if err is not None:
                e.error, e.done, e.finish_reason = f"turn {turn + 1}: {err}", True, "error"
                continue
            if turn == 0:
                e.num_prompt_tokens = len(prompt)
            e.token_ids += list(out.token_ids)
            e.augmentation += list(out.augmentation)
            _add_metrics(e.metrics, dict(getattr(out, "metrics", None) or {}))
            e.finish_reason = out.finish_reason
            # the whole generation decoded as the reference decodes it, then cut its way
            response = tq.cut_response(tokenizer.decode(list(out.token_ids), skip_special_tokens=True))
            kind, content = tq.parse_action(response)
            e.messages.append({"role": "assistant", "content": response})
            e.turns.append({"response": response, "action": kind, "content": content})
            if kind == "answer":
                e.answer, e.done = content, True
                e.reward = float(tq.is_correct(content, e.aliases))
                e.messages.append({"role": "user", "content": ""})
            elif kind == "search":
                searches.append((i, content))
            else:
                e.messages.append({"role": "user", "content": tq.INVALID_ACTION})
                e.turns[-1]["observation"] = tq.INVALID_ACTION
        if searches:
            try:
                found = retriever.search([q for _, q in searches])
            except Exception:   # the reference turns any retrieval failure into this observation
                found = [tq.SEARCH_FAILED] * len(searches)
                for i, _ in searches:
                    episodes[i].metrics["retrieval_errors"] = episodes[i].metrics.get("retrieval_errors", 0) + 1
            for (i, _), observation in zip(searches, found):
                observation = truncate_observation(tokenizer, observation, max_obs_tokens)
                episodes[i].messages.append({"role": "user", "content": observation})
                episodes[i].turns[-1]["observation"] = observation
    return episodes
