// See cpu_attention.h.
#include "cpu_attention.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace memgen {
namespace {

struct BF16 { uint16_t bits; };

inline float to_acc(BF16 x, float) {
    uint32_t u = uint32_t(x.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline float to_acc(float x, float) { return x; }
inline double to_acc(double x, double) { return x; }

inline void store(float* dst, float x) { *dst = x; }
inline void store(double* dst, double x) { *dst = x; }
inline void store(BF16* dst, float x) {  // round to nearest even, as torch does
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) { dst->bits = uint16_t((u >> 16) | 0x40); return; }  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    dst->bits = uint16_t(u >> 16);
}

// Up to kTile consecutive query rows of one chunk, and one KV head with its `group`
// query heads: two passes over the keys the rows see (scores, then the
// softmax-weighted sum of values), each key and value row read once for all of
// them (rows of a chunk see a growing prefix: row i stops at its own position).
// `scores` holds kTile * group * stride entries, `acc` kTile * group * head_dim.
constexpr int64_t kTile = 4;

template <typename T, typename Acc>
inline __attribute__((always_inline)) bool attend(const PagedAttentionArgs& a, int64_t row0, int64_t rows,
                                                  int64_t kv_head, int64_t chunk, int64_t stride, Acc* scores,
                                                  Acc* acc) {
    const int64_t D = a.head_dim, bs = a.block_size, group = a.num_heads / a.num_kv_heads;
    const int64_t q_len = a.cu_seqlens_q[chunk + 1] - a.cu_seqlens_q[chunk];
    const int64_t first = a.context_lens[chunk] - q_len + (row0 - a.cu_seqlens_q[chunk]);  // row0's position
    const int64_t last = first + rows - 1;
    const int64_t heads = rows * group;   // (row, head) pairs of this item, row-major
    const int64_t slot_stride = a.num_kv_heads * D;
    const T* k_cache = static_cast<const T*>(a.k_cache) + kv_head * D;
    const T* v_cache = static_cast<const T*>(a.v_cache) + kv_head * D;
    const int64_t* table = a.block_tables + chunk * a.max_blocks;
    const Acc scale = Acc(a.scale);
    auto q_of = [&](int64_t h) {   // pair h = (row0 + h / group, kv_head * group + h % group)
        return static_cast<const T*>(a.q) + ((row0 + h / group) * a.num_heads + kv_head * group + h % group) * D;
    };

    for (int64_t j = 0; j <= last; ++j) {
        const int64_t block = table[j / bs];
        if (block < 0 || block >= a.num_blocks) return false;
        const T* k = k_cache + (block * bs + j % bs) * slot_stride;
        // rows before position j do not see key j
        for (int64_t h = std::max<int64_t>(0, j - first) * group; h < heads; ++h) {
            const T* qh = q_of(h);
            Acc s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) s += to_acc(qh[d], Acc()) * to_acc(k[d], Acc());
            scores[h * stride + j] = s * scale;
        }
    }
    for (int64_t h = 0; h < heads; ++h) {
        const int64_t position = first + h / group;
        Acc* sh = scores + h * stride;
        Acc max_score = -std::numeric_limits<Acc>::infinity();
        for (int64_t j = 0; j <= position; ++j) max_score = std::max(max_score, sh[j]);
        Acc total = 0;
        for (int64_t j = 0; j <= position; ++j) {
            sh[j] = std::exp(sh[j] - max_score);
            total += sh[j];
        }
        const Acc inv = Acc(1) / total;
        for (int64_t j = 0; j <= position; ++j) sh[j] *= inv;
    }
    std::fill(acc, acc + heads * D, Acc(0));
    for (int64_t j = 0; j <= last; ++j) {
        const T* v = v_cache + (table[j / bs] * bs + j % bs) * slot_stride;
        for (int64_t h = std::max<int64_t>(0, j - first) * group; h < heads; ++h) {
            const Acc p = scores[h * stride + j];
            Acc* ah = acc + h * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ah[d] += p * to_acc(v[d], Acc());
        }
    }
    for (int64_t h = 0; h < heads; ++h) {
        T* out = static_cast<T*>(a.out) + ((row0 + h / group) * a.num_heads + kv_head * group + h % group) * D;
        for (int64_t d = 0; d < D; ++d) store(out + d, acc[h * D + d]);
    }
    return true;
}

// The per-item entry points, compiled for several instruction sets and picked at run
// time (never -march=native: the wheel must run on any x86-64).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define MEMGEN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MEMGEN_CLONES
#endif

MEMGEN_CLONES bool attend_f32(const PagedAttentionArgs& a, int64_t row0, int64_t rows, int64_t kv_head,
                              int64_t chunk, int64_t stride, float* s, float* acc) {
    return attend<float, float>(a, row0, rows, kv_head, chunk, stride, s, acc);
}
MEMGEN_CLONES bool attend_f64(const PagedAttentionArgs& a, int64_t row0, int64_t rows, int64_t kv_head,
                              int64_t chunk, int64_t stride, double* s, double* acc) {
    return attend<double, double>(a, row0, rows, kv_head, chunk, stride, s, acc);
}
MEMGEN_CLONES bool attend_bf16(const PagedAttentionArgs& a, int64_t row0, int64_t rows, int64_t kv_head,
                               int64_t chunk, int64_t stride, float* s, float* acc) {
    return attend<BF16, float>(a, row0, rows, kv_head, chunk, stride, s, acc);
}

// Below this many multiply-adds per thread a step's attention runs on one thread: a
// fork/join costs more than it saves, and spinning workers slow torch's own threads.
constexpr int64_t kWorkPerThread = int64_t(1) << 20;

// Up to kTile consecutive rows of one chunk: a decode row alone, a prefill chunk in tiles.
struct Tile {
    int64_t chunk, row0, rows;
};

template <typename Acc, typename Fn>
bool run_all(const PagedAttentionArgs& a, const std::vector<Tile>& tiles, int64_t max_context, int64_t work,
             Fn fn) {
    const int64_t items = (int64_t)tiles.size() * a.num_kv_heads, group = a.num_heads / a.num_kv_heads;
    const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(a.num_threads, work / kWorkPerThread));
    std::atomic<bool> ok{true};
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        std::vector<Acc> scores(kTile * group * max_context), acc(kTile * group * a.head_dim);
#pragma omp for schedule(dynamic, 4)
        for (int64_t item = 0; item < items; ++item) {
            const Tile& t = tiles[item / a.num_kv_heads];
            if (!fn(a, t.row0, t.rows, item % a.num_kv_heads, t.chunk, max_context, scores.data(), acc.data()))
                ok.store(false, std::memory_order_relaxed);
        }
    }
    return ok.load();
}

void store_kv(const PagedAttentionArgs& a) {
    const int64_t elem = a.dtype == AttnDtype::kFloat64 ? 8 : a.dtype == AttnDtype::kFloat32 ? 4 : 2;
    const int64_t row_bytes = a.num_kv_heads * a.head_dim * elem;
    const int64_t num_slots = a.num_blocks * a.block_size;
    for (int64_t r = 0; r < a.num_store_rows; ++r) {
        const int64_t slot = a.slot_mapping[r];
        if (slot < 0) continue;
        if (slot >= num_slots) throw std::out_of_range("paged_attention_cpu: a slot is outside the KV cache");
        std::memcpy(static_cast<char*>(const_cast<void*>(a.k_cache)) + slot * row_bytes,
                    static_cast<const char*>(a.k) + r * row_bytes, row_bytes);
        std::memcpy(static_cast<char*>(const_cast<void*>(a.v_cache)) + slot * row_bytes,
                    static_cast<const char*>(a.v) + r * row_bytes, row_bytes);
    }
}

}  // namespace

void paged_attention_cpu(const PagedAttentionArgs& a) {
    if (a.num_chunks < 0 || a.head_dim < 1 || a.block_size < 1 || a.num_kv_heads < 1 ||
        a.num_heads % a.num_kv_heads != 0)
        throw std::invalid_argument("paged_attention_cpu: bad sizes (heads must be a multiple of KV heads)");
    std::vector<Tile> tiles;
    int64_t max_context = 0, work = 0;
    for (int64_t b = 0; b < a.num_chunks; ++b) {
        const int64_t q_len = a.cu_seqlens_q[b + 1] - a.cu_seqlens_q[b];
        const int64_t context = a.context_lens[b];
        if (q_len < 0 || q_len > context || (context + a.block_size - 1) / a.block_size > a.max_blocks)
            throw std::invalid_argument("paged_attention_cpu: chunk " + std::to_string(b) + " has " +
                                        std::to_string(q_len) + " queries and " + std::to_string(context) +
                                        " keys, which its block table cannot hold");
        for (int64_t r = 0; r < q_len; r += kTile)
            tiles.push_back({b, a.cu_seqlens_q[b] + r, std::min(kTile, q_len - r)});
        max_context = std::max(max_context, context);
        work += q_len * (2 * context - q_len + 1) / 2;   // keys seen, summed over the chunk's rows
    }
    work *= 2 * a.num_heads * a.head_dim;   // q.k and p.v
    if (a.k != nullptr) store_kv(a);
    bool ok = true;
    switch (a.dtype) {
        case AttnDtype::kFloat32: ok = run_all<float>(a, tiles, max_context, work, attend_f32); break;
        case AttnDtype::kFloat64: ok = run_all<double>(a, tiles, max_context, work, attend_f64); break;
        case AttnDtype::kBFloat16: ok = run_all<float>(a, tiles, max_context, work, attend_bf16); break;
        default: throw std::invalid_argument("paged_attention_cpu: unsupported dtype");
    }
    if (!ok) throw std::out_of_range("paged_attention_cpu: a block table entry is outside the KV cache");
}

}  // namespace memgen
