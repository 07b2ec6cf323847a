// See cpu_attention.h.
#include "cpu_attention.h"
#include "cpu_gemm.h"
#include "cpu_math.h"


#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace memgen {
namespace {

struct BF16 { uint16_t bits; };

inline float to_acc(BF16 x, float) { return bf16_to_float(x.bits); }
inline float to_acc(float x, float) { return x; }
inline double to_acc(double x, double) { return x; }

inline void store(float* dst, float x) { *dst = x; }
inline void store(double* dst, double x) { *dst = x; }
inline void store(BF16* dst, float x) { dst->bits = float_to_bf16(x); }

// the softmax's exp: vexp for float (std::exp is a scalar call per element, which
// alone cost as much as the dot products here); float64 keeps the reference's exp
inline float softmax_exp(float x) { return vexp(x); }
inline double softmax_exp(double x) { return std::exp(x); }   // float64: the reference's exp

// Four dot products of float rows at once, D a multiple of 8: vector partial sums, then
// one joint reduction (two rounds of shuffles) where four separate horizontal sums
// cost as much as the multiplies.
typedef float v8f __attribute__((vector_size(32)));

inline __attribute__((always_inline)) void dot4(const float* q, const float* k0, const float* k1, const float* k2,
                                                 const float* k3, int64_t D, float* out) {
    v8f a = {}, b = {}, c = {}, d = {};
    v8f qv, x0, x1, x2, x3;
    for (int64_t i = 0; i < D; i += 8) {
        std::memcpy(&qv, q + i, sizeof qv);
        std::memcpy(&x0, k0 + i, sizeof x0);
        std::memcpy(&x1, k1 + i, sizeof x1);
        std::memcpy(&x2, k2 + i, sizeof x2);
        std::memcpy(&x3, k3 + i, sizeof x3);
        a += qv * x0, b += qv * x1, c += qv * x2, d += qv * x3;
    }
    const v8f ab = __builtin_shufflevector(a, b, 0, 8, 1, 9, 4, 12, 5, 13) +
                   __builtin_shufflevector(a, b, 2, 10, 3, 11, 6, 14, 7, 15);
    const v8f cd = __builtin_shufflevector(c, d, 0, 8, 1, 9, 4, 12, 5, 13) +
                   __builtin_shufflevector(c, d, 2, 10, 3, 11, 6, 14, 7, 15);
    const v8f all = __builtin_shufflevector(ab, cd, 0, 1, 8, 9, 4, 5, 12, 13) +
                    __builtin_shufflevector(ab, cd, 2, 3, 10, 11, 6, 7, 14, 15);
    for (int i = 0; i < 4; ++i) out[i] = all[i] + all[i + 4];
}

constexpr int64_t kMaxRopeDim = 1024;   // head sizes the fused rotary takes

// HF's rotary embedding of one head: out = x*cos + rotate_half(x)*sin (within an ulp of
// torch's ops, which round each product: here the compiler may fuse one into an FMA).
inline void rotate(const float* x, const float* cos, const float* sin, int64_t D, float* out) {
    const int64_t half = D / 2;
    for (int64_t d = 0; d < half; ++d) out[d] = x[d] * cos[d] - x[d + half] * sin[d];
    for (int64_t d = half; d < D; ++d) out[d] = x[d] * cos[d] + x[d - half] * sin[d];
}

// Asks for the KV rows a tile will read (K's blocks, then V's) ahead of use. A step's
// weights have pushed the KV cache out of the caches by the time a layer attends, and
// the hardware prefetcher stops at each jump to another block. The lines are asked for
// a few at a time, as the work goes: a whole block's worth at once overflows the core's
// queue of outstanding misses (a cold 8-row decode call at 222 keys: 170 -> 90 us).
// The pace (a block's lines over its rounds of four keys, plus one line a round) keeps
// the asking about a block ahead of the reading.

struct KVPrefetcher {
    const char* k;
    const char* v;
    const int64_t* table;
    int64_t num_blocks, block_bytes, last_bytes;   // bytes of a block, of the last (partly filled) one
    int64_t next = 0, offset = 0;                  // the next line to ask for: stream block, byte in it

    void lines(int64_t n) {
        for (; n > 0 && next < 2 * num_blocks; --n) {
            const int64_t b = next < num_blocks ? next : next - num_blocks;
            __builtin_prefetch((next < num_blocks ? k : v) + table[b] * block_bytes + offset, 0, 3);
            offset += 64;
            if (offset >= (b + 1 == num_blocks ? last_bytes : block_bytes)) ++next, offset = 0;
        }
    }
    // at least up to the start of stream block `block`
    void until(int64_t block) {
        while (next < std::min(block, 2 * num_blocks)) lines(1);
    }
};

// Up to kTile consecutive query rows of one chunk, all heads: two passes over the keys
// the rows see (scores, then the softmax-weighted sum of values). A slot's K (or V)
// row holds every KV head side by side, so each pass reads the chunk's blocks front
// to back, each row once for all the rows' heads (row i stops at its own position).
// `qs` holds the tile's queries in Acc, pre-scaled (kTile * num_heads * head_dim),
// `scores` kTile * num_heads * stride entries, `acc` kTile * num_heads * head_dim.
constexpr int64_t kTile = 4;

template <typename T, typename Acc>
inline __attribute__((always_inline)) bool attend(const PagedAttentionArgs& a, int64_t row0, int64_t rows,
                                                  int64_t chunk, int64_t stride, Acc* qs, Acc* scores,
                                                  Acc* acc) {
    const int64_t D = a.head_dim, bs = a.block_size, H = a.num_heads, group = a.num_heads / a.num_kv_heads;
    const int64_t q_len = a.cu_seqlens_q[chunk + 1] - a.cu_seqlens_q[chunk];
    const int64_t first = a.context_lens[chunk] - q_len + (row0 - a.cu_seqlens_q[chunk]);  // row0's position
    const int64_t last = first + rows - 1;
    const int64_t pairs = rows * H;   // (row, head) pairs of this tile, row-major
    const int64_t slot_stride = a.num_kv_heads * D;
    const int64_t* table = a.block_tables + chunk * a.max_blocks;
    const Acc scale = Acc(a.scale);
    const int64_t q_stride = a.q_row_stride != 0 ? a.q_row_stride : H * D;
    for (int64_t p = 0; p < pairs; ++p) {
        const int64_t row = row0 + p / H;
        const T* q = static_cast<const T*>(a.q) + row * q_stride + (p % H) * D;
        if constexpr (std::is_same_v<Acc, float>) {
            if (a.rope_cos != nullptr) {   // bfloat16 rotated in float (the rotated q is not rounded)
                const float* qf = reinterpret_cast<const float*>(q);
                float q_float[kMaxRopeDim];
                if constexpr (!std::is_same_v<T, float>) {
                    for (int64_t d = 0; d < D; ++d) q_float[d] = to_acc(q[d], Acc());
                    qf = q_float;
                }
                rotate(qf, static_cast<const float*>(a.rope_cos) + row * D,
                       static_cast<const float*>(a.rope_sin) + row * D, D, qs + p * D);
                for (int64_t d = 0; d < D; ++d) qs[p * D + d] *= scale;
                continue;
            }
        }
        for (int64_t d = 0; d < D; ++d) qs[p * D + d] = to_acc(q[d], Acc()) * scale;
    }
    const int64_t num_keys = last + 1, num_blocks = (num_keys + bs - 1) / bs;
    for (int64_t b = 0; b < num_blocks; ++b) {
        const int64_t block = table[b];
        if (block < 0 || block >= a.num_blocks) return false;
    }

    // pass 1: scores, block by block (a block's keys are contiguous slots), four keys
    // at a time: four independent sums keep the FMA units busy where one is a latency chain
    const T* k_cache = static_cast<const T*>(a.k_cache);
    const T* v_cache = static_cast<const T*>(a.v_cache);
    const int64_t slot_bytes = slot_stride * int64_t(sizeof(T));
    KVPrefetcher ahead{reinterpret_cast<const char*>(k_cache), reinterpret_cast<const char*>(v_cache), table,
                       num_blocks, bs * slot_bytes, (num_keys - (num_blocks - 1) * bs) * slot_bytes};
    // lines to ask for per four keys of one head: a block's lines over its rounds, plus one
    const int64_t per_quad = (bs * slot_bytes / 64 + rows * H * ((bs + 3) / 4) - 1) / (rows * H * ((bs + 3) / 4)) + 1;
    for (int64_t b = 0; b < num_blocks; ++b) {
        const T* k_block = k_cache + table[b] * bs * slot_stride;
        const int64_t j0 = b * bs;
        ahead.until(b + 1);   // this block asked for (a no-op once the pace leads)
        for (int64_t r = 0; r < rows; ++r) {
            const int64_t j_end = std::min(j0 + bs, first + r + 1);   // row r sees keys up to its position
            for (int64_t h = 0; h < H && j_end > j0; ++h) {
                const T* k = k_block + (h / group) * D;
                const Acc* q = qs + (r * H + h) * D;
                Acc* s = scores + (r * H + h) * stride;
                int64_t j = j0;
                if constexpr (std::is_same_v<T, float>) {
                    if (D % 8 == 0) {
                        for (; j + 4 <= j_end; j += 4) {
                            const T* k0 = k + (j - j0) * slot_stride;
                            ahead.lines(per_quad);
                            dot4(q, k0, k0 + slot_stride, k0 + 2 * slot_stride, k0 + 3 * slot_stride, D, s + j);
                        }
                    }
                }
                for (; j + 4 <= j_end; j += 4) {
                    const T *k0 = k + (j - j0) * slot_stride, *k1 = k0 + slot_stride, *k2 = k1 + slot_stride,
                            *k3 = k2 + slot_stride;
                    ahead.lines(per_quad);
                    Acc s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
                    for (int64_t d = 0; d < D; ++d) {
                        s0 += q[d] * to_acc(k0[d], Acc());
                        s1 += q[d] * to_acc(k1[d], Acc());
                        s2 += q[d] * to_acc(k2[d], Acc());
                        s3 += q[d] * to_acc(k3[d], Acc());
                    }
                    s[j] = s0, s[j + 1] = s1, s[j + 2] = s2, s[j + 3] = s3;
                }
                for (; j < j_end; ++j) {
                    const T* kj = k + (j - j0) * slot_stride;
                    Acc s0 = 0;
#pragma omp simd reduction(+ : s0)
                    for (int64_t d = 0; d < D; ++d) s0 += q[d] * to_acc(kj[d], Acc());
                    s[j] = s0;
                }
            }
        }
    }
    for (int64_t p = 0; p < pairs; ++p) {
        const int64_t n = first + p / H + 1;   // keys this row sees
        Acc* sp = scores + p * stride;
        Acc max_score = -std::numeric_limits<Acc>::infinity();
        for (int64_t j = 0; j < n; ++j) max_score = std::max(max_score, sp[j]);
        Acc total = 0;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < n; ++j) {
            sp[j] = softmax_exp(sp[j] - max_score);
            total += sp[j];
        }
        const Acc inv = Acc(1) / total;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) sp[j] *= inv;
    }

    // pass 2: the probability-weighted sum of values, four value rows per update of
    // the accumulator (a quarter of its loads and stores)
    std::fill(acc, acc + pairs * D, Acc(0));
    for (int64_t b = 0; b < num_blocks; ++b) {
        const T* v_block = v_cache + table[b] * bs * slot_stride;
        const int64_t j0 = b * bs;
        ahead.until(num_blocks + b + 1);
        for (int64_t r = 0; r < rows; ++r) {
            const int64_t j_end = std::min(j0 + bs, first + r + 1);
            for (int64_t h = 0; h < H && j_end > j0; ++h) {
                const T* v = v_block + (h / group) * D;
                const Acc* w = scores + (r * H + h) * stride;
                Acc* o = acc + (r * H + h) * D;
                int64_t j = j0;
                for (; j + 4 <= j_end; j += 4) {
                    const T *v0 = v + (j - j0) * slot_stride, *v1 = v0 + slot_stride, *v2 = v1 + slot_stride,
                            *v3 = v2 + slot_stride;
                    const Acc w0 = w[j], w1 = w[j + 1], w2 = w[j + 2], w3 = w[j + 3];
                    ahead.lines(per_quad);
#pragma omp simd
                    for (int64_t d = 0; d < D; ++d)
                        o[d] += w0 * to_acc(v0[d], Acc()) + w1 * to_acc(v1[d], Acc()) +
                                w2 * to_acc(v2[d], Acc()) + w3 * to_acc(v3[d], Acc());
                }
                for (; j < j_end; ++j) {
                    const T* vj = v + (j - j0) * slot_stride;
                    const Acc wj = w[j];
#pragma omp simd
                    for (int64_t d = 0; d < D; ++d) o[d] += wj * to_acc(vj[d], Acc());
                }
            }
        }
    }
    T* out = static_cast<T*>(a.out) + row0 * H * D;
    for (int64_t i = 0; i < pairs * D; ++i) store(out + i, acc[i]);
    return true;
}

// The per-item entry points, compiled for several instruction sets and picked at run
// time (never -march=native: the wheel must run on any x86-64). x86-64-v3 is AVX2 with
// FMA (a plain "avx2" clone has no FMA); v4 adds AVX-512.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define MEMGEN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MEMGEN_CLONES
#endif

MEMGEN_CLONES bool attend_f32(const PagedAttentionArgs& a, int64_t row0, int64_t rows, int64_t chunk,
                              int64_t stride, float* q, float* s, float* acc) {
    return attend<float, float>(a, row0, rows, chunk, stride, q, s, acc);
}
MEMGEN_CLONES bool attend_f64(const PagedAttentionArgs& a, int64_t row0, int64_t rows, int64_t chunk,
                              int64_t stride, double* q, double* s, double* acc) {
    return attend<double, double>(a, row0, rows, chunk, stride, q, s, acc);
}
MEMGEN_CLONES bool attend_bf16(const PagedAttentionArgs& a, int64_t row0, int64_t rows, int64_t chunk,
                               int64_t stride, float* q, float* s, float* acc) {
    return attend<BF16, float>(a, row0, rows, chunk, stride, q, s, acc);
}

// Below this many multiply-adds per thread a step's attention runs on one thread: a
// fork/join costs more than it saves, and spinning workers slow torch's own threads.
constexpr int64_t kWorkPerThread = int64_t(1) << 20;

// Up to kTile consecutive rows of one chunk: a decode row alone, a prefill chunk in tiles.
struct Tile {
    int64_t chunk, row0, rows;
};

template <typename Acc, typename Fn>
struct RunAll {
    const PagedAttentionArgs* a;
    const std::vector<Tile>* tiles;
    int64_t max_context;
    Fn fn;
    std::atomic<bool>* ok;
};

// Tiles [t0, t1) with their own scratch: one chunk of the split.
template <typename Acc, typename Fn>
void run_tiles(const void* args, int64_t t0, int64_t t1) {
    const RunAll<Acc, Fn>& r = *static_cast<const RunAll<Acc, Fn>*>(args);
    const int64_t per_tile = kTile * r.a->num_heads;
    std::vector<Acc> q(per_tile * r.a->head_dim), scores(per_tile * r.max_context), acc(per_tile * r.a->head_dim);
    for (int64_t item = t0; item < t1; ++item) {
        const Tile& t = (*r.tiles)[item];
        if (!r.fn(*r.a, t.row0, t.rows, t.chunk, r.max_context, q.data(), scores.data(), acc.data()))
            r.ok->store(false, std::memory_order_relaxed);
    }
}

// The tiles on the linears' thread pool (cpu_gemm.h parallel_chunks), not an OpenMP team:
// an OpenMP region ends when every thread of its team has arrived, so while another
// process held a core a step waited for a worker the kernel had not scheduled yet; here
// the caller runs every chunk no helper has started.
template <typename Acc, typename Fn>
bool run_all(const PagedAttentionArgs& a, const std::vector<Tile>& tiles, int64_t max_context, int64_t work,
             Fn fn) {
    const int64_t items = (int64_t)tiles.size();
    const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(a.num_threads, work / kWorkPerThread));
    std::atomic<bool> ok{true};
    const RunAll<Acc, Fn> r{&a, &tiles, max_context, fn, &ok};
    // chunks of a few tiles: ~8 per thread, so a late or slowed thread takes fewer
    const int64_t per_chunk = std::max<int64_t>(1, items / (8 * std::max(1, threads)));
    parallel_chunks(run_tiles<Acc, Fn>, &r, items, per_chunk, threads);
    return ok.load();
}

void store_kv(const PagedAttentionArgs& a) {
    const int64_t elem = a.dtype == AttnDtype::kFloat64 ? 8 : a.dtype == AttnDtype::kFloat32 ? 4 : 2;
    const int64_t row = a.num_kv_heads * a.head_dim;   // elements of a slot (and of a contiguous input row)
    const int64_t stride = a.kv_row_stride != 0 ? a.kv_row_stride : row;
    const int64_t num_slots = a.num_blocks * a.block_size;
    char* k_cache = static_cast<char*>(const_cast<void*>(a.k_cache));
    char* v_cache = static_cast<char*>(const_cast<void*>(a.v_cache));
    for (int64_t r = 0; r < a.num_store_rows; ++r) {
        const int64_t slot = a.slot_mapping[r];
        if (slot < 0) continue;
        if (slot >= num_slots) throw std::out_of_range("paged_attention_cpu: a slot is outside the KV cache");
        const char* k = static_cast<const char*>(a.k) + r * stride * elem;
        if (a.rope_cos != nullptr) {   // float32 or bfloat16 (checked by the caller); cos/sin float32
            const float* cos = static_cast<const float*>(a.rope_cos) + r * a.head_dim;
            const float* sin = static_cast<const float*>(a.rope_sin) + r * a.head_dim;
            for (int64_t h = 0; h < a.num_kv_heads; ++h) {
                if (a.dtype == AttnDtype::kFloat32) {
                    rotate(reinterpret_cast<const float*>(k) + h * a.head_dim, cos, sin, a.head_dim,
                           reinterpret_cast<float*>(k_cache + slot * row * elem) + h * a.head_dim);
                    continue;
                }
                // bfloat16: rotated in float, rounded once into the cache
                float in[kMaxRopeDim], out[kMaxRopeDim];
                const uint16_t* kh = reinterpret_cast<const uint16_t*>(k) + h * a.head_dim;
                for (int64_t d = 0; d < a.head_dim; ++d) in[d] = bf16_to_float(kh[d]);
                rotate(in, cos, sin, a.head_dim, out);
                uint16_t* dst = reinterpret_cast<uint16_t*>(k_cache + slot * row * elem) + h * a.head_dim;
                for (int64_t d = 0; d < a.head_dim; ++d) dst[d] = float_to_bf16(out[d]);
            }
        } else {
            std::memcpy(k_cache + slot * row * elem, k, row * elem);
        }
        std::memcpy(v_cache + slot * row * elem, static_cast<const char*>(a.v) + r * stride * elem, row * elem);
    }
}

}  // namespace

void paged_attention_cpu(const PagedAttentionArgs& a) {
    if (a.num_chunks < 0 || a.head_dim < 1 || a.block_size < 1 || a.num_kv_heads < 1 ||
        a.num_heads % a.num_kv_heads != 0)
        throw std::invalid_argument("paged_attention_cpu: bad sizes (heads must be a multiple of KV heads)");
    if ((a.rope_cos != nullptr) != (a.rope_sin != nullptr) ||
        (a.rope_cos != nullptr && (a.dtype == AttnDtype::kFloat64 || a.head_dim % 2 != 0 ||
                                   a.head_dim > kMaxRopeDim)))
        throw std::invalid_argument("paged_attention_cpu: rotary takes cos and sin (float32), float32 or "
                                    "bfloat16 rows, an even head size up to 1024");
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
