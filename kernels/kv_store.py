"""KV store: write the K and V rows of a flat batch of tokens into their slots of
the paged caches; rows whose slot is -1 (padding) are skipped.

Layout (vLLM's words): key/value `[num_tokens, num_kv_heads, head_dim]`, caches
`[num_blocks, block_size, num_kv_heads, head_dim]`, `slot_mapping [num_tokens]`
int64 with slot = block * block_size + offset in block.
"""
from __future__ import annotations

import torch

from ._common import next_pow2, tl, triton
from .reference import _check_kv_store as _check
from .reference import store_kvcache_ref

__all__ = ["store_kvcache", "store_kvcache_ref"]


@triton.jit
def _store_kvcache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_key_t, stride_value_t, stride_kc_b, stride_vc_b,
    block_size,
    ROW: tl.constexpr,        # num_kv_heads * head_dim: one contiguous row
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    chunk = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padded row
        return
    # slot -> (block, offset in block); a slot row is ROW contiguous elements
    block = slot // block_size
    dst_row = slot - block * block_size
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < ROW
    tok = token.to(tl.int64)
    k = tl.load(key_ptr + tok * stride_key_t + cols, mask=mask)
    v = tl.load(value_ptr + tok * stride_value_t + cols, mask=mask)
    tl.store(k_cache_ptr + block * stride_kc_b + dst_row * ROW + cols,
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + block * stride_vc_b + dst_row * ROW + cols,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value `[num_tokens, num_kv_heads, head_dim]` into the caches at
    `slot_mapping`; slot -1 rows are skipped. Casts to the cache dtype."""
    _check(key, value, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    row = num_kv_heads * head_dim
    block = min(next_pow2(row, 16), 1024)
    grid = (num_tokens, triton.cdiv(row, block))
    _store_kvcache_kernel[grid](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), value.stride(0), k_cache.stride(0), v_cache.stride(0),
        k_cache.shape[1], ROW=row, BLOCK=block,
    )
