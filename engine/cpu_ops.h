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

}  // namespace memgen
