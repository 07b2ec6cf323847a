// The native runtime alone, without Python: allocation, prefix hits, free,
// eviction, admission, the catch-up loop, postprocess and batch assembly, with
// invariant checks after every operation of a seeded random run. Built by
// CMakeLists.txt with -DMEMGEN_NATIVE_TESTS=ON under AddressSanitizer and UBSan
// and run by ctest (.ci/run). The Python tests (tests/test_native_allocator.py)
// compare the same code with a plain-Python oracle; this program is what the
// sanitizers see.
#include "runtime.h"

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

using namespace memgen;

namespace {

int g_failures = 0;
struct { int64_t admitted = 0, with_hits = 0, preempted = 0, chunks = 0; } g_stats;  // what the random runs did

#define CHECK(cond)                                                                 \
    do {                                                                            \
        if (!(cond)) {                                                              \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            ++g_failures;                                                           \
        }                                                                           \
    } while (0)

template <typename E, typename F>
bool throws(F&& f) {
    try {
        f();
    } catch (const E&) {
        return true;
    }
    return false;
}

std::unique_ptr<StreamCore> stream(const std::vector<int64_t>& tokens, int64_t salt = 0, int64_t pool = 0) {
    auto s = std::make_unique<StreamCore>();
    s->name = "R";
    s->token_ids = tokens;
    s->salt_id = salt;
    s->pool_index = pool;
    return s;
}

// allocate + mark computed + register, as a scheduler step would
void compute_all(BlockManager& m, StreamCore& s) {
    m.allocate(s, s.num_pending_tokens(), {});
    s.num_computed_tokens = s.num_tokens();
    m.cache_full_blocks(s);
}

// Every block is free xor referenced, and referenced exactly as often as the block
// tables name it.
void check_refs(const BlockManager& m, const std::vector<const StreamCore*>& streams) {
    m.check_invariants();
    std::vector<int32_t> refs(m.num_blocks(), 0);
    for (const StreamCore* s : streams)
        for (int32_t id : s->block_table) ++refs.at(id);
    std::vector<bool> is_free(m.num_blocks(), false);
    for (int32_t id : m.free_block_ids()) is_free.at(id) = true;
    for (int64_t id = 0; id < m.num_blocks(); ++id) {
        CHECK(m.ref_count(id) == refs[id]);
        CHECK(is_free[id] == (refs[id] == 0));
    }
}

void test_allocate_and_free() {
    BlockManager m(8, 4, true, 64);
    auto s = stream({0, 1, 2, 3, 4, 5, 6, 7, 8, 9});
    CHECK(m.can_allocate(*s, 10, {}));
    m.allocate(*s, 10, {});
    CHECK(s->block_table.size() == 3 && m.num_free_blocks() == 5);
    s->num_computed_tokens = 10;
    s->append_token(99);
    m.allocate(*s, 1, {});            // position 10 still fits in block 3
    CHECK(s->block_table.size() == 3);
    check_refs(m, {s.get()});
    m.free(*s);
    CHECK(m.num_free_blocks() == 8 && s->block_table.empty() && s->num_computed_tokens == 0);
    check_refs(m, {});
    CHECK(throws<std::logic_error>([&] {  // a block table naming a free block: a double free
        s->block_table = {0};
        m.free(*s);
    }));
    s->block_table.clear();
}

void test_refused_allocation_changes_nothing() {
    BlockManager m(2, 4, true, 64);
    auto s = stream({0, 1, 2, 3, 4, 5, 6, 7, 8});
    CHECK(!m.can_allocate(*s, 9, {}));
    CHECK(throws<std::runtime_error>([&] { m.allocate(*s, 9, {}); }));
    CHECK(m.num_free_blocks() == 2 && s->block_table.empty());
    CHECK(!m.extend(*s, 9));
    CHECK(m.num_free_blocks() == 2 && s->block_table.empty());
    CHECK(throws<std::out_of_range>([&] { m.allocate(*s, 1, {17}); }));
    CHECK(throws<std::invalid_argument>([] { BlockManager(4, 0, true, 64); }));
    CHECK(throws<std::out_of_range>([&] { m.ref_count(2); }));
    check_refs(m, {});
}

void test_prefix_hits_and_salts() {
    BlockManager m(16, 4, true, 64);
    auto a = stream({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11});
    compute_all(m, *a);
    auto b = stream(a->token_ids);  // 3 full blocks, but the last position must be computed
    auto hits = m.find_cached_prefix(*b);
    CHECK(hits.size() == 2 && hits[0] == a->block_table[0] && hits[1] == a->block_table[1]);
    CHECK(m.num_free_blocks_needed(*b, 4, hits) == 1);
    m.allocate(*b, 4, hits);
    CHECK(b->num_computed_tokens == 8 && b->num_cached_tokens == 8);
    CHECK(m.ref_count(hits[0]) == 2 && m.ref_count(hits[1]) == 2);
    m.record_admission(*b);
    CHECK(m.num_prefix_hit_tokens == 8 && m.num_prefix_query_tokens == 12);
    auto d = stream({0, 1, 2, 3, 9, 9, 9, 9, 9});  // diverges in block 1
    CHECK(m.find_cached_prefix(*d).size() == 1);
    auto e = stream(a->token_ids, /*salt=*/1);      // another stream kind: no hits
    CHECK(m.find_cached_prefix(*e).empty());
    CHECK(throws<std::runtime_error>([&] { m.allocate(*b, 1, hits); }));  // hits only start an empty stream
    check_refs(m, {a.get(), b.get()});
    m.free(*a);
    m.free(*b);
    check_refs(m, {});

    BlockManager off(8, 4, false, 64);
    auto f = stream(a->token_ids);
    compute_all(off, *f);
    CHECK(f->block_hashes.empty() && off.cached_blocks().empty());
    off.free(*f);
}

void test_embedding_digests() {
    BlockManager m(8, 4, true, 64);
    const std::string one(32, '\x01'), zero(32, '\x00');
    auto make = [&](const std::string& digest) {
        auto s = stream({1, 2});
        s->append_embed(&digest);
        s->append_embed(&digest);
        s->append_token(5);
        s->append_token(6);
        return s;
    };
    auto a = make(one);
    compute_all(m, *a);
    auto same = make(one), other = make(zero);
    CHECK(m.find_cached_prefix(*same).size() == 1);
    CHECK(m.find_cached_prefix(*other).empty());
    auto missing = stream({1, kEmbed, 3, 4, 5});  // an embedding position without its digest
    CHECK(throws<std::out_of_range>([&] { m.find_cached_prefix(*missing); }));
    // scratch: appended without digests, never registered, cut off again
    auto w = make(one);
    w->num_scratch = 3;
    for (int i = 0; i < 3; ++i) w->append_embed(nullptr);
    m.allocate(*w, w->num_tokens(), {});
    w->num_computed_tokens = w->num_tokens();
    m.cache_full_blocks(*w);
    CHECK(w->block_hashes.size() == 1);  // 9 positions, 6 not scratch: one full block
    w->drop_scratch();
    CHECK(w->num_tokens() == 6 && w->num_computed_tokens == 6 && w->num_scratch == 0);
    CHECK(w->embed_digests.size() == 2);
    CHECK(throws<std::out_of_range>([&] { w->truncate(7); }));
    check_refs(m, {a.get(), w.get()});
    m.free(*a);
    m.free(*w);
    check_refs(m, {});
}

void test_collisions_and_eviction() {
    BlockManager c(8, 4, true, 0);  // every block hashes to 0: every lookup collides
    auto a = stream({1, 2, 3, 4, 5});
    compute_all(c, *a);
    CHECK(c.find_cached_prefix(*stream({7, 7, 7, 7, 5})).empty());
    CHECK(c.find_cached_prefix(*stream({1, 2, 3, 4, 5})).size() == 1);
    CHECK(c.find_cached_prefix(*stream({1, 2, 3, 4, 5}, 3)).empty());
    c.free(*a);

    BlockManager m(4, 4, true, 64);
    auto x = stream({0, 1, 2, 3, 4, 5, 6, 7, 8});  // 3 blocks, 2 full and registered
    compute_all(m, *x);
    const std::vector<int32_t> kept(x->block_table.begin(), x->block_table.begin() + 2);
    m.free(*x);
    // last block first: after the never-used block, the partial block is evicted before the cached ones
    CHECK((m.free_block_ids() == std::vector<int32_t>{3, 2, 1, 0}));
    auto y = stream({0, 1, 2, 3, 4, 5, 6, 7, 8});
    auto hits = m.find_cached_prefix(*y);
    CHECK(hits == kept);
    CHECK(m.num_free_blocks_needed(*y, 1, hits) == 3);  // 2 revived + 1 fresh
    m.allocate(*y, 1, hits);
    CHECK(m.num_free_blocks() == 1);
    m.free(*y);
    auto z = stream({100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115});
    compute_all(m, *z);  // the whole pool: every registration evicted
    CHECK(m.find_cached_prefix(*stream({0, 1, 2, 3, 4, 5, 6, 7, 8})).empty());
    m.free(*z);
    check_refs(m, {});
}

void test_admission_pins_hits_first() {
    // the first stream needs a new block, the second hits a freed cached block at the
    // free list's head: the hit is pinned before the new block is taken
    BlockManager m(3, 2, true, 64);
    StepCore core({&m});
    core.begin(100);
    auto a = stream({1, 2}, 1), c = stream({7, 7, 7, 7}, 2);
    CHECK(core.admit({a.get()}) && core.admit({c.get()}));
    core.postprocess();
    core.remove_running(1);
    core.remove_running(0);
    m.free(*a);
    m.free(*c);
    CHECK((m.free_block_ids() == std::vector<int32_t>{0, 2, 1}));
    core.begin(100);
    auto s1 = stream({5}, 3), s2 = stream({1, 2, 3}, 1);
    CHECK(core.admit({s1.get(), s2.get()}));
    CHECK(s2->block_table.size() == 2 && s2->block_table[0] == 0 && s2->num_cached_tokens == 2);
    CHECK(s1->block_table.size() == 1 && s1->block_table[0] != 0);
    CHECK(core.running().size() == 1 && core.chunks().size() == 2 && core.budget() == 100 - 1 - 1);
    CHECK(core.chunks()[1].start == 2 && core.chunks()[1].num_tokens == 1);
    check_refs(m, {s1.get(), s2.get()});
    // refused: nothing changes
    auto big = stream({9, 9, 9, 9, 9});
    const int64_t budget = core.budget();
    CHECK(!core.admit({big.get()}));
    CHECK(big->block_table.empty() && core.running().size() == 1 && core.budget() == budget);
    // an error (a digest missing) before any block is taken: nothing changes either
    auto bad = stream({1, kEmbed, 3, 4});
    CHECK(throws<std::out_of_range>([&] { core.admit({big.get(), bad.get()}); }));
    CHECK(core.running().size() == 1 && m.num_free_blocks() == 0);
    m.free(*s1);
    m.free(*s2);
    check_refs(m, {});
}

void test_schedule_running_and_postprocess() {
    BlockManager m(6, 2, true, 64);
    StepCore core({&m});
    core.begin(100);
    auto a = stream({1, 2, 3}), b = stream({4, 5, 6});
    CHECK(core.admit({a.get()}) && core.admit({b.get()}));
    core.postprocess();
    CHECK(a->num_computed_tokens == 3 && a->block_hashes.size() == 1);
    a->append_token(7);
    b->append_token(8);
    b->due = false;                         // b waits this step
    core.begin(100);
    auto r = core.schedule_running(0);
    CHECK(r.first == 2 && !r.second && core.chunks().size() == 1 && core.chunks()[0].seq == 0);
    core.postprocess();
    CHECK(a->num_computed_tokens == 4 && a->block_hashes.size() == 2);
    b->due = true;
    a->append_token(9);
    // the budget stops the loop; the index says where
    core.begin(1);
    r = core.schedule_running(0);
    CHECK(r.first == 1 && !r.second && core.budget() == 0 && a->block_table.size() == 3);
    // out of blocks: the failing sequence's index, and its blocks untouched
    for (int i = 0; i < 8; ++i) a->append_token(i);
    core.begin(100);
    r = core.schedule_running(0);
    CHECK(r.second && r.first == 0 && a->block_table.size() == 3 && core.chunks().empty());
    CHECK(throws<std::out_of_range>([&] { core.remove_running(2); }));
    for (StreamCore* s : {a.get(), b.get()}) m.free(*s);
    core.remove_running(0);
    core.remove_running(0);
    check_refs(m, {});
}

void test_assemble() {
    // input_batch.py's example, block_size 4: chunk A = position 6 of a stream with
    // blocks [5, 2], chunk B = positions 0..2 of a stream with blocks [7]
    BlockManager m(8, 4, false, 64);
    auto a = stream({10, 11, 12, 13, 14, 15, 16}), b = stream({20, kEmbed, 22});
    a->block_table = {5, 2};
    a->adapter_id = 1;
    b->block_table = {7};
    StepCore core({&m});
    core.begin(100);
    core.add_chunk(-1, a.get(), 6, 1);
    core.add_chunk(-1, b.get(), 0, 3);
    std::vector<int64_t> ids(4), pos(4), slots(4), adapters(4), cu(3), ctx(2), last(2), tables(4);
    InputBuffers buf{ids.data(), pos.data(), slots.data(), adapters.data(), 4, cu.data(), ctx.data(),
                     last.data(), 2, tables.data(), 4};
    AssembleResult res = core.assemble(-1, 4, buf);
    CHECK(res.fits && res.num_rows == 4 && res.num_chunks == 2 && res.max_blocks == 2);
    CHECK((ids == std::vector<int64_t>{16, 20, kEmbed, 22}));
    CHECK((pos == std::vector<int64_t>{6, 0, 1, 2}));
    CHECK((slots == std::vector<int64_t>{2 * 4 + 2, 7 * 4 + 0, 7 * 4 + 1, 7 * 4 + 2}));
    CHECK((adapters == std::vector<int64_t>{1, -1, -1, -1}));
    CHECK((cu == std::vector<int64_t>{0, 1, 4}) && (ctx == std::vector<int64_t>{7, 3}));
    CHECK((last == std::vector<int64_t>{0, 3}) && (tables == std::vector<int64_t>{5, 2, 7, -1}));
    CHECK(res.max_seqlen_q == 3 && res.max_seqlen_k == 7 && res.has_embeds && res.has_adapters);
    // too small: the sizes it needs, nothing written
    InputBuffers small = buf;
    small.max_rows = 3;
    res = core.assemble(-1, 4, small);
    CHECK(!res.fits && res.num_rows == 4);
    // one pool only
    b->pool_index = 1;
    res = core.assemble(0, 4, buf);
    CHECK(res.fits && res.num_rows == 1 && res.num_chunks == 1 && !res.has_embeds);
    // a chunk without blocks is refused, and so is one beyond the positions
    a->block_table = {5};
    CHECK(throws<std::out_of_range>([&] { core.assemble(-1, 4, buf); }));
    CHECK(throws<std::out_of_range>([&] { core.add_chunk(-1, b.get(), 2, 2); }));
    a->block_table.clear();
    b->block_table.clear();
}

// A seeded random run over two pools: sequences of 1-3 streams are admitted, catch
// up (with preemption of the most recently admitted sequence when blocks run out),
// grow, switch streams on and off, add and drop scratch positions and finish, as the
// Python scheduler drives it; invariants after every step, every block free at the end.
void random_run(uint64_t seed) {
    std::mt19937_64 rng(seed);
    auto pick = [&](int64_t n) { return (int64_t)(rng() % (uint64_t)n); };
    const int64_t block_size = 1 + pick(4);
    const bool prefix = pick(4) != 0;
    const int hash_bits = pick(3) == 0 ? 2 : 64;
    BlockManager m0(4 + pick(28), block_size, prefix, hash_bits), m1(4 + pick(28), block_size, prefix, hash_bits);
    std::vector<BlockManager*> managers{&m0, &m1};
    StepCore core(managers);
    const std::string digests[2] = {std::string(32, 'a'), std::string(32, 'b')};

    std::vector<std::vector<std::unique_ptr<StreamCore>>> seqs;  // owned here
    std::vector<size_t> waiting, running;                          // indices into seqs
    auto streams_of = [&](size_t q) {
        SeqStreams out;
        for (auto& s : seqs[q]) out.push_back(s.get());
        return out;
    };
    auto append_random = [&](StreamCore& s, int64_t n) {
        for (int64_t i = 0; i < n; ++i) {
            if (pick(6) == 0) s.append_embed(&digests[pick(2)]);
            else s.append_token(pick(3));
        }
    };
    auto free_seq = [&](size_t q) {
        for (auto& s : seqs[q]) managers[s->pool_index]->free(*s);
    };
    auto check = [&] {
        for (BlockManager* m : managers) {
            std::vector<const StreamCore*> all;
            for (auto& q : seqs)
                for (auto& s : q)
                    if (managers[s->pool_index] == m) all.push_back(s.get());
            check_refs(*m, all);
        }
        CHECK(core.running().size() == running.size());
        for (size_t k = 0; k < running.size(); ++k) CHECK(core.running()[k] == streams_of(running[k]));
        for (size_t q : waiting)
            for (auto& s : seqs[q]) CHECK(s->block_table.empty() && s->num_computed_tokens == 0);
    };

    for (int step = 0; step < 150; ++step) {
        const int64_t op = pick(10);
        if (op < 3) {  // a new request, sometimes a copy of an earlier one (prefix hits)
            std::vector<std::unique_ptr<StreamCore>> q;
            const int64_t n = 1 + pick(3);
            const bool copy = !seqs.empty() && pick(2) == 0;
            const size_t src = copy ? (size_t)pick((int64_t)seqs.size()) : 0;
            for (int64_t k = 0; k < n; ++k) {
                auto s = std::make_unique<StreamCore>();
                s->name = "S" + std::to_string(k);
                s->pool_index = pick(2);
                s->salt_id = pick(2);
                if (copy && (size_t)k < seqs[src].size()) {
                    const StreamCore& o = *seqs[src][k];
                    for (int64_t p = 0; p < o.num_tokens() - o.num_scratch; ++p) {
                        if (o.token_ids[p] == kEmbed) s->append_embed(&o.embed_digests.at(p));
                        else s->append_token(o.token_ids[p]);
                    }
                    s->pool_index = o.pool_index;
                    s->salt_id = o.salt_id;
                }
                append_random(*s, 1 + pick(12));
                q.push_back(std::move(s));
            }
            seqs.push_back(std::move(q));
            waiting.push_back(seqs.size() - 1);
        } else if (op < 7) {  // a step: Scheduler.schedule's order, then the forward's postprocess
            core.begin(1 + pick(24));
            int64_t i = 0;
            bool preempted = false;
            for (;;) {
                auto r = core.schedule_running(i);
                i = r.first;
                if (!r.second) break;
                const size_t seq = running[i], victim = running.back();
                running.pop_back();
                core.remove_running((int64_t)running.size());
                free_seq(victim);
                ++g_stats.preempted;
                waiting.insert(waiting.begin(), victim);
                preempted = true;
                if (victim == seq) break;
            }
            while (!preempted && !waiting.empty() && core.budget() > 0 && running.size() < 6) {
                if (!core.admit(streams_of(waiting.front()))) break;
                ++g_stats.admitted;
                for (auto& s : seqs[waiting.front()]) g_stats.with_hits += s->num_cached_tokens > 0;
                running.push_back(waiting.front());
                waiting.erase(waiting.begin());
            }
            int64_t rows = 0;
            for (const Chunk& c : core.chunks()) rows += c.num_tokens;
            g_stats.chunks += (int64_t)core.chunks().size();
            std::vector<int64_t> ids(rows), pos(rows), slots(rows), adapters(rows);
            const int64_t nc = (int64_t)core.chunks().size();
            std::vector<int64_t> cu(nc + 1), ctx(nc), last(nc), tables(nc * 64 + 1);
            InputBuffers buf{ids.data(), pos.data(), slots.data(), adapters.data(), rows, cu.data(), ctx.data(),
                             last.data(), nc, tables.data(), nc * 64 + 1};
            AssembleResult res = core.assemble(-1, block_size, buf);
            if (res.fits) {
                CHECK(res.num_rows == rows && (nc == 0 || cu[nc] == rows));
                for (int64_t r = 0; r < rows; ++r) CHECK(slots[r] >= 0 && slots[r] < 32 * block_size);
            }
            core.postprocess();
        } else if (op == 7 && !running.empty()) {  // grow, or scratch on / off
            auto& s = *seqs[running[pick((int64_t)running.size())]][0];
            if (s.num_scratch) {
                s.drop_scratch();
            } else if (pick(3) == 0 && s.num_pending_tokens() == 0) {
                s.num_scratch = 1 + pick(3);
                for (int64_t k = 0; k < s.num_scratch; ++k) s.append_embed(nullptr);
            } else {
                append_random(s, 1 + pick(3));
            }
        } else if (op == 8 && !seqs.empty()) {  // switch a stream on or off
            auto& q = seqs[pick((int64_t)seqs.size())];
            StreamCore& s = *q[pick((int64_t)q.size())];
            s.due = !s.due;
        } else if (op == 9 && !running.empty()) {  // finish
            const int64_t k = pick((int64_t)running.size());
            free_seq(running[k]);
            core.remove_running(k);
            running.erase(running.begin() + k);
        }
        check();
    }
    for (size_t q : running) free_seq(q);
    while (!core.running().empty()) core.remove_running(0);
    running.clear();
    check();
    for (BlockManager* m : managers) CHECK(m->num_free_blocks() == m->num_blocks());
}

}  // namespace

int main() {
    test_allocate_and_free();
    test_refused_allocation_changes_nothing();
    test_prefix_hits_and_salts();
    test_embedding_digests();
    test_collisions_and_eviction();
    test_admission_pins_hits_first();
    test_schedule_running_and_postprocess();
    test_assemble();
    for (uint64_t seed = 0; seed < 200; ++seed) random_run(seed);
    if (g_failures) {
        std::fprintf(stderr, "%d check(s) failed\n", g_failures);
        return 1;
    }
    std::printf("test_runtime: all checks passed (random runs: %lld admissions, %lld streams with prefix hits, "
                "%lld preemptions, %lld chunks)\n", (long long)g_stats.admitted, (long long)g_stats.with_hits,
                (long long)g_stats.preempted, (long long)g_stats.chunks);
    return 0;
}
