// See cpu_gemm.h.
#include "cpu_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#include <omp.h>

namespace memgen {
namespace {

constexpr int64_t kPanel = 16;   // columns per panel: one AVX-512 register, two AVX2 ones, four SSE ones
typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

// How far ahead a tile asks for its panel: 128 cache lines (8 KiB). The hardware
// prefetcher alone leaves a decode step's few rows waiting on DRAM for W (a step's
// weights do not fit in the last-level cache); asking this far ahead halved the time of
// the small model's linear layers at 8 rows.
constexpr int64_t kPrefetchLines = 128;

// A body works in vectors V of the instruction set's width: a panel row is kParts<V>
// of them. (GCC lowers a 64-byte vector through the stack when the target has only
// 32-byte registers: the AVX2 body ran 5x slower than AVX-512 on one machine.)
template <typename V>
constexpr int kParts = int(kPanel * sizeof(float) / sizeof(V));
template <typename V>
constexpr int kLanes = int(sizeof(V) / sizeof(float));
template <typename V>
constexpr int kRegisters = sizeof(V) == 64 ? 32 : 16;

// MR rows x NP neighbouring panels: acc[j][m] = bias + sum_k x[m, k] * panel_j[k, :],
// every sum in the order of k (a row's result does not depend on the rows beside it).
// The rows arrive k-major (xp[k * MR + m], see pack_x): one cache line of x per k.
// A panel read once (`once`: its only row tile) is fetched non-temporally, so that
// streaming the weights does not evict what the step keeps (the KV cache, the
// activations); a panel that more row tiles will read is fetched into the caches.
template <typename V, int MR, int NP, bool once>
inline __attribute__((always_inline)) void tile(const float* xp, int64_t K, const float* panel, const float* bias,
                                                float* y, int64_t ldy, int64_t cols) {
    constexpr int P = kParts<V>, L = kLanes<V>;
    V acc[NP][MR][P];
    for (int j = 0; j < NP; ++j)
        for (int q = 0; q < P; ++q) {
            V b;
            std::memcpy(&b, bias + j * kPanel + q * L, sizeof b);
            for (int m = 0; m < MR; ++m) acc[j][m][q] = b;
        }
    const int64_t panel_size = K * kPanel;
    for (int64_t k = 0; k < K; ++k) {
        V w[NP][P];
        for (int j = 0; j < NP; ++j) {
            const float* p = panel + j * panel_size + k * kPanel;
            __builtin_prefetch(p + kPanel * kPrefetchLines, 0, once ? 0 : 3);
            for (int q = 0; q < P; ++q) std::memcpy(&w[j][q], p + q * L, sizeof(V));
        }
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m) {
            const float xm = xp[k * MR + m];
            for (int j = 0; j < NP; ++j)
                for (int q = 0; q < P; ++q) acc[j][m][q] += xm * w[j][q];
        }
    }
    for (int j = 0; j < NP; ++j)
        for (int q = 0; q < P; ++q) {
            // the padded last panel has fewer columns
            const int64_t c = std::min<int64_t>(L, cols - j * kPanel - q * L);
            for (int m = 0; m < MR; ++m) {
                float* dst = y + m * ldy + j * kPanel + q * L;
                if (c == L) std::memcpy(dst, &acc[j][m][q], sizeof(V));
                else if (c > 0) std::memcpy(dst, &acc[j][m][q], c * sizeof(float));
            }
        }
}

// The last rows (fewer than a full tile) of NP panels in one pass: one row alone is
// one chain of dependent FMAs, as slow as a full tile, so a few rows take several
// panels at once to give the FMA units independent work.
template <typename V, int R, int NP, bool once>
inline __attribute__((always_inline)) void rest(int64_t rows, const float* xp, int64_t K, const float* panel,
                                                const float* bias, float* y, int64_t ldy, int64_t cols) {
    if constexpr (R > 0) {
        if (rows == R) tile<V, R, NP, once>(xp, K, panel, bias, y, ldy, cols);
        else rest<V, R - 1, NP, once>(rows, xp, K, panel, bias, y, ldy, cols);
    }
}

// Rows [m0, M) of NP panels from column n0: the tail of a panel group.
template <typename V, int big, int NP, bool once>
inline __attribute__((always_inline)) void tail(const float* xp, int64_t M, int64_t m0, int64_t K, const float* panel,
                                                int64_t N, const float* bias, float* y, int64_t n0) {
    const int64_t cols = std::min<int64_t>(NP * kPanel, N - n0);
    alignas(64) float bias_cols[NP * kPanel] = {};
    if (bias != nullptr) std::memcpy(bias_cols, bias + n0, cols * sizeof(float));
    rest<V, big, NP, once>(M - m0, xp + m0 * K, K, panel, bias_cols, y + m0 * N + n0, N, cols);
}

// Do R rows of NP panels fit in the registers (accumulators and the panels' values)?
template <typename V>
constexpr bool fits(int R, int NP) {
    return (R + 1) * NP * kParts<V> <= kRegisters<V> - 2;
}

// x's rows in the tiles' order, each tile k-major: a tile then broadcasts its x values
// from one cache line per k instead of from a pointer per row (16 row pointers spill
// the general registers). Tiles of `big` rows, then the last rows as one tile.
inline void pack_x(const float* x, int64_t M, int64_t K, int64_t big, float* xp) {
    for (int64_t m0 = 0; m0 < M; m0 += big) {
        const int64_t rows = std::min(big, M - m0);
        float* tile_x = xp + m0 * K;
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t k = 0; k < K; ++k) tile_x[k * rows + r] = x[(m0 + r) * K + k];
    }
}

// Rows per pass over the panels: a long prefill chunk runs in blocks of rows, so that
// its packed copy of x stays small (W is streamed once per block, where each panel
// then serves 256 rows: the sums, not the stream, bound those passes).
constexpr int64_t kRowBlock = 256;

// The panels [p0, p1) for up to kRowBlock rows, a group of kGroup panels at a time: row
// tiles of `big` rows (as many accumulators as the registers hold) panel by panel,
// then the group's last rows together (4 panels for 1-2 rows, 2 for 3-4, where the
// registers hold them).
constexpr int64_t kGroup = 4;

template <typename V, int big>
inline __attribute__((always_inline)) void row_block(const float* x, int64_t M, int64_t K, const float* packed,
                                                     int64_t N, const float* bias, float* y, int64_t p0,
                                                     int64_t p1) {
    const int64_t full = M / big * big, left = M - full, panel_size = K * kPanel;
    std::unique_ptr<float[]> x_tiles(new float[M * K]);
    float* xp = x_tiles.get();
    pack_x(x, M, K, big, xp);
    for (int64_t g = p0; g < p1; g += kGroup) {
        const int64_t in_group = std::min(kGroup, p1 - g);
        for (int64_t p = g; p < g + in_group && full > 0; ++p) {
            const int64_t n0 = p * kPanel;
            const int64_t cols = std::min(kPanel, N - n0);
            alignas(64) float bias16[kPanel] = {};
            if (bias != nullptr) std::memcpy(bias16, bias + n0, cols * sizeof(float));
            const float* panel = packed + p * panel_size;
            for (int64_t m = 0; m < full; m += big) {
                if (M == big) tile<V, big, 1, true>(xp, K, panel, bias16, y + n0, N, cols);   // the only tile
                else tile<V, big, 1, false>(xp + m * K, K, panel, bias16, y + m * N + n0, N, cols);
            }
        }
        if (left == 0) continue;
        int64_t p = g;
        const float* at = packed + p * panel_size;
        if (full == 0) {   // the panels' only pass, bound by reading W: one stream, read once
            for (; p < g + in_group; ++p, at += panel_size) tail<V, big, 1, true>(xp, M, 0, K, at, N, bias, y, p * kPanel);
            continue;
        }
        // the panels are in the cache now: their sums are the bound
        if constexpr (fits<V>(2, 4)) {
            if (left <= 2)
                for (; p + 4 <= g + in_group; p += 4, at += 4 * panel_size)
                    tail<V, big, 4, false>(xp, M, full, K, at, N, bias, y, p * kPanel);
        }
        if constexpr (fits<V>(4, 2)) {
            if (left <= 4)
                for (; p + 2 <= g + in_group; p += 2, at += 2 * panel_size)
                    tail<V, big, 2, false>(xp, M, full, K, at, N, bias, y, p * kPanel);
        }
        for (; p < g + in_group; ++p, at += panel_size) tail<V, big, 1, false>(xp, M, full, K, at, N, bias, y, p * kPanel);
    }
}

template <typename V, int big>
inline __attribute__((always_inline)) void panels(const float* x, int64_t M, int64_t K, const float* packed,
                                                  int64_t N, const float* bias, float* y, int64_t p0, int64_t p1) {
    for (int64_t r0 = 0; r0 < M; r0 += kRowBlock)
        row_block<V, big>(x + r0 * K, std::min(kRowBlock, M - r0), K, packed, N, bias, y + r0 * N, p0, p1);
}

// One body per instruction set, picked at run time (never -march=native: the wheel
// runs on any x86-64). AVX-512 holds 16 rows of accumulators in its 32 registers: a
// 9-16-row step (decode rows and a catch-up chunk) reads W once, its sums overlapping
// the stream (16 rows: 3.0 -> 2.6 ms for the small model's layers, where two passes of
// 8 rows each waited on the stream or on the sums). AVX2 splits a panel row into two
// registers, so 6 rows fill its 16 (with the panel's two and a broadcast); the SSE2
// baseline into four, 2 rows.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target("avx512f,avx512vl,fma"))) void panels_avx512(const float* x, int64_t M, int64_t K,
                                                                    const float* packed, int64_t N,
                                                                    const float* bias, float* y, int64_t p0,
                                                                    int64_t p1) {
    panels<v16, 16>(x, M, K, packed, N, bias, y, p0, p1);
}
__attribute__((target("avx2,fma"))) void panels_avx2(const float* x, int64_t M, int64_t K, const float* packed,
                                                     int64_t N, const float* bias, float* y, int64_t p0,
                                                     int64_t p1) {
    panels<v8, 6>(x, M, K, packed, N, bias, y, p0, p1);
}
#define MEMGEN_GEMM_DISPATCH 1
#endif
void panels_baseline(const float* x, int64_t M, int64_t K, const float* packed, int64_t N, const float* bias,
                     float* y, int64_t p0, int64_t p1) {
    panels<v4, 2>(x, M, K, packed, N, bias, y, p0, p1);
}

using PanelsFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t,
                          int64_t);

// The best body this CPU runs; MEMGEN_CPU_ISA=avx2|baseline asks for a lower one (tests
// run every body on one machine; an unknown or unsupported value is ignored).
PanelsFn pick_panels() {
    const char* asked = std::getenv("MEMGEN_CPU_ISA");
    const std::string cap = asked != nullptr ? asked : "";
    if (cap == "baseline") return panels_baseline;
#ifdef MEMGEN_GEMM_DISPATCH
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (cap != "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
        return panels_avx512;
    if (avx2) return panels_avx2;
#endif
    return panels_baseline;
}

PanelsFn chosen_panels() {
    static const PanelsFn run = pick_panels();
    return run;
}

// Below this many multiply-adds a second thread costs more than it saves.
constexpr int64_t kWorkPerThread = int64_t(1) << 21;

}  // namespace

const char* linear_isa() {
    const PanelsFn run = chosen_panels();
#ifdef MEMGEN_GEMM_DISPATCH
    if (run == panels_avx512) return "avx512";
    if (run == panels_avx2) return "avx2";
#endif
    (void)run;
    return "baseline";
}

int64_t packed_size(int64_t K, int64_t N) { return (N + kPanel - 1) / kPanel * kPanel * K; }

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

void packed_linear(const float* x, int64_t M, int64_t K, const float* packed, int64_t N, const float* bias,
                   float* y, int num_threads) {
    if (M < 0 || K < 1 || N < 1) throw std::invalid_argument("packed_linear: bad sizes");
    const PanelsFn run = chosen_panels();
    const int64_t num_panels = (N + kPanel - 1) / kPanel;
    const int threads = (int)std::max<int64_t>(
        1, std::min<int64_t>({num_threads, num_panels, M * K * N / kWorkPerThread}));
    if (threads == 1) {
        run(x, M, K, packed, N, bias, y, 0, num_panels);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        // contiguous ranges of panels: each thread streams its own part of W
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        const int64_t p0 = num_panels * t / n, p1 = num_panels * (t + 1) / n;
        run(x, M, K, packed, N, bias, y, p0, p1);
    }
}

}  // namespace memgen
