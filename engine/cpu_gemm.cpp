// See cpu_gemm.h.
#include "cpu_gemm.h"
#include "cpu_math.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MEMGEN_DPBF16 1   // the avx512_bf16 body (vdpbf16ps, written as inline assembly)
#endif

namespace memgen {
namespace {

constexpr int64_t kPanel = 16;   // columns per panel: one AVX-512 register, two AVX2 ones, four SSE ones
typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
typedef uint32_t u16x32 __attribute__((vector_size(64)));   // 16 lanes of uint32
typedef uint32_t u8x32 __attribute__((vector_size(32)));
typedef uint32_t u4x32 __attribute__((vector_size(16)));

// The avx512_bf16 body's tag (vdpbf16ps: a pair of bfloat16 products per float lane).
struct Dot512 {};

using Bf16 = uint16_t;   // a bfloat16 model's elements, as bits

// How far ahead a tile asks for its panel: 8 KiB (128 cache lines). The hardware
// prefetcher alone leaves a decode step's few rows waiting on DRAM for W (a step's
// weights do not fit in the last-level cache); asking this far ahead halved the time of
// the small model's linear layers at 8 rows.
constexpr int64_t kPrefetchBytes = 8192;

// A body works in vectors V of the instruction set's width: a panel row is kParts<V>
// of them. (GCC lowers a 64-byte vector through the stack when the target has only
// 32-byte registers: the AVX2 body ran 5x slower than AVX-512 on one machine.)
template <typename V>
struct Vec {
    static constexpr int parts = int(kPanel * sizeof(float) / sizeof(V));
    static constexpr int lanes = int(sizeof(V) / sizeof(float));
    static constexpr int registers = sizeof(V) == 64 ? 32 : 16;
};
template <>
struct Vec<Dot512> {
    static constexpr int parts = 1, lanes = 16, registers = 32;
};
template <typename V>
using UVec = std::conditional_t<sizeof(V) == 64, u16x32, std::conditional_t<sizeof(V) == 32, u8x32, u4x32>>;

// Elements of a panel per step down K: a float32 panel takes one k per step (16
// floats), a bfloat16 panel a pair of k's (16 columns x 2: 32 values, one cache line).
template <typename T>
constexpr int64_t kStepElems = std::is_same_v<T, float> ? kPanel : 2 * kPanel;

inline float to_float(float x) { return x; }
inline float to_float(Bf16 x) { return bf16_to_float(x); }

// MR rows x NP neighbouring panels: acc[j][m] = bias + sum_k x[m, k] * panel_j[k, :]
// (a row's result does not depend on the rows beside it: every tile shape runs the
// same sums in the same order). The rows arrive k-major (xp[k * MR + m], see pack_x):
// one cache line of x per k.
// float32 panels: one FMA per row per k, in the order of k.
// bfloat16 panels, converted while read (a panel row holds k and k + 1 per column, as
// two halves of a 32-bit lane: << 16 and & 0xffff0000 give their float values exactly):
// k + 1's FMA, then k's, per pair: the order vdpbf16ps documents for its pair, so the
// avx512_bf16 body (Dot512: one vdpbf16ps per row per pair, x packed as pairs) takes the
// same sums up to its flushing of denormals.
// A float32 panel read once (`once`: its only row tile) by 1-3 rows is left to the
// hardware prefetcher: the packed weights are one sequential stream, and asking for it
// ahead (prefetchnta) cost 1 row 8% of its time (SmolLM2's linears, C++, medians of 8
// alternated pairs, 1 and 2 threads). A bfloat16 one, whose 1 row reads two panels at
// once, is fetched non-temporally, so that streaming the weights does not evict what the
// step keeps (the KV cache, the activations). By 4 or more rows, either type is fetched
// into the outer cache levels (prefetcht2): with the non-temporal hint an 8-row step's
// linears waited on the stream (SmolLM2, 1 thread, load ~1: a whole batch-8 decode step
// 51-53 -> 42-45 ms). A panel that more row tiles will read is fetched into the caches.
// A panel for a tile to fetch into L2 as it sums another: the lines first, first + every, ...
// (a step of any panel is one 64-byte line).
struct Ahead {
    const void* next = nullptr;
    int64_t first = 0, every = 1;
};

template <typename V, int MR, int NP, bool once, typename T>
inline __attribute__((always_inline)) void tile(const float* xp, int64_t steps, const T* panel, int64_t panel_size,
                                                const float* bias, T* y, int64_t ldy, int64_t cols,
                                                Ahead also = {}, bool resume = false) {
    constexpr int P = Vec<V>::parts, L = Vec<V>::lanes;
    [[maybe_unused]] constexpr int hint = once ? (MR >= 4 ? 1 : 0) : 3;
    constexpr int64_t ahead = kPrefetchBytes / int64_t(sizeof(T));
    using A = std::conditional_t<std::is_same_v<V, Dot512>, v16, V>;
    A acc[NP][MR][P];
    for (int j = 0; j < NP; ++j)
        for (int q = 0; q < P; ++q) {
            A b;
            std::memcpy(&b, bias + j * kPanel + q * L, sizeof b);
            for (int m = 0; m < MR; ++m) acc[j][m][q] = b;
        }
    if constexpr (std::is_same_v<T, float>)
        if (resume)   // the sums of the k's before these steps, from y (float32: exact)
            for (int j = 0; j < NP; ++j)
                for (int q = 0; q < P; ++q) {
                    const size_t c = size_t(std::clamp<int64_t>(cols - j * kPanel - q * L, 0, L));
                    for (int m = 0; m < MR; ++m)
                        if (c > 0) std::memcpy(&acc[j][m][q], y + m * ldy + j * kPanel + q * L, c * sizeof(float));
                }
    constexpr int64_t E = kStepElems<T>;
    const auto step = [&](int64_t s) __attribute__((always_inline)) {
        if constexpr (std::is_same_v<T, float>) {
            V w[NP][P];
            for (int j = 0; j < NP; ++j) {
                const float* p = panel + j * panel_size + s * E;
                if constexpr (!(once && MR < 4)) __builtin_prefetch(p + ahead, 0, hint);
                for (int q = 0; q < P; ++q) std::memcpy(&w[j][q], p + q * L, sizeof(V));
            }
#pragma GCC unroll 16
            for (int m = 0; m < MR; ++m) {
                const float xm = xp[s * MR + m];
                for (int j = 0; j < NP; ++j)
                    for (int q = 0; q < P; ++q) acc[j][m][q] += xm * w[j][q];
            }
        } else if constexpr (std::is_same_v<V, Dot512>) {
#ifdef MEMGEN_DPBF16
            u16x32 w[NP];
            for (int j = 0; j < NP; ++j) {
                const Bf16* p = panel + j * panel_size + s * E;
                __builtin_prefetch(p + ahead, 0, hint);
                std::memcpy(&w[j], p, sizeof w[j]);
            }
            const uint32_t* xq = reinterpret_cast<const uint32_t*>(xp);
#pragma GCC unroll 16
            for (int m = 0; m < MR; ++m) {
                const u16x32 xm = u16x32{} + xq[s * MR + m];   // the row's pair in every lane
                // the instruction itself: an intrinsic (or builtin) will not inline into this
                // template, which only its caller (panels_bf16_dot512) compiles for avx512_bf16
                for (int j = 0; j < NP; ++j) asm("vdpbf16ps %2, %1, %0" : "+v"(acc[j][m][0]) : "v"(xm), "v"(w[j]));
            }
#endif
        } else {
            using U = UVec<V>;
            V lo[NP][P], hi[NP][P];
            for (int j = 0; j < NP; ++j) {
                const Bf16* p = panel + j * panel_size + s * E;
                __builtin_prefetch(p + ahead, 0, hint);
                for (int q = 0; q < P; ++q) {
                    U u;
                    std::memcpy(&u, p + q * 2 * L, sizeof u);
                    lo[j][q] = (V)(u << 16);
                    hi[j][q] = (V)(u & 0xffff0000u);
                }
            }
#pragma GCC unroll 16
            for (int m = 0; m < MR; ++m) {
                const float x0 = xp[2 * s * MR + m], x1 = xp[(2 * s + 1) * MR + m];
                for (int j = 0; j < NP; ++j)
                    for (int q = 0; q < P; ++q) {
                        acc[j][m][q] += x1 * hi[j][q];
                        acc[j][m][q] += x0 * lo[j][q];
                    }
            }
        }
    };
    // two steps a turn, and the next panel's lines asked for by pointer: a 6-row step is
    // 12 FMAs, and the loop's own instructions (the counter, the fetch's address and
    // test) held a tile at 55-75% of the FMA rate
    const char* next = static_cast<const char*>(also.next);
    const char* next_end = next + (next != nullptr ? steps * 64 : 0);
    next += also.first * 64;
    const int64_t every = also.every * 64;
    int64_t s = 0;
    for (; s + 2 <= steps; s += 2) {
        if (next < next_end) {
            __builtin_prefetch(next, 0, 2);
            __builtin_prefetch(next + every, 0, 2);   // past the panel's end: the next one's line, or nothing
            next += 2 * every;
        }
        step(s);
        step(s + 1);
    }
    if (s < steps) {
        if (next < next_end) __builtin_prefetch(next, 0, 2);
        step(s);
    }
    for (int j = 0; j < NP; ++j)
        for (int q = 0; q < P; ++q) {
            // the padded last panel has fewer columns
            const int64_t c = std::min<int64_t>(L, cols - j * kPanel - q * L);
            for (int m = 0; m < MR; ++m) {
                T* dst = y + m * ldy + j * kPanel + q * L;
                if constexpr (std::is_same_v<T, float>) {
                    if (c == L) std::memcpy(dst, &acc[j][m][q], sizeof(A));
                    else if (c > 0) std::memcpy(dst, &acc[j][m][q], c * sizeof(float));
                } else {
                    alignas(64) float out[L];
                    std::memcpy(out, &acc[j][m][q], sizeof(A));
                    for (int64_t i = 0; i < c; ++i) dst[i] = float_to_bf16(out[i]);
                }
            }
        }
}

// The geometry of one call: `steps` down K per panel (K, or K/2 rounded up for
// bfloat16), `xk` packed x entries per row, `panel_size` elements of a panel.
struct Geom {
    int64_t steps, xk, panel_size;
};

// The last rows (fewer than a full tile) of NP panels in one pass: one row alone is
// one chain of dependent FMAs, as slow as a full tile, so a few rows take several
// panels at once to give the FMA units independent work.
template <typename V, int R, int NP, bool once, typename T>
inline __attribute__((always_inline)) void rest(int64_t rows, const float* xp, const Geom& g, const T* panel,
                                                const float* bias, T* y, int64_t ldy, int64_t cols,
                                                Ahead also = {}, bool resume = false) {
    if constexpr (R > 0) {
        if (rows == R) tile<V, R, NP, once>(xp, g.steps, panel, g.panel_size, bias, y, ldy, cols, also, resume);
        else rest<V, R - 1, NP, once>(rows, xp, g, panel, bias, y, ldy, cols, also, resume);
    }
}

// Rows [m0, M) of NP panels from column n0: the tail of a panel group.
template <typename V, int big, int NP, bool once, typename T>
inline __attribute__((always_inline)) void tail(const float* xp, int64_t M, int64_t m0, const Geom& g,
                                                const T* panel, int64_t N, const float* bias, T* y, int64_t n0) {
    const int64_t cols = std::min<int64_t>(NP * kPanel, N - n0);
    alignas(64) float bias_cols[NP * kPanel] = {};
    if (bias != nullptr) std::memcpy(bias_cols, bias + n0, cols * sizeof(float));
    rest<V, big, NP, once>(M - m0, xp + m0 * g.xk, g, panel, bias_cols, y + m0 * N + n0, N, cols);
}

// Do R rows of NP panels fit in the registers (accumulators and the panels' values)?
template <typename V, typename T>
constexpr bool fits(int R, int NP) {
    constexpr int w = std::is_same_v<T, float> || std::is_same_v<V, Dot512> ? 1 : 2;   // lo and hi
    return (R + w) * NP * Vec<V>::parts <= Vec<V>::registers - 2;
}

// A row block's tiles: as few as `big` rows allow, their heights balanced. (8 rows on
// AVX2 as 4 + 4, not 6 + 2: a 2-row tile keeps only 4 sums in flight, half what the FMA
// units take, and took as long as the 6-row one.) Which tile a row is in never changes
// its result: every tile runs a row's sums in the same order.
struct Tiles {
    int64_t count, base, extra;   // `extra` tiles of base + 1 rows, then tiles of base rows
    Tiles(int64_t M, int64_t big) : count((M + big - 1) / big), base(M / count), extra(M % count) {}
    int64_t rows(int64_t i) const { return base + (i < extra ? 1 : 0); }
    int64_t start(int64_t i) const { return i * base + std::min(i, extra); }
};

// x's rows in the tiles' order, each tile k-major: a tile then broadcasts its x values
// from one cache line per k instead of from a pointer per row (16 row pointers spill
// the general registers).
// float32: xp[k * rows + r]; bfloat16 converted to float (K padded to even with a zero);
// pairs (the avx512_bf16 body): xp[kp * rows + r] = x[r, 2kp] | x[r, 2kp + 1] << 16.
enum class XPack { kFloat, kFloatPairs, kBf16Pairs };

template <typename T>
void pack_x(const T* x, int64_t M, int64_t K, int64_t big, XPack how, int64_t xk, float* xp) {
    const Tiles tiles(M, big);
    for (int64_t i = 0; i < tiles.count; ++i) {
        const int64_t m0 = tiles.start(i), rows = tiles.rows(i);
        float* tile_x = xp + m0 * xk;
        for (int64_t r = 0; r < rows; ++r) {
            const T* xr = x + (m0 + r) * K;
            if (how == XPack::kBf16Pairs) {
                uint32_t* t = reinterpret_cast<uint32_t*>(tile_x);
                for (int64_t kp = 0; kp < xk; ++kp) {
                    uint32_t lo = 0, hi = 0;
                    if constexpr (!std::is_same_v<T, float>) {
                        lo = xr[2 * kp];
                        hi = 2 * kp + 1 < K ? xr[2 * kp + 1] : 0;
                    }
                    t[kp * rows + r] = lo | hi << 16;
                }
            } else {
                for (int64_t k = 0; k < K; ++k) tile_x[k * rows + r] = to_float(xr[k]);
                for (int64_t k = K; k < xk; ++k) tile_x[k * rows + r] = 0.0f;
            }
        }
    }
}

// Rows per pass over the panels: a long prefill chunk runs in blocks of rows (W is
// streamed once per block, where each panel then serves 256 rows: the sums, not the
// stream, bound those passes).
constexpr int64_t kRowBlock = 256;

constexpr int64_t kGroup = 4;

template <typename V, int big, typename T>
inline __attribute__((always_inline)) void row_block(const float* xp, int64_t M, const Geom& g, const T* packed,
                                                     int64_t N, const float* bias, T* y, int64_t p0, int64_t p1) {
    const Tiles tiles(M, big);
    const int64_t panel_size = g.panel_size;
    for (int64_t gr = p0; gr < p1; gr += kGroup) {
        const int64_t in_group = std::min(kGroup, p1 - gr);
        int64_t p = gr;
        const T* at = packed + p * panel_size;
        if (tiles.count == 1) {   // the panels' only pass, bound by reading W: read once
            if constexpr (!std::is_same_v<T, float> && !std::is_same_v<V, Dot512> && fits<V, T>(1, 2)) {
                // a bfloat16 pair is two dependent FMAs: two panels at a time keep the
                // chains short enough for one row to stream (AVX2 holds them for 1 row:
                // 1.1x its 1-row linears on 1 thread, 1.35x on 2, medians of 8 pairs)
                if (M <= (fits<V, T>(2, 2) ? 2 : 1))
                    for (; p + 2 <= gr + in_group; p += 2, at += 2 * panel_size)
                        tail<V, big, 2, true>(xp, M, 0, g, at, N, bias, y, p * kPanel);
            }
            for (; p < gr + in_group; ++p, at += panel_size) tail<V, big, 1, true>(xp, M, 0, g, at, N, bias, y, p * kPanel);
            continue;
        }
        // the first tile streams a panel into the caches, the others read it there and
        // meanwhile fetch the next panel between them: the stream goes on while they sum
        for (; p < gr + in_group; ++p, at += panel_size) {
            const int64_t n0 = p * kPanel, cols = std::min(kPanel, N - n0);
            alignas(64) float bias16[kPanel] = {};
            if (bias != nullptr) std::memcpy(bias16, bias + n0, cols * sizeof(float));
            if constexpr (std::is_same_v<T, float> && sizeof(V) == 32) {
                if (tiles.count == 2 && M <= 8) {
                    // AVX2's 7-8 rows (two tiles of 4): both tiles sum 128 steps of the panel
                    // (8 KiB) while it is in L1, then the next 128. The second tile read a whole
                    // panel (36 KiB for K = 576) back from L2, and with the next panel's
                    // fetches in flight its own reads waited: SmolLM2's linears at 8 rows, 2
                    // threads, weights on huge pages, 1.08-1.17x (medians of 6-8 alternated
                    // pairs); at 12 and 16 rows it lost (0.86x, 0.93x). Same sums in the same order.
                    constexpr int64_t kChunkSteps = 128;
                    for (int64_t s0 = 0; s0 < g.steps; s0 += kChunkSteps)
                        for (int64_t i = 0; i < 2; ++i) {
                            // steps [s0, s0 + n) of the panel; the tile's x is k-major
                            const int64_t m0 = tiles.start(i), rows = tiles.rows(i);
                            const Geom part{std::min(kChunkSteps, g.steps - s0), g.xk, panel_size};
                            rest<V, 4, 1, false>(rows, xp + m0 * g.xk + s0 * rows, part, at + s0 * kPanel, bias16,
                                                 y + m0 * N + n0, N, cols, Ahead{}, s0 > 0);
                        }
                    continue;
                }
            }
            for (int64_t i = 0; i < tiles.count; ++i) {
                const int64_t m0 = tiles.start(i);
                const Ahead also = i == 0 || p + 1 >= p1 ? Ahead{} : Ahead{at + panel_size, i - 1, tiles.count - 1};
                rest<V, big, 1, false>(tiles.rows(i), xp + m0 * g.xk, g, at, bias16, y + m0 * N + n0, N, cols, also);
            }
        }
    }
}

// The arguments of one packed call, shared by the threads that run its chunks.
struct PanelCall {
    const float* xp;
    int64_t M;
    Geom g;
    const void* packed;
    int64_t N;
    const float* bias;
    void* y;
};

// The panels [p0, p1) for all M rows, a block of kRowBlock rows at a time; xp holds every
// block's rows packed. A thread's share of a call is one such range: every output is one
// tile's sum in its fixed order, whichever thread runs it.
template <typename V, int big, typename T>
inline __attribute__((always_inline)) void panels(const void* args, int64_t p0, int64_t p1) {
    const PanelCall& c = *static_cast<const PanelCall*>(args);
    const T* packed = static_cast<const T*>(c.packed);
    T* y = static_cast<T*>(c.y);
    for (int64_t r0 = 0; r0 < c.M; r0 += kRowBlock)
        row_block<V, big>(c.xp + r0 * c.g.xk, std::min(kRowBlock, c.M - r0), c.g, packed, c.N, c.bias,
                          y + r0 * c.N, p0, p1);
}

// One body per instruction set, picked at run time (never -march=native: the wheel
// runs on any x86-64). AVX-512 holds 16 rows of accumulators in its 32 registers: a
// 9-16-row step (decode rows and a catch-up chunk) reads W once, its sums overlapping
// the stream (16 rows: 3.0 -> 2.6 ms for the small model's layers, where two passes of
// 8 rows each waited on the stream or on the sums). AVX2 splits a panel row into two
// registers, so 6 rows fill its 16 (with the panel's two and a broadcast); the SSE2
// baseline into four, 2 rows. bfloat16 panels need a second register per panel part
// (k and k + 1): 5 rows on AVX2; avx512_bf16 takes a pair in one instruction.
using RangeFn = void (*)(const void*, int64_t, int64_t);

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MEMGEN_GEMM_DISPATCH 1
#define MEMGEN_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,fma")))
#define MEMGEN_AVX512BF16 __attribute__((target("avx512f,avx512vl,avx512bw,avx512bf16,fma")))
#define MEMGEN_AVX2 __attribute__((target("avx2,fma")))
MEMGEN_AVX512 void panels_avx512(const void* a, int64_t p0, int64_t p1) { panels<v16, 16, float>(a, p0, p1); }
MEMGEN_AVX2 void panels_avx2(const void* a, int64_t p0, int64_t p1) { panels<v8, 6, float>(a, p0, p1); }
MEMGEN_AVX512BF16 void panels_bf16_dot512(const void* a, int64_t p0, int64_t p1) {
    panels<Dot512, 16, Bf16>(a, p0, p1);
}
MEMGEN_AVX512 void panels_bf16_avx512(const void* a, int64_t p0, int64_t p1) { panels<v16, 14, Bf16>(a, p0, p1); }
MEMGEN_AVX2 void panels_bf16_avx2(const void* a, int64_t p0, int64_t p1) { panels<v8, 5, Bf16>(a, p0, p1); }
#endif
void panels_baseline(const void* a, int64_t p0, int64_t p1) { panels<v4, 2, float>(a, p0, p1); }
void panels_bf16_baseline(const void* a, int64_t p0, int64_t p1) { panels<v4, 2, Bf16>(a, p0, p1); }

struct Body {
    RangeFn panels_f32, panels_bf16;
    int64_t big, big_bf16;   // rows per full tile (pack_x's tiles)
    XPack bf16_x;            // how the bfloat16 panels take x
    const char* name;
    const char* name_bf16;
};

// The best body this CPU runs; MEMGEN_CPU_ISA=avx512|avx2|baseline asks for a lower one
// (avx512: no avx512_bf16; tests run every body on one machine; an unknown or
// unsupported value is ignored).
Body pick_body() {
    const char* asked = std::getenv("MEMGEN_CPU_ISA");
    const std::string cap = asked != nullptr ? asked : "";
    const Body baseline{panels_baseline, panels_bf16_baseline, 2, 2, XPack::kFloatPairs, "baseline", "baseline"};
    if (cap == "baseline") return baseline;
#ifdef MEMGEN_GEMM_DISPATCH
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (cap != "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw")) {
        if (cap != "avx512" && __builtin_cpu_supports("avx512bf16"))
            return {panels_avx512, panels_bf16_dot512, 16, 16, XPack::kBf16Pairs, "avx512", "avx512_bf16"};
        return {panels_avx512, panels_bf16_avx512, 16, 14, XPack::kFloatPairs, "avx512", "avx512"};
    }
    if (avx2)
        return {panels_avx2, panels_bf16_avx2, 6, 5, XPack::kFloatPairs, "avx2", "avx2"};
#endif
    return baseline;
}

const Body& chosen_body() {
    static const Body body = pick_body();
    return body;
}

// Threads share a call by chunks of whole panel groups, about 64 KiB of W each or more:
// each thread takes the next chunk when it is done with one (a thread that starts late
// or is slowed by another process takes fewer), and every output column is one
// tile's sum in its fixed order whichever thread runs it: bit for bit the result of 1
// thread.
constexpr int64_t kChunkBytes = int64_t(64) << 10;

int64_t chunk_panels(int64_t K, int64_t elem) {
    const int64_t group_bytes = kGroup * K * kPanel * elem;
    return kGroup * std::max<int64_t>(1, kChunkBytes / group_bytes);
}

// When a call is worth more threads (set_linear_split, MEMGEN_LINEAR_SPLIT):
//  "stream" (the default): also the few-row calls that reading W bounds (a decode step's
//    1-16 rows): a thread per ~20 us of one core's estimated time, its weights' stream
//    (~25 GB/s) plus its sums (~100 GFLOP/s); a tiny linear stays on the caller.
//    On the shared 2-core development machine, 2 threads against 1 for whole SmolLM2
//    decode steps: batch 1 1.08-1.09x, batch 8 1.29-1.46x while the other core was
//    free; while it was not, 2 threads lost under either rule (0.92x / 0.67x here,
//    0.99x / 0.68x under "sums"): bench/README.md, "Decode rows across threads".
//  "sums": only where a call's multiply-adds pay, 2^22 (4M) per thread (about what the
//    OpenMP split before the pool did): prefill chunks and larger decode batches.
//  "off": 1 thread always.
std::atomic<int> g_split{-1};   // -1: not read from the environment yet

int split_mode() {
    int mode = g_split.load(std::memory_order_relaxed);
    if (mode >= 0) return mode;
    const char* v = std::getenv("MEMGEN_LINEAR_SPLIT");
    const std::string asked = v != nullptr ? v : "";
    mode = asked == "sums" ? 1 : asked == "off" ? 0 : 2;
    int expected = -1;
    g_split.compare_exchange_strong(expected, mode, std::memory_order_relaxed);
    return g_split.load(std::memory_order_relaxed);
}

constexpr int64_t kNsPerThread = 20000;
constexpr int64_t kMacsPerThread = int64_t(1) << 22;

int threads_for(int64_t M, int64_t K, int64_t N, int64_t elem, int64_t chunks, int num_threads) {
    if (M < 1 || K < 1 || N < 1 || num_threads <= 1) return 1;
    const int mode = split_mode();
    if (mode == 0) return 1;
    const int64_t bytes = (N + kPanel - 1) / kPanel * kPanel * K * elem;
    const int64_t worth = mode == 2 ? (bytes / 25 + M * K * N / 50) / kNsPerThread : M * K * N / kMacsPerThread;
    return (int)std::max<int64_t>(1, std::min<int64_t>({num_threads, chunks, worth}));
}

// The threads that share a linear call: the caller and up to num_threads - 1 helpers of
// this pool (its own, not OpenMP's team: an OpenMP region ends when every thread of the
// team has arrived, so on a busy machine a call waited for a helper that the kernel had
// not yet scheduled, often a whole time slice: a step's linears at 8-16 rows took 3-15x
// as long on 2 threads as on 1 at load 2 on 2 cores; 1.04-1.1x on this pool). Here the
// caller starts on the chunks at once and takes every chunk no helper has claimed; it
// waits only for chunks a helper is running. A helper spins a little after its last
// chunk (the next linear of a step may come soon), then sleeps on a condition variable:
// a sleeping helper costs the caller a notify, never a wait.
class LinearPool {
  public:
    struct Job {
        RangeFn run;
        const void* args;
        int64_t units, per_chunk;   // the call's units (panels, or W's rows) and units per chunk
    };

    // The process's pool (a new one after fork(): the parent's helpers do not exist there).
    static LinearPool& get() {
        static std::atomic<LinearPool*> pool{nullptr};
        static std::mutex made;
        LinearPool* p = pool.load(std::memory_order_acquire);
        if (p != nullptr && p->pid_ == getpid()) return *p;
        std::lock_guard<std::mutex> lock(made);
        p = pool.load(std::memory_order_relaxed);
        if (p == nullptr || p->pid_ != getpid()) {
            p = new LinearPool();   // never deleted: its helpers run until the process ends
            pool.store(p, std::memory_order_release);
        }
        return *p;
    }

    // Runs every chunk of `job` on the caller and up to threads - 1 helpers; false (nothing
    // done) when another caller holds the pool (the caller then runs it alone).
    bool run(const Job& job, int64_t chunks, int threads) {
        std::unique_lock<std::mutex> busy(caller_, std::try_to_lock);
        if (!busy.owns_lock() || chunks >= (int64_t(1) << 16)) return false;
        while ((int)helpers_.size() < threads - 1) {
            const int index = (int)helpers_.size();
            helpers_.emplace_back([this, index] { helper(index); });
            helpers_.back().detach();
        }
        job_ = job;
        limit_.store(threads, std::memory_order_relaxed);
        done_.store(0, std::memory_order_relaxed);
        const uint64_t gen = (gen_of(state_.load(std::memory_order_relaxed)) + 1) & 0xffffffffu;
        state_.store(make(gen, 0, chunks), std::memory_order_seq_cst);
        if (sleepers_.load(std::memory_order_seq_cst) > 0) {
            { std::lock_guard<std::mutex> lock(mu_); }
            cv_.notify_all();
        }
        work(gen);
        // only chunks a helper claimed are left: they are running (a helper the kernel
        // took off its core holds the caller until it runs again: yield the core to it)
        for (int spins = 0; done_.load(std::memory_order_acquire) < chunks; ++spins) {
            if (spins < 2048) __builtin_ia32_pause();
            else sched_yield();
        }
        return true;
    }

  private:
    LinearPool() : pid_(getpid()) {}

    static uint64_t make(uint64_t gen, int64_t next, int64_t total) {
        return gen << 32 | uint64_t(next) << 16 | uint64_t(total);
    }
    static uint64_t gen_of(uint64_t s) { return s >> 32; }
    static int64_t next_of(uint64_t s) { return int64_t(s >> 16 & 0xffff); }
    static int64_t total_of(uint64_t s) { return int64_t(s & 0xffff); }

    // Claim and run chunks of generation `gen` until none is left. A successful claim
    // proves the generation is still current, and it stays so until this thread
    // counts the chunk done: job_ is that generation's.
    void work(uint64_t gen) {
        for (;;) {
            uint64_t s = state_.load(std::memory_order_acquire);
            if (gen_of(s) != gen || next_of(s) >= total_of(s)) return;
            if (!state_.compare_exchange_weak(s, s + (uint64_t(1) << 16), std::memory_order_acq_rel)) continue;
            const Job& j = job_;
            const int64_t c = next_of(s);
            j.run(j.args, c * j.per_chunk, std::min(j.units, (c + 1) * j.per_chunk));
            done_.fetch_add(1, std::memory_order_release);
        }
    }

    void helper(int index) {
        uint64_t seen = gen_of(state_.load(std::memory_order_acquire));
        for (;;) {
            const auto start = std::chrono::steady_clock::now();
            uint64_t s;
            for (int spins = 0; gen_of(s = state_.load(std::memory_order_acquire)) == seen; ++spins) {
                if ((spins & 255) != 255 || std::chrono::steady_clock::now() - start < spin_time()) {
                    __builtin_ia32_pause();
                    continue;
                }
                std::unique_lock<std::mutex> lock(mu_);
                sleepers_.fetch_add(1, std::memory_order_seq_cst);
                cv_.wait(lock, [&] { return gen_of(state_.load(std::memory_order_seq_cst)) != seen; });
                sleepers_.fetch_sub(1, std::memory_order_relaxed);
            }
            seen = gen_of(s);
            if (index + 1 < limit_.load(std::memory_order_relaxed)) work(seen);
        }
    }

    // how long a helper spins for the next call before it sleeps (MEMGEN_LINEAR_SPIN_US,
    // default 20: at load 3 on 2 cores, 50 and 500 us of spinning made 2 threads slower)
    static std::chrono::microseconds spin_time() {
        static const std::chrono::microseconds spin{[] {
            const char* v = std::getenv("MEMGEN_LINEAR_SPIN_US");
            return v != nullptr ? std::max(0L, std::strtol(v, nullptr, 10)) : 20L;
        }()};
        return spin;
    }

    const pid_t pid_;
    std::mutex caller_;                    // one caller at a time
    std::vector<std::thread> helpers_;     // detached; only the caller holding caller_ adds
    Job job_{};
    std::atomic<uint64_t> state_{0};       // generation (32 bits), next chunk, chunks (16 bits each)
    std::atomic<int> limit_{1};            // threads this generation may use, caller included
    std::atomic<int64_t> done_{0};         // chunks of this generation finished
    std::atomic<int> sleepers_{0};
    std::mutex mu_;
    std::condition_variable cv_;
};

// Runs fn over [0, units) on up to `threads` threads, in chunks of `per_chunk` units.
void run_split(RangeFn fn, const void* args, int64_t units, int64_t per_chunk, int threads) {
    const int64_t chunks = (units + per_chunk - 1) / per_chunk;
    if (threads > 1 && LinearPool::get().run({fn, args, units, per_chunk}, chunks, threads)) return;
    fn(args, 0, units);
}

template <typename T>
void linear_panels(const T* x, int64_t M, int64_t K, const T* packed, int64_t N, const float* bias, T* y,
                   int num_threads) {
    const Body& body = chosen_body();
    const bool bf = !std::is_same_v<T, float>;
    const XPack how = bf ? body.bf16_x : XPack::kFloat;
    const int64_t half = (K + 1) / 2;
    const Geom g{bf ? half : K, how == XPack::kFloat ? K : how == XPack::kFloatPairs ? 2 * half : half,
                 (bf ? half : K) * kStepElems<T>};
    const int64_t big = bf ? body.big_bf16 : body.big;
    std::unique_ptr<float[]> x_tiles(new float[M * g.xk]);
    for (int64_t r0 = 0; r0 < M; r0 += kRowBlock)
        pack_x(x + r0 * K, std::min(kRowBlock, M - r0), K, big, how, g.xk, x_tiles.get() + r0 * g.xk);
    const PanelCall call{x_tiles.get(), M, g, packed, N, bias, y};
    const int64_t num_panels = (N + kPanel - 1) / kPanel, per_chunk = chunk_panels(K, sizeof(T));
    const int threads =
        threads_for(M, K, N, sizeof(T), (num_panels + per_chunk - 1) / per_chunk, num_threads);
    run_split(bf ? body.panels_bf16 : body.panels_f32, &call, num_panels, per_chunk, threads);
}

}  // namespace

void parallel_chunks(void (*fn)(const void*, int64_t, int64_t), const void* args, int64_t units, int64_t per_chunk,
                     int threads) {
    if (units <= 0) return;
    run_split(fn, args, units, std::max<int64_t>(1, per_chunk), threads);
}

bool advise_huge_pages(void* p, int64_t bytes) {
#ifdef MADV_HUGEPAGE
    constexpr uintptr_t kHuge = uintptr_t(2) << 20;
    const uintptr_t start = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + uintptr_t(std::max<int64_t>(0, bytes))) & ~(kHuge - 1);
    if (end <= start) return false;
    return madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE) == 0;
#else
    (void)p;
    (void)bytes;
    return false;
#endif
}

const char* linear_isa() { return chosen_body().name; }
const char* linear_isa_bf16() { return chosen_body().name_bf16; }

int linear_threads(int64_t M, int64_t K, int64_t N, int num_threads) {
    if (M < 1 || K < 1 || N < 1) return 1;
    const int64_t num_panels = (N + kPanel - 1) / kPanel, per_chunk = chunk_panels(K, sizeof(float));
    return threads_for(M, K, N, sizeof(float), (num_panels + per_chunk - 1) / per_chunk, num_threads);
}

void set_linear_split(const char* mode) {
    const std::string m = mode != nullptr ? mode : "";
    if (m != "sums" && m != "stream" && m != "off")
        throw std::invalid_argument("linear split: 'sums', 'stream' or 'off', got '" + m + "'");
    g_split.store(m == "sums" ? 1 : m == "off" ? 0 : 2, std::memory_order_relaxed);
}

const char* linear_split() {
    const int mode = split_mode();
    return mode == 1 ? "sums" : mode == 0 ? "off" : "stream";
}

int64_t packed_size(int64_t K, int64_t N) { return (N + kPanel - 1) / kPanel * kPanel * K; }

int64_t packed_size_bf16(int64_t K, int64_t N) { return (N + kPanel - 1) / kPanel * kPanel * ((K + 1) / 2 * 2); }

void pack_weight(const float* w_t, int64_t K, int64_t N, float* packed) {
    if (K < 1 || N < 1) throw std::invalid_argument("pack_weight: empty matrix");
    for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
        const int64_t cols = std::min(kPanel, N - n0);
        float* panel = packed + n0 * K;
        for (int64_t k = 0; k < K; ++k) {
            std::memcpy(panel + k * kPanel, w_t + k * N + n0, cols * sizeof(float));
            std::fill(panel + k * kPanel + cols, panel + (k + 1) * kPanel, 0.0f);
        }
    }
}

void pack_rows(const float* w, int64_t rows, int64_t K, int64_t N, int64_t col0, float* packed) {
    if (rows < 0 || K < 1 || col0 < 0 || col0 + rows > N) throw std::invalid_argument("pack_rows: rows outside W");
    for (int64_t n = 0; n < rows; ++n) {
        const int64_t col = col0 + n;
        float* dst = packed + col / kPanel * K * kPanel + col % kPanel;
        const float* src = w + n * K;
        for (int64_t k = 0; k < K; ++k) dst[k * kPanel] = src[k];
    }
}

void pack_rows_bf16(const uint16_t* w, int64_t rows, int64_t K, int64_t N, int64_t col0, uint16_t* packed) {
    if (rows < 0 || K < 1 || col0 < 0 || col0 + rows > N)
        throw std::invalid_argument("pack_rows_bf16: rows outside W");
    const int64_t Kp = (K + 1) / 2 * 2;
    for (int64_t n = 0; n < rows; ++n) {
        const int64_t col = col0 + n;
        uint16_t* dst = packed + col / kPanel * Kp * kPanel + col % kPanel * 2;
        const uint16_t* src = w + n * K;
        for (int64_t k = 0; k < K; ++k) dst[k / 2 * 2 * kPanel + k % 2] = src[k];
        if (K % 2) dst[K / 2 * 2 * kPanel + 1] = 0;
    }
}

void unpack_rows(const void* packed, int64_t K, int64_t N, const int64_t* ids, int64_t n, void* out, bool bf16) {
    if (K < 1 || N < 1 || n < 0) throw std::invalid_argument("unpack_rows: bad sizes");
    for (int64_t i = 0; i < n; ++i)
        if (ids[i] < 0 || ids[i] >= N) throw std::invalid_argument("unpack_rows: row outside W");
    const int64_t panel = bf16 ? (K + 1) / 2 * 2 * kPanel : K * kPanel;   // elements of a panel
    for (int64_t i = 0; i < n; ++i) {
        const int64_t col = ids[i], base = col / kPanel * panel;
        if (bf16) {   // a panel line holds a pair of k's per column
            const uint16_t* src = static_cast<const uint16_t*>(packed) + base + col % kPanel * 2;
            uint16_t* dst = static_cast<uint16_t*>(out) + i * K;
            for (int64_t k = 0; k < K; ++k) dst[k] = src[k / 2 * 2 * kPanel + k % 2];
        } else {
            const float* src = static_cast<const float*>(packed) + base + col % kPanel;
            float* dst = static_cast<float*>(out) + i * K;
            for (int64_t k = 0; k < K; ++k) dst[k] = src[k * kPanel];
        }
    }
}

void packed_linear(const float* x, int64_t M, int64_t K, const float* packed, int64_t N, const float* bias,
                   float* y, int num_threads) {
    if (M < 0 || K < 1 || N < 1) throw std::invalid_argument("packed_linear: bad sizes");
    if (M == 0) return;
    linear_panels(x, M, K, packed, N, bias, y, num_threads);
}

void packed_linear_bf16(const uint16_t* x, int64_t M, int64_t K, const uint16_t* packed, int64_t N,
                        const uint16_t* bias, uint16_t* y, int num_threads) {
    if (M < 0 || K < 1 || N < 1) throw std::invalid_argument("packed_linear_bf16: bad sizes");
    if (M == 0) return;
    std::vector<float> bias_f;
    if (bias != nullptr) {
        bias_f.resize(N);
        for (int64_t n = 0; n < N; ++n) bias_f[n] = bf16_to_float(bias[n]);
    }
    linear_panels(x, M, K, packed, N, bias != nullptr ? bias_f.data() : nullptr, y, num_threads);
}

}  // namespace memgen
