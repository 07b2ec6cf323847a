"""Per-request generation settings (API.md), checked when built and again when
a request is submitted: bad values raise ValueError / TypeError saying what
would be right."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from memgen.latent_policy import LatentPolicy


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
    memgen_checkpoint: str | None = None   # MemGen: which of the LLM's checkpoints (None: the default)
    # vLLM's fields, vLLM's semantics; latent positions are not tokens and never count
    n: int = 1                       # completions per prompt; completion i > 0 seeds from (seed, i)
    stop: list[str] | None = None    # the text ends before the first stop string (not included)
    min_tokens: int = 0              # EOS, stop ids and stop strings are ignored until this many tokens
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the output so far
    presence_penalty: float = 0.0    # in [-2, 2]: subtracted once from tokens already generated
    frequency_penalty: float = 0.0   # in [-2, 2]: subtracted per occurrence in the output so far
    # a memgen.LatentPolicy (docs/latent-policies.md): a per-request hook that may insert embedding
    # rows or forced tokens between tokens; the engine runs a copy per request (new_request)
    latent_policy: LatentPolicy | None = None
    # vLLM's: a memgen.StructuredOutputsParams (json | regex | choice | grammar); the sampled
    # tokens follow it, latent positions are not constrained (memgen/structured/)
    structured_outputs: "StructuredOutputsParams | None" = None

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
        _int("n", self.n, minimum=1)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            if not isinstance(self.stop, (list, tuple)) or not all(isinstance(x, str) for x in self.stop):
                raise TypeError(f"stop must be a string, a list of strings or None, got {self.stop!r}")
            if any(x == "" for x in self.stop):
                raise ValueError("stop strings must not be empty")
            self.stop = list(self.stop)
        _int("min_tokens", self.min_tokens, minimum=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} exceeds max_tokens={self.max_tokens}")
        _number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _number(name, value, allow_negative=True)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2] (0 disables it), got {value}")
        if self.memgen_checkpoint is not None and (not isinstance(self.memgen_checkpoint, str)
                                                   or not self.memgen_checkpoint):
            raise TypeError(f"memgen_checkpoint must be a checkpoint's name (a non-empty str) or None, "
                            f"got {self.memgen_checkpoint!r}")
        if self.latent_policy is not None and not isinstance(self.latent_policy, LatentPolicy):
            raise TypeError(f"latent_policy must be a memgen.LatentPolicy (an instance of a subclass) or None, "
                            f"got {type(self.latent_policy).__name__}")
        if self.structured_outputs is not None:
            _check_structured(self)

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def for_completion(self, i: int) -> "SamplingParams":
        """The settings of completion i of n: one completion each, completion 0 keeps
        the seed (n=1 runs are unchanged), completion i > 0 seeds from (seed, i)."""
        seed = self.seed
        if seed is not None and i > 0:
            seed = (seed * 1_000_003 + i) & 0x7FFF_FFFF_FFFF_FFFF
        return dataclasses.replace(self, n=1, seed=seed)


def _check_structured(params: SamplingParams) -> None:
    from memgen.structured.params import StructuredOutputsParams

    so = params.structured_outputs
    if isinstance(so, dict):     # vLLM's request-field shape
        params.structured_outputs = so = StructuredOutputsParams.from_dict(so)
    if not isinstance(so, StructuredOutputsParams):
        raise TypeError(f"structured_outputs must be a memgen.StructuredOutputsParams or None, got {type(so).__name__}")
    so.validate()
    if params.min_tokens:
        raise ValueError("min_tokens cannot be combined with structured_outputs: the grammar decides where the "
                         "output may end (leave min_tokens at 0)")


def _int(name: str, value, minimum: int | None = None, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{hint}, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{hint}, got {value}")


def _number(name: str, value, allow_negative: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if value < 0 and not allow_negative:
        raise ValueError(f"{name} must be >= 0 (0 means greedy for temperature), got {value}")


def _bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} ({value!r})")
