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

from ._common import next_pow2, tl, triton
from .reference import _check_latent_injection as _check
from .reference import inject_latents_ref

__all__ = ["inject_latents", "inject_latents_ref"]


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
    _check(token_ids, latent_index, embed_weight, latents, out, floats="float")
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
