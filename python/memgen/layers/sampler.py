"""Token sampling for one step: vLLM's penalties (repetition, presence,
frequency) and min_tokens' ban on stop ids, then greedy or temperature / top-k /
top-p per row, each sampled row drawing from its own request's torch.Generator
(so a seeded request samples the same tokens whatever else is in the batch),
plus top-k log-probabilities of the raw model distribution (before penalties,
temperature and truncation, as vLLM reports them)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from memgen.layers import native


@dataclass
class SamplingBatch:
    """Per-row sampling settings for the rows that sample this step."""
    temperatures: list[float]              # 0.0 -> greedy
    top_ks: list[int]                      # <= 0 -> off
    top_ps: list[float]                    # 1.0 -> off
    generators: list[torch.Generator]
    num_logprobs: list[int]                # -1 -> none, 0 -> the sampled token's only
    # per row, None where unused: (repetition, presence, frequency) penalties with the
    # prompt's and the output's token ids (latent positions are not tokens), and the
    # token ids banned this step (stop ids while min_tokens is not reached)
    penalties: list[tuple[float, float, float] | None] | None = None
    prompt_ids: list[list[int] | None] | None = None
    output_ids: list[list[int] | None] | None = None
    banned: list[frozenset[int] | None] | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # per row: {token: logprob} of the top-k plus the sampled token, or None
    logprobs: list[dict[int, float] | None]


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.dtype not in (torch.float32, torch.float64):
            logits = _to_float32(logits)
        raw = logits
        logits = _ban(_penalize(logits, batch), batch.banned)
        tokens = _argmax(logits)
        random_rows = [i for i, t in enumerate(batch.temperatures) if t > 0.0]
        if random_rows:
            tokens[random_rows] = self._sample(logits[random_rows], batch, random_rows)
        token_ids = tokens.tolist()
        return SamplerOutput(token_ids, self._logprobs(raw, token_ids, batch.num_logprobs))

    @staticmethod
    def _sample(logits: torch.Tensor, batch: SamplingBatch, rows: list[int]) -> torch.Tensor:
        device = logits.device
        temps = torch.tensor([batch.temperatures[r] for r in rows], dtype=logits.dtype, device=device)
        logits = logits / temps[:, None]
        top_ks = [batch.top_ks[r] for r in rows]
        top_ps = [batch.top_ps[r] for r in rows]
        if any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps):
            logits = _truncate(logits, top_ks, top_ps)
        probs = torch.softmax(logits, dim=-1)
        # exponential race (Gumbel-max in disguise): argmax(p / E), E ~ Exp(1) from the row's generator
        noise = torch.empty_like(probs)
        for i, r in enumerate(rows):
            noise[i].exponential_(generator=batch.generators[r])
        return _argmax(probs / noise)

    @staticmethod
    def _logprobs(logits, token_ids, num_logprobs) -> list[dict[int, float] | None]:
        k = max(num_logprobs, default=-1)
        if k < 0:
            return [None] * len(token_ids)
        logp = torch.log_softmax(logits, dim=-1)
        top_vals, top_ids = logp.topk(k, dim=-1)
        chosen = logp.gather(1, torch.tensor(token_ids, device=logp.device)[:, None]).squeeze(1).tolist()
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        out: list[dict[int, float] | None] = []
        for i, n in enumerate(num_logprobs):
            if n < 0:
                out.append(None)
                continue
            d = dict(zip(top_ids[i][:n], top_vals[i][:n]))
            d[token_ids[i]] = chosen[i]
            out.append(d)
        return out


def _to_float32(x: torch.Tensor) -> torch.Tensor:
    """x.float(); CPU bfloat16 natively on the caller's thread (torch's conversion woke its
    OpenMP team every step, whose spinning then slowed the next step's linears)."""
    if native.bf16_to_f32 is None or x.device.type != "cpu" or x.dtype != torch.bfloat16:
        return x.float()
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32)
    native.bf16_to_f32(x.data_ptr(), x.numel(), out.data_ptr())
    return out


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1); a CPU float32 batch through the native op, which gives the same
    indices (ties and NaN included) several times faster and on the caller's thread."""
    if native.argmax_rows_f32 is None or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2:
        return x.argmax(dim=-1)
    x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    native.argmax_rows_f32(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    return out


def _truncate(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """Mask tokens outside each row's top-k and top-p nucleus with -inf."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=logits.device)
    ranks = torch.arange(vocab, device=logits.device)
    remove = ranks[None, :] >= ks[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    ps = torch.tensor([p if p < 1.0 else float("inf") for p in top_ps], dtype=logits.dtype, device=logits.device)
    probs = torch.softmax(sorted_logits, dim=-1)
    # drop a token when the mass strictly before it already reaches top_p (the first always stays)
    remove = (probs.cumsum(dim=-1) - probs) >= ps[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def _penalize(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """vLLM's penalties: repetition divides positive (multiplies negative) logits of
    tokens in the prompt or the output; frequency subtracts per occurrence in the
    output, presence once per token present in it."""
    rows = [i for i, p in enumerate(batch.penalties or ()) if p is not None]
    if not rows:
        return logits
    logits = logits.clone()
    vocab, device = logits.shape[-1], logits.device
    for i in rows:
        repetition, presence, frequency = batch.penalties[i]
        out = torch.tensor(batch.output_ids[i], dtype=torch.long, device=device)
        counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
        row = logits[i]
        if repetition != 1.0:
            seen = counts > 0
            seen[torch.tensor(batch.prompt_ids[i], dtype=torch.long, device=device)] = True
            row = torch.where(seen, torch.where(row > 0, row / repetition, row * repetition), row)
        logits[i] = row - frequency * counts - presence * (counts > 0).to(logits.dtype)
    return logits


def _ban(logits: torch.Tensor, banned: list[frozenset[int] | None] | None) -> torch.Tensor:
    rows = [(i, list(b)) for i, b in enumerate(banned or ()) if b]
    if not rows:
        return logits
    logits = logits.clone()
    for i, ids in rows:
        logits[i, ids] = float("-inf")
    return logits
