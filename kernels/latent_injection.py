"""Batched latent-token injection: build one step's input hidden states in one pass,
each row either the embedding of its token id or a latent vector taken from the
weaver's output buffer.

Running example: token_ids [17, 5, -1, -1, 9], latent_index [-1, -1, 0, 1, -1] gives
rows [E[17], E[5], latents[0], latents[1], E[9]]: a sequence that inserts two
latents after token 5 before the next token 9. A row with token_id -1 and
latent_index -1 is padding and is not written.
"""
from __future__ import annotations

import torch

from ._common import check_same_device, check_tensor, next_pow2, tl, triton

__all__ = ["inject_latents", "inject_latents_ref"]

_INDEX = (torch.int64, torch.int32)


def _check(token_ids, latent_index, embed_weight, latents, out) -> None:
    check_tensor("token_ids", token_ids, ndim=1, dtypes=_INDEX)
    num_rows = token_ids.shape[0]
    check_tensor("latent_index", latent_index, ndim=1, dtypes=_INDEX, shape=(num_rows,))
    check_tensor("embed_weight", embed_weight, ndim=2, dtypes="float")
    hidden = embed_weight.shape[1]
    check_tensor("latents", latents, ndim=2, dtypes="float", shape=(None, hidden))
    if out is not None:
        check_tensor("out", out, ndim=2, dtypes=(embed_weight.dtype,), shape=(num_rows, hidden))
    check_same_device(token_ids=token_ids, latent_index=latent_index, embed_weight=embed_weight,
                      latents=latents, out=out)


def inject_latents_ref(token_ids: torch.Tensor, latent_index: torch.Tensor, embed_weight: torch.Tensor,
                       latents: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of `inject_latents` (same arguments)."""
    _check(token_ids, latent_index, embed_weight, latents, out)
    if out is None:
        out = torch.empty(token_ids.shape[0], embed_weight.shape[1], dtype=embed_weight.dtype,
                          device=embed_weight.device)
    is_latent = latent_index >= 0
    is_token = ~is_latent & (token_ids >= 0)
    out[is_token] = embed_weight[token_ids[is_token].long()]
    out[is_latent] = latents[latent_index[is_latent].long()].to(out.dtype)
    return out


@triton.jit
def _inject_latents_kernel(
    token_ids_ptr, latent_index_ptr, embed_ptr, latents_ptr, out_ptr,
    stride_embed, stride_latents, stride_out, hidden,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < hidden
    latent = tl.load(latent_index_ptr + row).to(tl.int64)
    token = tl.load(token_ids_ptr + row).to(tl.int64)
    dst = out_ptr + row.to(tl.int64) * stride_out + cols
    if latent >= 0:
        x = tl.load(latents_ptr + latent * stride_latents + cols, mask=col_ok)
        tl.store(dst, x.to(out_ptr.dtype.element_ty), mask=col_ok)
    elif token >= 0:
        x = tl.load(embed_ptr + token * stride_embed + cols, mask=col_ok)
        tl.store(dst, x.to(out_ptr.dtype.element_ty), mask=col_ok)


def inject_latents(token_ids: torch.Tensor, latent_index: torch.Tensor, embed_weight: torch.Tensor,
                   latents: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows `[N, H]` in embed_weight's dtype: latents[latent_index[i]] where
    latent_index[i] >= 0, else embed_weight[token_ids[i]]; rows with both -1 are
    left as they are. Ids are not range-checked on the device (the engine
    validates them when requests enter)."""
    _check(token_ids, latent_index, embed_weight, latents, out)
    num_rows, hidden = token_ids.shape[0], embed_weight.shape[1]
    if out is None:
        out = torch.empty(num_rows, hidden, dtype=embed_weight.dtype, device=embed_weight.device)
    if num_rows == 0 or hidden == 0:
        return out
    block = min(next_pow2(hidden, 16), 2048)
    _inject_latents_kernel[(num_rows, triton.cdiv(hidden, block))](
        token_ids, latent_index, embed_weight, latents, out,
        embed_weight.stride(0), latents.stride(0), out.stride(0), hidden, BLOCK=block,
    )
    return out
