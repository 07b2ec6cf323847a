"""MemGen's trigger decision on the torch path: the rule of the fused Triton
kernel (`memgen.kernels.trigger_scoring`), with the 2-way head computed in the
hidden state's own dtype, so that float64 runs stay exact against the reference
(the kernel and its reference compute the head in fp32)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

NOT_CONSULTED = -100


def trigger_decisions_exact(hidden, weight, bias, last_token, is_delim, count, budget, is_prompt, temperature,
                            uniforms) -> torch.Tensor:
    """Decisions `int64 [B]`: -100 (not consulted), 0 (skip) or 1 (insert); the
    arguments are `kernels.trigger_scoring.trigger_decisions`' (budget an int or
    `[B]`, temperature `[B]` fp32: <= 0 is argmax with ties to skip, otherwise
    insert iff uniforms >= P(skip) at that temperature)."""
    valid = last_token >= 0
    delim = is_delim[last_token.clamp(min=0)] & valid
    consulted = valid & (is_prompt | (delim & (count < budget)))
    logits = F.linear(hidden, weight, bias)
    diff = logits[:, 1] - logits[:, 0]
    sample = temperature > 0
    p_skip = 1.0 / (1.0 + torch.exp(diff / torch.where(sample, temperature, 1.0).to(diff.dtype)))
    decision = torch.where(sample, uniforms.to(diff.dtype) >= p_skip, diff > 0).long()
    return torch.where(consulted, decision, torch.full_like(decision, NOT_CONSULTED))
