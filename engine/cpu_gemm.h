// The CPU linear layer of float32 models: y = x W^T + b with W prepacked once at load
// into 16-column panels, [ceil(N/16)][K][16] (the last panel zero-padded). A panel is
// read front to back, asked for 8 KiB ahead; a register tile of up to 16 rows (AVX-512;
// 6 with AVX2, 2 with SSE2) x 16 columns runs down K with one FMA per row per k, its rows of x
// packed k-major. MKL repacks W on every call, which at a decode step's few rows costs
// as much as the multiply: this is ~1.8x faster at 1-64 rows before prefetching, ~3.5x
// with it at 8 rows (bench/README.md, "The small model"), and W is stored once (the
// packed copy replaces it).
#pragma once

#include <cstdint>

namespace memgen {

// The instruction set packed_linear runs: "avx512", "avx2" or "baseline" (picked once;
// MEMGEN_CPU_ISA=avx2|baseline caps it).
const char* linear_isa();

// Number of floats the packed form of a [K, N] matrix takes.
int64_t packed_size(int64_t K, int64_t N);

// w_t: W^T as stored, [K, N] row-major (Linear keeps [in, out] contiguous).
void pack_weight(const float* w_t, int64_t K, int64_t N, float* packed);

// Writes rows [col0, col0 + rows) of W (w: [rows, K] row-major, as HF stores a
// projection or a slice of a packed one) into a packed [K, N] matrix: loads straight
// into the panels, no plain copy first.
void pack_rows(const float* w, int64_t rows, int64_t K, int64_t N, int64_t col0, float* packed);

// x [M, K] row-major, y [M, N] row-major, bias [N] or null. Up to `num_threads`
// OpenMP threads share the call by chunks of panels (output columns), as many as its
// work pays for (linear_threads); every output is bit for bit the 1-thread result.
void packed_linear(const float* x, int64_t M, int64_t K, const float* packed, int64_t N, const float* bias,
                   float* y, int num_threads);

// How many threads packed_linear runs a call of these sizes on, given `num_threads`:
// 1 where the call is too small to pay for waking another, under the split rule:
// "stream" (default): a thread per ~20 us of estimated work (reading W and the sums),
// so a decode step's few-row calls split too; "sums": only 4M+ multiply-adds per
// thread; "off": 1.
int linear_threads(int64_t M, int64_t K, int64_t N, int num_threads);

// The split rule, for the process (its first value: MEMGEN_LINEAR_SPLIT=sums|stream|off).
void set_linear_split(const char* mode);
const char* linear_split();

}  // namespace memgen
