"""Property-based tests of the native block allocator against the plain-Python
oracle (tests/oracle.py): random sequences of admit (with prefix hits) /
append / compute / fork / preempt / free, with scratch positions and embedding
positions, on both at once; after every step every observable must agree and
the invariants must hold (no block both free and used, reference counts equal
the block tables' references, the free list is the eviction order). Short
hashes (hash_bits) force collisions so that the collision check is exercised.
Also: native batch assembly against a plain-torch reference."""
import hashlib

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from memgen._native import EMBED, StepCore
from memgen.engine.block_manager import BlockManager
from memgen.engine.input_batch import InputBuffers, build_model_input
from memgen.engine.sequence import Stream, salt_id
from oracle import OracleBlockManager, OracleStep, OracleStream

SALTS = [None, ("W", 0), ("T", 0)]
DIGESTS = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
# positions: mostly a tiny alphabet (so prefixes repeat), sometimes an embedding (one of 3 digests)
position = st.one_of(st.integers(0, 2), st.integers(0, 2).map(lambda d: (EMBED, d)))


class Pair:
    """The same stream twice: native (Stream) and oracle (OracleStream)."""

    def __init__(self, positions, salt):
        self.native = Stream("R", [], cache_salt=salt)
        self.oracle = OracleStream([], salt_id=salt_id(salt))
        self.positions = []            # what was appended (and not dropped), to fork from
        self.append(positions)

    def append(self, positions, digests=True):
        for p in positions:
            self.positions.append(p if digests else None)
            if isinstance(p, tuple):
                digest = DIGESTS[p[1]] if digests else None
                self.native.append_embed(digest)
                if digest is not None:
                    self.oracle.embed_keys[len(self.oracle.token_ids)] = digest
                self.oracle.token_ids.append(EMBED)
            else:
                self.native.append_token(p)
                self.oracle.token_ids.append(p)
        assert self.native.token_ids == tuple(self.oracle.token_ids)


class AllocatorMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 4]),
                prefix=st.booleans(), hash_bits=st.sampled_from([64, 3, 1]))
    def setup(self, num_blocks, block_size, prefix, hash_bits):
        self.native = BlockManager(num_blocks, block_size, prefix, hash_bits=hash_bits)
        self.oracle = OracleBlockManager(num_blocks, block_size, prefix, hash_bits=hash_bits)
        self.running: list[Pair] = []
        self.waiting: list[Pair] = []

    # ---- helpers ----------------------------------------------------------------
    def _admit(self, pair: Pair, chunk: int) -> bool:
        hits = self.native.find_cached_prefix(pair.native) if not pair.native.num_blocks else []
        assert hits == (self.oracle.find_cached_prefix(pair.oracle) if not pair.oracle.block_table else [])
        computed = len(hits) * self.native.block_size if hits else pair.native.num_computed_tokens
        n = min(pair.native.num_tokens - computed, chunk)
        if n <= 0:
            return False
        need = self.native.num_free_blocks_needed(pair.native, n, hits)
        assert need == self.oracle.num_free_blocks_needed(pair.oracle, n, hits)
        if need > self.native.num_free_blocks:
            return False
        for m, s in ((self.native, pair.native), (self.oracle, pair.oracle)):
            m.allocate(s, n, hits)
            m.record_admission(s)
            s.num_computed_tokens += n
            m.cache_full_blocks(s)
        return True

    def _free(self, pair: Pair) -> None:
        self.native.free(pair.native)
        self.oracle.free(pair.oracle)

    # ---- rules --------------------------------------------------------------------
    @rule(positions=st.lists(position, min_size=1, max_size=12), salt=st.sampled_from(SALTS),
          chunk=st.integers(1, 16))
    def admit(self, positions, salt, chunk):
        pair = Pair(positions, salt)
        if self._admit(pair, chunk):
            self.running.append(pair)
        else:
            self.waiting.append(pair)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 99), extra=st.lists(position, max_size=5), chunk=st.integers(1, 16))
    def fork(self, i, extra, chunk):
        """A new stream sharing a running one's positions (then its own): prefix hits share blocks."""
        src = self.running[i % len(self.running)]
        pair = Pair(src.positions[:len(src.positions) - src.native.num_scratch], src.native.cache_salt)
        pair.append(extra)
        if self._admit(pair, chunk):
            self.running.append(pair)
        else:
            self.waiting.append(pair)

    @precondition(lambda self: self.waiting)
    @rule(i=st.integers(0, 99), chunk=st.integers(1, 16))
    def readmit(self, i, chunk):
        pair = self.waiting.pop(i % len(self.waiting))
        if self._admit(pair, chunk):
            self.running.append(pair)
        else:
            self.waiting.append(pair)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 99), positions=st.lists(position, min_size=1, max_size=4))
    def append(self, i, positions):
        pair = self.running[i % len(self.running)]
        if pair.native.num_scratch == 0:
            pair.append(positions)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 99), chunk=st.integers(1, 16))
    def compute(self, i, chunk):
        """One scheduler step for a running stream: blocks for its pending positions, or preemption."""
        pair = self.running[i % len(self.running)]
        n = min(pair.native.num_pending_tokens, chunk)
        if n <= 0:
            return
        ok = self.native.can_allocate(pair.native, n)
        assert ok == self.oracle.can_allocate(pair.oracle, n)
        if not ok:   # preempt by recompute
            self._free(pair)
            self.running.remove(pair)
            self.waiting.append(pair)
            return
        for m, s in ((self.native, pair.native), (self.oracle, pair.oracle)):
            m.allocate(s, n)
            s.num_computed_tokens += n
            m.cache_full_blocks(s)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 99), k=st.integers(1, 4))
    def add_scratch(self, i, k):
        """The weaver's queries: k embedding positions that are computed but never cached."""
        pair = self.running[i % len(self.running)]
        if pair.native.num_scratch or pair.native.num_pending_tokens:
            return
        pair.append([(EMBED, 0)] * k, digests=False)
        pair.native.num_scratch = pair.oracle.num_scratch = k

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 99))
    def drop_scratch(self, i):
        pair = self.running[i % len(self.running)]
        k = pair.native.num_scratch
        if not k:
            return
        pair.native.drop_scratch()
        o = pair.oracle
        del o.token_ids[len(o.token_ids) - k:]
        o.num_computed_tokens = min(o.num_computed_tokens, len(o.token_ids))
        o.num_scratch = 0
        del pair.positions[len(pair.positions) - k:]
        assert pair.native.token_ids == tuple(o.token_ids) and pair.native.num_scratch == 0

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 99))
    def finish(self, i):
        self._free(self.running.pop(i % len(self.running)))

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 99))
    def preempt(self, i):
        pair = self.running.pop(i % len(self.running))
        self._free(pair)
        self.waiting.append(pair)

    # ---- invariants ---------------------------------------------------------------
    @invariant()
    def agree(self):
        n, o = self.native, self.oracle
        n.check_invariants()
        refs = [0] * n.num_blocks
        for pair in self.running:
            a, b = pair.native, pair.oracle
            assert a.block_table == b.block_table
            assert a.block_hashes == b.block_hashes
            assert (a.num_computed_tokens, a.num_cached_tokens) == (b.num_computed_tokens, b.num_cached_tokens)
            for block_id in a.block_table:
                refs[block_id] += 1
        for pair in self.waiting:
            assert pair.native.block_table == [] and pair.native.num_computed_tokens == 0
        free = n.free_block_ids()
        assert free == list(o.free_block_ids)                               # same eviction order
        assert all(refs[b] == 0 for b in free)                              # no block both free and used
        assert [n.ref_count(b) for b in range(n.num_blocks)] == refs        # reference counts exact
        assert [o.blocks[b].ref_count for b in range(n.num_blocks)] == refs
        assert len(free) + sum(1 for r in refs if r) == n.num_blocks        # every block free or used
        assert n.cached_blocks() == o.hash_to_block_id
        assert [n.block_hash(b) for b in range(n.num_blocks)] == [o.blocks[b].hash for b in range(n.num_blocks)]
        assert (n.num_prefix_hit_tokens, n.num_prefix_query_tokens) == (o.num_prefix_hit_tokens,
                                                                        o.num_prefix_query_tokens)

    def teardown(self):
        if not hasattr(self, "native"):
            return
        for pair in self.running:
            self._free(pair)
        self.running.clear()
        self.agree()
        assert self.native.num_free_blocks == self.native.num_blocks      # every block free at the end


TestAllocatorAgainstOracle = AllocatorMachine.TestCase
TestAllocatorAgainstOracle.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                               suppress_health_check=[HealthCheck.too_slow])


# ---- scheduling: StepCore against the Python scheduler it replaced -----------------
class SchedulerMachine(RuleBasedStateMachine):
    """Sequences of 1-3 streams (salts, two pools) go through admission, the catch-up
    loop with preemption of the most recently admitted sequence, postprocess,
    appends, due-stream changes and finishing, natively and in the oracle."""

    @initialize(blocks=st.tuples(st.integers(1, 16), st.integers(1, 16)), block_size=st.sampled_from([1, 2, 4]),
                prefix=st.booleans(), hash_bits=st.sampled_from([64, 2]))
    def setup(self, blocks, block_size, prefix, hash_bits):
        self.n_managers = [BlockManager(b, block_size, prefix, hash_bits=hash_bits) for b in blocks]
        self.o_managers = [OracleBlockManager(b, block_size, prefix, hash_bits=hash_bits) for b in blocks]
        self.native = StepCore(self.n_managers)
        self.oracle = OracleStep(self.o_managers)
        self.seqs: dict[int, list[Pair]] = {}
        self.waiting: list[int] = []
        self.running: list[int] = []      # both cores' running order
        self.next_id = 0
        self.history = []                 # every added sequence's streams, to fork from

    def _streams(self, sid):
        return tuple(p.native for p in self.seqs[sid]), [p.oracle for p in self.seqs[sid]]

    def _free(self, sid):
        for pair in self.seqs[sid]:
            self.n_managers[pair.native.pool_index].free(pair.native)
            self.o_managers[pair.oracle.pool_index].free(pair.oracle)

    @rule(streams=st.lists(st.tuples(st.lists(position, min_size=1, max_size=10), st.sampled_from(SALTS),
                                     st.integers(0, 1)), min_size=1, max_size=3))
    def add(self, streams):
        self.history.append(streams)
        sid, self.next_id = self.next_id, self.next_id + 1
        pairs = []
        for positions, salt, pool in streams:
            pair = Pair(positions, salt)
            pair.native.pool_index = pair.oracle.pool_index = pool
            pairs.append(pair)
        self.seqs[sid] = pairs
        self.waiting.append(sid)

    @rule(budget=st.integers(1, 24), max_seqs=st.integers(1, 6))
    def step(self, budget, max_seqs):
        """Scheduler.schedule's order, on both cores."""
        self.native.begin(budget)
        self.oracle.begin(budget)
        i, preempted = 0, False
        while True:
            start = i
            i, failed = self.native.schedule_running(start)
            assert (i, failed) == self.oracle.schedule_running(start)
            if not failed:
                break
            sid, victim = self.running[i], self.running.pop()
            assert self.native.pop_running() == victim and self.oracle.running.pop() is not None
            self._free(victim)
            self.waiting.insert(0, victim)
            preempted = True
            if victim == sid:
                break
        while not preempted and self.waiting and self.native.budget > 0 and len(self.running) < max_seqs:
            sid = self.waiting[0]
            native_streams, oracle_streams = self._streams(sid)
            ok = self.native.admit(sid, native_streams)
            assert ok == self.oracle.admit(oracle_streams)
            if not ok:
                break
            self.running.append(self.waiting.pop(0))
        assert self.native.budget == self.oracle.budget
        assert self.native.running == self.running
        index = {id(p.oracle): (sid, k) for sid, pairs in self.seqs.items() for k, p in enumerate(pairs)}
        native_chunks = [(seq, [p.native for p in self.seqs[seq]].index(stream), start, n)
                         for seq, stream, start, n in self.native.chunk_tuples()]
        oracle_chunks = [(self.running[i], index[id(stream)][1], start, n)
                         for i, stream, start, n in self.oracle.chunks]
        assert native_chunks == oracle_chunks
        self.native.postprocess()
        self.oracle.postprocess()

    @precondition(lambda self: self.history)
    @rule(i=st.integers(0, 99), extra=st.lists(position, max_size=3))
    def fork(self, i, extra):
        """A new sequence with an earlier one's streams (running or finished): prefix hits,
        on blocks in use or free at the free list's head."""
        self.add([(positions + extra, salt, pool) for positions, salt, pool in self.history[i % len(self.history)]])

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99), k=st.integers(0, 2), positions=st.lists(position, min_size=1, max_size=4))
    def append(self, i, k, positions):
        pairs = self.seqs[list(self.seqs)[i % len(self.seqs)]]
        pairs[k % len(pairs)].append(positions)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99), k=st.integers(0, 2))
    def toggle_due(self, i, k):
        pairs = self.seqs[list(self.seqs)[i % len(self.seqs)]]
        pair = pairs[k % len(pairs)]
        pair.native.due = pair.oracle.due = not pair.native.due

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 99))
    def finish(self, i):
        sid = self.running.pop(i % len(self.running))
        self.native.remove_running(sid)
        del self.oracle.running[self.oracle.running.index(self._streams(sid)[1])]
        self._free(sid)
        del self.seqs[sid]

    @invariant()
    def agree(self):
        if not hasattr(self, "native"):
            return
        assert self.native.num_running == len(self.oracle.running) == len(self.running)
        for n, o in zip(self.n_managers, self.o_managers):
            n.check_invariants()
            assert n.free_block_ids() == list(o.free_block_ids)
            assert n.cached_blocks() == o.hash_to_block_id
            assert [n.ref_count(b) for b in range(n.num_blocks)] == [o.blocks[b].ref_count
                                                                     for b in range(n.num_blocks)]
            assert (n.num_prefix_hit_tokens, n.num_prefix_query_tokens) == (o.num_prefix_hit_tokens,
                                                                            o.num_prefix_query_tokens)
        for pairs in self.seqs.values():
            for pair in pairs:
                a, b = pair.native, pair.oracle
                assert (a.block_table, a.block_hashes) == (b.block_table, b.block_hashes)
                assert (a.num_computed_tokens, a.num_cached_tokens) == (b.num_computed_tokens, b.num_cached_tokens)

    def teardown(self):
        if not hasattr(self, "native"):
            return
        for sid in list(self.running):
            self.native.remove_running(sid)
            self._free(sid)
        for n in self.n_managers:
            n.check_invariants()
            assert n.num_free_blocks == n.num_blocks                      # every block free at the end


TestSchedulerAgainstOracle = SchedulerMachine.TestCase
TestSchedulerAgainstOracle.settings = settings(max_examples=100, stateful_step_count=30, deadline=None,
                                               suppress_health_check=[HealthCheck.too_slow])


def test_admission_pins_every_hit_before_taking_new_blocks():
    """A sequence whose first stream needs a new block and whose second hits a freed,
    cached block at the free list's head: the hit is pinned first, so the new block
    does not evict it (StepCore.admit and the oracle alike)."""
    def run(manager, core, stream, admit):
        def computed(tokens, salt):
            s = stream(tokens, salt)
            assert admit(s)
            core.postprocess()
            core.begin(100)
            return s
        core.begin(100)
        a = computed([1, 2], ("X", 0))              # block 0: [1, 2], registered
        c = computed([7, 7, 7, 7], ("Z", 0))        # blocks 1, 2
        for s in (a, c):
            manager.free(s)
        free = manager.free_block_ids
        assert list(free() if callable(free) else free) == [0, 2, 1]   # the cached block at the head
        s1, s2 = stream([5], ("Y", 0)), stream([1, 2, 3], ("X", 0))
        assert admit(s1, s2)
        return s1.block_table, s2.block_table, s2.num_cached_tokens

    native = BlockManager(3, 2)
    core = StepCore([native])
    got = run(native, core, lambda t, salt: Stream("R", t, cache_salt=salt),
              lambda *ss: core.admit(object(), tuple(ss)))
    oracle = OracleBlockManager(3, 2)
    step = OracleStep([oracle])
    want = run(oracle, step, lambda t, salt: OracleStream(list(t), salt_id=salt_id(salt)),
               lambda *ss: step.admit(list(ss)))
    assert got == want and got[1][0] == 0 and got[2] == 2
    assert [native.ref_count(b) for b in range(3)] == [1, 1, 1]


def test_admission_error_changes_nothing():
    manager = BlockManager(8, 2)
    core = StepCore([manager])
    core.begin(100)
    ok = Stream("R", [1, 2, 3])
    bad = Stream("W", [1])
    bad.append_embed(None)                          # an embedding position without its digest
    bad.append_tokens([4, 5])
    with pytest.raises(IndexError, match="digest"):
        core.admit(object(), (ok, bad))
    assert core.num_running == 0 and core.num_chunks == 0 and core.budget == 100
    assert manager.num_free_blocks == 8 and ok.block_table == [] and bad.block_table == []


# ---- batch assembly ----------------------------------------------------------------
def reference_assembly(chunks, block_size):
    """The plain-torch assembly (the engine's before the native runtime)."""
    ids, pos, slots, adapters, cu, ctx, tables = [], [], [], [], [0], [], []
    for stream, start, n in chunks:
        table, token_ids = stream.block_table, stream.token_ids
        for p in range(start, start + n):
            ids.append(token_ids[p])
            pos.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
            adapters.append(stream.adapter_id)
        cu.append(cu[-1] + n)
        ctx.append(start + n)
        tables.append(table)
    width = max(len(t) for t in tables)
    padded = [t + [-1] * (width - len(t)) for t in tables]
    t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return t(ids), t(pos), t(slots), t(adapters), t(cu), t(ctx), t(padded)


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("capacity", [1, 4096])     # 1: the buffers must grow
def test_native_assembly_matches_reference(block_size, capacity):
    from hypothesis import given

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 40), st.integers(-1, 2)), min_size=1, max_size=8))
    def check(specs):
        manager = BlockManager(512, block_size, enable_prefix_caching=False)
        step = StepCore([manager])
        step.begin(10**9)
        chunks = []
        for length, computed, adapter in specs:
            stream = Stream("R", [(7 * i + length) % 50 for i in range(length)], adapter_id=adapter)
            start = min(computed, length - 1)
            stream.num_computed_tokens = start
            assert step.admit(stream, (stream,))     # blocks for [start, length), one chunk of them
            chunks.append((stream, start, length - start))
        buffers = InputBuffers(torch.device("cpu"), capacity, capacity, capacity)
        inp = build_model_input(step, -1, buffers, block_size, torch.device("cpu"), torch.float32)
        ids, pos, slots, adapters, cu, ctx, tables = reference_assembly(chunks, block_size)
        c = inp.context
        assert torch.equal(inp.input_ids, ids) and torch.equal(inp.positions, pos)
        assert torch.equal(c.slot_mapping, slots) and torch.equal(c.cu_seqlens_q, cu)
        assert torch.equal(c.context_lens, ctx) and torch.equal(c.block_tables, tables)
        assert torch.equal(inp.last_rows, cu[1:] - 1)
        assert c.max_seqlen_q == int((cu[1:] - cu[:-1]).max()) and c.max_seqlen_k == int(ctx.max())
        if (adapters >= 0).any():
            assert torch.equal(c.adapter_ids, adapters)
        else:
            assert c.adapter_ids is None
        assert inp.latents is None and inp.latent_index is None

    check()


def test_assembly_refuses_a_chunk_without_blocks():
    manager = BlockManager(4, 4)
    step = StepCore([manager])
    stream = Stream("R", list(range(6)))
    step.begin(6)
    assert step.admit(stream, (stream,))          # one chunk [0, 6) on two blocks
    manager.free(stream)                          # now no block covers it
    with pytest.raises(IndexError, match="not covered"):
        build_model_input(step, -1, InputBuffers(torch.device("cpu")), 4, torch.device("cpu"), torch.float32)
    # a chunk outside the stream's positions ("not within") is refused by StepCore::add_chunk:
    # engine/test_runtime.cpp checks it (the Python binding that took arbitrary chunks is gone)
