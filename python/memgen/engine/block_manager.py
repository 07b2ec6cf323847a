"""The paged KV cache's bookkeeping: a pool of fixed-size blocks with reference
counts, handed out per stream, and prefix caching.

Prefix caching: a full, computed block is registered under a chained hash of
(parent block's hash, the block's contents, the stream's cache salt). A later
stream whose leading blocks hash the same shares those blocks (ref count + 1)
after a collision check that compares the stored key itself. Freed blocks keep
their registration until they are handed out again, least recently freed
first, so finished requests still serve hits.
"""
from __future__ import annotations

from memgen.engine.sequence import Stream


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "key")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.key: tuple | None = None     # (parent hash, contents, salt): the collision check


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: dict[int, None] = dict.fromkeys(range(num_blocks))   # ordered: evict oldest first
        self.hash_to_block_id: dict[int, int] = {}
        self.num_prefix_hit_tokens = 0    # statistics, for tests and benchmarks
        self.num_prefix_query_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix caching -------------------------------------------------------
    def _key(self, stream: Stream, index: int, parent_hash: int | None) -> tuple[int, tuple]:
        key = (parent_hash, stream.block_content(index, self.block_size), stream.cache_salt)
        return hash(key), key

    def find_cached_prefix(self, stream: Stream) -> list[int]:
        """Block ids holding the stream's leading full blocks, as far as they are
        cached. The last position is never covered: it must be computed to
        produce the next logits."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = None
        num_tokens = stream.num_tokens - stream.num_scratch
        for index in range((num_tokens - 1) // self.block_size):
            h, key = self._key(stream, index, parent)
            block_id = self.hash_to_block_id.get(h)
            if block_id is None or self.blocks[block_id].key != key:
                break
            hits.append(block_id)
            parent = h
        return hits

    def cache_full_blocks(self, stream: Stream) -> None:
        """Register the stream's newly computed full blocks."""
        if not self.enable_prefix_caching:
            return
        # scratch positions (weaver queries) are overwritten later: never register them
        num_full = min(stream.num_computed_tokens, stream.num_tokens - stream.num_scratch) // self.block_size
        for index in range(len(stream.block_hashes), num_full):
            parent = stream.block_hashes[-1] if stream.block_hashes else None
            h, key = self._key(stream, index, parent)
            block = self.blocks[stream.block_table[index]]
            if block.hash is None:
                block.hash, block.key = h, key
                self.hash_to_block_id.setdefault(h, block.block_id)
            stream.block_hashes.append(h)

    # ---- allocation -----------------------------------------------------------
    def num_free_blocks_needed(self, stream: Stream, num_new_tokens: int, hits: list[int] = ()) -> int:
        have = len(stream.block_table) if not hits else len(hits)
        computed = stream.num_computed_tokens if not hits else len(hits) * self.block_size
        new_blocks = max(0, self.blocks_for(computed + num_new_tokens) - have)
        return new_blocks + sum(1 for b in hits if self.blocks[b].ref_count == 0)

    def can_allocate(self, stream: Stream, num_new_tokens: int, hits: list[int] = ()) -> bool:
        return self.num_free_blocks_needed(stream, num_new_tokens, hits) <= self.num_free_blocks

    def allocate(self, stream: Stream, num_new_tokens: int, hits: list[int] = ()) -> None:
        """Make the stream's block table cover `num_new_tokens` more positions;
        `hits` (from find_cached_prefix, only on a stream with no blocks) become
        its leading, already computed blocks."""
        if hits:
            if stream.block_table:
                raise RuntimeError("prefix hits can only start an empty stream")
            for block_id in hits:
                block = self.blocks[block_id]
                if block.ref_count == 0:
                    del self.free_block_ids[block_id]
                block.ref_count += 1
                stream.block_table.append(block_id)
                stream.block_hashes.append(block.hash)
            stream.num_computed_tokens = stream.num_cached_tokens = len(hits) * self.block_size
        needed = self.blocks_for(stream.num_computed_tokens + num_new_tokens) - len(stream.block_table)
        for _ in range(needed):
            stream.block_table.append(self._take_free_block())

    def record_admission(self, stream: Stream) -> None:
        """Count a stream's prompt positions and its prefix-cache hits (statistics)."""
        self.num_prefix_query_tokens += stream.num_tokens
        self.num_prefix_hit_tokens += stream.num_cached_tokens

    def _take_free_block(self) -> int:
        if not self.free_block_ids:
            raise RuntimeError("KV cache out of blocks: the scheduler must check can_allocate first")
        block_id = next(iter(self.free_block_ids))
        del self.free_block_ids[block_id]
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]
        block.hash = block.key = None
        block.ref_count = 1
        return block_id

    def free(self, stream: Stream) -> None:
        """Return the stream's blocks (last block first, so it is evicted first)."""
        for block_id in reversed(stream.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        stream.reset()
