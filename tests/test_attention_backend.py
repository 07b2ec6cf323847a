"""The torch backend's attention on steps that mix decode rows with multi-row
chunks (prefill, MemGen catch-up), both ways it runs: SDPA with each group
padded on its own, and the native CPU kernel straight from the blocks. Each
equals the paged-attention reference row by row."""
import pytest
import torch

from memgen.kernels.paged_attention import paged_prefill_attention_ref
from memgen.layers.backend import TorchBackend
from memgen.layers.context import ForwardContext


def _step(context_lens, query_lens, block_size=4, num_kv_heads=2, group=2, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-c // block_size) for c in context_lens) + 1
    num_blocks = len(context_lens) * max_blocks
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(context_lens), max_blocks), -1, dtype=torch.int64)
    slots = []
    for b, (c, n) in enumerate(zip(context_lens, query_lens)):
        used = -(-c // block_size)
        tables[b, :used] = perm[b * max_blocks:b * max_blocks + used]
        slots += [int(tables[b, p // block_size]) * block_size + p % block_size for p in range(c - n, c)]
    slots = torch.tensor(slots)
    cu = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)))
    ctx = ForwardContext(cu_seqlens_q=cu, context_lens=torch.tensor(context_lens), slot_mapping=slots,
                         block_tables=tables, max_seqlen_q=max(query_lens), max_seqlen_k=max(context_lens),
                         block_size=block_size)
    q = torch.randn(int(cu[-1]), num_kv_heads * group, head_dim, generator=g)
    # the rows' own K/V are already in the cache: storing them again changes nothing
    k = k_cache.view(-1, num_kv_heads, head_dim)[slots].clone()
    v = v_cache.view(-1, num_kv_heads, head_dim)[slots].clone()
    return q, k, v, k_cache, v_cache, ctx


@pytest.mark.parametrize("context_lens,query_lens", [
    ([5, 9, 37, 1, 12], [1, 4, 1, 1, 12]),    # decode rows around a catch-up chunk and a prompt
    ([7, 3], [1, 3]),                          # the docstring's example
    ([6, 10, 2], [1, 1, 1]),                   # decode only: one group
    ([8, 5], [3, 5]),                          # multi-row only: one group
])
def test_mixed_steps_equal_the_reference(context_lens, query_lens):
    q, k, v, k_cache, v_cache, ctx = _step(context_lens, query_lens)
    backend = TorchBackend(cpu_attention=False)
    ctx.attn_metadata = backend.prepare(ctx)
    decode_and_multi = 0 < sum(n == 1 for n in query_lens) < len(query_lens)
    assert len(ctx.attn_metadata.groups) == (2 if decode_and_multi else 1)
    assert max(g.max_q for g in ctx.attn_metadata.groups) == max(query_lens)
    if decode_and_multi:   # decode rows are not padded to the longest chunk
        assert ctx.attn_metadata.groups[0].max_q == 1
    got = backend.forward(q, k, v, k_cache, v_cache, ctx, scale=0.3)
    want = paged_prefill_attention_ref(q, k_cache, v_cache, ctx.cu_seqlens_q, ctx.context_lens,
                                       ctx.block_tables, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


CASES = [([5, 9, 37, 1, 12], [1, 4, 1, 1, 12]), ([7, 3], [1, 3]), ([6, 10, 2], [1, 1, 1]), ([8, 5], [3, 5]),
         ([70, 33], [70, 1]),
         ([900] * 8, [1] * 8)]   # enough work for two threads


@pytest.mark.parametrize("context_lens,query_lens", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_cpu_attention_equals_the_reference(context_lens, query_lens, dtype, threads):
    q, k, v, k_cache, v_cache, ctx = _step(context_lens, query_lens, head_dim=64 if dtype != torch.float64 else 8)
    q, k, v, k_cache, v_cache = (t.to(dtype) for t in (q, k, v, k_cache, v_cache))
    clean_k, clean_v = k_cache.clone(), v_cache.clone()
    for cache in (k_cache, v_cache):   # the rows' own slots: the native call must store them first
        cache.view(-1, *cache.shape[2:])[ctx.slot_mapping] = float("nan")
    backend = TorchBackend()
    ctx.attn_metadata = backend.prepare(ctx)
    assert ctx.attn_metadata.native, "the native kernel is the CPU default"
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = backend.forward(q, k, v, k_cache, v_cache, ctx, scale=0.3)
    finally:
        torch.set_num_threads(before)
    # the reference in float64 (bfloat16 compared after rounding the reference to it)
    want = paged_prefill_attention_ref(q.double(), clean_k.double(), clean_v.double(), ctx.cu_seqlens_q,
                                       ctx.context_lens, ctx.block_tables, 0.3)
    assert torch.equal(k_cache, clean_k) and torch.equal(v_cache, clean_v)
    assert got.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.double(), want.to(dtype).double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("head_dim", [8, 12, 20])
def test_native_cpu_attention_float32_head_sizes(head_dim):
    """float32 dot products run four keys at a time in 8-wide vectors where head_dim is a
    multiple of 8, and one by one otherwise: both equal the reference."""
    q, k, v, k_cache, v_cache, ctx = _step([23, 9, 40], [1, 9, 5], head_dim=head_dim)
    backend = TorchBackend()
    ctx.attn_metadata = backend.prepare(ctx)
    got = backend.forward(q, k, v, k_cache, v_cache, ctx, scale=0.3)
    want = paged_prefill_attention_ref(q.double(), k_cache.double(), v_cache.double(), ctx.cu_seqlens_q,
                                       ctx.context_lens, ctx.block_tables, 0.3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_native_cpu_attention_refuses_a_bad_block_table():
    q, k, v, k_cache, v_cache, ctx = _step([9], [1])
    ctx.block_tables[0, 1] = k_cache.shape[0] + 5        # past the cache
    backend = TorchBackend()
    ctx.attn_metadata = backend.prepare(ctx)
    with pytest.raises(IndexError, match="outside the KV cache"):
        backend.forward(q, k, v, k_cache, v_cache, ctx, scale=0.3)


def test_only_the_native_cpu_path_skips_the_zero_fill():
    """An untouched KV cache is safe only where attention reads written slots alone."""
    cpu = torch.device("cpu")
    assert TorchBackend().reads_only_written_slots(cpu, torch.float32)
    assert TorchBackend().reads_only_written_slots(cpu, torch.float64)
    assert not TorchBackend().reads_only_written_slots(cpu, torch.float16)          # SDPA fallback
    assert not TorchBackend(cpu_attention=False).reads_only_written_slots(cpu, torch.float32)
    assert not TorchBackend().reads_only_written_slots(torch.device("cuda"), torch.float32)


def test_native_rotary_on_packed_views_equals_rotating_first():
    """float32 on the CPU: the native call rotates unrotated q/k views of a packed QKV
    (strided rows, no copies) as it reads q and stores k; the same as RoPE first."""
    from memgen.layers.rotary import RotaryEmbedding

    heads, kv_heads, head_dim = 4, 2, 16
    _, _, _, k_cache, v_cache, ctx = _step([23, 9, 40], [1, 9, 5], num_kv_heads=kv_heads, head_dim=head_dim)
    g = torch.Generator().manual_seed(5)
    rows = int(ctx.cu_seqlens_q[-1])
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=g)
    q = qkv[:, :heads * head_dim].view(rows, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(rows, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(rows, kv_heads, head_dim)
    angle = torch.rand(rows, head_dim // 2, generator=g) * 6
    cos, sin = torch.cat([angle.cos()] * 2, dim=-1), torch.cat([angle.sin()] * 2, dim=-1)
    backend = TorchBackend()
    assert backend.fuses_rope(q) and not backend.fuses_rope(q.double())
    ctx.attn_metadata = backend.prepare(ctx)
    k_cache2, v_cache2 = k_cache.clone(), v_cache.clone()
    got = backend.attend_rotating(q, k, v, k_cache, v_cache, ctx, 0.3, cos, sin)
    rq, rk = RotaryEmbedding.apply(q, k, cos[:, None], sin[:, None])
    want = backend.forward(rq, rk, v, k_cache2, v_cache2, ctx, scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache, k_cache2, rtol=1e-6, atol=1e-6)   # the same rotated keys stored
    assert torch.equal(v_cache, v_cache2)
