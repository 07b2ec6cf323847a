"""Paged attention over block tables: a varlen causal prefill/chunk kernel and a
GQA decode kernel (with split-K over the context for small batches), each beside
a torch reference with the same signature.

Words are vLLM's / flash-attn's:
- q `[num_tokens, num_heads, head_dim]` (flat tokens of all sequences),
- k_cache / v_cache `[num_blocks, block_size, num_kv_heads, head_dim]`,
- block_tables `[num_seqs, max_blocks]` (-1 = unused entry),
- context_lens `[num_seqs]`: the sequence's number of cached positions, the
  current chunk included (its K/V must be stored first, see kv_store),
- cu_seqlens_q `[num_seqs + 1]`: sequence b's queries are q[cu[b]:cu[b+1]];
  the three index tensors int32 (flash-attn) or int64 (the engine's context).

Running example (prefill with a cached prefix): a sequence with context_lens = 10
and a 3-token chunk has queries at absolute positions 7, 8, 9 (the chunk sits at
the END of the context); query 8 attends to keys 0..8. With block_size 4 and
block_tables row [5, 2, 9, -1], key 8 lives in cache block 9, offset 0.

Rows with context_lens == 0 (padding) and query rows past cu_seqlens_q[-1] are not
written. Scores use the log2 domain (exp2) with a finite running-max floor, so a
row with no visible key never produces exp(-inf - -inf).
"""
from __future__ import annotations

import torch

from ._common import next_pow2, tl, triton, upcast_inside
from .reference import (
    _check_decode,
    _check_prefill,
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
)

__all__ = ["paged_prefill_attention", "paged_prefill_attention_ref",
           "paged_decode_attention", "paged_decode_attention_ref"]

_LOG2E = 1.4426950408889634
_BLOCK_N = 32           # keys per inner tile (independent of the cache block size)
_PREFILL_ROWS = 64      # query rows (queries x heads of one KV group) per prefill program
_MIN_DOT = 16           # tl.dot on a GPU wants every dimension >= 16


# ----------------------------------------------------------------------------- checks


# ----------------------------------------------------------------------------- torch


# ----------------------------------------------------------------------------- triton
@triton.jit
def _paged_attn_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, context_lens_ptr, cu_seqlens_q_ptr,
    part_acc_ptr, part_m_ptr, part_l_ptr,
    scale_log2,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_k_b, stride_k_s, stride_k_h,
    stride_v_b, stride_v_s, stride_v_h,
    stride_bt,
    block_size, partition_size, num_splits, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,         # query heads per KV head
    QPP: tl.constexpr,           # queries per program (prefill); 1 for decode
    BLOCK_R: tl.constexpr,       # rows = QPP * GROUP, padded to a power of two >= 16
    BLOCK_N: tl.constexpr,
    IS_DECODE: tl.constexpr,     # one query per sequence; program_id(0) is the split
    SPLIT: tl.constexpr,         # write unnormalized partials for _reduce_splits_kernel
    UPCAST: tl.constexpr,
):
    pid0 = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    if IS_DECODE:
        q_start = seq
        q_len = 1
        q_block = 0
    else:
        q_start = tl.load(cu_seqlens_q_ptr + seq)
        q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
        q_block = pid0
    if (ctx == 0) | (q_block * QPP >= q_len):
        return

    # Row r of the tile = query (q_block * QPP + r // GROUP), head (kv_head * GROUP + r % GROUP):
    # the GROUP query heads that share a KV head share every K/V tile load.
    rows = tl.arange(0, BLOCK_R)
    qi = q_block * QPP + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < QPP * GROUP) & (qi < q_len)
    q_pos = ctx - q_len + qi                    # absolute position: the chunk ends the context
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM

    tok = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_q_t + head[:, None].to(tl.int64) * stride_q_h + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # Keys this program looks at: decode splits the context into partitions.
    if IS_DECODE:
        kv_lo = pid0 * partition_size
        kv_hi = tl.minimum(kv_lo + partition_size, ctx)
    else:
        kv_lo = 0
        kv_hi = ctx - q_len + tl.minimum(q_len, (q_block + 1) * QPP)
    if kv_lo >= kv_hi:
        return

    m_i = tl.full([BLOCK_R], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_head64 = kv_head.to(tl.int64)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < kv_hi
        block = tl.load(table + keys // block_size, mask=key_ok, other=0).to(tl.int64)
        in_block = (keys % block_size).to(tl.int64)
        k_off = block * stride_k_b + in_block * stride_k_s + kv_head64 * stride_k_h
        v_off = block * stride_v_b + in_block * stride_v_s + kv_head64 * stride_v_h
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k_t = tl.load(k_cache_ptr + k_off[None, :] + dims[:, None],            # [BLOCK_D, BLOCK_N]
                      mask=key_ok[None, :] & dim_ok[:, None], other=0.0)
        v = tl.load(v_cache_ptr + v_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k_t = k_t.to(tl.float32)
            v = v.to(tl.float32)
            s = tl.dot(q, k_t, input_precision="ieee")
        else:
            s = tl.dot(q, k_t)
        visible = key_ok[None, :] & (keys[None, :] <= q_pos[:, None])
        s = tl.where(visible, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if UPCAST:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out_mask = row_ok[:, None] & dim_ok[None, :]
    if SPLIT:
        # partials [num_seqs, num_heads, num_splits, (HEAD_DIM)]; decode only
        part = (seq.to(tl.int64) * num_heads + head.to(tl.int64)) * num_splits + pid0
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=out_mask)
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
    else:
        o = acc / l_i[:, None]
        tl.store(out_ptr + tok[:, None] * stride_o_t + head[:, None].to(tl.int64) * stride_o_h + dims[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _reduce_splits_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, context_lens_ptr,
    stride_o_t, stride_o_h,
    partition_size, num_splits, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    ctx = tl.load(context_lens_ptr + seq)
    if ctx == 0:
        return
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < (ctx + partition_size - 1) // partition_size   # splits that saw keys
    base = (seq.to(tl.int64) * num_heads + head) * num_splits
    m = tl.load(part_m_ptr + base + splits, mask=split_ok, other=-1.0e30)
    l = tl.load(part_l_ptr + base + splits, mask=split_ok, other=0.0)
    weight = tl.where(split_ok, tl.exp2(m - tl.max(m, 0)), 0.0)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    acc = tl.load(part_acc_ptr + (base + splits)[:, None] * HEAD_DIM + dims[None, :],
                  mask=split_ok[:, None] & dim_ok[None, :], other=0.0)
    o = tl.sum(acc * weight[:, None], 0) / tl.sum(l * weight, 0)
    tl.store(out_ptr + seq.to(tl.int64) * stride_o_t + head.to(tl.int64) * stride_o_h + dims,
             o.to(out_ptr.dtype.element_ty), mask=dim_ok)


def _launch(q, k_cache, v_cache, out, block_tables, context_lens, cu_seqlens_q, scale, *,
            grid, qpp, block_r, is_decode, partition_size=0, num_splits=1):
    head_dim = q.shape[2]
    group = q.shape[1] // k_cache.shape[2]
    split = num_splits > 1
    if split:
        parts = q.shape[0] * q.shape[1] * num_splits
        part_acc = torch.empty(parts * head_dim, dtype=torch.float32, device=q.device)
        part_m = torch.empty(parts, dtype=torch.float32, device=q.device)
        part_l = torch.empty(parts, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_m = part_l = out  # unused
    block_d = next_pow2(head_dim, _MIN_DOT)
    _paged_attn_kernel[grid](
        q, k_cache, v_cache, out, block_tables, context_lens, cu_seqlens_q,
        part_acc, part_m, part_l,
        float(scale) * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        k_cache.shape[1], partition_size, num_splits, q.shape[1],
        HEAD_DIM=head_dim, BLOCK_D=block_d, GROUP=group, QPP=qpp, BLOCK_R=block_r,
        BLOCK_N=_BLOCK_N, IS_DECODE=is_decode, SPLIT=split, UPCAST=upcast_inside(q.dtype),
    )
    if split:
        _reduce_splits_kernel[(q.shape[0], q.shape[1])](
            out, part_acc, part_m, part_l, context_lens,
            out.stride(0), out.stride(1), partition_size, num_splits, q.shape[1],
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=next_pow2(num_splits),
        )
    return out


def paged_prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables,
                            scale: float, out: torch.Tensor | None = None,
                            max_seqlen_q: int | None = None) -> torch.Tensor:
    """Varlen causal attention of each sequence's query chunk (the last
    cu_seqlens_q[b+1] - cu_seqlens_q[b] positions of its context) over its paged
    K/V. Returns out `[num_tokens, num_heads, head_dim]`.

    Pass `max_seqlen_q` (known on the host) to avoid a device->host sync.
    Preconditions not checked on the device: context_lens[b] >= the chunk length,
    block table entries valid for the first context_lens[b] positions.
    """
    _check_prefill(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, out, floats="float")
    out = torch.empty_like(q) if out is None else out
    num_seqs = block_tables.shape[0]
    if q.shape[0] == 0 or num_seqs == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
    if max_seqlen_q <= 0:
        return out
    group = q.shape[1] // k_cache.shape[2]
    block_r = next_pow2(max(_PREFILL_ROWS, group), _MIN_DOT)
    qpp = block_r // group
    grid = (triton.cdiv(max_seqlen_q, qpp), num_seqs, k_cache.shape[2])
    return _launch(q, k_cache, v_cache, out, block_tables, context_lens, cu_seqlens_q, scale,
                   grid=grid, qpp=qpp, block_r=block_r, is_decode=False)


def _default_partition(num_seqs: int, num_kv_heads: int, max_context: int, q: torch.Tensor) -> int:
    """Split the context only when (seq, kv head) programs alone cannot fill the GPU."""
    if q.device.type != "cuda":
        return max_context
    num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    if num_seqs * num_kv_heads >= num_sms or max_context <= 512:
        return max_context
    return 512 if max_context > 8192 else 256


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                           out: torch.Tensor | None = None,
                           partition_size: int | None = None) -> torch.Tensor:
    """One query per sequence (`q [num_seqs, num_heads, head_dim]`, at position
    context_lens[b] - 1) over its paged K/V, GQA heads of one KV head per program.

    The context is split into partitions of `partition_size` keys (one program
    each, then a reduction) when that helps fill the GPU; the default depends only
    on shapes (block_tables' width), never on values, so it is CUDA-graph safe.
    """
    _check_decode(q, k_cache, v_cache, block_tables, context_lens, out, floats="float")
    out = torch.empty_like(q) if out is None else out
    num_seqs = q.shape[0]
    if num_seqs == 0:
        return out
    max_context = max(1, block_tables.shape[1] * k_cache.shape[1])
    if partition_size is None:
        partition_size = _default_partition(num_seqs, k_cache.shape[2], max_context, q)
    if partition_size <= 0:
        raise ValueError(f"partition_size must be positive, got {partition_size}")
    partition_size = triton.cdiv(min(partition_size, max_context), _BLOCK_N) * _BLOCK_N
    num_splits = triton.cdiv(max_context, partition_size)
    group = q.shape[1] // k_cache.shape[2]
    grid = (num_splits, num_seqs, k_cache.shape[2])
    return _launch(q, k_cache, v_cache, out, block_tables, context_lens, context_lens, scale,
                   grid=grid, qpp=1, block_r=next_pow2(group, _MIN_DOT), is_decode=True,
                   partition_size=partition_size, num_splits=num_splits)
