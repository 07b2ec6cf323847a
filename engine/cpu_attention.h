// Paged attention on the CPU, straight from the KV blocks: decode rows and
// multi-row chunks of any lengths in one call, no gather into a padded batch
// (the torch backend's attention on CPU; layers/backend.py calls it).
//
// Layout (vLLM's / flash-attn's words, as kernels/paged_attention.py):
//   q, out        [num_rows, num_heads, head_dim]        contiguous
//   k/v caches    [num_blocks, block_size, num_kv_heads, head_dim]   contiguous
//   cu_seqlens_q  [num_chunks + 1]  chunk b's rows are [cu[b], cu[b+1])
//   context_lens  [num_chunks]      keys chunk b sees (its own rows included: their
//                                   K/V are stored first); its rows sit at the END
//   block_tables  [num_chunks, max_blocks]  -1 padded
//   k, v          [num_store_rows, num_kv_heads, head_dim]  optional: written to the
//                 caches at slot_mapping (-1: skipped) before anything is read
// Query row i of chunk b is at position context_lens[b] - q_len + i and attends to
// keys 0..that position (causal). Scores and the softmax accumulate in float for
// float32 / bfloat16 and in double for float64. Plain C++17 + OpenMP; the hot
// loops are compiled for AVX-512, AVX2 and a baseline, picked at run time.
#pragma once

#include <cstdint>

namespace memgen {

enum class AttnDtype : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2 };

struct PagedAttentionArgs {
    // this forward's K/V rows [num_rows, num_kv_heads, head_dim], stored into their
    // slots (slot_mapping, -1: skip) before attending; k == nullptr: already stored
    const void* k;
    const void* v;
    const int64_t* slot_mapping;
    int64_t num_store_rows;
    const void* q;
    const void* k_cache;
    const void* v_cache;
    void* out;
    const int64_t* cu_seqlens_q;
    const int64_t* context_lens;
    const int64_t* block_tables;
    int64_t num_chunks, max_blocks;
    int64_t num_heads, num_kv_heads, head_dim, block_size, num_blocks;
    double scale;
    AttnDtype dtype;
    int num_threads;
    // Row strides (elements) of q and of k / v, whose heads are contiguous within a
    // row: views of a packed QKV projection need no copy. 0: contiguous rows.
    int64_t q_row_stride = 0;
    int64_t kv_row_stride = 0;
    // Rotary embedding applied to q and k here (float32 or bfloat16 rows; cos and sin
    // float32, per row [num_rows, head_dim] contiguous), HF's rotate_half form
    // (x*cos + rot(x)*sin), in float: a bfloat16 k is rounded once as it is stored, a
    // bfloat16 q not at all. null: q and k arrive rotated.
    const void* rope_cos = nullptr;
    const void* rope_sin = nullptr;
};

// Throws std::invalid_argument on inconsistent sizes or a block id out of range.
void paged_attention_cpu(const PagedAttentionArgs& args);

}  // namespace memgen
