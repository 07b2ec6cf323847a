"""Which single-turn forwards an SFT row is trained through (spec §3.2).

A row whose labels hold one supervised run (one assistant turn) is one
forward over the whole row. A row with several runs is a conversation, and
the reference's `_conversational_forward` trains it turn by turn:
  - turns are the maximal runs of supervised labels;
  - each chosen turn is its own single-turn forward over ids[:turn end] with
    labels on that turn only, so its prompt latents go right before the
    turn's first content token and the latents of earlier turns are not
    visible to it (earlier turns are plain tokens);
  - when a row has more turns than `max_prompt_aug_num`, that many are chosen
    at random with `rng.sample(range(turns), k)` (Python's `random`, one call
    per row in batch order, redrawn every time the row is seen); turns not
    chosen count neither in the loss nor in its denominator.
The reference decides once, from the first row it sees, whether every row is a
conversation; here each row decides for itself (a one-turn conversation's
forward is the single-turn forward, so nothing else changes).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .data import IGNORE, EncodedExample


@dataclass
class Segment:
    """One single-turn forward: ids and labels up to the end of the turn it learns."""
    input_ids: list[int]
    labels: list[int]

    @property
    def num_supervised(self) -> int:
        """Tokens this forward is scored on (the first label has nothing to predict it)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def supervised_runs(labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of every maximal run of supervised labels."""
    runs, start = [], None
    for i, t in enumerate(labels):
        if t != IGNORE and start is None:
            start = i
        elif t == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(labels)))
    return runs


def choose_turns(num_turns: int, max_turns: int, rng: random.Random) -> list[int]:
    """Indices of the turns to train, in order: all of them when they fit in
    `max_turns`, else `rng.sample(range(num_turns), max_turns)` (the
    reference's draw, so a generator in the same state picks the same turns)."""
    if num_turns <= max_turns:
        return list(range(num_turns))
    return sorted(set(rng.sample(range(num_turns), max_turns)))


def row_segments(example: EncodedExample, max_turns: int, rng: random.Random) -> list[Segment]:
    """The single-turn forwards that train `example` (module docstring)."""
    runs = supervised_runs(example.labels)
    if len(runs) <= 1:
        return [Segment(list(example.input_ids), list(example.labels))]
    if max_turns < 1:
        raise ValueError(f"a conversation ({len(runs)} assistant turns) needs max_prompt_aug_num >= 1 "
                         "to train any of them")
    segments = []
    for i in choose_turns(len(runs), max_turns, rng):
        start, end = runs[i]
        segments.append(Segment(list(example.input_ids[:end]), [IGNORE] * start + list(example.labels[start:end])))
    return segments
