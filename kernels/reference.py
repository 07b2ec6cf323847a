"""The torch version of every kernel op, with the argument checks it shares
with its Triton wrapper (each kernel module imports both from here). These
are the engine's torch backend where it has no faster torch path of its own,
and the references the kernel tests compare with; they compute in their
inputs' dtype (float64 included) unless said otherwise. Also the one
torch-only helper: the weaver's folded query latents.

Importing this module never imports Triton.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._checks import check_same_device, check_tensor

_INDEX = (torch.int64, torch.int32)
_ANY_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- kv_store
def _check_kv_store(key, value, k_cache, v_cache, slot_mapping) -> None:
    check_tensor("key", key, ndim=3, dtypes="float")
    num_tokens, num_kv_heads, head_dim = key.shape
    check_tensor("value", value, ndim=3, dtypes=(key.dtype,), shape=tuple(key.shape))
    check_tensor("k_cache", k_cache, ndim=4, dtypes="float", shape=(None, None, num_kv_heads, head_dim))
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,), shape=tuple(k_cache.shape))
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64, torch.int32),
                 shape=(num_tokens,))
    for name, t in (("key", key), ("value", value)):
        if t.shape[1] > 1 and t.stride(1) != head_dim:
            raise ValueError(f"{name} must have its heads contiguous within a row (stride(1) == head_dim)")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(2) != head_dim or t.stride(1) != num_kv_heads * head_dim:
            raise ValueError(f"{name} must be contiguous within a block row (one slot = one contiguous "
                             f"[num_kv_heads, head_dim] tile)")
    check_same_device(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)


def store_kvcache_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor, rows=None, check: bool = True) -> None:
    """Torch reference of `store_kvcache` (same arguments, same in-place effect), and the
    torch backend's KV store. `rows`: the rows to store (an index tensor, or slice(None) for
    all) when the caller found them once for every layer; None: those whose slot is >= 0."""
    if check:
        _check_kv_store(key, value, k_cache, v_cache, slot_mapping)
    if rows is None:
        rows = (slot_mapping >= 0).nonzero().squeeze(1)
    slots = slot_mapping[rows].long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key[rows].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value[rows].to(v_cache.dtype))

# ----------------------------------------------------------------------------- latent_injection
def _check_latent_injection(token_ids, latent_index, embed_weight, latents, out, floats=_ANY_FLOAT) -> None:
    """`floats`: the dtypes the caller computes in (the kernel: "float", no float64)."""
    check_tensor("token_ids", token_ids, ndim=1, dtypes=_INDEX)
    num_rows = token_ids.shape[0]
    check_tensor("latent_index", latent_index, ndim=1, dtypes=_INDEX, shape=(num_rows,))
    check_tensor("embed_weight", embed_weight, ndim=2, dtypes=floats)
    hidden = embed_weight.shape[1]
    check_tensor("latents", latents, ndim=2, dtypes=floats, shape=(None, hidden))
    if out is not None:
        check_tensor("out", out, ndim=2, dtypes=(embed_weight.dtype,), shape=(num_rows, hidden))
    check_same_device(token_ids=token_ids, latent_index=latent_index, embed_weight=embed_weight,
                      latents=latents, out=out)


def inject_latents_ref(token_ids: torch.Tensor, latent_index: torch.Tensor, embed_weight: torch.Tensor,
                       latents: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Torch version of `inject_latents` (same arguments), in the inputs' dtype."""
    _check_latent_injection(token_ids, latent_index, embed_weight, latents, out)
    if out is None:
        out = torch.empty(token_ids.shape[0], embed_weight.shape[1], dtype=embed_weight.dtype,
                          device=embed_weight.device)
    is_latent = latent_index >= 0
    is_token = ~is_latent & (token_ids >= 0)
    out[is_token] = embed_weight[token_ids[is_token].long()]
    out[is_latent] = latents[latent_index[is_latent].long()].to(out.dtype)
    return out

# ----------------------------------------------------------------------------- lora
@dataclass(frozen=True)
class LoraMeta:
    """Rows grouped by adapter: adapter a's rows are
    sorted_rows[group_starts[a]:group_starts[a + 1]] (rows without adapter excluded)."""
    sorted_rows: torch.Tensor    # [N] int64
    group_starts: torch.Tensor   # [num_adapters + 1] int64
    num_adapters: int


def lora_metadata(adapter_ids: torch.Tensor, num_adapters: int) -> LoraMeta:
    """Group rows by adapter (stable). Compute once per step, pass to every layer.

    Example: adapter_ids [1, -1, 0, 1, 0], 2 adapters -> sorted_rows [1, 2, 4, 0, 3],
    group_starts [1, 3, 5]: adapter 0 owns rows 2 and 4, adapter 1 rows 0 and 3.
    Ids >= num_adapters are not checked on the device (the engine assigns them).
    """
    check_tensor("adapter_ids", adapter_ids, ndim=1, dtypes=(torch.int64, torch.int32))
    if num_adapters < 0:
        raise ValueError(f"num_adapters must be >= 0, got {num_adapters}")
    ids = adapter_ids.long()
    sorted_rows = torch.sort(ids, stable=True).indices
    # scatter_add, not bincount: bincount syncs to size its output
    counts = torch.zeros(num_adapters + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, (ids + 1).clamp(0, num_adapters), torch.ones_like(ids))
    group_starts = torch.cumsum(counts, 0)   # group_starts[a] = rows with id < a (ids -1 first)
    return LoraMeta(sorted_rows, group_starts, num_adapters)


def _check_rows(x, adapter_ids, meta, num_adapters):
    check_tensor("adapter_ids", adapter_ids, ndim=1, dtypes=(torch.int64, torch.int32), shape=(x.shape[0],))
    if meta is not None and (meta.num_adapters != num_adapters or meta.sorted_rows.shape[0] != x.shape[0]):
        raise ValueError(f"meta was built for {meta.sorted_rows.shape[0]} rows and {meta.num_adapters} adapters, "
                         f"not {x.shape[0]} rows and {num_adapters}")


def _check_shrink(x, lora_a, scaling, adapter_ids, out, meta):
    check_tensor("x", x, ndim=2, dtypes="float")
    check_tensor("lora_a", lora_a, ndim=3, dtypes=(x.dtype,), shape=(None, None, x.shape[1]))
    _check_rows(x, adapter_ids, meta, lora_a.shape[0])
    check_tensor("scaling", scaling, ndim=1, dtypes=(torch.float32,), shape=(lora_a.shape[0],))
    if out is not None:
        check_tensor("out", out, ndim=2, dtypes=(torch.float32,), shape=(x.shape[0], lora_a.shape[1]))
    check_same_device(x=x, lora_a=lora_a, scaling=scaling, adapter_ids=adapter_ids, out=out)


def _check_expand(t, lora_b, adapter_ids, y, meta):
    check_tensor("t", t, ndim=2, dtypes=(torch.float32,))
    check_tensor("lora_b", lora_b, ndim=3, dtypes="float", shape=(None, None, t.shape[1]))
    check_tensor("y", y, ndim=2, dtypes=(lora_b.dtype,), shape=(t.shape[0], lora_b.shape[1]))
    _check_rows(t, adapter_ids, meta, lora_b.shape[0])
    check_same_device(t=t, lora_b=lora_b, adapter_ids=adapter_ids, y=y)


def lora_shrink_ref(x, lora_a, scaling, adapter_ids, out: torch.Tensor | None = None,
                    meta: LoraMeta | None = None) -> torch.Tensor:
    """Torch reference of `lora_shrink` (same arguments)."""
    _check_shrink(x, lora_a, scaling, adapter_ids, out, meta)
    if out is None:
        out = torch.empty(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for a in range(lora_a.shape[0]):
        rows = adapter_ids == a
        out[rows] = scaling[a] * (x[rows].float() @ lora_a[a].float().T)
    return out


def lora_expand_ref(t, lora_b, adapter_ids, y, meta: LoraMeta | None = None) -> torch.Tensor:
    """Torch reference of `lora_expand` (same arguments)."""
    _check_expand(t, lora_b, adapter_ids, y, meta)
    for a in range(lora_b.shape[0]):
        rows = adapter_ids == a
        y[rows] = (y[rows].float() + t[rows] @ lora_b[a].float().T).to(y.dtype)
    return y


def add_lora_ref(y, x, lora_a, lora_b, scaling, adapter_ids, meta: LoraMeta | None = None) -> torch.Tensor:
    """Torch version of `add_lora` (same arguments; in place on y, returned): for each
    adapter a, y[rows of a] += ((x @ A[a].T) @ B[a].T) * scaling[a], PEFT's order of
    operations in the inputs' dtype (the kernels: scaling folded into an fp32 shrink).
    `scaling` is fp32, or float64 for float64 inputs (the adapter's exact factor)."""
    check_tensor("x", x, ndim=2, dtypes=_ANY_FLOAT)
    check_tensor("lora_a", lora_a, ndim=3, dtypes=(x.dtype,), shape=(None, None, x.shape[1]))
    check_tensor("lora_b", lora_b, ndim=3, dtypes=(x.dtype,), shape=(lora_a.shape[0], None, lora_a.shape[1]))
    check_tensor("y", y, ndim=2, dtypes=(x.dtype,), shape=(x.shape[0], lora_b.shape[1]), last_contiguous=False)
    check_tensor("scaling", scaling, ndim=1, dtypes=(torch.float32, torch.float64), shape=(lora_a.shape[0],))
    _check_rows(x, adapter_ids, meta, lora_a.shape[0])
    check_same_device(x=x, lora_a=lora_a, lora_b=lora_b, y=y, scaling=scaling, adapter_ids=adapter_ids)
    meta = meta if meta is not None else lora_metadata(adapter_ids, lora_a.shape[0])
    return add_lora_rows(y, x, lora_a, lora_b, scaling, lora_rows(meta))


def lora_rows(meta: LoraMeta) -> list[torch.Tensor | None]:
    """Each adapter's rows (None: none), read once per forward (a host sync)."""
    starts = meta.group_starts.tolist()
    return [meta.sorted_rows[lo:hi] if hi > lo else None for lo, hi in zip(starts[:-1], starts[1:])]


def add_lora_rows(y, x, lora_a, lora_b, scaling, rows_of: list[torch.Tensor | None]) -> torch.Tensor:
    """add_lora_ref's computation on checked inputs and precomputed rows (the torch
    backend calls it once per layer with the forward's rows)."""
    for a, rows in enumerate(rows_of):
        if rows is not None:
            y[rows] += ((x[rows] @ lora_a[a].T) @ lora_b[a].T) * scaling[a].item()
    return y


# ----------------------------------------------------------------------------- paged_attention
def _check_common(q, k_cache, v_cache, block_tables, context_lens, out, floats=_ANY_FLOAT):
    check_tensor("q", q, ndim=3, dtypes=floats)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), shape=(None, None, None, q.shape[2]))
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(q.dtype,), shape=tuple(k_cache.shape))
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    check_tensor("block_tables", block_tables, ndim=2, dtypes=_INDEX)
    num_seqs = block_tables.shape[0]
    check_tensor("context_lens", context_lens, ndim=1, dtypes=_INDEX, shape=(num_seqs,))
    if out is not None:
        check_tensor("out", out, ndim=3, dtypes=(q.dtype,), shape=tuple(q.shape))
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                      context_lens=context_lens, out=out)


def _check_prefill(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, out, floats=_ANY_FLOAT):
    _check_common(q, k_cache, v_cache, block_tables, context_lens, out, floats)
    check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=_INDEX,
                 shape=(block_tables.shape[0] + 1,))
    check_same_device(q=q, cu_seqlens_q=cu_seqlens_q)


def _check_decode(q, k_cache, v_cache, block_tables, context_lens, out, floats=_ANY_FLOAT):
    _check_common(q, k_cache, v_cache, block_tables, context_lens, out, floats)
    if block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"decode has one query per sequence: q has {q.shape[0]} rows, "
                         f"block_tables {block_tables.shape[0]}")


@dataclass
class SDPAGroup:
    """Chunks attended by one padded SDPA call."""
    rows: torch.Tensor | None         # [n] the group's rows in the flat batch; None: all rows, in order
    num_chunks: int
    max_q: int
    max_k: int
    kv_index: torch.Tensor            # [B * max_k] flat cache slots to gather (pads -> slot 0)
    attn_mask: torch.Tensor | None    # [B, 1, max_q, max_k] bool, None when not needed
    is_causal: bool                   # single chunk, pure prefill: SDPA's own causal mask
    pad_index: torch.Tensor | None    # [n] group row -> index in the padded [B * max_q] queries; None: identity


def sdpa_groups(cu_seqlens_q, context_lens, block_tables, block_size: int, max_seqlen_q: int | None = None,
                max_seqlen_k: int | None = None, chunks: torch.Tensor | None = None) -> list[SDPAGroup]:
    """The padded SDPA batches of a step's chunks (`chunks`: a subset, None: all).
    Single-row (decode) chunks and multi-row chunks (prefill, MemGen catch-up) are
    padded separately: padded together, every decode row would be padded to the
    longest chunk's queries. The max lengths, when given for all chunks, spare a sync."""
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    selected = chunks if chunks is not None else torch.arange(q_lens.shape[0], device=q_lens.device)
    is_decode = q_lens[selected] == 1
    num_decode = int(is_decode.sum())
    if num_decode in (0, selected.shape[0]):
        known = (max_seqlen_q, max_seqlen_k) if chunks is None else (None, None)
        return [_sdpa_group(cu_seqlens_q, context_lens, block_tables, block_size, chunks, q_lens, *known)]
    return [_sdpa_group(cu_seqlens_q, context_lens, block_tables, block_size, selected[is_decode], q_lens),
            _sdpa_group(cu_seqlens_q, context_lens, block_tables, block_size, selected[~is_decode], q_lens)]


def _sdpa_group(cu_seqlens_q, context_lens, block_tables, bs: int, chunks: torch.Tensor | None,
                q_lens: torch.Tensor, max_q: int | None = None, max_k: int | None = None) -> SDPAGroup:
    """Padded-batch metadata for some chunks (None: all of them).

    Example: chunks with q_lens [1, 3], context_lens [7, 3], max_q 3, max_k 7.
    Query i of chunk b sits at position context_lens[b] - q_lens[b] + i and sees
    keys j <= that position; padded queries (i >= q_len) see every valid key
    (never an all-masked row, which would give NaN) and are dropped afterwards."""
    device = q_lens.device
    starts, tables = cu_seqlens_q[:-1].long(), block_tables.long()
    q_lens, context_lens = q_lens.long(), context_lens.long()
    if chunks is not None:
        q_lens, starts, context_lens, tables = q_lens[chunks], starts[chunks], context_lens[chunks], tables[chunks]
    if max_q is None or max_k is None:
        max_q, max_k = int(q_lens.max()), int(context_lens.max())
    num_chunks = q_lens.shape[0]
    j = torch.arange(max_k, device=device)
    blocks = tables.clamp(min=0).gather(1, (j // bs).expand(num_chunks, -1))
    kv_index = (blocks * bs + j % bs).masked_fill(j >= context_lens[:, None], 0).view(-1)
    rows = pad_index = None
    if max_q > 1:
        chunk_of_row = torch.repeat_interleave(torch.arange(num_chunks, device=device), q_lens)
        local = torch.arange(chunk_of_row.shape[0], device=device) - (q_lens.cumsum(0) - q_lens)[chunk_of_row]
        pad_index = chunk_of_row * max_q + local
        if chunks is not None:
            rows = starts[chunk_of_row] + local
    elif chunks is not None:
        rows = starts
    attn_mask, is_causal = None, False
    if num_chunks == 1 and int(context_lens[0]) == max_q:
        is_causal = max_q > 1                       # a single pure prefill: SDPA's causal mask
    elif not (num_chunks == 1 and max_q == 1):
        i = torch.arange(max_q, device=device)
        qpos = (context_lens - q_lens)[:, None] + i[None, :]                # [B, max_q]
        qpos = torch.where(i[None, :] < q_lens[:, None], qpos, context_lens[:, None] - 1)
        attn_mask = (j[None, None, :] <= qpos[:, :, None]).unsqueeze(1)    # [B, 1, max_q, max_k]
    return SDPAGroup(rows, num_chunks, max_q, max_k, kv_index, attn_mask, is_causal, pad_index)


def sdpa_attend(q, k_cache, v_cache, groups: list[SDPAGroup], scale: float) -> torch.Tensor:
    """Attention of every row the groups cover, in q's dtype; rows no group covers are
    left as torch.empty_like made them (a caller writes only covered rows)."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_flat, v_flat = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    if len(groups) == 1 and groups[0].rows is None:
        return _sdpa_attend_group(q, k_flat, v_flat, groups[0], scale)
    out = torch.empty_like(q)
    for g in groups:
        out.index_copy_(0, g.rows, _sdpa_attend_group(q.index_select(0, g.rows), k_flat, v_flat, g, scale))
    return out


def _sdpa_attend_group(q, k_flat, v_flat, g: SDPAGroup, scale: float) -> torch.Tensor:
    """SDPA over one group's padded batch; q holds the group's rows, in order."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_flat.shape[1]
    keys = k_flat.index_select(0, g.kv_index).view(g.num_chunks, g.max_k, num_kv_heads, head_dim)
    values = v_flat.index_select(0, g.kv_index).view(g.num_chunks, g.max_k, num_kv_heads, head_dim)
    if g.pad_index is None:
        queries = q.view(g.num_chunks, 1, num_heads, head_dim)
    else:
        queries = q.new_zeros(g.num_chunks * g.max_q, num_heads, head_dim)
        queries.index_copy_(0, g.pad_index, q)
        queries = queries.view(g.num_chunks, g.max_q, num_heads, head_dim)
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=g.attn_mask, is_causal=g.is_causal, scale=scale, enable_gqa=num_heads != num_kv_heads,
    )                                                                    # [B, Hq, max_q, D]
    out = out.transpose(1, 2).reshape(g.num_chunks * g.max_q, num_heads, head_dim)
    return out if g.pad_index is None else out.index_select(0, g.pad_index)


def paged_prefill_attention_ref(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables,
                                scale: float, out: torch.Tensor | None = None,
                                max_seqlen_q: int | None = None) -> torch.Tensor:
    """Torch version of `paged_prefill_attention` (same arguments): the SDPA grouping
    above, in fp32 for half inputs (the kernel's math) and float64 for float64. Chunks
    with no keys or no queries, and rows past cu_seqlens_q[-1], are not written."""
    _check_prefill(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, out)
    out = torch.empty_like(q) if out is None else out
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    chunks = ((context_lens > 0) & (q_lens > 0)).nonzero().squeeze(1)
    if chunks.numel() == 0:
        return out
    acc = torch.promote_types(q.dtype, torch.float32)
    groups = sdpa_groups(cu_seqlens_q, context_lens, block_tables, k_cache.shape[1], chunks=chunks)
    got = sdpa_attend(q.to(acc), k_cache.to(acc), v_cache.to(acc), groups, scale)
    for g in groups:
        out[g.rows] = got[g.rows].to(out.dtype)
    return out


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                               out: torch.Tensor | None = None,
                               partition_size: int | None = None) -> torch.Tensor:
    """Torch version of `paged_decode_attention` (same arguments): a prefill of one
    query per sequence."""
    _check_decode(q, k_cache, v_cache, block_tables, context_lens, out)
    cu = torch.arange(q.shape[0] + 1, device=q.device, dtype=context_lens.dtype)
    return paged_prefill_attention_ref(q, k_cache, v_cache, cu, context_lens, block_tables, scale, out=out)


# ----------------------------------------------------------------------------- trigger_scoring
def _prepare_trigger(hidden, weight, bias, temperature, uniforms, out, logits_out, floats=_ANY_FLOAT):
    """Checks; `floats`: the dtypes the caller computes in (the kernel: no float64)."""
    check_tensor("hidden", hidden, ndim=2, dtypes=floats)
    num_rows, width = hidden.shape
    check_tensor("weight", weight, ndim=2, dtypes=floats, shape=(2, width))
    check_tensor("bias", bias, ndim=1, dtypes=floats, shape=(2,))
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        temperature = torch.full((num_rows,), float(temperature), dtype=torch.float32, device=hidden.device)
    check_tensor("temperature", temperature, ndim=1, dtypes=(torch.float32,), shape=(num_rows,))
    check_tensor("uniforms", uniforms, ndim=1, dtypes=(torch.float32,), shape=(num_rows,))
    if out is not None:
        check_tensor("out", out, ndim=1, dtypes=(torch.int64,), shape=(num_rows,))
    if logits_out is not None:
        check_tensor("logits_out", logits_out, ndim=2, dtypes=(torch.float32,), shape=(num_rows, 2))
    check_same_device(hidden=hidden, weight=weight, bias=bias, temperature=temperature, uniforms=uniforms,
                      out=out, logits_out=logits_out)
    if out is None:
        out = torch.empty(num_rows, dtype=torch.int64, device=hidden.device)
    return temperature, out


def trigger_decisions_ref(hidden, weight, bias, temperature, uniforms, out: torch.Tensor | None = None,
                          logits_out: torch.Tensor | None = None) -> torch.Tensor:
    """Torch version of `trigger_decisions` (same arguments), in the inputs' dtype."""
    temperature, out = _prepare_trigger(hidden, weight, bias, temperature, uniforms, out, logits_out)
    logits = F.linear(hidden, weight, bias)
    diff = logits[:, 1] - logits[:, 0]
    sample = temperature > 0
    p_skip = 1.0 / (1.0 + torch.exp(diff / torch.where(sample, temperature, 1.0).to(diff.dtype)))
    out.copy_(torch.where(sample, uniforms.to(diff.dtype) >= p_skip, diff > 0))
    if logits_out is not None:
        logits_out.copy_(logits)
    return out

# ----------------------------------------------------------------------------- query latents
def fold_query_latents(query_latents: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                       scale: torch.Tensor | float, eps: float = 1e-5) -> torch.Tensor:
    """`LayerNorm(query_latents) * scale` (spec §1.1, weaver.py:52-94): input-independent,
    so it is computed once at load instead of a kernel per insertion. Computed in the
    latents' dtype, exactly as the reference module does."""
    if query_latents.dim() != 2:
        raise ValueError(f"query_latents must be [K, H], got shape {tuple(query_latents.shape)}")
    hidden = query_latents.shape[1]
    if ln_weight.shape != (hidden,) or ln_bias.shape != (hidden,):
        raise ValueError(f"LayerNorm weight/bias must be [{hidden}], got {tuple(ln_weight.shape)} "
                         f"and {tuple(ln_bias.shape)}")
    normed = torch.nn.functional.layer_norm(query_latents, (hidden,), ln_weight, ln_bias, eps)
    return normed * scale
