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
// MEMGEN_CPU_ISA=avx512|avx2|baseline caps it).
const char* linear_isa();
// The one bfloat16 weights run on: "avx512_bf16" (vdpbf16ps) where the CPU has it
// (MEMGEN_CPU_ISA=avx512 leaves it out), else the float32 body's set, converting each
// weight to float as it reads it.
const char* linear_isa_bf16();

// Number of floats the packed form of a [K, N] matrix takes.
int64_t packed_size(int64_t K, int64_t N);

// w_t: W^T as stored, [K, N] row-major (Linear keeps [in, out] contiguous).
void pack_weight(const float* w_t, int64_t K, int64_t N, float* packed);

// Writes rows [col0, col0 + rows) of W (w: [rows, K] row-major, as HF stores a
// projection or a slice of a packed one) into a packed [K, N] matrix: loads straight
// into the panels, no plain copy first.
void pack_rows(const float* w, int64_t rows, int64_t K, int64_t N, int64_t col0, float* packed);

// x [M, K] row-major, y [M, N] row-major, bias [N] or null. Up to `num_threads`
// threads (the caller and a pool's helpers) share the call by chunks of panels (output
// columns), as many as its work pays for (linear_threads); every output is bit for bit
// the 1-thread result.
void packed_linear(const float* x, int64_t M, int64_t K, const float* packed, int64_t N, const float* bias,
                   float* y, int num_threads);

// bfloat16 weights (a bfloat16 model on the CPU): the same 16-column panels, each panel
// row holding a pair of k's per column, [ceil(N/16)][ceil(K/2)][16][2] (k even in the
// low half; a zero pads an odd K): one cache line per pair of k's. uint16_t: bfloat16
// bits. Sums in float32 (a pair: k + 1's product, then k's, as vdpbf16ps adds them),
// each output rounded to bfloat16 once; bias added in float32 before that rounding.
int64_t packed_size_bf16(int64_t K, int64_t N);   // uint16 elements
void pack_rows_bf16(const uint16_t* w, int64_t rows, int64_t K, int64_t N, int64_t col0, uint16_t* packed);
void packed_linear_bf16(const uint16_t* x, int64_t M, int64_t K, const uint16_t* packed, int64_t N,
                        const uint16_t* bias, uint16_t* y, int num_threads);

// Rows `ids` of W ([N, K]: W's row n is the packed matrix's column n) read back from its
// panels, float32 or bfloat16 (bf16): out [n, K] row-major. The tied LM head's panels
// serve the embedding lookup this way; an id outside [0, N) throws.
void unpack_rows(const void* packed, int64_t K, int64_t N, const int64_t* ids, int64_t n, void* out, bool bf16);

// How many threads packed_linear runs a call of these sizes on, given `num_threads`:
// 1 where the call is too small to pay for waking another, under the split rule:
// "stream" (default): a thread per ~20 us of estimated work (reading W and the sums),
// so a decode step's few-row calls split too; "sums": only 4M+ multiply-adds per
// thread; "off": 1.
int linear_threads(int64_t M, int64_t K, int64_t N, int num_threads);

// Runs fn(args, u0, u1) over [0, units) in chunks of per_chunk units on up to `threads`
// threads of the linears' pool: the caller starts at once and takes every chunk no
// helper has claimed (it waits only for chunks a helper is running; a helper that the
// kernel has not scheduled yet costs nothing); helpers spin briefly, then sleep. One
// caller at a time: another runs its call alone. (The CPU attention shares it.)
void parallel_chunks(void (*fn)(const void*, int64_t, int64_t), const void* args, int64_t units, int64_t per_chunk,
                     int threads);

// Asks the kernel to back [p, p + bytes) with transparent huge pages where it can (the
// 2 MiB-aligned part; madvise(MADV_HUGEPAGE), before the memory is first written): the
// weights' stream then crosses a page table entry per 2 MiB instead of per 4 KiB (a
// decode row's linears read 11-13 -> 15-17 GB/s on one thread here). False where the
// range holds no whole huge page or the kernel refused.
bool advise_huge_pages(void* p, int64_t bytes);

// The split rule, for the process (its first value: MEMGEN_LINEAR_SPLIT=sums|stream|off).
void set_linear_split(const char* mode);
const char* linear_split();

}  // namespace memgen
