// Scalar helpers of the CPU kernels (cpu_attention.cpp, cpu_ops.cpp), written so that
// the loops around them vectorize: bfloat16 <-> float as torch rounds, and exp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace memgen {

inline float bf16_to_float(uint16_t bits) {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline uint16_t float_to_bf16(float x) {   // round to nearest even, as torch does
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);   // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

// e^x for float, clamped to [-87, 87] (no denormal or infinite results), where
// std::exp is a scalar call per element: x = n*ln2 + r (Cody-Waite), |r| <= ln2/2,
// and e^r's Taylor polynomial of degree 7; within 1.3 ulp of exp on [-87, 0] (checked
// against double exp at every float there).
inline float vexp(float x) {
    x = std::min(std::max(x, -87.0f), 87.0f);
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   // round to nearest (1.5 * 2^23)
    const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
    float p = 1.98412698e-4f;
    p = p * r + 1.38888889e-3f;
    p = p * r + 8.33333333e-3f;
    p = p * r + 4.16666667e-2f;
    p = p * r + 1.66666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits;
    std::memcpy(&bits, &p, sizeof bits);
    bits += int32_t(n) << 23;   // * 2^n
    std::memcpy(&p, &bits, sizeof p);
    return p;
}

}  // namespace memgen
