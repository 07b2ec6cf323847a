"""Block pool bookkeeping (the native BlockManager): reference counts, prefix
hits through chained hashes, the collision check, least-recently-freed
eviction, and errors as Python exceptions. tests/test_native_allocator.py
compares it with the plain-Python model on random operation sequences."""
import pytest

from memgen.engine.block_manager import BlockManager
from memgen.engine.sequence import Stream


def _computed(manager: BlockManager, tokens: list[int], salt=None) -> Stream:
    """A stream whose positions are all allocated, computed and registered."""
    stream = Stream("R", list(tokens), cache_salt=salt)
    manager.allocate(stream, len(tokens))
    stream.num_computed_tokens = len(tokens)
    manager.cache_full_blocks(stream)
    return stream


def test_allocate_and_free_return_every_block():
    m = BlockManager(8, 4)
    s = Stream("R", list(range(10)))
    assert m.can_allocate(s, 10)
    m.allocate(s, 10)
    assert len(s.block_table) == 3 and m.num_free_blocks == 5
    s.num_computed_tokens = 10
    s.append_token(99)
    m.allocate(s, 1)                       # position 10 still fits in block 3
    assert len(s.block_table) == 3
    m.free(s)
    assert m.num_free_blocks == 8 and s.block_table == [] and s.num_computed_tokens == 0
    assert all(m.ref_count(i) == 0 for i in range(m.num_blocks))
    m.check_invariants()


def test_prefix_hits_share_blocks_and_leave_the_last_position():
    m = BlockManager(16, 4)
    a = _computed(m, list(range(12)))
    b = Stream("R", list(range(12)))        # same 12 tokens: 3 full blocks, but the last must be computed
    hits = m.find_cached_prefix(b)
    assert hits == a.block_table[:2]
    m.allocate(b, 12 - 8, hits)
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert [m.ref_count(i) for i in hits] == [2, 2]
    c = Stream("R", list(range(8)) + [50, 51, 52, 53, 54])
    assert m.find_cached_prefix(c) == a.block_table[:2]
    d = Stream("R", [0, 1, 2, 3, 9, 9, 9, 9, 9])     # diverges in block 1: only block 0 hits
    assert m.find_cached_prefix(d) == a.block_table[:1]
    e = Stream("R", list(range(12)), cache_salt="adapter-1")   # another stream kind: no hits
    assert m.find_cached_prefix(e) == []


def test_collision_check_rejects_a_block_with_other_contents():
    m = BlockManager(8, 4, hash_bits=0)     # every block hashes to 0: every lookup collides
    a = _computed(m, [1, 2, 3, 4, 5])
    assert m.find_cached_prefix(Stream("R", [7, 7, 7, 7, 5])) == []
    assert m.find_cached_prefix(Stream("R", [1, 2, 3, 4, 5])) == a.block_table[:1]
    assert m.find_cached_prefix(Stream("R", [1, 2, 3, 4, 5], cache_salt="other")) == []


def test_freed_blocks_keep_serving_hits_until_reused():
    m = BlockManager(4, 4)
    a = _computed(m, list(range(9)))       # 3 blocks, 2 full and registered
    kept = a.block_table[:2]
    m.free(a)
    assert m.num_free_blocks == 4
    b = Stream("R", list(range(9)))
    hits = m.find_cached_prefix(b)
    assert hits == kept
    assert m.num_free_blocks_needed(b, 1, hits) == 3   # 2 revived + 1 fresh
    m.allocate(b, 1, hits)
    assert m.num_free_blocks == 1
    m.free(b)
    # filling the whole pool with other tokens evicts the registrations
    c = _computed(m, [100 + i for i in range(16)])
    assert m.find_cached_prefix(Stream("R", list(range(9)))) == []
    m.free(c)
    assert m.num_free_blocks == 4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_embedding_positions_key_the_cache_by_their_values(dtype):
    """Latent positions are keyed by their raw bytes, in every engine dtype (numpy
    has no bfloat16: the GPU default must not break insertion)."""
    import torch

    dtype = getattr(torch, dtype)
    m = BlockManager(8, 4)
    a = Stream("R", [1, 2])
    a.append_embeds(torch.ones(2, 3, dtype=dtype))
    a.append_tokens([5, 6])
    m.allocate(a, 6)
    a.num_computed_tokens = 6
    m.cache_full_blocks(a)
    same = Stream("R", [1, 2])
    same.append_embeds(torch.ones(2, 3, dtype=dtype))
    same.append_tokens([5, 6])
    other = Stream("R", [1, 2])
    other.append_embeds(torch.zeros(2, 3, dtype=dtype))
    other.append_tokens([5, 6])
    assert m.find_cached_prefix(same) == a.block_table[:1]
    assert m.find_cached_prefix(other) == []


def test_out_of_blocks_is_refused_not_overrun():
    m = BlockManager(2, 4)
    s = Stream("R", list(range(9)))
    assert not m.can_allocate(s, 9)
    with pytest.raises(RuntimeError, match="out of blocks"):
        m.allocate(s, 9)
    assert m.num_free_blocks == 2 and s.block_table == []     # a refused allocation changes nothing


def test_native_errors_are_python_exceptions():
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
    m = BlockManager(4, 4)
    with pytest.raises(IndexError, match="block id"):
        m.ref_count(4)
    s = Stream("R", [1, 2, 3, 4, 5])
    with pytest.raises(IndexError, match="block id"):
        m.allocate(s, 1, [17])
    with pytest.raises(TypeError):
        m.allocate(object(), 1)
    with pytest.raises(AttributeError):
        s.token_ids.append(6)                      # a tuple: positions change only through the methods
    with pytest.raises(TypeError):
        Stream("R", [1, 2, "x", 4, 5])
    with pytest.raises(TypeError):
        s.append_token(2.5)
    with pytest.raises(TypeError, match="bytes"):
        s.append_embed("not bytes")
    assert s.token_ids == (1, 2, 3, 4, 5)           # refused appends changed nothing
    embed = Stream("R", [1, -1, 3, 4, 5])          # an embedding position without its digest
    m2 = BlockManager(4, 4)
    m2.allocate(embed, 5)
    embed.num_computed_tokens = 5
    with pytest.raises(IndexError, match="digest"):
        m2.cache_full_blocks(embed)


def test_drop_scratch_cuts_the_scratch_positions_only():
    """The weaver's scratch queries: appended without digests, never registered, cut off
    again with their vectors; the digested positions before them keep keying the cache."""
    import torch

    from memgen._native import EMBED

    m = BlockManager(8, 2)
    s = Stream("R", [1, 2])
    s.append_embeds(torch.ones(2, 3))                       # latents at 2, 3 (digested)
    s.num_scratch = 2
    s.append_embeds(torch.zeros(2, 3), hash_keys=False)     # scratch queries at 4, 5
    m.allocate(s, 6)
    s.num_computed_tokens = 6
    m.cache_full_blocks(s)
    assert len(s.block_hashes) == 2                         # the scratch block is never registered
    s.drop_scratch()
    assert s.token_ids == (1, 2, EMBED, EMBED) and sorted(s.embeds) == [2, 3]
    assert (s.num_tokens, s.num_computed_tokens, s.num_scratch) == (4, 4, 0)
    s.append_token(7)
    twin = Stream("R", [1, 2])
    twin.append_embeds(torch.ones(2, 3))
    twin.append_token(7)
    assert m.find_cached_prefix(twin) == s.block_table[:2]
