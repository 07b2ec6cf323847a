// See runtime.h. Semantics follow the plain-Python model in tests/oracle.py,
// which the property-based tests compare this file against step by step;
// engine/test_runtime.cpp checks it alone (no Python) under ASan and UBSan.
#include "runtime.h"

#include <algorithm>
#include <cstring>

namespace memgen {

// ---- streams -------------------------------------------------------------------
void StreamCore::append_embed(const std::string* digest) {
    if (digest) embed_digests[num_tokens()] = *digest;
    token_ids.push_back(kEmbed);
}

void StreamCore::truncate(int64_t n) {
    if (n < 0 || n > num_tokens())
        throw std::out_of_range("stream " + name + ": cannot truncate " + std::to_string(num_tokens()) +
                                " positions to " + std::to_string(n));
    for (int64_t pos = n; pos < num_tokens(); ++pos)
        if (token_ids[pos] == kEmbed) embed_digests.erase(pos);
    token_ids.resize(n);
}

void StreamCore::drop_scratch() {
    truncate(num_tokens() - num_scratch);
    num_computed_tokens = std::min(num_computed_tokens, num_tokens());
    num_scratch = 0;
}

void StreamCore::reset() {
    block_table.clear();
    block_hashes.clear();
    num_computed_tokens = num_cached_tokens = 0;
}

// ---- block keys ------------------------------------------------------------------
// The hash is defined word by word so that tests/oracle.py can compute the same
// value (hash_bits < 64 truncates it, which the tests use to force collisions).
static inline uint64_t mix(uint64_t h, uint64_t x) { return h ^ (x + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2)); }

static inline uint64_t finalize(uint64_t z) {  // splitmix64's finalizer
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

uint64_t hash_key(const BlockKey& key, uint64_t mask) {
    uint64_t h = 0x6d656d67656eULL;  // "memgen"
    h = mix(h, key.has_parent);
    h = mix(h, key.parent);
    h = mix(h, (uint64_t)key.salt);
    h = mix(h, key.tokens.size());
    for (int64_t t : key.tokens) h = mix(h, (uint64_t)t);
    h = mix(h, key.extra.size());
    for (size_t i = 0; i < key.extra.size(); i += 8) {
        uint64_t w = 0;
        std::memcpy(&w, key.extra.data() + i, std::min<size_t>(8, key.extra.size() - i));  // little-endian
        h = mix(h, w);
    }
    return finalize(h) & mask;
}

// ---- block manager -----------------------------------------------------------------
BlockManager::BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching, int hash_bits)
    : block_size_(block_size), prefix_caching_(enable_prefix_caching) {
    if (num_blocks < 0 || num_blocks > INT32_MAX)
        throw std::invalid_argument("num_blocks must be in [0, 2**31), got " + std::to_string(num_blocks));
    if (block_size < 1) throw std::invalid_argument("block_size must be >= 1, got " + std::to_string(block_size));
    if (hash_bits < 0 || hash_bits > 64)
        throw std::invalid_argument("hash_bits must be in [0, 64], got " + std::to_string(hash_bits));
    hash_mask_ = hash_bits == 64 ? ~0ULL : ((1ULL << hash_bits) - 1);
    blocks_.resize(num_blocks);
    for (int32_t i = 0; i < (int32_t)num_blocks; ++i) push_free(i);
}

int64_t BlockManager::check_id(int64_t block_id) const {
    if (block_id < 0 || block_id >= num_blocks())
        throw std::out_of_range("block id " + std::to_string(block_id) + " is not in [0, " +
                                std::to_string(num_blocks()) + ")");
    return block_id;
}

void BlockManager::push_free(int32_t id) {
    Block& b = blocks_[id];
    b.is_free = true;
    b.prev = tail_;
    b.next = -1;
    if (tail_ >= 0) blocks_[tail_].next = id; else head_ = id;
    tail_ = id;
    ++num_free_;
}

void BlockManager::unlink_free(int32_t id) {
    Block& b = blocks_[id];
    if (b.prev >= 0) blocks_[b.prev].next = b.next; else head_ = b.next;
    if (b.next >= 0) blocks_[b.next].prev = b.prev; else tail_ = b.prev;
    b.prev = b.next = -1;
    b.is_free = false;
    --num_free_;
}

int32_t BlockManager::take_free_block() {
    if (head_ < 0) throw std::runtime_error("KV cache out of blocks: the scheduler must check can_allocate first");
    int32_t id = head_;
    unlink_free(id);
    Block& b = blocks_[id];
    if (b.has_hash) {  // evict its registration
        auto it = hash_to_block_.find(b.hash);
        if (it != hash_to_block_.end() && it->second == id) hash_to_block_.erase(it);
        b.has_hash = false;
        b.key = BlockKey();
    }
    b.ref_count = 1;
    return id;
}

void BlockManager::make_key(const StreamCore& s, int64_t index, const uint64_t* parent, BlockKey& key) const {
    const int64_t start = index * block_size_;
    if (start + block_size_ > s.num_tokens())
        throw std::out_of_range("stream " + s.name + ": block " + std::to_string(index) + " is not full");
    key.has_parent = parent != nullptr;
    key.parent = parent ? *parent : 0;
    key.salt = s.salt_id;
    key.tokens.resize(block_size_);
    key.extra.clear();
    for (int64_t i = 0; i < block_size_; ++i) {
        const int64_t t = s.token_ids[start + i];
        key.tokens[i] = t;
        if (t != kEmbed) continue;
        auto digest = s.embed_digests.find(start + i);
        if (digest == s.embed_digests.end())
            throw std::out_of_range("stream " + s.name + ": embedding position " + std::to_string(start + i) +
                                    " has no digest");
        key.extra += digest->second;
    }
}

std::vector<int32_t> BlockManager::find_cached_prefix(const StreamCore& s) const {
    // The last position is never covered: it must be computed to produce the next logits.
    std::vector<int32_t> hits;
    if (!prefix_caching_) return hits;
    const int64_t num_tokens = s.num_tokens() - s.num_scratch;
    if (num_tokens <= 0) return hits;
    BlockKey key;
    uint64_t parent = 0;
    for (int64_t index = 0; index < (num_tokens - 1) / block_size_; ++index) {
        make_key(s, index, index ? &parent : nullptr, key);
        const uint64_t h = hash_key(key, hash_mask_);
        auto it = hash_to_block_.find(h);
        if (it == hash_to_block_.end() || !(blocks_[it->second].key == key)) break;  // miss or collision
        hits.push_back(it->second);
        parent = h;
    }
    return hits;
}

void BlockManager::cache_full_blocks(StreamCore& s) {
    if (!prefix_caching_) return;
    // scratch positions (weaver queries) are overwritten later: never register them
    const int64_t num_full = std::min(s.num_computed_tokens, s.num_tokens() - s.num_scratch) / block_size_;
    if (num_full > (int64_t)s.block_table.size())
        throw std::logic_error("stream " + s.name + ": computed positions beyond its block table");
    BlockKey key;
    for (int64_t index = (int64_t)s.block_hashes.size(); index < num_full; ++index) {
        const uint64_t* parent = s.block_hashes.empty() ? nullptr : &s.block_hashes.back();
        make_key(s, index, parent, key);
        const uint64_t h = hash_key(key, hash_mask_);
        const int32_t id = s.block_table[index];
        Block& b = blocks_[id];
        if (!b.has_hash) {
            b.has_hash = true;
            b.hash = h;
            b.key = key;
            hash_to_block_.emplace(h, id);  // keeps an earlier block with this hash
        }
        s.block_hashes.push_back(h);
    }
}

int64_t BlockManager::num_free_blocks_needed(const StreamCore& s, int64_t num_new,
                                             const std::vector<int32_t>& hits) const {
    const int64_t have = hits.empty() ? (int64_t)s.block_table.size() : (int64_t)hits.size();
    const int64_t computed = hits.empty() ? s.num_computed_tokens : (int64_t)hits.size() * block_size_;
    int64_t needed = std::max<int64_t>(0, blocks_for(computed + num_new) - have);
    for (int32_t id : hits) needed += blocks_[check_id(id)].ref_count == 0;
    return needed;
}

void BlockManager::allocate(StreamCore& s, int64_t num_new, const std::vector<int32_t>& hits) {
    // Checked first, so that a refused allocation changes nothing.
    if (num_new < 0) throw std::invalid_argument("num_new_tokens must be >= 0");
    if (!hits.empty() && !s.block_table.empty())
        throw std::runtime_error("prefix hits can only start an empty stream");
    for (int32_t id : hits)
        if (!blocks_[check_id(id)].has_hash) throw std::runtime_error("prefix hit on a block that is not cached");
    if (num_free_blocks_needed(s, num_new, hits) > num_free_)
        throw std::runtime_error("KV cache out of blocks: the scheduler must check can_allocate first");
    for (int32_t id : hits) {
        Block& b = blocks_[id];
        if (b.ref_count == 0) unlink_free(id);
        ++b.ref_count;
        s.block_table.push_back(id);
        s.block_hashes.push_back(b.hash);
    }
    if (!hits.empty()) s.num_computed_tokens = s.num_cached_tokens = (int64_t)hits.size() * block_size_;
    const int64_t needed = blocks_for(s.num_computed_tokens + num_new) - (int64_t)s.block_table.size();
    for (int64_t i = 0; i < needed; ++i) s.block_table.push_back(take_free_block());
}

bool BlockManager::extend(StreamCore& s, int64_t num_new) {
    const int64_t needed = blocks_for(s.num_computed_tokens + num_new) - (int64_t)s.block_table.size();
    if (needed > num_free_) return false;
    for (int64_t i = 0; i < needed; ++i) s.block_table.push_back(take_free_block());
    return true;
}

void BlockManager::free(StreamCore& s) {
    for (int32_t id : s.block_table)
        if (blocks_[check_id(id)].ref_count <= 0)
            throw std::logic_error("stream " + s.name + ": freeing block " + std::to_string(id) + " twice");
    // last block first, so that it is evicted first
    for (auto it = s.block_table.rbegin(); it != s.block_table.rend(); ++it)
        if (--blocks_[*it].ref_count == 0) push_free(*it);
    s.reset();
}

bool BlockManager::block_hash(int64_t block_id, uint64_t* out) const {
    const Block& b = blocks_.at(check_id(block_id));
    *out = b.hash;
    return b.has_hash;
}

std::vector<int32_t> BlockManager::free_block_ids() const {
    std::vector<int32_t> ids;
    ids.reserve(num_free_);
    for (int32_t id = head_; id >= 0; id = blocks_[id].next) ids.push_back(id);
    return ids;
}

std::vector<std::pair<uint64_t, int32_t>> BlockManager::cached_blocks() const {
    std::vector<std::pair<uint64_t, int32_t>> out(hash_to_block_.begin(), hash_to_block_.end());
    std::sort(out.begin(), out.end());
    return out;
}

void BlockManager::check_invariants() const {
    int64_t walked = 0;
    int32_t prev = -1;
    for (int32_t id = head_; id >= 0; id = blocks_[id].next) {
        const Block& b = blocks_[id];
        if (!b.is_free || b.ref_count != 0 || b.prev != prev)
            throw std::logic_error("free list entry " + std::to_string(id) + " is inconsistent");
        if (++walked > num_blocks()) throw std::logic_error("free list has a cycle");
        prev = id;
    }
    if (walked != num_free_ || prev != tail_) throw std::logic_error("free list length or tail is wrong");
    for (int64_t id = 0; id < num_blocks(); ++id) {
        const Block& b = blocks_[id];
        if (b.ref_count < 0 || (b.ref_count == 0) != b.is_free)
            throw std::logic_error("block " + std::to_string(id) + " is both free and used, or neither");
    }
    for (const auto& [h, id] : hash_to_block_) {
        const Block& b = blocks_[id];
        if (!b.has_hash || b.hash != h) throw std::logic_error("hash table entry points at a stale block");
    }
}

// ---- one step ----------------------------------------------------------------------
BlockManager& StepCore::manager(const StreamCore& s) const {
    if (s.pool_index < 0 || s.pool_index >= (int64_t)managers_.size())
        throw std::out_of_range("stream " + s.name + ": pool index " + std::to_string(s.pool_index) +
                                " has no block manager");
    return *managers_[s.pool_index];
}

void StepCore::add_chunk(int64_t seq, StreamCore* stream, int64_t start, int64_t num_tokens) {
    if (start < 0 || num_tokens <= 0 || start + num_tokens > stream->num_tokens())
        throw std::out_of_range("stream " + stream->name + ": chunk [" + std::to_string(start) + ", " +
                                std::to_string(start + num_tokens) + ") is not within its " +
                                std::to_string(stream->num_tokens()) + " positions");
    chunks_.push_back({seq, stream, start, num_tokens});
    budget_ -= num_tokens;
}

bool StepCore::admit(SeqStreams streams) {
    struct Plan { StreamCore* s; int64_t n; std::vector<int32_t> hits; };
    std::vector<Plan> plan;
    std::vector<int64_t> needed(managers_.size(), 0);   // free blocks per pool
    int64_t budget = budget_;
    for (StreamCore* s : streams) {
        if (!s->due) continue;
        BlockManager& m = manager(*s);
        std::vector<int32_t> hits;
        if (s->block_table.empty()) hits = m.find_cached_prefix(*s);
        const int64_t computed = hits.empty() ? s->num_computed_tokens : (int64_t)hits.size() * m.block_size();
        const int64_t n = std::min(s->num_tokens() - computed, budget);
        if (n <= 0) continue;
        needed[s->pool_index] += m.num_free_blocks_needed(*s, n, hits);
        plan.push_back({s, n, std::move(hits)});
        budget -= n;
    }
    if (plan.empty()) return false;
    for (size_t p = 0; p < managers_.size(); ++p)
        if (managers_[p]->num_free_blocks() < needed[p]) return false;
    try {
        for (Plan& p : plan)
            if (!p.hits.empty()) manager(*p.s).allocate(*p.s, 0, p.hits);
        for (Plan& p : plan) manager(*p.s).allocate(*p.s, p.n, {});
    } catch (...) {
        for (StreamCore* s : streams) manager(*s).free(*s);   // the streams not reached hold nothing
        throw;
    }
    const int64_t seq = (int64_t)running_.size();
    running_.push_back(std::move(streams));
    for (Plan& p : plan) {
        manager(*p.s).record_admission(*p.s);
        add_chunk(seq, p.s, p.s->num_computed_tokens, p.n);
    }
    return true;
}

std::pair<int64_t, bool> StepCore::schedule_running(int64_t start) {
    if (start < 0) throw std::out_of_range("schedule_running: start must be >= 0");
    struct Pending { StreamCore* s; int64_t start, n; };
    std::vector<Pending> pending;
    int64_t i = start;
    for (; i < (int64_t)running_.size() && budget_ > 0; ++i) {
        pending.clear();
        int64_t left = budget_;
        for (StreamCore* s : running_[i]) {
            if (!s->due) continue;
            const int64_t n = std::min(s->num_pending_tokens(), left);
            if (n <= 0) continue;
            if (!manager(*s).extend(*s, n)) return {i, true};
            pending.push_back({s, s->num_computed_tokens, n});
            left -= n;
        }
        for (const Pending& p : pending) add_chunk(i, p.s, p.start, p.n);
    }
    return {i, false};
}

void StepCore::remove_running(int64_t index) {
    if (index < 0 || index >= (int64_t)running_.size())
        throw std::out_of_range("running sequence " + std::to_string(index) + " is not in [0, " +
                                std::to_string(running_.size()) + ")");
    running_.erase(running_.begin() + index);
}

void StepCore::postprocess() {
    for (Chunk& c : chunks_) {
        StreamCore& s = *c.stream;
        s.num_computed_tokens = c.start + c.num_tokens;
        // most decode steps complete no block: skip the call
        if (s.num_computed_tokens / manager(s).block_size() > (int64_t)s.block_hashes.size())
            manager(s).cache_full_blocks(s);
    }
}

AssembleResult StepCore::assemble(int64_t pool_index, int64_t block_size, const InputBuffers& buf) const {
    AssembleResult r;
    for (const Chunk& c : chunks_) {
        if (pool_index >= 0 && c.stream->pool_index != pool_index) continue;
        ++r.num_chunks;
        r.num_rows += c.num_tokens;
        r.max_blocks = std::max<int64_t>(r.max_blocks, c.stream->block_table.size());
    }
    if (r.num_rows > buf.max_rows || r.num_chunks > buf.max_chunks || r.num_chunks * r.max_blocks > buf.max_table) {
        r.fits = false;
        return r;
    }
    int64_t row = 0, b = 0;
    buf.cu_seqlens_q[0] = 0;
    for (const Chunk& c : chunks_) {
        const StreamCore& s = *c.stream;
        if (pool_index >= 0 && s.pool_index != pool_index) continue;
        const int64_t end = c.start + c.num_tokens;
        const int64_t num_blocks = (int64_t)s.block_table.size();
        if (end > s.num_tokens() || (end + block_size - 1) / block_size > num_blocks)
            throw std::out_of_range("stream " + s.name + ": chunk [" + std::to_string(c.start) + ", " +
                                    std::to_string(end) + ") is not covered by its positions and blocks");
        for (int64_t pos = c.start; pos < end; ++pos, ++row) {
            const int64_t t = s.token_ids[pos];
            r.has_embeds |= t == kEmbed;
            buf.input_ids[row] = t;
            buf.positions[row] = pos;
            buf.slot_mapping[row] = (int64_t)s.block_table[pos / block_size] * block_size + pos % block_size;
            buf.adapter_ids[row] = s.adapter_id;
        }
        r.has_embeds |= s.projected;
        r.has_adapters |= s.adapter_id >= 0;
        buf.cu_seqlens_q[b + 1] = row;
        buf.last_rows[b] = row - 1;
        buf.context_lens[b] = end;
        int64_t* table = buf.block_tables + b * r.max_blocks;
        for (int64_t k = 0; k < r.max_blocks; ++k) table[k] = k < num_blocks ? s.block_table[k] : -1;
        r.max_seqlen_q = std::max(r.max_seqlen_q, c.num_tokens);
        r.max_seqlen_k = std::max(r.max_seqlen_k, end);
        ++b;
    }
    return r;
}

}  // namespace memgen
