"""Fused trigger scoring: for every row of a batch of consulted sequences, in
one launch and with no host round trip, the trigger's 2-way head and its
decision (insert latent memory before the next token, or skip).

Per row b (spec §2.2 (a)):
  logits    = hidden[b] @ weight.T + bias                       # the 2-way head
  decision  = argmax(logits)            if temperature[b] <= 0   (ties -> 0 = skip)
            = inverse CDF of softmax(logits / temperature[b]) over (skip, insert)
              at uniforms[b], i.e. 1 iff uniforms[b] >= P(skip)
Who is consulted (the prompt, a delimiter under budget) is the host's decision
(memory.controller): it must be, for delimiters whose meaning depends on
context. An inactive trigger is a constant head: weight 0, bias [0, 1].

The kernel computes in fp32; `trigger_decisions_ref` (the engine's torch
backend) in the inputs' dtype, so that float64 runs stay exact.
"""
from __future__ import annotations

import torch

from ._common import next_pow2, tl, triton
from .reference import _prepare_trigger as _prepare
from .reference import trigger_decisions_ref

__all__ = ["trigger_decisions", "trigger_decisions_ref"]


@triton.jit
def _trigger_kernel(
    hidden_ptr, weight_ptr, bias_ptr, temperature_ptr, uniforms_ptr, out_ptr, logits_ptr,
    stride_hidden, stride_weight, width,
    BLOCK: tl.constexpr, WRITE_LOGITS: tl.constexpr,
):
    row = tl.program_id(0)
    # the 2-way head: two dot products of length `width`, fp32
    acc0 = tl.zeros([BLOCK], tl.float32)
    acc1 = tl.zeros([BLOCK], tl.float32)
    h_row = hidden_ptr + row.to(tl.int64) * stride_hidden
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < width
        h = tl.load(h_row + cols, mask=ok, other=0.0).to(tl.float32)
        w0 = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        w1 = tl.load(weight_ptr + stride_weight + cols, mask=ok, other=0.0).to(tl.float32)
        acc0 += h * w0
        acc1 += h * w1
    logit0 = tl.sum(acc0, 0) + tl.load(bias_ptr).to(tl.float32)
    logit1 = tl.sum(acc1, 0) + tl.load(bias_ptr + 1).to(tl.float32)
    temperature = tl.load(temperature_ptr + row)
    if temperature > 0:
        p_skip = 1.0 / (1.0 + tl.exp((logit1 - logit0) / temperature))
        decision = (tl.load(uniforms_ptr + row) >= p_skip).to(tl.int64)
    else:
        decision = (logit1 > logit0).to(tl.int64)
    tl.store(out_ptr + row, decision)
    if WRITE_LOGITS:
        tl.store(logits_ptr + row * 2, logit0)
        tl.store(logits_ptr + row * 2 + 1, logit1)


def trigger_decisions(hidden, weight, bias, temperature, uniforms, out: torch.Tensor | None = None,
                      logits_out: torch.Tensor | None = None) -> torch.Tensor:
    """Trigger decisions `int64 [B]`: 0 (skip) or 1 (insert), see the module docstring.

    hidden `[B, Ht]` (the trigger's post-norm last hidden state), weight `[2, Ht]`,
    bias `[2]`, temperature float or `[B]` fp32 (<= 0: argmax), uniforms `[B]` fp32
    in [0, 1). `logits_out [B, 2]` fp32, if given, receives the head's logits.
    """
    temperature, out = _prepare(hidden, weight, bias, temperature, uniforms, out, logits_out, floats="float")
    num_rows, width = hidden.shape
    if num_rows == 0:
        return out
    _trigger_kernel[(num_rows,)](
        hidden, weight, bias, temperature, uniforms, out, logits_out if logits_out is not None else out,
        hidden.stride(0), weight.stride(0), width,
        BLOCK=min(next_pow2(width, 16), 1024), WRITE_LOGITS=logits_out is not None,
    )
    return out
