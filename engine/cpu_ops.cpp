// See cpu_ops.h.
#include "cpu_ops.h"
#include "cpu_gemm.h"
#include "cpu_math.h"

#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

namespace memgen {
namespace {

inline float round_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

// one body per instruction set, picked at run time (x86-64-v3: AVX2 + FMA; v4: AVX-512)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define MEMGEN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MEMGEN_CLONES
#endif

MEMGEN_CLONES void rms_norm_f32(const float* x, float* residual, const float* w, float* out, int64_t rows,
                                int64_t n, float eps) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * n;
        float* h = residual != nullptr ? residual + r * n : nullptr;
        if (h != nullptr) {
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) h[i] += xr[i];
            xr = h;
        }
        float sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; ++i) sum += xr[i] * xr[i];
        const float inv = 1.0f / std::sqrt(sum / float(n) + eps);
        float* o = out + r * n;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) o[i] = w[i] * (xr[i] * inv);
    }
}

MEMGEN_CLONES void rms_norm_bf16(const uint16_t* x, uint16_t* residual, const uint16_t* w, uint16_t* out,
                                 int64_t rows, int64_t n, float eps) {
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t* xr = x + r * n;
        uint16_t* h = residual != nullptr ? residual + r * n : nullptr;
        if (h != nullptr) {
            for (int64_t i = 0; i < n; ++i) h[i] = float_to_bf16(bf16_to_float(h[i]) + bf16_to_float(xr[i]));
            xr = h;
        }
        float sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; ++i) sum += bf16_to_float(xr[i]) * bf16_to_float(xr[i]);
        const float inv = 1.0f / std::sqrt(sum / float(n) + eps);
        uint16_t* o = out + r * n;
        // HF: weight * (h * inv).to(bfloat16), each product rounded to bfloat16
        for (int64_t i = 0; i < n; ++i)
            o[i] = float_to_bf16(bf16_to_float(w[i]) * round_bf16(bf16_to_float(xr[i]) * inv));
    }
}

MEMGEN_CLONES void silu_and_mul_f32(const float* gu, float* out, int64_t rows, int64_t width) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *g = gu + r * 2 * width, *u = g + width;
        float* o = out + r * width;
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) o[i] = g[i] / (1.0f + vexp(-g[i])) * u[i];
    }
}

MEMGEN_CLONES void silu_and_mul_bf16(const uint16_t* gu, uint16_t* out, int64_t rows, int64_t width) {
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t *g = gu + r * 2 * width, *u = g + width;
        uint16_t* o = out + r * width;
        for (int64_t i = 0; i < width; ++i) {   // silu rounds to bfloat16, then the product does
            const float x = bf16_to_float(g[i]);
            o[i] = float_to_bf16(round_bf16(x / (1.0f + vexp(-x))) * bf16_to_float(u[i]));
        }
    }
}

// a row's largest value in 8 lanes (the maximum is exact whatever the order), then its
// first index; a NaN anywhere makes the row's answer its first NaN
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

MEMGEN_CLONES int64_t argmax_row(const float* x, int64_t n) {
    f32x8 top = f32x8{} - INFINITY;
    i32x8 nan = {};
    const int64_t whole = n / 8 * 8;
    for (int64_t i = 0; i < whole; i += 8) {
        f32x8 v;
        std::memcpy(&v, x + i, sizeof v);
        nan |= v != v;
        top = v > top ? v : top;
    }
    float best = -INFINITY;
    bool has_nan = false;
    for (int l = 0; l < 8; ++l) {
        best = top[l] > best ? top[l] : best;
        has_nan |= nan[l] != 0;
    }
    for (int64_t i = whole; i < n; ++i) {
        has_nan |= x[i] != x[i];
        best = x[i] > best ? x[i] : best;
    }
    for (int64_t i = 0; i < n; ++i)
        if (has_nan ? x[i] != x[i] : x[i] == best) return i;
    return 0;
}

}  // namespace

void rms_norm_cpu(const void* x, void* residual, const void* weight, void* out, int64_t rows, int64_t hidden,
                  double eps, AttnDtype dtype) {
    if (rows < 0 || hidden < 1) throw std::invalid_argument("rms_norm_cpu: bad sizes");
    switch (dtype) {
        case AttnDtype::kFloat32:
            rms_norm_f32(static_cast<const float*>(x), static_cast<float*>(residual),
                         static_cast<const float*>(weight), static_cast<float*>(out), rows, hidden, float(eps));
            break;
        case AttnDtype::kBFloat16:
            rms_norm_bf16(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(residual),
                          static_cast<const uint16_t*>(weight), static_cast<uint16_t*>(out), rows, hidden,
                          float(eps));
            break;
        default: throw std::invalid_argument("rms_norm_cpu: float32 or bfloat16 only");
    }
}

void silu_and_mul_cpu(const void* gate_up, void* out, int64_t rows, int64_t width, AttnDtype dtype) {
    if (rows < 0 || width < 1) throw std::invalid_argument("silu_and_mul_cpu: bad sizes");
    switch (dtype) {
        case AttnDtype::kFloat32:
            silu_and_mul_f32(static_cast<const float*>(gate_up), static_cast<float*>(out), rows, width);
            break;
        case AttnDtype::kBFloat16:
            silu_and_mul_bf16(static_cast<const uint16_t*>(gate_up), static_cast<uint16_t*>(out), rows, width);
            break;
        default: throw std::invalid_argument("silu_and_mul_cpu: float32 or bfloat16 only");
    }
}

namespace {

void linear_any(const void* x, int64_t M, int64_t K, const void* w, int64_t N, const void* b, void* y, AttnDtype dt,
                int threads) {
    if (dt == AttnDtype::kFloat32)
        packed_linear(static_cast<const float*>(x), M, K, static_cast<const float*>(w), N,
                      static_cast<const float*>(b), static_cast<float*>(y), threads);
    else
        packed_linear_bf16(static_cast<const uint16_t*>(x), M, K, static_cast<const uint16_t*>(w), N,
                           static_cast<const uint16_t*>(b), static_cast<uint16_t*>(y), threads);
}

}  // namespace

void decoder_layer_cpu(const DecoderLayerArgs& a) {
    const AttnDtype dt = a.attn.dtype;
    if (dt != AttnDtype::kFloat32 && dt != AttnDtype::kBFloat16)
        throw std::invalid_argument("decoder_layer_cpu: float32 or bfloat16 only");
    if (a.rows < 0 || a.hidden < 1 || a.inter < 1 || a.q_size != a.attn.num_heads * a.attn.head_dim ||
        a.kv_size != a.attn.num_kv_heads * a.attn.head_dim)
        throw std::invalid_argument("decoder_layer_cpu: bad sizes");
    const int64_t N = a.rows, H = a.hidden, I = a.inter, Q = a.q_size, KV = a.kv_size, W = Q + 2 * KV;
    const int64_t elem = dt == AttnDtype::kFloat32 ? 4 : 2;
    const int threads = a.attn.num_threads;
    // the layer's intermediates, carved from one uninitialized buffer (every byte is written
    // before it is read), the thread's own up to 16 MB: six zero-filled vectors a layer were
    // 28 MB of memset a step at 32 rows (SmolLM2), the larger ones fresh from mmap each time
    const int64_t sizes[6] = {N * H, N * W, N * Q, N * H, N * 2 * I, N * I};
    const auto bytes = [elem](int64_t n) { return (n * elem + 63) / 64 * 64; };   // whole cache lines
    int64_t total = 64;   // room to align the first part
    for (const int64_t n : sizes) total += bytes(n);
    constexpr int64_t kKeep = int64_t(16) << 20;
    thread_local std::vector<char> kept;   // grows to the largest layer seen (zeroed then only)
    std::unique_ptr<char[]> own;           // a long prefill chunk's, for this layer
    if (total <= kKeep && int64_t(kept.size()) < total) kept.resize(total);
    if (total > kKeep) own.reset(new char[total]);
    char* const scratch = total <= kKeep ? kept.data() : own.get();
    char* parts[6];
    char* at = scratch + (64 - reinterpret_cast<uintptr_t>(scratch) % 64) % 64;
    for (int i = 0; i < 6; ++i) {
        parts[i] = at;
        at += bytes(sizes[i]);
    }
    char *const normed = parts[0], *const qkv = parts[1], *const attn = parts[2], *const o = parts[3],
                *const gu = parts[4], *const act = parts[5];
    void* residual = a.residual != nullptr ? a.residual : const_cast<void*>(a.x);
    rms_norm_cpu(a.x, a.residual, a.ln1, normed, N, H, a.eps, dt);
    linear_any(normed, N, H, a.qkv_w, W, a.qkv_b, qkv, dt, threads);
    PagedAttentionArgs p = a.attn;
    p.q = qkv;
    p.k = qkv + Q * elem;
    p.v = qkv + (Q + KV) * elem;
    p.num_store_rows = N;
    p.out = attn;
    p.q_row_stride = p.kv_row_stride = W;
    paged_attention_cpu(p);
    linear_any(attn, N, Q, a.o_w, H, a.o_b, o, dt, threads);
    rms_norm_cpu(o, residual, a.ln2, normed, N, H, a.eps, dt);
    linear_any(normed, N, H, a.gate_up_w, 2 * I, a.gate_up_b, gu, dt, threads);
    silu_and_mul_cpu(gu, act, N, I, dt);
    linear_any(act, N, I, a.down_w, H, a.down_b, a.out, dt, threads);
}

int decoder_layers_cpu(DecoderLayerArgs* layers, int64_t num_layers, void* x, void* const out[2]) {
    const void* input = x;
    for (int64_t i = 0; i < num_layers; ++i) {
        DecoderLayerArgs& a = layers[i];
        a.x = input;
        a.residual = i == 0 ? nullptr : x;
        a.out = out[i % 2];
        decoder_layer_cpu(a);
        input = a.out;
    }
    return int((num_layers - 1) % 2);
}

void argmax_rows_f32(const float* x, int64_t rows, int64_t width, int64_t* out) {
    if (width < 1) throw std::invalid_argument("argmax_rows_f32: a row needs at least one value");
    for (int64_t r = 0; r < rows; ++r) out[r] = argmax_row(x + r * width, width);
}

void bf16_to_f32(const uint16_t* x, int64_t n, float* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(x[i]);
}

}  // namespace memgen
