// Small fused CPU ops of a decoder layer that torch runs as several kernels each
// (its RMSNorm on CPU is about ten): the residual add with RMSNorm, and SiLU-and-mul.
// float32 and bfloat16 (layers/norm.py and layers/linear.py call them; float64 keeps
// torch's ops, bit for bit HF's). They round where HF's modules round, so that
// bfloat16 results equal torch's up to the order of a sum.
#pragma once

#include <cstdint>

#include "cpu_attention.h"   // AttnDtype

namespace memgen {

// out[r] = weight * (h * rsqrt(mean(h^2) + eps)) for each of `rows` rows of `hidden`
// values, h = x[r]; with `residual` (not null) first residual[r] += x[r] in place
// and h = the new residual[r] (vLLM's fused_add_rms_norm). All contiguous.
void rms_norm_cpu(const void* x, void* residual, const void* weight, void* out, int64_t rows, int64_t hidden,
                  double eps, AttnDtype dtype);

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, width + i], i < width; gate_up is
// [rows, 2 * width], out [rows, width], both contiguous.
void silu_and_mul_cpu(const void* gate_up, void* out, int64_t rows, int64_t width, AttnDtype dtype);

// out[r] = the index of row r's largest of `width` float32 values, as torch.argmax gives
// it: the first of equal maxima, and the first NaN where a row has one. The greedy
// sampler's op: torch's took 0.14 ms a row of a 49k vocabulary on one thread, and 5 ms
// for 8 rows on 2 (its OpenMP team then waited on the linears' helper for the core).
void argmax_rows_f32(const float* x, int64_t rows, int64_t width, int64_t* out);

// out[i] = x[i] as float (exact), on the caller's thread: a bfloat16 model's logits for
// the sampler. torch's .float() of a [rows, vocab] tensor woke its OpenMP team, whose
// worker then spun on the core the next step's linears needed (19% of a bfloat16 batch-1
// step's CPU samples on 2 threads).
void bf16_to_f32(const uint16_t* x, int64_t n, float* out);

// One whole decoder layer (Llama / Qwen2 shape: no q/k norm, no LoRA) in one call, float32
// or bfloat16, on weights packed for cpu_gemm.h's linears: input norm (with the residual
// add), QKV, paged attention (K/V stored, rotary applied in it, or none: a NoPE layer),
// o_proj, post-attention norm (residual add), gate-up, SiLU-and-mul, down. The same
// kernels, in the same order, as the layer's ops called one by one from Python: bit for
// bit their result, without a Python round trip, a tensor and a dispatch per op (a decode
// step of a 30-layer model made ~300 such calls).
struct DecoderLayerArgs {
    const void* x;        // [rows, hidden]: the layer's input
    void* residual;       // [rows, hidden]: the residual stream, added to in place; null at layer 0
                          // (x is the residual then, and is added to in place)
    void* out;            // [rows, hidden]: the layer's output
    int64_t rows, hidden, inter, q_size, kv_size;
    const void *ln1, *ln2;   // the norms' weights [hidden]
    double eps;
    const void *qkv_w, *qkv_b, *o_w, *o_b, *gate_up_w, *gate_up_b, *down_w, *down_b;   // packed; biases or null
    PagedAttentionArgs attn;   // caches, chunks, heads, scale, rotary, dtype, threads (k, v, q, out set here)
};
void decoder_layer_cpu(const DecoderLayerArgs& a);

// A model's decoder layers in one call, each by decoder_layer_cpu in turn: layers[0]
// takes x as its input and as the residual stream (added to in place, as layer 0 alone
// does); layer i > 0 the output of layer i - 1. Outputs alternate between out[0] and
// out[1] (x, residual and out of `layers` are set here); returns the index of the last.
// A 30-layer decoding step then makes one call from Python instead of 30: each took
// ~0.1 ms of Python between layers whose weight stream had evicted its objects.
int decoder_layers_cpu(DecoderLayerArgs* layers, int64_t num_layers, void* x, void* const out[2]);

}  // namespace memgen
