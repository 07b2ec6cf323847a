// memgen's native host runtime: the paged KV cache's block allocator (reference
// counts, a free list that is also the eviction order, prefix caching by chained
// block hashes with a collision check) and the per-step work of the scheduler
// (admitting waiting sequences, catching running streams up under a token budget,
// batch assembly into preallocated buffers, marking chunks computed).
//
// Plain C++17: no Python here. Streams own their token ids and the digests of
// their embedding positions; the running sequences are lists of stream pointers
// registered with the StepCore at admission. engine/bindings.cpp is the only file
// that knows Python (it maps chunks back to Python objects). Errors throw std
// exceptions, which the bindings turn into Python exceptions.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace memgen {

constexpr int64_t kEmbed = -1;  // token_ids entry of an embedding-valued position

// One KV stream of a sequence (Python: memgen.engine.sequence.Stream subclasses it).
struct StreamCore {
    std::string name;
    std::vector<int64_t> token_ids;                       // kEmbed at embedding positions
    std::unordered_map<int64_t, std::string> embed_digests;  // embedding position -> digest (prefix-cache key)
    std::vector<int32_t> block_table;
    std::vector<uint64_t> block_hashes;  // hashes of its cached full blocks
    int64_t num_computed_tokens = 0;
    int64_t num_cached_tokens = 0;
    int64_t num_scratch = 0;     // trailing positions computed but never cached
    int64_t adapter_id = -1;
    int64_t pool_index = 0;      // which block manager / KV pool
    int64_t salt_id = 0;         // interned cache salt (part of prefix-cache keys)
    bool due = true;             // may the scheduler compute this stream now
    bool projected = false;      // token rows enter as projected embeddings (weaver)

    StreamCore() = default;
    StreamCore(const StreamCore&) = delete;             // the scheduler holds pointers to streams
    StreamCore& operator=(const StreamCore&) = delete;

    int64_t num_tokens() const { return (int64_t)token_ids.size(); }
    int64_t num_pending_tokens() const { return num_tokens() - num_computed_tokens; }
    void append_token(int64_t token) { token_ids.push_back(token); }
    // An embedding-valued position; digest == nullptr: none (scratch positions are never cached).
    void append_embed(const std::string* digest);
    void truncate(int64_t num_tokens);   // drop positions >= num_tokens and their digests
    void drop_scratch();                 // cut the scratch positions off again
    void reset();                        // forget the cache (the blocks went back to the pool)
};

struct BlockKey {
    uint64_t parent = 0;
    bool has_parent = false;
    int64_t salt = 0;
    std::vector<int64_t> tokens;
    std::string extra;  // digests of the block's embedding positions, in order
    bool operator==(const BlockKey& o) const {
        return has_parent == o.has_parent && parent == o.parent && salt == o.salt && tokens == o.tokens &&
               extra == o.extra;
    }
};

uint64_t hash_key(const BlockKey& key, uint64_t mask);

class BlockManager {
public:
    BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching, int hash_bits);

    int64_t num_blocks() const { return (int64_t)blocks_.size(); }
    int64_t block_size() const { return block_size_; }
    bool enable_prefix_caching() const { return prefix_caching_; }
    int64_t num_free_blocks() const { return num_free_; }
    int64_t blocks_for(int64_t num_tokens) const { return (num_tokens + block_size_ - 1) / block_size_; }

    std::vector<int32_t> find_cached_prefix(const StreamCore& s) const;
    void cache_full_blocks(StreamCore& s);
    int64_t num_free_blocks_needed(const StreamCore& s, int64_t num_new, const std::vector<int32_t>& hits) const;
    bool can_allocate(const StreamCore& s, int64_t num_new, const std::vector<int32_t>& hits) const {
        return num_free_blocks_needed(s, num_new, hits) <= num_free_;
    }
    void allocate(StreamCore& s, int64_t num_new, const std::vector<int32_t>& hits);
    // allocate() without prefix hits, as one step: false (nothing changed) when blocks run out
    bool extend(StreamCore& s, int64_t num_new);
    void free(StreamCore& s);
    void record_admission(const StreamCore& s) {
        num_prefix_query_tokens += s.num_tokens();
        num_prefix_hit_tokens += s.num_cached_tokens;
    }

    // introspection, for tests and invariant checks
    int32_t ref_count(int64_t block_id) const { return blocks_.at(check_id(block_id)).ref_count; }
    bool block_hash(int64_t block_id, uint64_t* out) const;
    std::vector<int32_t> free_block_ids() const;          // eviction order, oldest first
    std::vector<std::pair<uint64_t, int32_t>> cached_blocks() const;  // the hash table
    void check_invariants() const;                        // throws std::logic_error

    int64_t num_prefix_hit_tokens = 0;
    int64_t num_prefix_query_tokens = 0;

private:
    struct Block {
        int32_t ref_count = 0;
        int32_t prev = -1, next = -1;  // free list links
        bool is_free = false;
        bool has_hash = false;
        uint64_t hash = 0;
        BlockKey key;
    };
    int64_t check_id(int64_t block_id) const;
    void make_key(const StreamCore& s, int64_t index, const uint64_t* parent, BlockKey& key) const;
    void push_free(int32_t id);
    void unlink_free(int32_t id);
    int32_t take_free_block();

    int64_t block_size_;
    bool prefix_caching_;
    uint64_t hash_mask_;
    std::vector<Block> blocks_;
    int32_t head_ = -1, tail_ = -1;
    int64_t num_free_ = 0;
    std::unordered_map<uint64_t, int32_t> hash_to_block_;
};

// Positions [start, start + num_tokens) of one stream, computed in this step.
struct Chunk {
    int64_t seq;          // index of its sequence in StepCore::running() when it was made; -1: add_chunk
    StreamCore* stream;
    int64_t start;
    int64_t num_tokens;
};

// Sizes and flags of one assembled batch (or, with fits == false, the
// capacities the buffers need).
struct AssembleResult {
    bool fits = true;
    int64_t num_rows = 0, num_chunks = 0, max_blocks = 0;
    int64_t max_seqlen_q = 0, max_seqlen_k = 0;
    bool has_embeds = false, has_adapters = false;
};

// Preallocated int64 buffers (owned by the caller; pinned on CUDA).
struct InputBuffers {
    int64_t* input_ids; int64_t* positions; int64_t* slot_mapping; int64_t* adapter_ids;
    int64_t max_rows;
    int64_t* cu_seqlens_q; int64_t* context_lens; int64_t* last_rows;
    int64_t max_chunks;
    int64_t* block_tables;   // [num_chunks, max_blocks], row-major, -1 padded
    int64_t max_table;       // capacity in entries
};

// A sequence as the step sees it: its streams, in order (not owned: the caller
// keeps them alive while the sequence is registered).
using SeqStreams = std::vector<StreamCore*>;

// The running sequences (in admission order) and one step's chunks, and the work
// done on them.
class StepCore {
public:
    explicit StepCore(std::vector<BlockManager*> managers) : managers_(std::move(managers)) {}

    void begin(int64_t budget) { chunks_.clear(); budget_ = budget; ++step_; }
    int64_t budget() const { return budget_; }
    int64_t step() const { return step_; }
    const std::vector<Chunk>& chunks() const { return chunks_; }
    void add_chunk(int64_t seq, StreamCore* stream, int64_t start, int64_t num_tokens);

    // Admit a waiting sequence: blocks and chunks for its due streams, each from its
    // cached prefix on, under the step's budget. Atomic: every stream gets its blocks
    // (the sequence joins running()) or none does (false, nothing changed). Every
    // stream's prefix hits are pinned before any stream takes a free block (new blocks
    // come off the free list's head and would evict a hit counted on); if an error
    // interrupts it anyway, every stream of the sequence is freed and the error rethrown.
    bool admit(SeqStreams streams);
    // Catch running sequences up from index `start` on; returns the index where it
    // stopped and whether that sequence could not get blocks (the caller preempts and
    // calls again).
    std::pair<int64_t, bool> schedule_running(int64_t start);
    const std::vector<SeqStreams>& running() const { return running_; }
    void remove_running(int64_t index);   // finished, preempted or aborted (its blocks are the caller's)

    void postprocess();
    AssembleResult assemble(int64_t pool_index, int64_t block_size, const InputBuffers& buf) const;

private:
    BlockManager& manager(const StreamCore& s) const;
    std::vector<BlockManager*> managers_;
    std::vector<SeqStreams> running_;
    std::vector<Chunk> chunks_;
    int64_t budget_ = 0;
    int64_t step_ = 0;
};

}  // namespace memgen
