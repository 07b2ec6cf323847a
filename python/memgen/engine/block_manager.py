"""The paged KV cache's bookkeeping: a pool of fixed-size blocks with reference
counts, handed out per stream, and prefix caching. Implemented natively
(engine/runtime.cpp, `memgen._native.BlockManager`); tests/oracle.py holds the
plain-Python model that the tests compare it with.

Prefix caching: a full, computed block is registered under a chained hash of
(parent block's hash, the block's contents, the stream's cache salt). A later
stream whose leading blocks hash the same shares those blocks (ref count + 1)
after a collision check that compares the stored key itself. Freed blocks keep
their registration until they are handed out again, least recently freed
first, so finished requests still serve hits. The last position of a stream is
never served from the cache: it must be computed to produce the next logits.

Methods take `memgen.engine.sequence.Stream` objects: find_cached_prefix,
cache_full_blocks, num_free_blocks_needed, can_allocate, allocate (raises
RuntimeError, changing nothing, when blocks run out), free, record_admission;
ref_count / free_block_ids / cached_blocks / check_invariants for tests.
"""
from memgen._native import BlockManager

__all__ = ["BlockManager"]
