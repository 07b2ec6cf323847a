"""Multi-LoRA for one batched forward whose rows use different adapters (reasoner
rows none, weaver and trigger rows their own), as in Punica / S-LoRA / vLLM:

    y[i] += scaling[a] * (x[i] @ A[a].T) @ B[a].T      for a = adapter_ids[i] >= 0

in two segmented kernels, shrink (x -> t = scaling * x @ A.T, fp32, rank r) and
expand (y += t @ B.T). Rows are grouped by adapter once per step (`lora_metadata`,
device-only ops, CUDA-graph safe) and the grouping is reused by every layer;
each program then handles one adapter's rows with that adapter's weights.

Shapes: x `[N, in]`, adapter_ids `[N]` (-1 = no adapter), A `[num_adapters, r, in]`,
B `[num_adapters, out, r]`, scaling `[num_adapters]` fp32, y `[N, out]` (may be a
column slice of a packed output, e.g. the q part of qkv). Adapters of smaller
rank are zero-padded to r.
"""
from __future__ import annotations

import torch

from ._common import next_pow2, tl, triton, upcast_inside
from .reference import (
    LoraMeta,
    _check_expand,
    _check_shrink,
    add_lora_ref,
    lora_expand_ref,
    lora_metadata,
    lora_shrink_ref,
)

__all__ = ["LoraMeta", "lora_metadata", "lora_shrink", "lora_shrink_ref", "lora_expand", "lora_expand_ref",
           "add_lora", "add_lora_ref"]

_BLOCK_M = 16
_BLOCK_K = 64
_BLOCK_N = 64


# ----------------------------------------------------------------------------- torch


# ----------------------------------------------------------------------------- triton
@triton.jit
def _adapter_rows(sorted_rows_ptr, group_starts_ptr, adapter, m_block, BLOCK_M: tl.constexpr):
    """Rows m_block * BLOCK_M ... of `adapter`'s group (see LoraMeta), and which exist."""
    idx = tl.load(group_starts_ptr + adapter) + m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = idx < tl.load(group_starts_ptr + adapter + 1)
    return tl.load(sorted_rows_ptr + idx, mask=row_ok, other=0), row_ok


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, scaling_ptr, out_ptr, sorted_rows_ptr, group_starts_ptr,
    stride_x, stride_a0, stride_a1, stride_out,
    in_features, rank,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
):
    m_block = tl.program_id(0)
    adapter = tl.program_id(1)
    rows, row_ok = _adapter_rows(sorted_rows_ptr, group_starts_ptr, adapter, m_block, BLOCK_M)
    if tl.max(row_ok.to(tl.int32), 0) == 0:  # this adapter has fewer rows
        return
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank
    a_base = a_ptr + adapter.to(tl.int64) * stride_a0
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for start in range(0, in_features, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < in_features
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a_t = tl.load(a_base + ranks[None, :] * stride_a1 + ks[:, None],               # A[a].T tile [K, R]
                      mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), a_t.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, a_t)
    acc = acc * tl.load(scaling_ptr + adapter)
    tl.store(out_ptr + rows[:, None] * stride_out + ranks[None, :], acc,
             mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _lora_expand_kernel(
    t_ptr, b_ptr, y_ptr, sorted_rows_ptr, group_starts_ptr,
    stride_t, stride_b0, stride_b1, stride_y,
    out_features, rank,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
):
    m_block = tl.program_id(0)
    n_block = tl.program_id(1)
    adapter = tl.program_id(2)
    rows, row_ok = _adapter_rows(sorted_rows_ptr, group_starts_ptr, adapter, m_block, BLOCK_M)
    if tl.max(row_ok.to(tl.int32), 0) == 0:  # this adapter has fewer rows
        return
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank
    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < out_features
    t = tl.load(t_ptr + rows[:, None] * stride_t + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    b_t = tl.load(b_ptr + adapter.to(tl.int64) * stride_b0 + cols[None, :].to(tl.int64) * stride_b1 + ranks[:, None],
                  mask=rank_ok[:, None] & col_ok[None, :], other=0.0)                   # B[a].T tile [R, N]
    if UPCAST:
        delta = tl.dot(t, b_t.to(tl.float32), input_precision="ieee")
    else:
        delta = tl.dot(t.to(b_t.dtype), b_t)
    y_ptrs = y_ptr + rows[:, None] * stride_y + cols[None, :]
    y_mask = row_ok[:, None] & col_ok[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=y_mask)


def lora_shrink(x, lora_a, scaling, adapter_ids, out: torch.Tensor | None = None,
                meta: LoraMeta | None = None) -> torch.Tensor:
    """t `[N, r]` fp32 = scaling[a] * x @ A[a].T for rows with adapter a >= 0; rows
    without adapter are not written."""
    _check_shrink(x, lora_a, scaling, adapter_ids, out, meta)
    num_rows, in_features = x.shape
    num_adapters, rank = lora_a.shape[:2]
    if out is None:
        out = torch.empty(num_rows, rank, dtype=torch.float32, device=x.device)
    if num_rows == 0 or num_adapters == 0 or rank == 0:
        return out
    if meta is None:
        meta = lora_metadata(adapter_ids, num_adapters)
    _lora_shrink_kernel[(triton.cdiv(num_rows, _BLOCK_M), num_adapters)](
        x, lora_a, scaling, out, meta.sorted_rows, meta.group_starts,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), out.stride(0), in_features, rank,
        BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K, BLOCK_R=next_pow2(rank, 16), UPCAST=upcast_inside(x.dtype),
    )
    return out


def lora_expand(t, lora_b, adapter_ids, y, meta: LoraMeta | None = None) -> torch.Tensor:
    """y[i] += t[i] @ B[a].T in place for rows with adapter a >= 0; returns y."""
    _check_expand(t, lora_b, adapter_ids, y, meta)
    num_rows = t.shape[0]
    num_adapters, out_features, rank = lora_b.shape
    if num_rows == 0 or num_adapters == 0 or rank == 0 or out_features == 0:
        return y
    if meta is None:
        meta = lora_metadata(adapter_ids, num_adapters)
    grid = (triton.cdiv(num_rows, _BLOCK_M), triton.cdiv(out_features, _BLOCK_N), num_adapters)
    _lora_expand_kernel[grid](
        t, lora_b, y, meta.sorted_rows, meta.group_starts,
        t.stride(0), lora_b.stride(0), lora_b.stride(1), y.stride(0), out_features, rank,
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_R=next_pow2(rank, 16), UPCAST=upcast_inside(y.dtype),
    )
    return y


def add_lora(y, x, lora_a, lora_b, scaling, adapter_ids, meta: LoraMeta | None = None) -> torch.Tensor:
    """y += scaling[a] * (x @ A[a].T) @ B[a].T per row (a = adapter_ids[i], -1: none); returns y."""
    _check_shrink(x, lora_a, scaling, adapter_ids, None, meta)
    if lora_b.dim() != 3 or lora_b.shape[0] != lora_a.shape[0] or lora_b.shape[2] != lora_a.shape[1]:
        raise ValueError(f"lora_b must be [num_adapters, out, r] = [{lora_a.shape[0]}, out, {lora_a.shape[1]}], "
                         f"got {tuple(lora_b.shape)}")
    if meta is None:
        meta = lora_metadata(adapter_ids, lora_a.shape[0])
    t = lora_shrink(x, lora_a, scaling, adapter_ids, meta=meta)
    return lora_expand(t, lora_b, adapter_ids, y, meta=meta)
