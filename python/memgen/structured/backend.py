"""Structured outputs on xgrammar: compile once per constraint, a matcher per
request, and a per-row logits mask at sampled positions only.

Why xgrammar (of xgrammar 0.2.8, llguidance 1.9.1, outlines-core 0.2.14): it is
vLLM's default structured-output backend, so `json=`, `regex=`, `choice=` and
`grammar=` (its EBNF) mean what they mean there; it compiles JSON schemas,
regexes and EBNF to one grammar type with a thread-safe, built-in compile cache;
its per-token mask is a packed int32 bitmask filled in C++ in microseconds,
which unpacks to a boolean row on any device and dtype (float64 tests included);
and it is a single wheel with no Rust toolchain or model-specific setup.

How it meets the engine (engine/llm_engine.py): `LLMEngine.step` calls `mask`
on the rows that sample now (a LatentPolicy's or MemGen's inserted latent
positions never sample, so they are never masked) and `accept` with the sampled
tokens; a request whose grammar has ended (it accepted a stop token) finishes
with "stop". Rows without a constraint are not touched, so they are bit for bit
what they would be alone. A preempted request keeps its matcher: recompute
re-prefills tokens the matcher has already accepted and samples nothing until
it has caught up.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict

import torch

from memgen.structured.params import StructuredOutputsParams

NO_TOKEN = ""     # xgrammar never allows a token whose text is empty (special / padding ids)
MAX_CACHED_GRAMMARS = 512     # compiled constraints kept (least recently used first out)


class MissingBackend(ImportError, ValueError):
    """xgrammar is not installed: an ImportError offline, a 400 (not a 500) in the server."""


class StructuredOutputs:
    """One per LLM: the tokenizer's info for xgrammar, the compiled grammars by
    constraint, and the matchers of the requests that carry one (seq.grammar)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: frozenset[int]):
        try:
            import xgrammar as xgr
        except ImportError:
            raise MissingBackend("structured outputs and enforced tool calls need xgrammar: "
                                 "pip install 'memgen[structured]'") from None

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.info = tokenizer_info(tokenizer, vocab_size, self.stop_token_ids)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=True)
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        self._shifts: dict[torch.device, torch.Tensor] = {}
        # tokens holding a control byte other than tab / newline / carriage return can never be
        # JSON (outside strings only whitespace, inside them escapes); xgrammar 0.2.8 lets them
        # into strings with maxLength / minLength, so JSON rows never get them
        self._json_bad = [i for i, t in enumerate(self.info.decoded_vocab)
                          if any(b < 0x20 and b not in (9, 10, 13) for b in t)]
        self._json_bad_on: dict[torch.device, torch.Tensor] = {}
        self.num_compiled = 0          # compiles that missed the cache (tests, the benchmark)

    # ---- compile (off the engine's step: LLM and the server compile when they validate) ----
    def compile(self, params: StructuredOutputsParams):
        """The compiled grammar of `params` (cached by constraint); an invalid schema,
        regex or grammar raises ValueError naming it."""
        key = params.key()
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
        kind, value, compact = key
        c = self.compiler
        try:
            if kind == "json":
                # xgrammar's strict mode, as vLLM: no properties beyond the schema's unless it allows them
                compiled = c.compile_json_schema(value, any_whitespace=not compact)
            elif kind == "json_object":
                compiled = c.compile_json_schema('{"type": "object"}', any_whitespace=not compact, strict_mode=False)
            elif kind == "regex":
                compiled = c.compile_regex(value)
            elif kind == "choice":
                compiled = c.compile_grammar("root ::= " + " | ".join(_ebnf_literal(s) for s in value))
            else:
                compiled = c.compile_grammar(value)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"structured_outputs.{kind} does not compile: {_clean(e)}") from None
        with self._lock:
            self._cache[key] = compiled
            self.num_compiled += 1
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)    # requests holding its matchers keep it alive
        return compiled

    # ---- per request ----------------------------------------------------------------
    def add(self, seq) -> None:
        """A new request with structured_outputs: its own matcher."""
        so = seq.params.structured_outputs
        seq.grammar = self._xgr.GrammarMatcher(self.compile(so))
        seq.grammar_json = so.kind in ("json", "json_object")

    def mask(self, seqs, logits: torch.Tensor) -> torch.Tensor:
        """Set to -inf, in the rows of requests with a constraint, the logits of the
        tokens their grammar does not allow next; other rows are left as they are."""
        rows = [(i, g) for i, s in enumerate(seqs) if (g := getattr(s, "grammar", None)) is not None]
        if not rows:
            return logits
        xgr = self._xgr
        bitmask = xgr.allocate_token_bitmask(len(rows), self.vocab_size)
        for j, (_, matcher) in enumerate(rows):
            matcher.fill_next_token_bitmask(bitmask, j)
        device = logits.device
        shifts = self._shifts.get(device)
        if shifts is None:
            shifts = self._shifts[device] = torch.arange(32, dtype=torch.int32, device=device)
        bits = bitmask.to(device, non_blocking=True)
        banned = ((bits.unsqueeze(-1) >> shifts) & 1).eq(0).reshape(len(rows), -1)[:, :logits.shape[-1]]
        json_rows = [j for j, (i, _) in enumerate(rows) if getattr(seqs[i], "grammar_json", False)]
        if json_rows and self._json_bad:
            bad = self._json_bad_on.get(device)
            if bad is None:
                bad = self._json_bad_on[device] = torch.tensor(self._json_bad, device=device)
            banned[torch.tensor(json_rows, device=device)[:, None], bad[None, :]] = True
        with torch.inference_mode():     # the logits are an inference tensor; in place, no copies
            if len(rows) == logits.shape[0]:
                logits.masked_fill_(banned, float("-inf"))
            else:
                for j, (i, _) in enumerate(rows):
                    logits[i].masked_fill_(banned[j], float("-inf"))
        return logits

    def accept(self, seqs, token_ids: list[int]) -> None:
        for seq, token in zip(seqs, token_ids):
            matcher = getattr(seq, "grammar", None)
            if matcher is not None and not matcher.is_terminated():
                if not matcher.accept_token(token):
                    # only a stop token the grammar did not expect (a user's stop id) gets here
                    seq.grammar_rejected = True

    @staticmethod
    def done(seq) -> bool:
        """The grammar has ended (it accepted a stop token): the request ends with "stop"."""
        matcher = getattr(seq, "grammar", None)
        return matcher is not None and (matcher.is_terminated() or getattr(seq, "grammar_rejected", False))


def tokenizer_info(tokenizer, vocab_size: int, stop_token_ids: list[int]):
    """xgrammar's TokenizerInfo for an HF-style tokenizer (transformers' or memgen's
    LightTokenizer): the raw vocabulary, its encoding detected from tokenizer.json,
    special (added) tokens and ids past the tokenizer's vocabulary never allowed
    inside the text; stop tokens only where the grammar ends."""
    import xgrammar as xgr

    backend = tokenizer.backend_tokenizer
    encoded = [NO_TOKEN] * vocab_size
    for token, index in tokenizer.get_vocab().items():
        if index < vocab_size:
            encoded[index] = token
    special = {i for i, t in backend.get_added_tokens_decoder().items() if getattr(t, "special", False)}
    for index in special:
        if index < vocab_size:
            encoded[index] = NO_TOKEN
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    return xgr.TokenizerInfo(encoded, vocab_type=meta["vocab_type"], vocab_size=vocab_size,
                             stop_token_ids=list(stop_token_ids) or None, add_prefix_space=meta["add_prefix_space"])


def _ebnf_literal(text: str) -> str:
    """A string literal of xgrammar's EBNF (JSON's escapes are its escapes)."""
    return json.dumps(text, ensure_ascii=True)


def _clean(e: Exception) -> str:
    """xgrammar's message without its C++ file:line prefix."""
    text = str(e).strip()
    if "] " in text and text.startswith("["):
        text = text.split("] ", 1)[1]
    parts = text.split(": ", 1)
    if len(parts) == 2 and ".cc:" in parts[0]:
        text = parts[1]
    return text.replace("Check failed: (error.empty()) is false: ", "").strip()
