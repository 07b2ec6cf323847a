"""The plain-Python model of the block allocator (what memgen's engine used
before the native runtime), kept as the tests' oracle: tests/
test_native_allocator.py runs random operation sequences on it and on
memgen._native.BlockManager and compares every observable.

Its streams are plain objects (OracleStream) with the fields the allocator
uses. OracleStep is the scheduler's per-step work as it was in Python
(Scheduler._admit and the loop over running sequences), compared with
memgen._native.StepCore. The block hash is the native one (engine/runtime.cpp: hash_key), written
out here, so that truncated hashes (hash_bits < 64) collide on the same blocks
in both; the collision check compares the stored key itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field

EMBED = -1
MASK64 = (1 << 64) - 1


def _mix(h: int, x: int) -> int:
    return h ^ ((x + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & MASK64)


def _finalize(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def block_hash(parent: int | None, tokens: tuple, extra: bytes, salt: int, hash_bits: int = 64) -> int:
    h = 0x6D656D67656E
    h = _mix(h, int(parent is not None))
    h = _mix(h, parent or 0)
    h = _mix(h, salt & MASK64)
    h = _mix(h, len(tokens))
    for t in tokens:
        h = _mix(h, t & MASK64)
    h = _mix(h, len(extra))
    for i in range(0, len(extra), 8):
        h = _mix(h, int.from_bytes(extra[i:i + 8], "little"))
    return _finalize(h) & ((1 << hash_bits) - 1)


@dataclass(eq=False)
class OracleStream:
    token_ids: list[int]
    salt_id: int = 0
    num_scratch: int = 0
    embed_keys: dict[int, bytes] = field(default_factory=dict)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    pool_index: int = 0
    due: bool = True

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def reset(self) -> None:
        self.block_table, self.block_hashes = [], []
        self.num_computed_tokens = self.num_cached_tokens = 0


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "key")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.key: tuple | None = None     # (parent hash, tokens, digests, salt): the collision check


class OracleBlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, hash_bits: int = 64):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_bits = hash_bits
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: dict[int, None] = dict.fromkeys(range(num_blocks))   # ordered: evict oldest first
        self.hash_to_block_id: dict[int, int] = {}
        self.num_prefix_hit_tokens = 0
        self.num_prefix_query_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix caching -------------------------------------------------------
    def _key(self, stream: OracleStream, index: int, parent_hash: int | None) -> tuple[int, tuple]:
        start = index * self.block_size
        ids = tuple(stream.token_ids[start:start + self.block_size])
        extra = b"".join(stream.embed_keys[start + i] for i, t in enumerate(ids) if t == EMBED)
        key = (parent_hash, ids, extra, stream.salt_id)
        return block_hash(parent_hash, ids, extra, stream.salt_id, self.hash_bits), key

    def find_cached_prefix(self, stream: OracleStream) -> list[int]:
        """The last position is never covered: it must be computed to produce the next logits."""
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

    def cache_full_blocks(self, stream: OracleStream) -> None:
        if not self.enable_prefix_caching:
            return
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
    def num_free_blocks_needed(self, stream: OracleStream, num_new_tokens: int, hits: list[int] = ()) -> int:
        have = len(stream.block_table) if not hits else len(hits)
        computed = stream.num_computed_tokens if not hits else len(hits) * self.block_size
        new_blocks = max(0, self.blocks_for(computed + num_new_tokens) - have)
        return new_blocks + sum(1 for b in hits if self.blocks[b].ref_count == 0)

    def can_allocate(self, stream: OracleStream, num_new_tokens: int, hits: list[int] = ()) -> bool:
        return self.num_free_blocks_needed(stream, num_new_tokens, hits) <= self.num_free_blocks

    def allocate(self, stream: OracleStream, num_new_tokens: int, hits: list[int] = ()) -> None:
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

    def record_admission(self, stream: OracleStream) -> None:
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

    def free(self, stream: OracleStream) -> None:
        """Return the stream's blocks (last block first, so it is evicted first)."""
        for block_id in reversed(stream.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        stream.reset()


class OracleStep:
    """The running sequences (lists of streams, admission order) and one step's
    chunks [(running index, stream, start, num_tokens)]: admission and the catch-up
    loop as the Python scheduler had them before they moved to StepCore."""

    def __init__(self, managers: list[OracleBlockManager]):
        self.managers = managers
        self.running: list[list[OracleStream]] = []
        self.chunks: list[tuple[int, OracleStream, int, int]] = []
        self.budget = 0

    def begin(self, budget: int) -> None:
        self.chunks, self.budget = [], budget

    def _add_chunk(self, seq: int, stream: OracleStream, start: int, n: int) -> None:
        self.chunks.append((seq, stream, start, n))
        self.budget -= n

    def admit(self, streams: list[OracleStream]) -> bool:
        """Scheduler._admit: atomic; every stream's hits pinned before any new block."""
        budget, plan, needed = self.budget, [], {}
        for stream in streams:
            if not stream.due:
                continue
            manager = self.managers[stream.pool_index]
            hits = manager.find_cached_prefix(stream) if not stream.block_table else []
            computed = len(hits) * manager.block_size if hits else stream.num_computed_tokens
            n = min(stream.num_tokens - computed, budget)
            if n <= 0:
                continue
            needed[stream.pool_index] = (needed.get(stream.pool_index, 0)
                                         + manager.num_free_blocks_needed(stream, n, hits))
            plan.append((stream, n, hits))
            budget -= n
        if not plan or any(self.managers[p].num_free_blocks < k for p, k in needed.items()):
            return False
        for stream, _, hits in plan:
            if hits:
                self.managers[stream.pool_index].allocate(stream, 0, hits)
        for stream, n, _ in plan:
            self.managers[stream.pool_index].allocate(stream, n, [])
        self.running.append(streams)
        for stream, n, _ in plan:
            self.managers[stream.pool_index].record_admission(stream)
            self._add_chunk(len(self.running) - 1, stream, stream.num_computed_tokens, n)
        return True

    def schedule_running(self, start: int) -> tuple[int, bool]:
        i = start
        while i < len(self.running) and self.budget > 0:
            pending, left = [], self.budget
            for stream in self.running[i]:
                if not stream.due:
                    continue
                n = min(stream.num_tokens - stream.num_computed_tokens, left)
                if n <= 0:
                    continue
                manager = self.managers[stream.pool_index]
                if not manager.can_allocate(stream, n):
                    return i, True
                manager.allocate(stream, n)
                pending.append((stream, stream.num_computed_tokens, n))
                left -= n
            for stream, start_pos, n in pending:
                self._add_chunk(i, stream, start_pos, n)
            i += 1
        return i, False

    def postprocess(self) -> None:
        for _, stream, start, n in self.chunks:
            stream.num_computed_tokens = start + n
            self.managers[stream.pool_index].cache_full_blocks(stream)
