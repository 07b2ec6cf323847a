"""Fused trigger scoring: for every sequence of a batch, in one pass and with no
host round trip, decide whether to insert latent memory before its next token.

Per row b (spec §2.2 (a), §2.3):
  consulted = last_token[b] >= 0 and (is_prompt[b] or
              (is_delim[last_token[b]] and count[b] < budget[b]))
  logits    = hidden[b] @ weight.T + bias                       # the 2-way head, fp32
  decision  = -100                      if not consulted
            = argmax(logits)            if temperature[b] <= 0   (ties -> 0 = skip)
            = inverse CDF of softmax(logits / temperature[b]) over (skip, insert)
              at uniforms[b], i.e. 1 iff uniforms[b] >= P(skip)
Rows with last_token -1 are padding: neither decision nor logits are written.
"Prompt decision" rows (is_prompt) bypass the delimiter and budget tests. An
inactive trigger is weight = 0, bias = [0, 1] (spec §1.1: it always inserts).
"""
from __future__ import annotations

import torch

from ._common import check_same_device, check_tensor, next_pow2, tl, triton

__all__ = ["trigger_decisions", "trigger_decisions_ref"]

NOT_CONSULTED = -100
_INDEX = (torch.int64, torch.int32)


def _as_row_tensor(name, value, num_rows, dtype, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number or a tensor of shape [{num_rows}], got {type(value).__name__}")
    return torch.full((num_rows,), value, dtype=dtype, device=device)


def _prepare(hidden, weight, bias, last_token, is_delim, count, budget, is_prompt, temperature,
             uniforms, out, logits_out):
    check_tensor("hidden", hidden, ndim=2, dtypes="float")
    num_rows, width = hidden.shape
    check_tensor("weight", weight, ndim=2, dtypes="float", shape=(2, width))
    check_tensor("bias", bias, ndim=1, dtypes="float", shape=(2,))
    check_tensor("last_token", last_token, ndim=1, dtypes=_INDEX, shape=(num_rows,))
    check_tensor("is_delim", is_delim, ndim=1, dtypes=(torch.bool,), contiguous=True)
    check_tensor("count", count, ndim=1, dtypes=_INDEX, shape=(num_rows,))
    budget = _as_row_tensor("budget", budget, num_rows, torch.int64, hidden.device)
    check_tensor("budget", budget, ndim=1, dtypes=_INDEX, shape=(num_rows,))
    check_tensor("is_prompt", is_prompt, ndim=1, dtypes=(torch.bool,), shape=(num_rows,), contiguous=True)
    temperature = _as_row_tensor("temperature", temperature, num_rows, torch.float32, hidden.device)
    check_tensor("temperature", temperature, ndim=1, dtypes=(torch.float32,), shape=(num_rows,))
    check_tensor("uniforms", uniforms, ndim=1, dtypes=(torch.float32,), shape=(num_rows,))
    if out is not None:
        check_tensor("out", out, ndim=1, dtypes=(torch.int64,), shape=(num_rows,))
    if logits_out is not None:
        check_tensor("logits_out", logits_out, ndim=2, dtypes=(torch.float32,), shape=(num_rows, 2))
    check_same_device(hidden=hidden, weight=weight, bias=bias, last_token=last_token, is_delim=is_delim,
                      count=count, budget=budget, is_prompt=is_prompt, temperature=temperature,
                      uniforms=uniforms, out=out, logits_out=logits_out)
    if out is None:
        out = torch.empty(num_rows, dtype=torch.int64, device=hidden.device)
    return budget, temperature, out


def trigger_decisions_ref(hidden, weight, bias, last_token, is_delim, count, budget, is_prompt,
                          temperature, uniforms, out: torch.Tensor | None = None,
                          logits_out: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of `trigger_decisions` (same arguments); returns `out`."""
    budget, temperature, out = _prepare(hidden, weight, bias, last_token, is_delim, count, budget,
                                        is_prompt, temperature, uniforms, out, logits_out)
    valid = last_token >= 0
    delim = torch.zeros_like(valid)
    delim[valid] = is_delim[last_token[valid].long()]
    consulted = valid & (is_prompt | (delim & (count < budget)))
    logits = hidden.float() @ weight.float().T + bias.float()
    t = temperature.clamp(min=1e-30)  # only used where temperature > 0
    p_skip = 1.0 / (1.0 + torch.exp((logits[:, 1] - logits[:, 0]) / t))
    sampled = (uniforms >= p_skip).long()
    greedy = (logits[:, 1] > logits[:, 0]).long()
    decision = torch.where(temperature > 0, sampled, greedy)
    decision = torch.where(consulted, decision, torch.full_like(decision, NOT_CONSULTED))
    out[valid] = decision[valid]
    if logits_out is not None:
        logits_out[consulted] = logits[consulted]
    return out


@triton.jit
def _trigger_kernel(
    hidden_ptr, weight_ptr, bias_ptr, last_token_ptr, is_delim_ptr, count_ptr, budget_ptr,
    is_prompt_ptr, temperature_ptr, uniforms_ptr, out_ptr, logits_ptr,
    stride_hidden, stride_weight, width,
    BLOCK: tl.constexpr, WRITE_LOGITS: tl.constexpr,
):
    row = tl.program_id(0)
    token = tl.load(last_token_ptr + row).to(tl.int64)
    if token < 0:  # padded row
        return
    prompt = tl.load(is_prompt_ptr + row) != 0
    delim = tl.load(is_delim_ptr + token) != 0
    under_budget = tl.load(count_ptr + row).to(tl.int64) < tl.load(budget_ptr + row).to(tl.int64)
    consulted = prompt | (delim & under_budget)
    if consulted == 0:
        tl.store(out_ptr + row, -100)
        return
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


def trigger_decisions(hidden, weight, bias, last_token, is_delim, count, budget, is_prompt,
                      temperature, uniforms, out: torch.Tensor | None = None,
                      logits_out: torch.Tensor | None = None) -> torch.Tensor:
    """Trigger decisions `int64 [B]` (-100 / 0 / 1, see the module docstring).

    hidden `[B, Ht]` (the trigger's post-norm last hidden state), weight `[2, Ht]`,
    bias `[2]`, last_token `[B]` (-1 = padded row), is_delim `[V]` bool, count
    `[B]`, budget int or `[B]`, is_prompt `[B]` bool, temperature float or `[B]`
    fp32 (<= 0: argmax), uniforms `[B]` fp32 in [0, 1). `logits_out [B, 2]` fp32,
    if given, receives the head's logits of the consulted rows.
    """
    budget, temperature, out = _prepare(hidden, weight, bias, last_token, is_delim, count, budget,
                                        is_prompt, temperature, uniforms, out, logits_out)
    num_rows, width = hidden.shape
    if num_rows == 0:
        return out
    _trigger_kernel[(num_rows,)](
        hidden, weight, bias, last_token, is_delim.view(torch.uint8), count, budget,
        is_prompt.view(torch.uint8), temperature, uniforms, out,
        logits_out if logits_out is not None else out,
        hidden.stride(0), weight.stride(0), width,
        BLOCK=min(next_pow2(width, 16), 1024), WRITE_LOGITS=logits_out is not None,
    )
    return out
