"""The MemGen reference's evaluation protocols (`memgen eval --dataset NAME`):
for each dataset, how a row of its published schema becomes the chat the model
sees (character for character as the reference's `data/<name>/builder.py`), the
reference config's generation settings, and its reward.

A protocol's `build(row, record_id, seed)` returns the record data the runner keeps:
`messages` (the first turn's chat), the reference fields its `score` reads, and
anything worth recording per record (GPQA's option order). Prompts are rendered
with MemGen's chat template whatever model runs (`render_prompt`), as the
reference renders every dataset, vanilla runs included.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from memgen.eval.tasks import Score

# The reference's eval scripts and configs: greedy (temperature 0.0; gpqa.yaml's 1.0 is
# moot since weaver_do_sample=False decodes greedily), max_response_length 1024, trigger argmax.
REFERENCE_GENERATION = {"max_tokens": 1024, "temperature": 0.0}


@dataclass(frozen=True)
class DatasetProtocol:
    name: str
    build: Callable[[dict[str, Any], Any, int], dict[str, Any]]   # (row, record id, seed) -> record data
    score: Callable[[str, dict[str, Any]], Score]                  # (completion, record data) -> Score
    default_split: str                                             # of a save_to_disk DatasetDict
    id_field: str | None = None                                    # the schema's id column, if any
    multiturn: bool = False
    generation: dict[str, Any] = field(default_factory=lambda: dict(REFERENCE_GENERATION))


def render_prompt(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """`messages` under MemGen's chat template (what the reference's tokenizer renders)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from memgen.memory.chat_template import MEMGEN_CHAT_TEMPLATE

    rendered, _ = render_jinja_template([messages], chat_template=MEMGEN_CHAT_TEMPLATE,
                                        add_generation_prompt=add_generation_prompt)
    return rendered[0]


def require(row: dict[str, Any], name: str, *fields: str) -> None:
    """A one-line error naming the missing columns of the dataset's schema."""
    missing = [f for f in fields if f not in row or row[f] is None]
    if missing:
        raise ValueError(f"not a {name} row: missing {', '.join(repr(m) for m in missing)} "
                         f"(the published schema has {', '.join(repr(f) for f in fields)})")


def text_field(row: dict[str, Any], key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"column {key!r} must be a string, got {type(value).__name__}")
    return value


def get_protocol(name: str) -> DatasetProtocol:
    from memgen.eval.protocols import gpqa, gsm8k, kodcode, triviaqa

    table = {p.name: p for p in (gsm8k.PROTOCOL, gpqa.PROTOCOL, kodcode.PROTOCOL, triviaqa.PROTOCOL)}
    if name not in table:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return table[name]


DATASETS = ("gsm8k", "gpqa", "kodcode", "triviaqa")

__all__ = ["DATASETS", "DatasetProtocol", "REFERENCE_GENERATION", "get_protocol", "render_prompt"]
