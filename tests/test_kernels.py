"""Each Triton kernel against its torch reference on fresh random inputs: odd
lengths, GQA ratios, block sizes, padded rows, outputs poisoned with NaN first (so
every valid element must be written and every padded one left alone).

On CPU this runs under TRITON_INTERPRET=1 (conftest sets it); bench/gpu.sh runs
the same file natively on a CUDA device with TRITON_INTERPRET=0.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from memgen.kernels._common import is_interpreting
from memgen.kernels.kv_store import store_kvcache, store_kvcache_ref
from memgen.kernels.latent_injection import inject_latents, inject_latents_ref
from memgen.kernels.trigger_scoring import trigger_decisions, trigger_decisions_ref
from memgen.kernels.lora import (add_lora, add_lora_ref, lora_expand, lora_expand_ref, lora_metadata,
                                 lora_shrink, lora_shrink_ref)
from memgen.kernels.paged_attention import (paged_decode_attention, paged_decode_attention_ref,
                                            paged_prefill_attention, paged_prefill_attention_ref)

pytestmark = pytest.mark.kernels

DEVICE = "cuda" if (not is_interpreting() and torch.cuda.is_available()) else "cpu"
if DEVICE == "cpu" and not is_interpreting():
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 without a CUDA device", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dtype_id(value):
    """Readable test ids: float32 instead of dtype0."""
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None
# fp32: 1e-5-ish. bf16 is looser also because the interpreter truncates fp32->bf16.
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(abs(hash(request.node.name)) % (2**31))


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def poisoned(like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, float("nan"))


def assert_close_with_nans(got: torch.Tensor, want: torch.Tensor, dtype) -> None:
    """Same NaN pattern (padded rows untouched), close elsewhere."""
    assert torch.equal(got.isnan(), want.isnan()), "written / untouched elements differ"
    torch.testing.assert_close(got.nan_to_num(0).float(), want.nan_to_num(0).float(), **TOL[dtype])


# ------------------------------------------------------------------ kv store
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                               (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
                         ids=dtype_id)
@pytest.mark.parametrize("block_size,num_kv_heads,head_dim", [(16, 2, 16), (8, 1, 24)])
def test_store_kvcache(dtype, cache_dtype, block_size, num_kv_heads, head_dim):
    num_tokens, num_blocks = 13, 4
    key = randn(num_tokens, num_kv_heads, head_dim, dtype=dtype)
    # value as a strided view of a packed qkv row (stride(0) > row width)
    packed = randn(num_tokens, 3 * num_kv_heads, head_dim, dtype=dtype)
    value = packed[:, num_kv_heads:2 * num_kv_heads]
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[[0, 5, 12]] = -1
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"),
                         dtype=cache_dtype, device=DEVICE)
    v_cache = k_cache.clone()
    k_want, v_want = k_cache.clone(), v_cache.clone()
    store_kvcache(key, value, k_cache, v_cache, slots)
    store_kvcache_ref(key, value, k_want, v_want, slots)
    assert_close_with_nans(k_cache, k_want, cache_dtype)
    assert_close_with_nans(v_cache, v_want, cache_dtype)
    if dtype == cache_dtype:  # no rounding involved: bit-exact
        assert torch.equal(k_cache.nan_to_num(0), k_want.nan_to_num(0))


def test_store_kvcache_empty_and_all_padded():
    k_cache = torch.full((2, 8, 1, 16), float("nan"), device=DEVICE)
    v_cache = k_cache.clone()
    store_kvcache(randn(0, 1, 16), randn(0, 1, 16), k_cache, v_cache,
                  torch.zeros(0, dtype=torch.int64, device=DEVICE))
    store_kvcache(randn(3, 1, 16), randn(3, 1, 16), k_cache, v_cache,
                  torch.full((3,), -1, dtype=torch.int64, device=DEVICE))
    assert k_cache.isnan().all() and v_cache.isnan().all()


def test_store_kvcache_validation():
    key, cache = randn(4, 2, 16), randn(3, 8, 2, 16)
    slots = torch.arange(4, device=DEVICE)
    with pytest.raises(ValueError, match="value"):
        store_kvcache(key, randn(4, 2, 8), cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="k_cache"):
        store_kvcache(key, key, randn(3, 8, 1, 16), cache, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kvcache(key, key, cache, cache.clone(), slots.float())
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kvcache(key, key, cache, cache.clone(), slots[:3])
    with pytest.raises(ValueError, match="v_cache"):
        store_kvcache(key, key, cache, cache.half(), slots)
    with pytest.raises(ValueError, match="contiguous"):
        store_kvcache(key, key, cache.transpose(1, 2).contiguous().transpose(1, 2), cache, slots)


# ------------------------------------------------------------------ paged attention
def make_paged_batch(context_lens, query_lens, num_kv_heads, group, head_dim, block_size, dtype,
                     extra_query_rows=0, index_dtype=torch.int32):
    """Random paged K/V for a batch: block tables point at shuffled cache blocks, -1 padded."""
    num_seqs = len(context_lens)
    max_blocks = max(1, max(-(-c // block_size) for c in context_lens)) + 1   # one spare -1 column
    num_blocks = num_seqs * max_blocks + 1
    k_cache = randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
    v_cache = randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
    perm = torch.randperm(num_blocks, device=DEVICE)
    block_tables = torch.full((num_seqs, max_blocks), -1, dtype=torch.int32, device=DEVICE)
    for b, ctx in enumerate(context_lens):
        n = -(-ctx // block_size)
        block_tables[b, :n] = perm[b * max_blocks:b * max_blocks + n].int()
    cu = [0]
    for lq in query_lens:
        cu.append(cu[-1] + lq)
    cu_seqlens_q = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    q = randn(cu[-1] + extra_query_rows, num_kv_heads * group, head_dim, dtype=dtype)
    context = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, block_tables.to(index_dtype), context.to(index_dtype), cu_seqlens_q.to(index_dtype)


# (context_lens, query_lens): whole prompts, chunks at the end of a cached prefix, an empty
# padded sequence (context 0), single-token chunks, lengths that straddle blocks and tiles
PREFILL_CASES = {
    "mixed": ([5, 0, 37, 70], [3, 0, 37, 1]),
    "prompts": ([1, 19, 33], [1, 19, 33]),
}


def attention_configs(half_config):
    """(dtype, group, block_size): fp32 over every GQA ratio and block size; the half
    types on one of them, to keep the interpreter run short."""
    full = [(torch.float32, g, bs) for g in (1, 2, 4) for bs in (16, 8)]
    configs = full + [(dt, *half_config) for dt in (torch.float16, torch.bfloat16)]
    return [pytest.param(*c, id=f"{dtype_id(c[0])}-gqa{c[1]}-bs{c[2]}") for c in configs]


@pytest.mark.parametrize("dtype,group,block_size", attention_configs((2, 8)))
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_paged_prefill_attention(dtype, group, block_size, case):
    context_lens, query_lens = PREFILL_CASES[case]
    q, k_cache, v_cache, block_tables, context, cu = make_paged_batch(
        context_lens, query_lens, 2, group, 16, block_size, dtype, extra_query_rows=2)
    out = poisoned(q)
    want = paged_prefill_attention_ref(q, k_cache, v_cache, cu, context, block_tables, 0.3, out=poisoned(q))
    got = paged_prefill_attention(q, k_cache, v_cache, cu, context, block_tables, 0.3, out=out,
                                  max_seqlen_q=max(query_lens))
    assert got is out
    assert_close_with_nans(got, want, dtype)
    assert got[-2:].isnan().all()  # rows past cu_seqlens_q[-1]


def test_paged_prefill_matches_dense_causal_attention():
    """Independent of the reference: one sequence in order equals SDPA with is_causal."""
    q, k_cache, v_cache, block_tables, context, cu = make_paged_batch([21], [21], 2, 2, 16, 8, torch.float32)
    got = paged_prefill_attention(q, k_cache, v_cache, cu, context, block_tables, 0.25)
    pos = torch.arange(21, device=DEVICE)
    k = k_cache[block_tables[0, pos // 8].long(), pos % 8].repeat_interleave(2, dim=1)
    v = v_cache[block_tables[0, pos // 8].long(), pos % 8].repeat_interleave(2, dim=1)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=0.25).transpose(0, 1)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("dtype,group,block_size", attention_configs((4, 16)))
@pytest.mark.parametrize("partition_size", [None, 32])
def test_paged_decode_attention(dtype, group, block_size, partition_size):
    context_lens = [1, 0, 45, 70, 9]
    q, k_cache, v_cache, block_tables, context, _ = make_paged_batch(
        context_lens, [1] * len(context_lens), 2, group, 16, block_size, dtype)
    want = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context, 0.3, out=poisoned(q))
    out = poisoned(q)
    got = paged_decode_attention(q, k_cache, v_cache, block_tables, context, 0.3, out=out,
                                 partition_size=partition_size)
    assert got is out
    assert_close_with_nans(got, want, dtype)
    assert got[1].isnan().all()  # context 0: untouched


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=dtype_id)
def test_decode_equals_prefill_of_one_token(index_dtype):
    q, k_cache, v_cache, block_tables, context, cu = make_paged_batch([13, 40], [1, 1], 1, 3, 16, 8, torch.float32,
                                                                      index_dtype=index_dtype)
    a = paged_decode_attention(q, k_cache, v_cache, block_tables, context, 0.5, partition_size=16)
    b = paged_prefill_attention(q, k_cache, v_cache, cu, context, block_tables, 0.5)
    torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_paged_attention_validation():
    q, k_cache, v_cache, block_tables, context, cu = make_paged_batch([5, 7], [1, 1], 2, 2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_decode_attention(randn(2, 3, 16), k_cache, v_cache, block_tables, context, 1.0)
    with pytest.raises(ValueError, match="k_cache"):
        paged_decode_attention(q, k_cache.half(), v_cache, block_tables, context, 1.0)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(q, k_cache, v_cache, block_tables.float(), context, 1.0)
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode_attention(q, k_cache, v_cache, block_tables, context[:1], 1.0)
    with pytest.raises(ValueError, match="one query per sequence"):
        paged_decode_attention(q[:1], k_cache, v_cache, block_tables, context, 1.0)
    with pytest.raises(ValueError, match="partition_size"):
        paged_decode_attention(q, k_cache, v_cache, block_tables, context, 1.0, partition_size=0)
    with pytest.raises(ValueError, match="out"):
        paged_decode_attention(q, k_cache, v_cache, block_tables, context, 1.0, out=q.half())
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_prefill_attention(q, k_cache, v_cache, cu[:2], context, block_tables, 1.0)
    with pytest.raises(ValueError, match="unit stride"):
        paged_prefill_attention(q.transpose(0, 2).contiguous().transpose(0, 2), k_cache, v_cache, cu, context,
                                block_tables, 1.0)


# ------------------------------------------------------------------ latent injection
@pytest.mark.parametrize("dtype,latent_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                                (torch.bfloat16, torch.float32)], ids=dtype_id)
@pytest.mark.parametrize("hidden", [24, 80])
def test_inject_latents(dtype, latent_dtype, hidden):
    vocab, num_latents = 50, 6
    embed = randn(vocab, hidden, dtype=dtype)
    # latents as a strided view of a wider buffer (the weaver's output, sliced)
    latents = randn(num_latents, hidden + 8, dtype=latent_dtype)[:, :hidden]
    token_ids = torch.tensor([17, 5, -1, -1, 9, -1, 0, 49, -1, 3, -1], device=DEVICE)
    latent_index = torch.tensor([-1, -1, 0, 1, -1, -1, -1, -1, 5, -1, 2], device=DEVICE)  # row 5: padding
    out = torch.full((11, hidden), float("nan"), dtype=dtype, device=DEVICE)
    got = inject_latents(token_ids, latent_index.int(), embed, latents, out=out)
    want = inject_latents_ref(token_ids, latent_index.int(), embed, latents, out=poisoned(out))
    assert got is out
    assert_close_with_nans(got, want, dtype)
    assert got[5].isnan().all()
    assert torch.equal(got[1], embed[5])
    if dtype == latent_dtype:
        assert torch.equal(got[3], latents[1])


def test_inject_latents_tokens_only_and_empty():
    embed = randn(30, 16)
    ids = torch.tensor([3, 29, 0], device=DEVICE)
    none = torch.full((3,), -1, device=DEVICE)
    got = inject_latents(ids, none, embed, randn(0, 16))
    assert torch.equal(got, embed[ids])
    assert inject_latents(ids[:0], none[:0], embed, randn(0, 16)).shape == (0, 16)


def test_inject_latents_validation():
    embed, latents = randn(30, 16), randn(4, 16)
    ids, idx = torch.tensor([1, 2], device=DEVICE), torch.tensor([-1, 0], device=DEVICE)
    with pytest.raises(ValueError, match="latents"):
        inject_latents(ids, idx, embed, randn(4, 12))
    with pytest.raises(ValueError, match="latent_index"):
        inject_latents(ids, idx[:1], embed, latents)
    with pytest.raises(ValueError, match="token_ids"):
        inject_latents(ids.float(), idx, embed, latents)
    with pytest.raises(ValueError, match="out"):
        inject_latents(ids, idx, embed, latents, out=randn(2, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match="embed_weight"):
        inject_latents(ids, idx, embed.t(), latents)


# ------------------------------------------------------------------ trigger scoring
def trigger_batch(num_rows, width, dtype):
    hidden = randn(num_rows, width, dtype=dtype)
    weight, bias = randn(2, width, dtype=dtype) / width ** 0.5, randn(2, dtype=dtype)
    return hidden, weight, bias


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("width", [24, 200])
@pytest.mark.parametrize("sample", [False, True])
def test_trigger_decisions(dtype, width, sample):
    num_rows = 11
    hidden, weight, bias = trigger_batch(num_rows, width, dtype)
    temperature = torch.rand(num_rows, device=DEVICE) + 0.3 if sample else 0.0
    if sample:
        temperature[3] = 0.0                                       # argmax rows mix with sampled ones
    uniforms = torch.rand(num_rows, device=DEVICE)
    out, logits = torch.full((num_rows,), 77, device=DEVICE), torch.full((num_rows, 2), float("nan"), device=DEVICE)
    # the reference computes in its inputs' dtype: compare it in fp32, where the kernel computes
    want_logits = logits.clone()
    want = trigger_decisions_ref(hidden.float(), weight.float(), bias.float(), temperature, uniforms,
                                 out=out.clone(), logits_out=want_logits)
    got = trigger_decisions(hidden, weight, bias, temperature, uniforms, out=out, logits_out=logits)
    assert got is out
    assert torch.equal(got, want), (got, want)
    assert set(got.tolist()) <= {0, 1}
    assert_close_with_nans(logits, want_logits, torch.float32 if dtype == torch.float32 else torch.float16)


def test_trigger_reference_keeps_float64():
    """The torch version is the engine's torch backend: float64 in, float64 head."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(64, 24, generator=g, dtype=torch.float64), torch.randn(2, 24, generator=g,
                                                                                     dtype=torch.float64)
    bias = torch.tensor([0.1, -0.2], dtype=torch.float64)
    logits = torch.empty(64, 2)
    got = trigger_decisions_ref(hidden, weight, bias, 0.0, torch.zeros(64), logits_out=logits)
    exact = hidden @ weight.T + bias
    assert torch.equal(got, (exact[:, 1] > exact[:, 0]).long())
    assert {0, 1} == set(got.tolist())


def test_trigger_inactive_always_inserts_and_ties_skip():
    hidden, weight, _ = trigger_batch(7, 16, torch.float32)
    zeros, u = torch.zeros_like(weight), torch.rand(7, device=DEVICE)
    inactive = trigger_decisions(hidden, zeros, torch.tensor([0.0, 1.0], device=DEVICE), 0.0, u)
    tie = trigger_decisions(hidden, zeros, torch.zeros(2, device=DEVICE), 0.0, u)
    assert (inactive == 1).all() and (tie == 0).all()


def test_trigger_sampling_frequency():
    """P(insert) = softmax(logits / T)[1]: the inactive trigger at T=1 inserts with e/(1+e)."""
    n = 2000 if DEVICE == "cuda" else 128
    hidden = randn(n, 16)
    dec = trigger_decisions(hidden, torch.zeros(2, 16, device=DEVICE), torch.tensor([0.0, 1.0], device=DEVICE),
                            1.0, torch.rand(n, device=DEVICE))
    rate = dec.float().mean().item()
    assert abs(rate - 0.7311) < 4 * (0.7311 * 0.2689 / n) ** 0.5


def test_trigger_validation():
    hidden, weight, bias = trigger_batch(7, 16, torch.float32)
    u = torch.rand(7, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        trigger_decisions(hidden, weight[:, :8], bias, 0.0, u)
    with pytest.raises(ValueError, match="bias"):
        trigger_decisions(hidden, weight, bias[:1], 0.0, u)
    with pytest.raises(ValueError, match="uniforms"):
        trigger_decisions(hidden, weight, bias, 0.0, u[:3])
    with pytest.raises(ValueError, match="temperature"):
        trigger_decisions(hidden, weight, bias, u.double(), u)
    with pytest.raises(ValueError, match="hidden"):
        trigger_decisions(hidden.double(), weight, bias, 0.0, u)    # the kernel computes in fp32 at most


# ------------------------------------------------------------------ multi-LoRA
def test_lora_metadata_groups_rows():
    meta = lora_metadata(torch.tensor([1, -1, 0, 1, 0], device=DEVICE), 2)
    assert meta.sorted_rows.tolist() == [1, 2, 4, 0, 3]
    assert meta.group_starts.tolist() == [1, 3, 5]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("num_rows,in_features,out_features,rank", [(7, 24, 40, 8), (37, 72, 136, 5)])
def test_add_lora(dtype, num_rows, in_features, out_features, rank):
    num_adapters = 3
    x = randn(num_rows, in_features, dtype=dtype)
    lora_a = randn(num_adapters, rank, in_features, dtype=dtype) / in_features ** 0.5
    lora_b = randn(num_adapters, out_features, rank, dtype=dtype) / rank ** 0.5
    scaling = torch.tensor([0.5, 2.0, 1.0], device=DEVICE)
    adapter_ids = torch.randint(-1, num_adapters, (num_rows,), device=DEVICE)
    adapter_ids[:2] = torch.tensor([-1, 2], device=DEVICE)  # both kinds present
    # y: the middle slice of a packed output (stride(0) > out_features)
    packed = randn(num_rows, out_features + 16, dtype=dtype)
    y, y_want = packed[:, 8:8 + out_features], packed.clone()[:, 8:8 + out_features]
    before = packed.clone()
    meta = lora_metadata(adapter_ids, num_adapters)

    t = lora_shrink(x, lora_a, scaling, adapter_ids, out=torch.full((num_rows, rank), float("nan"),
                                                                    device=DEVICE), meta=meta)
    t_want = lora_shrink_ref(x, lora_a, scaling, adapter_ids, out=torch.full_like(t, float("nan")))
    assert_close_with_nans(t, t_want, dtype if dtype == torch.float32 else torch.float16)
    assert t[0].isnan().all()                                      # no adapter: untouched

    got = add_lora(y, x, lora_a, lora_b, scaling, adapter_ids, meta=meta)
    # the torch version computes in its inputs' dtype: compare it in fp32, the kernel's math
    want = add_lora_ref(y_want.float(), x.float(), lora_a.float(), lora_b.float(), scaling, adapter_ids)
    assert got is y
    torch.testing.assert_close(got.float(), want.to(dtype).float(), **TOL[dtype])
    no_adapter = adapter_ids < 0
    assert torch.equal(packed[no_adapter], before[no_adapter])     # rows without adapter untouched
    assert torch.equal(packed[:, :8], before[:, :8]) and torch.equal(packed[:, -8:], before[:, -8:])


def test_lora_expand_matches_reference_on_its_own():
    t = randn(9, 4)
    lora_b = randn(2, 20, 4)
    ids = torch.tensor([0, 1, -1, 1, 0, 0, -1, 1, 1], device=DEVICE)
    y = randn(9, 20)
    want = lora_expand_ref(t, lora_b, ids, y.clone())
    torch.testing.assert_close(lora_expand(t, lora_b, ids, y), want, **TOL[torch.float32])


def test_lora_no_adapter_rows_and_empty():
    x, a, b = randn(5, 16), randn(2, 4, 16), randn(2, 8, 4)
    y = randn(5, 8)
    before = y.clone()
    add_lora(y, x, a, b, torch.ones(2, device=DEVICE), torch.full((5,), -1, device=DEVICE))
    assert torch.equal(y, before)
    add_lora(y[:0], x[:0], a, b, torch.ones(2, device=DEVICE), torch.zeros(0, dtype=torch.int64, device=DEVICE))


def test_lora_validation():
    x, a, b, s = randn(5, 16), randn(2, 4, 16), randn(2, 8, 4), torch.ones(2, device=DEVICE)
    ids, y = torch.zeros(5, dtype=torch.int64, device=DEVICE), randn(5, 8)
    with pytest.raises(ValueError, match="lora_a"):
        add_lora(y, x, randn(2, 4, 12), b, s, ids)
    with pytest.raises(ValueError, match="lora_b"):
        add_lora(y, x, a, randn(2, 8, 3), s, ids)
    with pytest.raises(ValueError, match="scaling"):
        add_lora(y, x, a, b, s.double(), ids)
    with pytest.raises(ValueError, match="adapter_ids"):
        add_lora(y, x, a, b, s, ids[:4])
    with pytest.raises(ValueError, match="y"):
        add_lora(y.half(), x, a, b, s, ids)
    with pytest.raises(ValueError, match="meta"):
        add_lora(y, x, a, b, s, ids, meta=lora_metadata(ids, 3))


# ------------------------------------------------------------------ torch-only helpers
def test_fold_query_latents_equals_the_reference_modules():
    from memgen.kernels.reference import fold_query_latents
    latents = randn(5, 24)
    norm = torch.nn.LayerNorm(24, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        scale = torch.tensor([1.7], device=DEVICE)
        torch.testing.assert_close(fold_query_latents(latents, norm.weight, norm.bias, scale),
                                   norm(latents) * scale, rtol=0, atol=0)
    with pytest.raises(ValueError, match="LayerNorm"):
        fold_query_latents(latents, norm.weight[:4], norm.bias, scale)


# ------------------------------------------------------------------ the GPU path compiles
COMPILE_FOR_SM90 = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from memgen.kernels import kv_store, latent_injection, lora, paged_attention as pa, trigger_scoring

    def compile_kernel(fn, pointers, constexprs):
        signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in fn.arg_names}
        triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))

    def attention(p, upcast, decode, split, index="*i32"):
        compile_kernel(pa._paged_attn_kernel, dict(
            q_ptr=p, k_cache_ptr=p, v_cache_ptr=p, out_ptr=p, block_tables_ptr=index, context_lens_ptr=index,
            cu_seqlens_q_ptr=index, part_acc_ptr="*fp32", part_m_ptr="*fp32", part_l_ptr="*fp32", scale_log2="fp32"),
            dict(HEAD_DIM=128, BLOCK_D=128, GROUP=6, QPP=1 if decode else 10, BLOCK_R=16 if decode else 64,
                 BLOCK_N=32, IS_DECODE=decode, SPLIT=split, UPCAST=upcast))

    def lora_kernels(p, upcast):
        compile_kernel(lora._lora_shrink_kernel, dict(x_ptr=p, a_ptr=p, scaling_ptr="*fp32", out_ptr="*fp32",
                       sorted_rows_ptr="*i64", group_starts_ptr="*i64"),
                       dict(BLOCK_M=16, BLOCK_K=64, BLOCK_R=16, UPCAST=upcast))
        compile_kernel(lora._lora_expand_kernel, dict(t_ptr="*fp32", b_ptr=p, y_ptr=p, sorted_rows_ptr="*i64",
                       group_starts_ptr="*i64"), dict(BLOCK_M=16, BLOCK_N=64, BLOCK_R=16, UPCAST=upcast))

    p = "*bf16"
    compile_kernel(kv_store._store_kvcache_kernel, dict(key_ptr=p, value_ptr=p, k_cache_ptr=p, v_cache_ptr=p,
                   slot_mapping_ptr="*i64"), dict(ROW=256, BLOCK=256))
    for decode, split in [(False, False), (True, False), (True, True)]:
        attention(p, False, decode, split)
    attention("*fp32", True, True, True)                      # the fp32 path: input_precision="ieee"
    attention(p, False, False, False, index="*i64")           # the engine's int64 metadata
    compile_kernel(pa._reduce_splits_kernel, dict(out_ptr=p, part_acc_ptr="*fp32", part_m_ptr="*fp32",
                   part_l_ptr="*fp32", context_lens_ptr="*i32"), dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_S=16))
    compile_kernel(latent_injection._inject_latents_kernel, dict(token_ids_ptr="*i64", latent_index_ptr="*i64",
                   embed_ptr=p, latents_ptr="*fp32", out_ptr=p), dict(BLOCK=2048))
    compile_kernel(trigger_scoring._trigger_kernel, dict(hidden_ptr=p, weight_ptr=p, bias_ptr=p,
                   temperature_ptr="*fp32", uniforms_ptr="*fp32", out_ptr="*i64", logits_ptr="*fp32"),
                   dict(BLOCK=1024, WRITE_LOGITS=True))
    lora_kernels(p, False)
    lora_kernels("*fp32", True)
    print("compiled")
""")


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the kernels run natively above")
def test_kernels_compile_for_sm90_without_a_gpu():
    """Triton compiles every kernel to a Hopper cubin here (no device needed): catches
    what the interpreter lets through (types, dot shapes, control flow)."""
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
