// See cpu_gemm.h.
#include "cpu_gemm.h"

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
#include <vector>

#include <sched.h>
#include <unistd.h>

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
// A panel read once (`once`: its only row tile) by 1-3 rows is fetched non-temporally,
// so that streaming the weights does not evict what the step keeps (the KV cache, the
// activations); by 4 or more rows into the outer cache levels (prefetcht2): with the
// non-temporal hint an 8-row step's linears waited on the stream (SmolLM2, 1 thread,
// load ~1: a whole batch-8 decode step 51-53 -> 42-45 ms; 1-row steps gained nothing from
// it). A panel that more row tiles will read is fetched into the caches.
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
            __builtin_prefetch(p + kPanel * kPrefetchLines, 0, once ? (MR >= 4 ? 1 : 0) : 3);
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

// Rows per pass over the panels: a long prefill chunk runs in blocks of rows (W is
// streamed once per block, where each panel then serves 256 rows: the sums, not the
// stream, bound those passes).
constexpr int64_t kRowBlock = 256;

constexpr int64_t kGroup = 4;

template <typename V, int big>
inline __attribute__((always_inline)) void row_block(const float* xp, int64_t M, int64_t K, const float* packed,
                                                     int64_t N, const float* bias, float* y, int64_t p0,
                                                     int64_t p1) {
    const int64_t full = M / big * big, left = M - full, panel_size = K * kPanel;
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

// The panels [p0, p1) for all M rows, a block of kRowBlock rows at a time; xp holds every
// block's rows packed (pack_rows_x). A thread's share of a call is one such range:
// every output is one tile's sum in the order of k, whichever thread runs it.
template <typename V, int big>
inline __attribute__((always_inline)) void panels(const float* xp, int64_t M, int64_t K, const float* packed,
                                                  int64_t N, const float* bias, float* y, int64_t p0, int64_t p1) {
    for (int64_t r0 = 0; r0 < M; r0 += kRowBlock)
        row_block<V, big>(xp + r0 * K, std::min(kRowBlock, M - r0), K, packed, N, bias, y + r0 * N, p0, p1);
}

// x [M, K] into the tiles' order, block of kRowBlock rows by block (tiles of `big` rows).
void pack_rows_x(const float* x, int64_t M, int64_t K, int64_t big, float* xp) {
    for (int64_t r0 = 0; r0 < M; r0 += kRowBlock)
        pack_x(x + r0 * K, std::min(kRowBlock, M - r0), K, big, xp + r0 * K);
}

// One body per instruction set, picked at run time (never -march=native: the wheel
// runs on any x86-64). AVX-512 holds 16 rows of accumulators in its 32 registers: a
// 9-16-row step (decode rows and a catch-up chunk) reads W once, its sums overlapping
// the stream (16 rows: 3.0 -> 2.6 ms for the small model's layers, where two passes of
// 8 rows each waited on the stream or on the sums). AVX2 splits a panel row into two
// registers, so 6 rows fill its 16 (with the panel's two and a broadcast); the SSE2
// baseline into four, 2 rows.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target("avx512f,avx512vl,fma"))) void panels_avx512(const float* xp, int64_t M, int64_t K,
                                                                    const float* packed, int64_t N,
                                                                    const float* bias, float* y, int64_t p0,
                                                                    int64_t p1) {
    panels<v16, 16>(xp, M, K, packed, N, bias, y, p0, p1);
}
__attribute__((target("avx2,fma"))) void panels_avx2(const float* xp, int64_t M, int64_t K, const float* packed,
                                                     int64_t N, const float* bias, float* y, int64_t p0,
                                                     int64_t p1) {
    panels<v8, 6>(xp, M, K, packed, N, bias, y, p0, p1);
}
#define MEMGEN_GEMM_DISPATCH 1
#endif
void panels_baseline(const float* xp, int64_t M, int64_t K, const float* packed, int64_t N, const float* bias,
                     float* y, int64_t p0, int64_t p1) {
    panels<v4, 2>(xp, M, K, packed, N, bias, y, p0, p1);
}

using PanelsFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t,
                          int64_t);

struct Body {
    PanelsFn run;
    int64_t big;        // rows per full tile (pack_x's tiles)
    const char* name;
};

// The best body this CPU runs; MEMGEN_CPU_ISA=avx2|baseline asks for a lower one (tests
// run every body on one machine; an unknown or unsupported value is ignored).
Body pick_body() {
    const char* asked = std::getenv("MEMGEN_CPU_ISA");
    const std::string cap = asked != nullptr ? asked : "";
    const Body baseline{panels_baseline, 2, "baseline"};
    if (cap == "baseline") return baseline;
#ifdef MEMGEN_GEMM_DISPATCH
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (cap != "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
        return {panels_avx512, 16, "avx512"};
    if (avx2) return {panels_avx2, 6, "avx2"};
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
// tile's sum in the order of k whichever thread runs it: bit for bit the result of 1
// thread.
constexpr int64_t kChunkBytes = int64_t(64) << 10;

int64_t chunk_panels(int64_t K) {
    const int64_t group_bytes = kGroup * K * kPanel * int64_t(sizeof(float));
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

int64_t call_ns(int64_t M, int64_t K, int64_t N) {
    const int64_t bytes = (N + kPanel - 1) / kPanel * kPanel * K * int64_t(sizeof(float));
    return bytes / 25 + M * K * N / 50;
}

// The threads that share a linear call: the caller and up to num_threads - 1 helpers of
// this pool (its own, not OpenMP's team: an OpenMP region ends when every thread of the
// team has arrived, so on a busy machine a call waited for a helper that the kernel had
// not yet scheduled, often a whole time slice: a step's linears at 8-16 rows took 3-15x
// as long on 2 threads as on 1 at load 2 on 2 cores; 1.04-1.1x on this pool). Here the caller starts on the chunks at once and takes every chunk no
// helper has claimed; it waits only for chunks a helper is running. A helper spins a
// little after its last chunk (the next linear of a step may come soon), then sleeps on a
// condition variable: a sleeping helper costs the caller a notify, never a wait.
class LinearPool {
  public:
    struct Job {
        PanelsFn run;
        const float *xp, *packed, *bias;
        float* y;
        int64_t M, K, N, num_panels, per_chunk;
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
        // only chunks a helper claimed are left: they are running
        for (int spins = 0; done_.load(std::memory_order_acquire) < chunks; ++spins) {
            if (spins < 4096) __builtin_ia32_pause();
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
            j.run(j.xp, j.M, j.K, j.packed, j.N, j.bias, j.y, c * j.per_chunk,
                  std::min(j.num_panels, (c + 1) * j.per_chunk));
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

}  // namespace

const char* linear_isa() { return chosen_body().name; }

int linear_threads(int64_t M, int64_t K, int64_t N, int num_threads) {
    if (M < 1 || K < 1 || N < 1 || num_threads <= 1) return 1;
    const int64_t num_panels = (N + kPanel - 1) / kPanel;
    const int64_t chunks = (num_panels + chunk_panels(K) - 1) / chunk_panels(K);
    const int mode = split_mode();
    if (mode == 0) return 1;
    const int64_t worth = mode == 2 ? call_ns(M, K, N) / kNsPerThread : M * K * N / kMacsPerThread;
    return (int)std::max<int64_t>(1, std::min<int64_t>({num_threads, chunks, worth}));
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
    if (M == 0) return;
    const Body& body = chosen_body();
    const int64_t num_panels = (N + kPanel - 1) / kPanel;
    std::unique_ptr<float[]> x_tiles(new float[M * K]);
    float* xp = x_tiles.get();
    pack_rows_x(x, M, K, body.big, xp);
    const int threads = linear_threads(M, K, N, num_threads);
    if (threads == 1) {
        body.run(xp, M, K, packed, N, bias, y, 0, num_panels);
        return;
    }
    const int64_t per_chunk = chunk_panels(K);
    const int64_t chunks = (num_panels + per_chunk - 1) / per_chunk;
    const LinearPool::Job job{body.run, xp, packed, bias, y, M, K, N, num_panels, per_chunk};
    if (!LinearPool::get().run(job, chunks, threads)) body.run(xp, M, K, packed, N, bias, y, 0, num_panels);
}

}  // namespace memgen
