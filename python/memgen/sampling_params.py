"""Per-request generation settings (API.md), checked when built and again when
a request is submitted: bad values raise ValueError / TypeError saying what
would be right."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class SamplingParams:
    max_tokens: int = 256            # generated tokens; latent positions do not count
    temperature: float = 1.0         # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0                   # 0 or -1 -> off
    seed: int | None = None          # per-request; same seed -> same output whatever the batch
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None      # k -> top-k log-probabilities per generated token
    trigger_sample: bool = False     # MemGen: sample the trigger decision instead of argmax
    trigger_temperature: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        _int("max_tokens", self.max_tokens, minimum=1)
        _number("temperature", self.temperature)
        _number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
        _int("top_k", self.top_k, minimum=-1, hint=" (0 or -1 disables it)")
        if self.seed is not None:
            _int("seed", self.seed)
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple, set, frozenset)):
                raise TypeError(f"stop_token_ids must be a list of token ids or None, "
                                f"got {type(self.stop_token_ids).__name__}")
            for t in self.stop_token_ids:
                _int("stop_token_ids entry", t, minimum=0)
        _bool("ignore_eos", self.ignore_eos)
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, minimum=0)
        _bool("trigger_sample", self.trigger_sample)
        if self.trigger_temperature is not None:
            _number("trigger_temperature", self.trigger_temperature)


def _int(name: str, value, minimum: int | None = None, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{hint}, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{hint}, got {value}")


def _number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (0 means greedy for temperature), got {value}")


def _bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} ({value!r})")
